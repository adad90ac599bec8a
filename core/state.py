"""Cluster state: what is where, shared by the simulator and the live runtime.

`sim/` and `live/` own a `ClusterState` and mutate it through the methods here, which
enforce the invariants (a tier never holds more than its capacity, a model is held at
most once per tier). Policies receive a `ClusterView`: read-only access to the same
state at one instant, `now_s`. Policies must not mutate what they are shown.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from core import memory_pool
from core.specs import ClusterSpec, EngineSpec, ModelSpec, NodeSpec, TierSpec


class CapacityError(RuntimeError):
    """A tier or GPU would exceed its capacity: a bug in whoever decided the move."""


@dataclass(slots=True)
class TierEntry:
    """One model held in one tier."""

    bytes: float
    added_s: float
    last_access_s: float
    hits: int = 0


class TierState:
    """Contents of one local tier on one node. In-flight writes reserve space first."""

    __slots__ = ("_entries", "reserved", "spec", "used_bytes")

    def __init__(self, spec: TierSpec) -> None:
        self.spec = spec
        self._entries: dict[str, TierEntry] = {}
        self.used_bytes = 0.0
        self.reserved: dict[str, float] = {}  # model -> bytes being written

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def capacity_bytes(self) -> float:
        return self.spec.capacity_bytes

    @property
    def reserved_bytes(self) -> float:
        return sum(self.reserved.values())

    @property
    def free_bytes(self) -> float:
        return self.spec.capacity_bytes - self.used_bytes - self.reserved_bytes

    @property
    def entries(self) -> Mapping[str, TierEntry]:
        return MappingProxyType(self._entries)

    def holds(self, model: str) -> bool:
        return model in self._entries

    def incoming(self, model: str) -> bool:
        return model in self.reserved

    def reserve(self, model: str, nbytes: float) -> None:
        """Claim space for a copy about to be written."""
        if model in self._entries or model in self.reserved:
            raise CapacityError(f"tier {self.name}: {model} already held or incoming")
        if nbytes > self.free_bytes + 1e-6:
            raise CapacityError(f"tier {self.name}: {model} needs {nbytes:.0f} B, free {self.free_bytes:.0f} B")
        self.reserved[model] = nbytes

    def commit(self, model: str, now_s: float) -> None:
        """The reserved copy finished writing: it is now held."""
        nbytes = self.reserved.pop(model)
        self._entries[model] = TierEntry(bytes=nbytes, added_s=now_s, last_access_s=now_s)
        self.used_bytes += nbytes

    def abort(self, model: str) -> None:
        """The reserved copy failed: release its space, keep nothing."""
        self.reserved.pop(model, None)

    def remove(self, model: str) -> float:
        entry = self._entries.pop(model)
        self.used_bytes -= entry.bytes
        return entry.bytes

    def touch(self, model: str, now_s: float) -> None:
        e = self._entries.get(model)
        if e is not None:
            e.last_access_s = now_s
            e.hits += 1

    def lru_order(self) -> list[str]:
        """Models held, least recently used first."""
        return sorted(self._entries, key=lambda m: (self._entries[m].last_access_s, m))


class InstanceState:
    """One engine instance: a model resident on some GPUs of one node."""

    __slots__ = (
        "active",
        "gpu_bytes",
        "gpu_ids",
        "gpu_shares",
        "id",
        "idle_since_s",
        "kv_budget_bytes",
        "kv_pool",
        "kv_reserved_bytes",
        "kv_shares",
        "kv_used_bytes",
        "last_used_s",
        "max_num_seqs",
        "model",
        "node",
        "ready_at_s",
        "res_int",
        "res_t",
        "served",
        "source_tier",
        "started_s",
        "status",
        "waiting",
    )

    def __init__(
        self,
        id: str,
        model: ModelSpec,
        node: str,
        gpu_ids: tuple[int, ...],
        gpu_bytes: float,
        kv_budget_bytes: float,
        max_num_seqs: int,
        source_tier: str,
        started_s: float,
    ) -> None:
        self.id = id
        self.model = model
        self.node = node
        self.gpu_ids = gpu_ids
        self.gpu_bytes = gpu_bytes
        self.kv_budget_bytes = kv_budget_bytes
        self.max_num_seqs = max_num_seqs
        self.source_tier = source_tier
        self.started_s = started_s
        self.status = "loading"  # loading -> ready -> stopping -> stopped
        self.ready_at_s = float("inf")  # estimate while loading, actual once ready
        self.active = 0  # requests admitted (prefill or decode)
        self.waiting = 0  # requests routed here, not yet admitted
        self.kv_used_bytes = 0.0
        self.last_used_s = started_s
        self.idle_since_s = started_s
        self.served = 0
        # memory accounting (docs/results/memory_waste.md): bytes held on each GPU, the KV cache mapped now (the
        # whole budget unless the engine maps KV on demand, EngineSpec.kv_elastic) and the pages mapped since the
        # start on each GPU, the integral of gpu_bytes up to res_t, and who maps KV pages (None: static KV)
        self.gpu_shares: dict[int, float] = {}
        self.kv_reserved_bytes = kv_budget_bytes
        self.kv_shares: dict[int, float] = {}
        self.res_int = 0.0
        self.res_t = started_s
        self.kv_pool: ClusterState | None = None

    def reserved_byte_s(self, now_s: float) -> float:
        """GPU byte-seconds this instance has reserved from its start until `now_s`."""
        return self.res_int + self.gpu_bytes * (now_s - self.res_t)

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    @property
    def loading(self) -> bool:
        return self.status == "loading"

    @property
    def idle(self) -> bool:
        return self.status == "ready" and self.active == 0 and self.waiting == 0

    @property
    def load(self) -> int:
        return self.active + self.waiting

    def __repr__(self) -> str:
        return f"Instance({self.id}, {self.model.name}@{self.node}, {self.status}, a={self.active}, w={self.waiting})"


class NodeState:
    """One node: GPU memory per GPU, local tiers, instances, loads in flight."""

    __slots__ = ("_fit_pad", "_footprints", "_pool_weights", "engine", "gpu_free_bytes", "instances",
                 "loads_in_flight", "spec", "tiers", "up")

    def __init__(self, spec: NodeSpec, engine: EngineSpec) -> None:
        self.spec = spec
        self.engine = engine
        self._footprints: dict[str, tuple[int, float, float]] = {}
        self._pool_weights: dict[float, float] = {}  # gpu_pool: footprint's per-GPU bytes -> its weights per GPU
        self._fit_pad: dict[float, float] = {}  # kv_elastic: footprint's per-GPU bytes -> free bytes asked besides
        usable = spec.gpu.mem_bytes * engine.gpu_mem_util
        self.gpu_free_bytes = [usable] * spec.n_gpus
        self.tiers: dict[str, TierState] = {name: TierState(t) for name, t in spec.tiers.items()}
        self.instances: dict[str, InstanceState] = {}
        self.loads_in_flight: dict[str, float] = {}  # link name -> bytes still to move
        self.up = True

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def gpu_free_total(self) -> float:
        return sum(self.gpu_free_bytes)

    def tier_holding(self, model: str) -> str | None:
        """The fastest local tier holding `model`, "gpu" if an instance has it resident, else None."""
        for inst in self.instances.values():
            if inst.model.name == model and inst.status in ("ready", "loading"):
                return "gpu"
        for name in ("dram", "nvme", "sata"):
            t = self.tiers.get(name)
            if t is not None and model in t._entries:
                return name
        return None

    def local_source(self, model: str) -> str:
        """Where a new instance of `model` on this node would load from: a local tier, else cloud."""
        for name in ("dram", "nvme", "sata"):
            t = self.tiers.get(name)
            if t is not None and model in t._entries:
                return name
        return "cloud"

    def lose_contents(self, keep: Collection[str] = ()) -> list[tuple[str, str, float]]:
        """The node went away (preempted, failed): every tier not in `keep` loses what it holds, and
        every copy still being written is dropped. Returns (tier, model, bytes) of the copies lost.

        Its instances must have been removed first; the GPUs are then whole again.
        """
        if self.instances:
            raise CapacityError(f"node {self.name}: remove its instances before it loses its contents")
        usable = self.spec.gpu.mem_bytes * self.engine.gpu_mem_util
        self.gpu_free_bytes = [usable] * self.spec.n_gpus  # exact again, whatever rounding the removals left
        lost: list[tuple[str, str, float]] = []
        for name, tier in self.tiers.items():
            tier.reserved.clear()
            if name in keep:
                continue
            for model in sorted(tier.entries):
                lost.append((name, model, tier.remove(model)))
        return lost

    def footprint(self, model: ModelSpec) -> tuple[int, float, float]:
        """`gpus_needed` for `model` on this node, cached (specs never change)."""
        fp = self._footprints.get(model.name)
        if fp is None:
            fp = gpus_needed(model, self.spec, self.engine)
            eng = self.engine
            if eng.kv_elastic:  # only the mapped minimum of KV is reserved at the start; kv stays the cap
                n, _, kv = fp
                fp = (n, (min(model.resident_bytes, n * self.usable_bytes) + kv * eng.kv_elastic_min_frac) / n, kv)
                if eng.kv_elastic_fit_frac > 0:
                    self._fit_pad[fp[1]] = kv * max(0.0, eng.kv_elastic_fit_frac - eng.kv_elastic_min_frac) / n
            if eng.gpu_pool:
                n, per_gpu, kv = fp
                self._pool_weights[per_gpu] = min(model.resident_bytes / n, per_gpu)
            self._footprints[model.name] = fp
        return fp

    @property
    def usable_bytes(self) -> float:
        """What the engine may use of one GPU (`gpu_mem_util` of its memory)."""
        return self.spec.gpu.mem_bytes * self.engine.gpu_mem_util

    def gpu_fit(self, need_bytes: float, per_gpu: float) -> tuple[int, ...] | None:
        """GPU ids that can take an instance needing `need_bytes` in all (`per_gpu` on each), or None."""
        n = max(1, round(need_bytes / per_gpu)) if per_gpu > 0 else 1
        weights = self._pool_weights.get(per_gpu) if self.engine.gpu_pool else None
        pad = self._fit_pad.get(per_gpu, 0.0) if self._fit_pad else 0.0
        if pad:  # elastic KV: ask for room for some KV growth too (placement only; nothing more is mapped)
            need_bytes, per_gpu = need_bytes + pad * n, per_gpu + pad
        if weights is not None:
            plan = self.pool_plan(n, need_bytes, weights)
            return None if plan is None else plan[0]
        if n == 1:
            best = None
            for i, free in enumerate(self.gpu_free_bytes):
                # best fit keeps large holes for large models
                if free + 1e-6 >= need_bytes and (best is None or free < self.gpu_free_bytes[best]):
                    best = i
            return None if best is None else (best,)
        candidates = [i for i, free in enumerate(self.gpu_free_bytes) if free + 1e-6 >= per_gpu]
        if len(candidates) < n:
            return None
        return tuple(sorted(candidates, key=lambda i: self.gpu_free_bytes[i])[:n])

    def pool_plan(self, n: int, need_bytes: float,
                  weights_per_gpu: float) -> tuple[tuple[int, ...], dict[int, float]] | None:
        """Pooled placement (`EngineSpec.gpu_pool`) on this node's free memory: `core.memory_pool.pool_plan`."""
        return memory_pool.pool_plan(self.gpu_free_bytes, n, need_bytes, weights_per_gpu)

