"""The simulated cluster: executes policy decisions in SimPy time and records what happens.

This module holds placement, request outcomes and the records; its mixins hold the rest: arrivals
(`sim.world_arrivals`), instance starts and loads (`sim.world_loads`), actions and tier moves
(`sim.world_actions`), node and instance losses (`sim.world_losses`)."""

from __future__ import annotations

import math
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import simpy

from core.decisions import ColdStart, Migration, Queue, Reject, Route
from core.inference import InferenceModel, MeasuredTable
from core.loadtime import link_capacities, link_streams
from core.policies.base import PolicyBundle
from core.response_cache_model import SimResponseCache
from core.specs import ClusterSpec, EngineSpec, ModelSpec
from core.state import ClusterState, ClusterView, InstanceState
from sim.engine import SimEngine
from sim.engine_start import EngineStarts
from sim.fabric import Fabric
from sim.faults import FaultInjector, StorePath
from sim.memory import install_memory_ledger
from sim.request import Request
from sim.steady_state import SteadyState, check_mode
from sim.stopping import Stops
from sim.world_actions import Actions, PolicyError
from sim.world_arrivals import Arrivals
from sim.world_loads import LoadRecord, Loads
from sim.world_losses import NodeLosses


@dataclass
class WorldStats:
    """Counters the summary needs beyond the tables."""

    cloud_bytes: float = 0.0
    reserved_byte_s: float = 0.0
    weights_byte_s: float = 0.0
    kv_byte_s: float = 0.0
    loads_by_tier: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    # (store, cloud of the fetching node) -> bytes, for egress
    cloud_bytes_by_route: dict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))
    requeued_by_cause: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    requeued_ids: set[int] = field(default_factory=set)
    node_down_s: dict[str, float] = field(default_factory=lambda: defaultdict(float))  # gone, not billed
    no_node_intervals: list[tuple[float, float]] = field(default_factory=list)


