"""Engine start-up in the simulated world: phases, a compile cache per node, engine pools, GPU snapshots.

`World` asks `EngineStarts.plan` how each instance's engine comes up (a full start, a pooled engine
that only needs its weights, or a snapshot restore) and tells it when the instance is ready, when a
node is lost and when it is back. Everything here is off unless the engine config
(`compile_cache`) or the policy bundle's `engine_start` options turn it on; then a start records its
phases in `rows` (`core.engine_start.ENGINE_START_SCHEMA`).

State kept per node:
- compile cache: the bases compiled on it. It lives on the node's disk, so it survives a node
  failure (repaired with its disks) but not a spot preemption (the replacement is a new machine).
- engine pool: pre-initialised processes per base; they die with the node, and the pool refills
  (each slot paying a full start) once the node is back. Their GPU memory is reserved for the whole
  time the node is up, refills included: a refilling process holds its context while it starts.
- snapshots: models whose snapshot is written to `snapshot_tier`. A snapshot's bytes are claimed in
  the tier as a pinned reservation (`TierState.reserved` under `<model>#snapshot`): they count against
  its capacity, policies' evictions never touch them, and they go with the tier's contents on a loss.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from core.engine_start import (
    StartPhases,
    base_of,
    options_from,
    refill_s,
    snapshot_bytes,
    snapshot_hop,
    start_phases,
)
from core.loadtime import Hop, hop_time_s, link_capacities, ready_time_s, transfer_s
from core.specs import ModelSpec
from core.state import InstanceState

if TYPE_CHECKING:
    from sim.fabric import Flow
    from sim.world import LoadRecord, World


def _snap_key(model: str) -> str:
    """The tier reservation a snapshot holds (no model name contains '#')."""
    return f"{model}#snapshot"


class EngineStarts:
    """Per-node start-up state of one simulated world (see the module docstring)."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.engine = world.engine
        self.opts = options_from(getattr(world.policy, "engine_start", None))
        nodes = list(world.state.nodes)
        self.compiled: dict[str, set[str]] = {n: set() for n in nodes}
        self.snapshots: dict[str, set[str]] = {n: set() for n in nodes}
        self._writing: set[tuple[str, str]] = set()
        self.bases: dict[str, ModelSpec] = {}  # base -> one of its models (fine-tunes have their base's size)
        for m in world.state.models.values():
            self.bases.setdefault(base_of(m), m)
        self.pool: dict[tuple[str, str], int] = {}
        self.plans: dict[str, StartPhases] = {}
        self.rows: list[tuple] = []
        self.counts = {"pool_taken": 0, "pool_refilled": 0, "snapshots_written": 0, "snapshot_skipped_full": 0}
        if self.opts.pool or self.opts.snapshots:
            world.state.start_mode = self.mode  # policies read it as view.start_mode(node, model)
        if self.opts.pool:
            for node in nodes:
                self._reserve_pool_memory(node)
                for base, model in self.bases.items():
                    # warmed before the trace starts (as a platform's pool would be); their compile is cached
                    self.pool[(node, base)] = self.opts.pool_size
                    if self._compiles(model):
                        self.compiled[node].add(base)

    # ------------------------------------------------------------------ starts
    def mode(self, node: str, model: str) -> str:
        """How a start of `model` on `node` would go now (what `plan` would choose)."""
        if self.opts.snapshots and model in self.snapshots[node]:
            return "snapshot"
        if self.pool.get((node, base_of(self.world.state.models[model])), 0) > 0:
            return "pool"
        return "full"

    def plan(self, inst: InstanceState, source_tier: str, kv: float, progressive: bool) -> tuple[StartPhases,
                                                                                                list[Hop] | None]:
        """How `inst`'s engine comes up: its phases, and the transfer hops when they replace the weight load
        (a snapshot restore; None: the usual hops)."""
        node, model = inst.node, inst.model
        base = base_of(model)
        ns = self.world.state.nodes[node]
        hops = None
        mode = self.mode(node, model.name)
        if mode == "snapshot":
            phases = start_phases(model, self.engine, kv, progressive, mode="snapshot")
            hops = [snapshot_hop(model, ns.spec, self.opts)]
            inst.ready_at_s = self.world.env.now + hop_time_s(hops[0], link_capacities(ns.spec))
        elif mode == "pool":
            self.pool[(node, base)] -= 1
            self.counts["pool_taken"] += 1
            self._refill(node, base)
            phases = start_phases(model, self.engine, kv, progressive, mode="pool")
            store = self.world.stores.current or self.world.cluster.store
            weights = transfer_s(source_tier, model, ns.spec, store, len(inst.gpu_ids))
            inst.ready_at_s = self.world.env.now + ready_time_s(weights, 0.0, phases.after_weights_s, progressive)
        else:
            hit = self.engine.compile_cache and base in self.compiled[node]
            phases = start_phases(model, self.engine, kv, progressive, cache_hit=hit)
        self.plans[inst.id] = phases
        return phases, hops

    def ready(self, inst: InstanceState, rec: LoadRecord) -> None:
        """`inst` is ready: record its phases, remember its compile, write its snapshot if asked to."""
        phases = self.plans.pop(inst.id, None)
        if phases is None:
            return
        node, model = inst.node, inst.model
        if phases.mode == "full" and self._compiles(model):
            self.compiled[node].add(base_of(model))  # (with progressive loading it compiled after the first token)
        restore = rec.to_gpu_s if phases.mode == "snapshot" else 0.0
        self.rows.append((self.world.env.now, inst.id, model.name, base_of(model), node, phases.mode,
                          phases.compile_cache, phases.process_start_s, phases.cuda_context_s, phases.kv_alloc_s,
                          phases.compile_s, phases.graph_capture_s, restore, phases.total_s - rec.engine_init_s,
                          rec.engine_init_s))
        if self.opts.snapshots and phases.mode != "snapshot":
            self._write_snapshot(inst)

    # ------------------------------------------------------------------ pools
    def _compiles(self, model: ModelSpec) -> bool:
        """Whether a start of `model` compiles and the compile cache keeps the result."""
        return self.engine.compile_cache and model.params_b >= self.engine.compile_min_params_b

    def _reserve_pool_memory(self, node: str) -> None:
        """Pooled processes' GPU memory, one slot after another over the node's GPUs."""
        ns = self.world.state.nodes[node]
        n_gpus = len(ns.gpu_free_bytes)
        for i in range(self.opts.pool_size * len(self.bases)):
            ns.gpu_free_bytes[i % n_gpus] -= self.opts.pool_gpu_bytes
        if min(ns.gpu_free_bytes) < 0:
            raise ValueError(f"node {node}: the engine pool's GPU memory ({self.opts.pool_size} x "
                             f"{len(self.bases)} bases x {self.opts.pool_gpu_bytes:.3g} B) exceeds its GPUs")

    def _refill(self, node: str, base: str) -> None:
        """Start a replacement pooled engine in the background (a full start without weights)."""
        world = self.world
        epoch = world._epoch[node]
        model = self.bases[base]
        hit = self.engine.compile_cache and base in self.compiled[node]

        def done(_e: object) -> None:
            if world._epoch[node] != epoch:
                return  # the node was lost meanwhile, and the process with it
            self.pool[(node, base)] += 1
            self.counts["pool_refilled"] += 1
            if self._compiles(model):
                self.compiled[node].add(base)
            world._schedule_retry()

        world.env.timeout(refill_s(model, self.engine, hit)).callbacks.append(done)

    # ------------------------------------------------------------------ snapshots
    def _write_snapshot(self, inst: InstanceState) -> None:
        node, model = inst.node, inst.model
        ns = self.world.state.nodes[node]
        tier = ns.tiers.get(self.opts.snapshot_tier)
        key = (node, model.name)
        if tier is None or model.name in self.snapshots[node] or key in self._writing:
            return
        nbytes = snapshot_bytes(model, self.opts)
        if tier.free_bytes < nbytes:
            self.counts["snapshot_skipped_full"] += 1
            return
        tier.reserved[_snap_key(model.name)] = nbytes
        self._writing.add(key)
        world = self.world
        epoch = world._epoch[node]
        t0 = world.env.now

        def done(_flow: Flow) -> None:
            if world._epoch[node] != epoch:
                return  # lost with its node (node_lost settled the tier)
            self._writing.discard(key)
            self.snapshots[node].add(model.name)
            self.counts["snapshots_written"] += 1
            world._event("snapshot_written", node=node, instance=inst.id, duration_s=world.env.now - t0,
                         detail=model.name)

        world.fabric.transfer(node, ("pcie", f"{tier.name}_w"), nbytes, math.inf, 0.0, done)

    # ------------------------------------------------------------------ faults
    def node_lost(self, node: str, cause: str, keep: tuple[str, ...]) -> None:
        """After `node` lost its contents: pooled processes are gone; a spot replacement has an empty disk
        (no compile cache); snapshots survive only in a kept tier (`lose_contents` dropped every
        reservation, so the kept ones are claimed again)."""
        for key in [k for k in self.pool if k[0] == node]:
            self.pool[key] = 0
        if cause == "preempted":
            self.compiled[node].clear()
        self._writing = {k for k in self._writing if k[0] != node}
        tier = self.world.state.nodes[node].tiers.get(self.opts.snapshot_tier)
        if tier is None or tier.name not in keep:
            self.snapshots[node].clear()
            return
        for name in sorted(self.snapshots[node]):
            tier.reserved[_snap_key(name)] = snapshot_bytes(self.world.state.models[name], self.opts)

    def node_back(self, node: str) -> None:
        """`node` is up again: its pool restarts from nothing, every slot paying a full start."""
        if not self.opts.pool:
            return
        self._reserve_pool_memory(node)
        for base in self.bases:
            for _ in range(self.opts.pool_size):
                self._refill(node, base)