def gpus_needed(model: ModelSpec, node: NodeSpec, engine: EngineSpec) -> tuple[int, float, float]:
    """GPUs an instance of `model` takes on `node`, the bytes it reserves on each, and its KV budget.

    Weights (as resident in the engine: `ModelSpec.resident_bytes`) plus `engine.kv_reserve_frac` of KV cache
    are reserved; a model whose reservation exceeds one GPU is tensor-parallel over the fewest GPUs that hold
    it (KV shrinks to what is left if the GPU count is capped by the node).
    """
    usable = node.gpu.mem_bytes * engine.gpu_mem_util
    basis = model.kv_reserve_basis_bytes  # a weight variant keeps its base's KV reserve (core/variants.py)
    want = (model.resident_bytes * (1.0 + engine.kv_reserve_frac) if basis is None
            else model.resident_bytes + basis * engine.kv_reserve_frac)
    n = 1
    while n * usable < want and n < node.n_gpus:
        n *= 2
    n = min(n, node.n_gpus)
    total = min(want, n * usable)
    kv = max(0.0, total - model.resident_bytes)
    return n, total / n, kv


class ClusterState:
    """All nodes and instances. Owned and mutated by sim or live; read by policies via `ClusterView`."""

    def __init__(self, cluster: ClusterSpec, models: Sequence[ModelSpec], engine: EngineSpec) -> None:
        self.cluster = cluster
        self.engine = engine
        self.models: dict[str, ModelSpec] = {m.name: m for m in models}
        self.nodes: dict[str, NodeState] = {n.name: NodeState(n, engine) for n in cluster.nodes}
        self.instances_by_model: dict[str, list[InstanceState]] = {m.name: [] for m in models}
        self.instances: dict[str, InstanceState] = {}
        self._next_instance = 0
        # (node, model) -> "snapshot" | "pool" | "full": how a start would go now (set by a world that keeps
        # engine pools or GPU snapshots, core.engine_start; None: every start is full)
        self.start_mode: Callable[[str, str], str] | None = None
        # called after any change of a node's GPU memory: (node, instance, "add" | "remove" | "grow" | "shrink");
        # set by a world that accounts memory over time or maps KV on demand (a release may admit waiting requests)
        self.on_gpu_change: Callable[[str, InstanceState, str], None] | None = None

    # ---- instances -------------------------------------------------------------------
    def add_instance(
        self, model: str, node: str, gpu_ids: tuple[int, ...], per_gpu_bytes: float, kv_budget: float,
        source_tier: str, now_s: float,
    ) -> InstanceState:
        ns = self.nodes[node]
        spec = self.models[model]  # before any change: an unknown model must leave no trace
        if len(set(gpu_ids)) != len(gpu_ids):
            raise CapacityError(f"node {node}: GPU ids repeat in {gpu_ids}")
        pooled = None
        if self.engine.gpu_pool and per_gpu_bytes in ns._pool_weights:
            pooled = memory_pool.spread(ns.gpu_free_bytes, gpu_ids, per_gpu_bytes * len(gpu_ids),
                                        ns._pool_weights[per_gpu_bytes])
            if pooled is None:
                raise CapacityError(f"node {node}: pooled placement of {model} on GPUs {gpu_ids} does not fit")
        else:
            for g in gpu_ids:
                if ns.gpu_free_bytes[g] + 1e-6 < per_gpu_bytes:
                    raise CapacityError(f"node {node} gpu {g}: need {per_gpu_bytes:.0f} B, "
                                        f"free {ns.gpu_free_bytes[g]:.0f}")
        shares = pooled if pooled is not None else dict.fromkeys(gpu_ids, per_gpu_bytes)
        for g, b in shares.items():
            ns.gpu_free_bytes[g] -= b
        self._next_instance += 1
        inst = InstanceState(
            id=f"i{self._next_instance}", model=spec, node=node, gpu_ids=gpu_ids,
            gpu_bytes=per_gpu_bytes * len(gpu_ids), kv_budget_bytes=kv_budget,
            max_num_seqs=self.engine.max_num_seqs, source_tier=source_tier, started_s=now_s,
        )
        inst.gpu_shares = shares
        if pooled is not None:
            inst.gpu_bytes = sum(shares.values())
        if self.engine.kv_elastic:
            inst.kv_pool = self
            inst.kv_reserved_bytes = min(kv_budget, kv_budget * self.engine.kv_elastic_min_frac)
        ns.instances[inst.id] = inst
        self.instances[inst.id] = inst
        self.instances_by_model[model].append(inst)
        if self.on_gpu_change is not None:
            self.on_gpu_change(node, inst, "add")
        return inst

    def remove_instance(self, inst: InstanceState) -> None:
        ns = self.nodes[inst.node]
        if self.engine.gpu_pool or self.engine.kv_elastic:
            for g, b in inst.gpu_shares.items():
                ns.gpu_free_bytes[g] += b
            for g, b in inst.kv_shares.items():
                ns.gpu_free_bytes[g] += b
        else:
            per_gpu = inst.gpu_bytes / len(inst.gpu_ids)
            for g in inst.gpu_ids:
                ns.gpu_free_bytes[g] += per_gpu
        inst.status = "stopped"
        del ns.instances[inst.id]
        del self.instances[inst.id]
        self.instances_by_model[inst.model.name].remove(inst)
        if self.on_gpu_change is not None:
            self.on_gpu_change(inst.node, inst, "remove")

    # ---- KV pages mapped on demand (EngineSpec.kv_elastic; core/memory_pool.py) ----------
    def kv_grow(self, inst: InstanceState, used_bytes: float, now_s: float) -> bool:
        """Map KV pages so that `used_bytes` of KV fit `inst` (up to its budget); False if the node has no room."""
        ok = memory_pool.kv_grow(self, inst, used_bytes, now_s)
        if ok and self.on_gpu_change is not None:
            self.on_gpu_change(inst.node, inst, "grow")
        return ok

    def kv_shrink(self, inst: InstanceState, now_s: float) -> None:
        """Unmap the KV pages `inst` no longer uses; tells `on_gpu_change` when any were."""
        if memory_pool.kv_shrink(self, inst, now_s) and self.on_gpu_change is not None:
            self.on_gpu_change(inst.node, inst, "shrink")

