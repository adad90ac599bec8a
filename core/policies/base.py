"""Policy protocols, shared helpers and the bundle the simulator and the live runtime call.

Hooks (faas-sim style lifecycle callbacks) return lists of actions; most return the
empty tuple. Every hook receives the `ClusterView`, whose `now_s` is the only clock a
policy may read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from core.decisions import Action, Copy, Decision, Evict, StopInstance
from core.engine_start import EngineStartOptions, options_from
from core.state import ClusterView, InstanceState, NodeState

NO_ACTIONS: tuple[Action, ...] = ()


class RequestView(Protocol):
    """What a policy may read of a request.

    Optional (read with ``getattr(req, "prefix_blocks", ())``, as `core.policies.prefix_aware` does):
    ``prefix_blocks``, the prompt's chained block ids for prefix caching (the simulator's from the trace's
    ``hash_ids``, the live gateway's from the prompt text); empty when unknown.
    """

    id: int
    model: str
    tenant: str
    prompt_tokens: int
    output_tokens: int
    arrival_s: float


class Placement(Protocol):
    def place(self, req: RequestView, view: ClusterView) -> Decision: ...


class Hooks:
    """Lifecycle hooks shared by caching and autoscaling policies; the defaults do nothing."""

    tick_s: float | None = None

    def on_arrival(self, req: RequestView, view: ClusterView) -> Sequence[Action]:
        return NO_ACTIONS

    def on_load_started(self, inst: InstanceState, view: ClusterView) -> Sequence[Action]:
        return NO_ACTIONS

    def on_load_done(self, inst: InstanceState, view: ClusterView) -> Sequence[Action]:
        return NO_ACTIONS

    def on_idle(self, inst: InstanceState, view: ClusterView) -> Sequence[Action]:
        return NO_ACTIONS

    def on_gpu_pressure(self, node: str, model: str, view: ClusterView) -> Sequence[Action]:
        """An instance of `model` must start on `node` and its GPUs are full."""
        return NO_ACTIONS

    def on_tick(self, view: ClusterView) -> Sequence[Action]:
        return NO_ACTIONS


# --------------------------------------------------------------------------- helpers
def pick_instance(insts: Sequence[InstanceState]) -> InstanceState | None:
    """The live instance a new request should join: a ready one with a free slot (least busy),
    else a loading one with room, else the one with the shortest queue."""
    best = None
    best_key = None
    for inst in insts:
        st = inst.status
        if st == "ready":
            if inst.waiting == 0 and inst.active < inst.max_num_seqs:
                key = (0, inst.active)
            else:
                key = (2, inst.waiting)
        elif st == "loading":
            routed = inst.waiting
            key = (1, routed) if routed < inst.max_num_seqs else (2, routed - inst.max_num_seqs)
        else:
            continue
        if best_key is None or key < best_key:
            best, best_key = inst, key
    return best


def queue_excess(insts: Sequence[InstanceState]) -> tuple[int, int]:
    """(requests beyond capacity, live instances). Loading instances count as coming capacity."""
    excess = 0
    n = 0
    for inst in insts:
        if inst.status == "ready":
            excess += inst.waiting
            n += 1
        elif inst.status == "loading":
            excess += max(0, inst.waiting - inst.max_num_seqs)
            n += 1
    return excess, n


def node_can_host(node: NodeState, model_name: str, view: ClusterView, *, allow_evict: bool) -> bool:
    """True if `node` has GPU room for an instance of `model_name` now, or after stopping idle ones."""
    if not node.up:
        return False
    n, per_gpu, _ = node.footprint(view.model(model_name))
    if node.gpu_fit(per_gpu * n, per_gpu) is not None:
        return True
    if not allow_evict:
        return False
    # pretend every idle instance is gone
    free = list(node.gpu_free_bytes)
    for inst in node.instances.values():
        if inst.idle:
            share = inst.gpu_bytes / len(inst.gpu_ids)
            for g in inst.gpu_ids:
                free[g] += share
    return _fits(free, n, per_gpu)


def _fits(free: Sequence[float], n: int, per_gpu: float) -> bool:
    return sum(1 for f in free if f + 1e-6 >= per_gpu) >= n


def lru_idle_stops(
    node: str, model: str, view: ClusterView, demote_to: str | None = None
) -> list[StopInstance]:
    """Stop idle instances on `node`, least recently used first, until an instance of `model` fits.

    With `demote_to`, an instance whose model is not already in that tier is written there first.
    Returns nothing if stopping every idle instance would still not make room.
    """
    ns = view.nodes[node]
    n, per_gpu, _ = ns.footprint(view.model(model))
    free = list(ns.gpu_free_bytes)
    if _fits(free, n, per_gpu):
        return []
    idle = sorted((i for i in ns.instances.values() if i.idle), key=lambda i: (i.last_used_s, i.id))
    out: list[StopInstance] = []
    for inst in idle:
        share = inst.gpu_bytes / len(inst.gpu_ids)
        for g in inst.gpu_ids:
            free[g] += share
        tier = None
        if demote_to is not None and demote_to in ns.tiers:
            t = ns.tiers[demote_to]
            if not t.holds(inst.model.name) and not t.incoming(inst.model.name):
                tier = demote_to
        out.append(StopInstance(inst.id, reason="gpu_pressure", demote_to=tier))
        if _fits(free, n, per_gpu):
            return out
    return []


def make_room(
    node: NodeState, tier: str, need_bytes: float, protect: frozenset[str] = frozenset()
) -> list[Evict] | None:
    """LRU evictions in `tier` so that `need_bytes` fit; None if even emptying it would not do."""
    t = node.tiers.get(tier)
    if t is None or need_bytes > t.capacity_bytes - t.reserved_bytes:
        return None
    free = t.free_bytes
    out: list[Evict] = []
    for m in t.lru_order():
        if free >= need_bytes:
            break
        if m in protect:
            continue
        free += t.entries[m].bytes
        out.append(Evict(m, node.name, tier))
    return out if free >= need_bytes else None


def copy_with_room(node: NodeState, model: str, nbytes: float, tier: str, kind: str) -> list[Action]:
    """Evictions (LRU) plus the copy of `model` into `tier`, or nothing if it cannot fit or is there."""
    t = node.tiers.get(tier)
    if t is None or t.holds(model) or t.incoming(model):
        return []
    ev = make_room(node, tier, nbytes, protect=frozenset({model}))
    if ev is None:
        return []
    return [*ev, Copy(model, node.name, tier, kind=kind)]


class PolicyBundle:
    """Placement x caching x autoscaling, plus loader settings, as one object both worlds call."""

    def __init__(
        self,
        placement: Placement,
        caching: Hooks,
        autoscaling: Hooks,
        name: str = "custom",
        progressive: bool = False,
        engine_start: Mapping[str, Any] | EngineStartOptions | None = None,
        variants: Any = None,
    ) -> None:
        self.name = name
        # which weight variant serves a request (core.policies.variants; None: the requested deployment)
        self.variants = variants
        # engine pools / GPU snapshots (checked here, so a bad config fails when the bundle is built)
        self.engine_start: EngineStartOptions = options_from(engine_start)
        self.placement = placement
        self.caching = caching
        self.autoscaling = autoscaling
        self.progressive = progressive
        bind = getattr(placement, "bind", None)
        if bind is not None:
            bind(autoscaling)
        ticks = [t for t in (caching.tick_s, autoscaling.tick_s) if t]
        self.tick_s: float | None = min(ticks) if ticks else None
        self._hooks = (caching, autoscaling)

    def place(self, req: RequestView, view: ClusterView) -> Decision:
        return self.placement.place(req, view)

    def pick_variant(self, req: RequestView, view: ClusterView) -> str:
        """The deployment that serves `req`: its own, or the variant the bundle's variant policy picks."""
        return req.model if self.variants is None else self.variants.pick(req, view)

    def _both(self, name: str, *args: object) -> list[Action]:
        out: list[Action] = []
        for h in self._hooks:
            acts = getattr(h, name)(*args)
            if acts:
                out.extend(acts)
        return out

    def on_arrival(self, req: RequestView, view: ClusterView) -> list[Action]:
        a = self.caching.on_arrival(req, view)
        b = self.autoscaling.on_arrival(req, view)
        if not a and not b:
            return []
        return [*a, *b]

    def on_load_started(self, inst: InstanceState, view: ClusterView) -> list[Action]:
        return self._both("on_load_started", inst, view)

    def on_load_done(self, inst: InstanceState, view: ClusterView) -> list[Action]:
        return self._both("on_load_done", inst, view)

    def on_idle(self, inst: InstanceState, view: ClusterView) -> list[Action]:
        return self._both("on_idle", inst, view)

    def on_gpu_pressure(self, node: str, model: str, view: ClusterView) -> list[Action]:
        return self._both("on_gpu_pressure", node, model, view)

    def on_tick(self, view: ClusterView) -> list[Action]:
        return self._both("on_tick", view)