class World(Arrivals, Loads, Actions, NodeLosses):
    """One simulated cluster running one policy bundle over one workload."""

    def __init__(
        self,
        cluster: ClusterSpec,
        models: Sequence[ModelSpec],
        engine: EngineSpec,
        policy: PolicyBundle,
        *,
        measured: Sequence[MeasuredTable] = (),
        request_timeout_s: float = 600.0,
        drain_timeout_s: float = 3600.0,
        on_progress: Callable[[float, int], None] | None = None,
        seed: int = 0,
        response_cache: SimResponseCache | None = None,
        steady_state: str = "exact",
    ) -> None:
        self.env = simpy.Environment()
        # "fast": warm requests with room in a ready instance's batch decode analytically (sim.steady_state)
        self.steady = SteadyState() if check_mode(steady_state) == "fast" else None
        self._picks_variant = getattr(policy, "variants", None) is not None  # a variant policy picks deployments
        self.cluster = cluster
        self.engine = engine
        self.policy = policy
        self.state = ClusterState(cluster, models, engine)
        self.view = ClusterView(self.state, self.env)
        self.fabric = Fabric(self.env)
        for node in cluster.nodes:
            self.fabric.add_node(node.name, link_capacities(node), link_streams(node),
                                 self.state.nodes[node.name].loads_in_flight)
        self.measured = tuple(measured)
        self.request_timeout_s = request_timeout_s
        self.drain_timeout_s = drain_timeout_s
        self.on_progress = on_progress
        self.engines: dict[str, SimEngine] = {}
        self.loads: dict[str, LoadRecord] = {}
        self.requests: list[Request] = []
        self.pending: deque[Request] = deque()
        self.outstanding = 0
        self.arrivals_done = False
        self.finished = self.env.event()
        self.moves: list[tuple] = []
        self.instance_rows: list[tuple] = []
        self.stats = WorldStats()
        self._reading: dict[tuple[str, str, str], int] = defaultdict(int)
        self.gpu_ids: dict[str, tuple[int, ...]] = {}  # instance -> the GPUs it held (billing shared GPUs once)
        self._inference: dict[tuple[str, str, int], InferenceModel] = {}
        self._retry_scheduled = False
        self._on_ready: dict[str, list[Callable[[], None]]] = {}
        self.end_s = 0.0
        # faults: sim-only events, which store serves, per-node epochs (a loss bumps it: late callbacks
        # of transfers on the lost node see it changed), migrations in flight (destination -> victim)
        self.events: list[tuple] = []
        self.stores = StorePath(self.env, cluster.stores, cluster.failover_s, self._event)
        self.faults = FaultInjector(self.env, cluster, seed, preempt=self.preempt, fail=self.fail, stores=self.stores)
        self._epoch: dict[str, int] = dict.fromkeys(self.state.nodes, 0)
        self._down_since: dict[str, float] = {}
        self._no_node_since: float | None = None
        self._migrations: dict[str, str] = {}
        self._open_from = 0  # requests before this index are all resolved
        self.stops = Stops(self)  # engine stops that hold memory for a while (EngineSpec.stop_s)
        self.starts = EngineStarts(self)  # start-up phases, compile cache, engine pools, GPU snapshots
        # the gateway's response cache (core.response_cache_model); None: off, every request is served
        self.response_cache = response_cache
        self.prompt_keys: Sequence[str | None] | None = None  # per request, the prompt's identity when known
        # regions (core/regions.py, sim/regions.py): the table and each request's client region; None: off
        self.regions: object | None = None
        self.client_regions: Sequence[str] | None = None
        install_memory_ledger(self)  # GPU memory over time (sim.memory); wakes engines waiting for KV pages

    # =========================================================================== running
    def run(self, arrival_s: np.ndarray, model: Sequence[str], tenant: Sequence[str],
            prompt_tokens: np.ndarray, output_tokens: np.ndarray, progress_every: int = 50_000,
            prefix_blocks: Sequence[tuple[int, ...]] | None = None) -> None:
        """Replay the arrivals, then drain; every request ends completed, rejected or failed.
        `prefix_blocks`: each request's prompt block ids, for engines with a prefix cache (None: none)."""
        n = len(arrival_s)
        self.requests = [None] * n  # type: ignore[list-item]
        self.env.process(self._arrivals(arrival_s.tolist(), list(model), list(tenant),
                                        np.asarray(prompt_tokens).tolist(), np.asarray(output_tokens).tolist(),
                                        progress_every, None if prefix_blocks is None else list(prefix_blocks)))
        if self.policy.tick_s:
            self.env.process(self._ticks(self.policy.tick_s))
        self.faults.start()
        last = float(arrival_s[-1]) if n else 0.0
        if n == 0:
            self.arrivals_done = True
            self.finished.succeed()
        deadline = self.env.timeout(last + self.drain_timeout_s)
        self.env.run(until=self.env.any_of([self.finished, deadline]))
        self.end_s = self.env.now
        self._finalize()

    def _ticks(self, tick_s: float):
        while not self.finished.triggered:
            yield self.env.timeout(tick_s)
            acts = self.policy.on_tick(self.view)
            if acts:
                self._execute(acts)
            if self.pending:
                self._retry_pending()

    # ========================================================================= placement
    def _place(self, req: Request) -> None:
        d = self.policy.place(req, self.view)
        kind = type(d)
        if kind is Route:
            eng = self.engines.get(d.instance_id)
            if eng is None or eng.state.status not in ("ready", "loading"):
                raise PolicyError(f"policy {self.policy.name!r} routed to unknown or stopped instance {d}")
            self._submit(req, eng)
        elif kind is ColdStart:
            if d.node not in self.state.nodes:
                raise PolicyError(f"policy {self.policy.name!r} chose unknown node in {d}")
            if not self.state.nodes[d.node].up:
                raise PolicyError(f"policy {self.policy.name!r} chose node {d.node!r}, which is down, in {d}")
            eng = self._start_instance(req.model, d.node, d.source_tier, reason="request", migrate=d.migrate,
                                       waiting=req)
            if eng is not None:
                self._submit(req, eng)
            elif d.migrate is None:
                self.pending.append(req)
        elif kind is Queue:
            self.pending.append(req)
        elif kind is Reject:
            self._resolve(req, "rejected", d.reason)
        else:
            raise PolicyError(f"policy {self.policy.name!r} returned {d!r}, not a placement decision")

    def _submit(self, req: Request, eng: SimEngine) -> None:
        if not eng.can_ever_fit(req):
            self._resolve(req, "rejected", "kv_cache_too_small")
            return
        req.instance = eng
        req.node = eng.state.node
        req.placed_s = self.env.now
        if eng.state.status == "loading":
            req.cold = True
        eng.submit(req)

    def _retry_pending(self) -> None:
        """Place held requests again, oldest first. Once a model's request is held again in this
        pass, its later ones are too without asking the policy (nothing changed for them)."""
        todo, self.pending = self.pending, deque()
        now = self.env.now
        held_models: set[str] = set()
        for req in todo:
            if req.deadline_s < now:
                self._resolve(req, "rejected", "queue_timeout")
            elif req.model in held_models:
                self.pending.append(req)
            else:
                before = len(self.pending)
                self._place(req)
                if len(self.pending) > before:
                    held_models.add(req.model)

    def _schedule_retry(self) -> None:
        if self.pending and not self._retry_scheduled:
            self._retry_scheduled = True

            def go(_e: object) -> None:
                self._retry_scheduled = False
                self._retry_pending()

            self.env.timeout(0).callbacks.append(go)

    # ========================================================================= instances
    def _drain(self, eng: SimEngine, override_s: float | None = None, override_n: int = 0) -> None:
        for req in eng.drain_queue(override_s, override_n):
            self._resolve(req, "rejected", "queue_timeout")

    def _on_finish(self, req: Request) -> None:
        self._resolve(req, "completed", "")
        eng: SimEngine = req.instance
        if eng.queue:
            self._drain(eng)
        inst = eng.state
        if inst.status == "ready" and inst.active == 0 and inst.waiting == 0:
            acts = self.policy.on_idle(inst, self.view)
            if acts:
                self._execute(acts)
        elif inst.status == "evacuating" and inst.active == 0:
            self._remove_instance(inst, "preemption_notice")  # drained before its node goes

    def _remove_instance(self, inst: InstanceState, reason: str, event: str = "stopped") -> None:
        eng = self.engines.pop(inst.id)
        eng.close_accounting()
        now = self.env.now
        life = now - inst.started_s
        self.stats.reserved_byte_s += inst.reserved_byte_s(now)  # gpu_bytes * life unless KV pages were mapped
        self.stats.weights_byte_s += inst.model.weights_bytes * life
        self.stats.kv_byte_s += eng.kv_int
        for req in eng.take_queue():
            self.pending.append(req)
        self.state.remove_instance(inst)
        self._instance_row(inst, event, reason)
        self._schedule_retry()

    # ========================================================================= migration
    def _migrate(self, mig: Migration, node: str, waiting: Request | None) -> None:
        """Token-based live migration: load the victim's model on the destination, then move its
        sequences there (each recomputes its KV cache); the freed GPUs then take the new model."""
        victim = self.state.instances.get(mig.instance_id)
        dest = None
        if victim is not None and victim.status == "ready" and victim.node == node:
            dest = self._start_instance(victim.model.name, mig.dest_node, mig.dest_source_tier, reason="migration")
        if waiting is not None:
            self.pending.append(waiting)  # placed again once the victim's GPUs are free
        if dest is None or victim is None:
            return
        victim.status = "migrating"  # no new requests
        src_eng = self.engines[victim.id]
        a, b = mig.a_s_per_token, mig.b_s
        self._migrations[dest.state.id] = victim.id

        def handover() -> None:
            if victim.id not in self.engines:
                return  # the victim was lost with its node meanwhile
            victim.status = "draining"
            for req in src_eng.take_queue():
                self._submit(req, dest)
            src_eng.migrate_to(dest, a, b, lambda: self.stops.stop(victim, "migrated"))

        self._on_ready.setdefault(dest.state.id, []).append(handover)

    # =========================================================================== actions
    def _fleet_changed(self) -> None:
        """Track the intervals with no node up."""
        any_up = any(ns.up for ns in self.state.nodes.values())
        now = self.env.now
        if not any_up and self._no_node_since is None:
            self._no_node_since = now
        elif any_up and self._no_node_since is not None:
            self.stats.no_node_intervals.append((self._no_node_since, now))
            self._no_node_since = None

    def _event(self, kind: str, *, node: str = "", store: str = "", instance: str = "", requests: int = 0,
               duration_s: float | None = None, detail: str = "") -> None:
        self.events.append((self.env.now, kind, node, store, instance, requests,
                            math.nan if duration_s is None else duration_s, detail))

    # ========================================================================== outcomes
    def _resolve(self, req: Request, outcome: str, reason: str) -> None:
        if req.outcome:
            raise RuntimeError(f"request {req.id} resolved twice ({req.outcome}, then {outcome})")
        req.outcome = outcome
        req.reason = reason
        if outcome != "completed":
            req.finish_s = self.env.now
        elif self.response_cache is not None and not req.cache:  # a served answer enters the cache
            key = self.prompt_keys[req.id] if self.prompt_keys is not None else None
            self.response_cache.on_completed(req.tenant, req.model, key, self.env.now)
        self.outstanding -= 1
        if self.arrivals_done and self.outstanding == 0:
            self._check_finished()

    def _check_finished(self) -> None:
        if self.arrivals_done and self.outstanding == 0 and not self.finished.triggered:
            self.finished.succeed()

    def _instance_row(self, inst: InstanceState, event: str, reason: str) -> None:
        self.instance_rows.append((self.env.now, inst.id, inst.model.name, inst.node, event, inst.source_tier,
                                   len(inst.gpu_ids), inst.gpu_bytes, inst.model.weights_bytes, reason))

    def _finalize(self) -> None:
        """Fail whatever is still unresolved and close every instance's accounting at the end time."""
        for req in self.requests:
            if req is not None and not req.outcome:
                req.outcome, req.reason = "failed", "unfinished_at_end"
                req.finish_s = self.end_s
                self.outstanding -= 1
        self.pending.clear()
        self.stops.finish_all()
        for inst in list(self.state.instances.values()):
            eng = self.engines.get(inst.id)
            if eng is not None:
                eng.queue.clear()
                inst.waiting = 0
                self._remove_instance(inst, "end_of_run")
        for node, since in sorted(self._down_since.items()):
            self.stats.node_down_s[node] += self.end_s - since
        self._down_since.clear()
        if self._no_node_since is not None:
            self.stats.no_node_intervals.append((self._no_node_since, self.end_s))
            self._no_node_since = None
        self.stores.close(self.end_s)

