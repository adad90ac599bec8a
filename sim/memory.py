"""GPU memory over time in the simulator: the ledger behind `summary["memory_waste_parts"]`
(`core.memory_waste`), and the wake-ups of engines that map KV pages on demand (`EngineSpec.kv_elastic`).

The ledger follows `ClusterState.on_gpu_change`: after every change of a node's GPU memory it notes the node's free
bytes and the part of them stranded in holes no deployment fits in; when an instance is removed it notes its times.
Nothing here changes what the world does (with `kv_elastic` off): the headline `memory_waste_frac` is computed as
before, from `WorldStats`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from core.memory_waste import InstanceTimes, waste_parts
from core.metrics import union_length_s
from core.state import InstanceState, NodeState

if TYPE_CHECKING:
    from sim.world import World, WorldStats


class MemoryLedger:
    """Per node, a step function of (free GPU bytes, stranded bytes); per removed instance, its life."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.pool = bool(world.engine.gpu_pool)
        self.elastic = bool(world.engine.kv_elastic)
        self.steps: dict[str, list[tuple[float, float, float]]] = {}
        self.closed: list[tuple[str, float, float, float, float, float]] = []  # id, start, ready, end, base, weights
        self._smallest: dict[str, float] = {}
        self._wake: set[str] = set()
        for name, ns in world.state.nodes.items():
            self.steps[name] = [(0.0, *self._free(ns))]

    def smallest_need(self, ns: NodeState) -> float:
        """Bytes the smallest deployment of the catalog takes on one GPU of `ns` at its start."""
        v = self._smallest.get(ns.name)
        if v is None:
            v = min((per_gpu for m in self.world.state.models.values()
                     for n, per_gpu, _ in [ns.footprint(m)] if n == 1), default=0.0)
            self._smallest[ns.name] = v
        return v

    def _free(self, ns: NodeState) -> tuple[float, float]:
        free = [max(0.0, f) for f in ns.gpu_free_bytes]
        total = sum(free)
        need = self.smallest_need(ns)
        if self.pool:  # holes combine (KV may spill anywhere on the node): stranded only if the node's total is
            stranded = total if total + 1e-6 < need else 0.0
        else:
            stranded = sum(f for f in free if f + 1e-6 < need)
        return total, stranded

    def on_change(self, node: str, inst: InstanceState, event: str) -> None:
        w = self.world
        now = w.env.now
        self.steps[node].append((now, *self._free(w.state.nodes[node])))
        if event == "remove":
            rec = w.loads.get(inst.id)
            ready = rec.ready_s if rec is not None else math.nan
            base = sum(inst.gpu_shares.values())
            self.closed.append((inst.id, inst.started_s, ready, now, base, inst.model.weights_bytes))
        if self.elastic and event in ("remove", "shrink") and node not in self._wake:
            self._wake.add(node)
            w.env.timeout(0).callbacks.append(lambda _e: self._wake_node(node))

    def _wake_node(self, node: str) -> None:
        """KV pages were released on `node`: engines there with requests waiting may admit them now."""
        self._wake.discard(node)
        w = self.world
        for inst in list(w.state.nodes[node].instances.values()):
            eng = w.engines.get(inst.id)
            if eng is not None and eng.queue and inst.status == "ready":
                w._drain(eng)

    # ------------------------------------------------------------------ the summary's parts
    def parts(self, stats: WorldStats, start_s: float, end_s: float) -> dict[str, Any]:
        """`core.memory_waste.waste_parts` over [start_s, end_s] (the measured window)."""
        w = self.world
        busy = _busy_intervals(w)
        times = []
        for iid, t0, ready, t1, base, weights in self.closed:
            a, b = max(t0, start_s), min(t1, end_s)
            if b <= a:
                continue
            r = t1 if math.isnan(ready) else min(max(ready, t0), t1)
            loading = max(0.0, min(r, b) - a)
            on = _clipped_union(busy.get(iid, ()), max(r, a), b)
            times.append(InstanceTimes(base, weights, loading, on, max(0.0, b - a - loading - on)))
        cap = head = stranded = unalloc = 0.0
        for name, steps in self.steps.items():
            ns = w.state.nodes[name]
            mem = ns.spec.gpu.mem_bytes * ns.spec.n_gpus
            span = max(0.0, end_s - start_s)
            cap += mem * span
            head += mem * (1.0 - w.engine.gpu_mem_util) * span
            for k, (t, free, strand) in enumerate(steps):
                t_next = steps[k + 1][0] if k + 1 < len(steps) else end_s
                dt = max(0.0, min(t_next, end_s) - max(t, start_s))
                stranded += strand * dt
                unalloc += (free - strand) * dt
        out = waste_parts(stats.reserved_byte_s, stats.weights_byte_s, stats.kv_byte_s, times,
                          capacity_byte_s=cap, headroom_byte_s=head, stranded_byte_s=stranded,
                          unallocated_byte_s=unalloc)
        out["mode"] = {"gpu_pool": self.pool, "kv_elastic": self.elastic}
        return out


def _busy_intervals(w: World) -> dict[str, list[tuple[float, float]]]:
    """Instance id -> the [placed, finished] intervals of the requests routed to it."""
    out: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in w.requests:
        if r is None or r.instance is None:
            continue
        a, b = r.placed_s, r.finish_s
        if a == a and b == b and b > a:
            out[r.instance.state.id].append((a, b))
    return out


def _clipped_union(intervals: list[tuple[float, float]] | tuple, lo: float, hi: float) -> float:
    """Length of the union of `intervals` within [lo, hi]."""
    clipped = [(max(a, lo), min(b, hi)) for a, b in intervals]
    return union_length_s([(a, b) for a, b in clipped if b > a])


def install_memory_ledger(world: World) -> None:
    """Attach a `MemoryLedger` to `world` (as `world.memory`) and to its cluster state's memory changes."""
    world.memory = MemoryLedger(world)  # type: ignore[attr-defined]
    world.state.on_gpu_change = world.memory.on_change  # type: ignore[attr-defined]
