"""How the simulated world executes a policy's actions: tier copies through the fabric, evictions (never of a
copy a load is reading), instance starts and stops. A mixin of `sim.world.World`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from core.decisions import Action, Copy, Evict, StartInstance, StopInstance
from core.loadtime import copy_hop
from core.specs import LOCAL_TIERS
from sim.fabric import Flow

if TYPE_CHECKING:
    from sim.world import World


class PolicyError(RuntimeError):
    """A policy returned something the world cannot execute (names the policy and the decision)."""


class Actions:
    """`World`'s execution of actions: `_execute` dispatches, `_copy` and `_evict` move tier contents."""

    def _execute(self: World, acts: Iterable[Action], staged: tuple[str, str] | None = None) -> None:
        for a in acts:
            kind = type(a)
            if kind is Copy:
                self._copy(a, src="host" if staged == (a.node, a.model) else None)
            elif kind is Evict:
                self._evict(a)
            elif kind is StartInstance:
                if a.node in self.state.nodes and a.model in self.state.models:
                    self._start_instance(a.model, a.node, a.source_tier, reason=a.reason)
            elif kind is StopInstance:
                inst = self.state.instances.get(a.instance_id)
                if inst is not None and inst.idle:
                    self.stops.stop(inst, a.reason, a.demote_to)
            else:
                raise PolicyError(f"policy {self.policy.name!r} returned {a!r}, not an action")

    def _copy(self: World, mv: Copy, src: str | None = None, on_done: Callable[[], None] | None = None) -> bool:
        """Start the copy `mv` (from `src`, or the fastest holder); False if it is not needed or cannot start.
        `on_done` runs when it lands (not if its node is lost meanwhile)."""
        ns = self.state.nodes.get(mv.node)
        if ns is None or mv.to_tier not in ns.tiers or mv.model not in self.state.models:
            raise PolicyError(f"policy {self.policy.name!r}: cannot execute {mv}")
        tier = ns.tiers[mv.to_tier]
        model = self.state.models[mv.model]
        if not ns.up or tier.holds(mv.model) or tier.incoming(mv.model) or tier.free_bytes < model.weights_bytes:
            return False
        if src is None:
            src = ns.tier_holding(mv.model) or "cloud"
            if src == mv.to_tier:
                return False
        store = self.cluster.store
        if src == "cloud":
            current = self.stores.current
            if current is None:
                return False  # no store serves right now: a cache copy is optional, skip it
            store = current
            self._event("cloud_fetch", node=mv.node, store=store.name, detail=mv.kind)
        tier.reserve(mv.model, model.weights_bytes)
        if src in LOCAL_TIERS:
            self._reading[(mv.node, src, mv.model)] += 1
        hop = copy_hop(src, mv.to_tier, model, ns.spec, store)
        t0 = self.env.now
        epoch = self._epoch[mv.node]

        def done(_flow: Flow) -> None:
            if self._epoch[mv.node] != epoch:
                return  # the node was lost meanwhile, and the copy with it
            now = self.env.now
            tier.commit(mv.model, now)
            if src in LOCAL_TIERS:
                self._release_read(mv.node, src, mv.model)
            if src == "cloud":
                self.stats.cloud_bytes += hop.nbytes
                self.stats.cloud_bytes_by_route[(store.name, ns.spec.cloud)] += hop.nbytes
            self.moves.append((t0, now, mv.model, mv.node, src, mv.to_tier, mv.kind, hop.nbytes, now - t0))
            if on_done is not None:
                on_done()

        self.fabric.transfer(mv.node, hop.links, hop.nbytes, hop.cap_Bps, hop.latency_s, done)
        return True

    def _evict(self: World, ev: Evict) -> None:
        ns = self.state.nodes.get(ev.node)
        if ns is None or ev.tier not in ns.tiers:
            raise PolicyError(f"policy {self.policy.name!r}: cannot execute {ev}")
        tier = ns.tiers[ev.tier]
        if not ns.up or not tier.holds(ev.model) or self._reading.get((ev.node, ev.tier, ev.model), 0) > 0:
            return  # a down node moves nothing; gone already, or a load is reading it right now
        nbytes = tier.remove(ev.model)
        now = self.env.now
        self.moves.append((now, now, ev.model, ev.node, ev.tier, "", ev.kind, nbytes, 0.0))

    def _release_read(self: World, node: str, tier: str, model: str) -> None:
        key = (node, tier, model)
        self._reading[key] -= 1
        if self._reading[key] <= 0:
            del self._reading[key]