class ClusterView:
    """What a policy sees: the cluster at `now_s`, read-only.

    The view is a window onto the live state rather than a deep copy, so that building
    it costs nothing per decision; policies must treat everything reachable from it as
    read-only and must not keep references across calls.
    """

    __slots__ = ("_clock", "_state")

    def __init__(self, state: ClusterState, clock: object) -> None:
        self._state = state
        self._clock = clock  # any object with a float attribute `now`

    @property
    def now_s(self) -> float:
        return self._clock.now  # type: ignore[attr-defined]

    @property
    def engine(self) -> EngineSpec:
        return self._state.engine

    @property
    def cluster(self) -> ClusterSpec:
        return self._state.cluster

    @property
    def nodes(self) -> Mapping[str, NodeState]:
        return MappingProxyType(self._state.nodes)

    def node_names(self) -> Iterator[str]:
        return iter(self._state.nodes)

    def model(self, name: str) -> ModelSpec:
        return self._state.models[name]

    @property
    def models(self) -> Mapping[str, ModelSpec]:
        return MappingProxyType(self._state.models)

    def instances_of(self, model: str) -> Sequence[InstanceState]:
        return self._state.instances_by_model.get(model, ())

    @property
    def instances(self) -> Mapping[str, InstanceState]:
        return MappingProxyType(self._state.instances)

    def start_mode(self, node: str, model: str) -> str:
        """How an instance of `model` would start on `node` now: "snapshot" (a GPU memory snapshot is there),
        "pool" (a pre-initialised engine of its base waits there) or "full"."""
        f = self._state.start_mode
        return "full" if f is None else f(node, model)

    def locations(self, model: str) -> dict[str, str]:
        """Node -> fastest tier holding `model` there (nodes where it is nowhere are omitted)."""
        out = {}
        for name, ns in self._state.nodes.items():
            t = ns.tier_holding(model)
            if t is not None:
                out[name] = t
        return out
