"""The simulated cluster: executes policy decisions in SimPy time and records what happens."""

from __future__ import annotations

import math
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import simpy

from core.decisions import (
    Action,
    ColdStart,
    Copy,
    Evict,
    Migration,
    Queue,
    Reject,
    Route,
    StartInstance,
    StopInstance,
)
from core.inference import InferenceModel, MeasuredTable
from core.loadtime import (
    copy_hop,
    estimate_load_s,
    link_capacities,
    link_streams,
    load_hops,
    progressive_first_token_s,
    ready_time_s,
)
from core.policies.base import PolicyBundle
from core.response_cache_model import SimResponseCache
from core.specs import LOCAL_TIERS, ClusterSpec, EngineSpec, ModelSpec
from core.state import ClusterState, ClusterView, InstanceState
from sim.engine import SimEngine
from sim.engine_start import EngineStarts
from sim.fabric import Fabric, Flow
from sim.faults import FaultInjector, StorePath
from sim.memory import install_memory_ledger
from sim.request import Request
from sim.steady_state import SteadyState, check_mode
from sim.stopping import Stops
from sim.world_arrivals import Arrivals
from sim.world_losses import NodeLosses


class PolicyError(RuntimeError):
    """A policy returned something the world cannot execute (names the policy and the decision)."""


@dataclass
class LoadRecord:
    """Timing of one instance's cold start, copied onto the requests that waited for it."""

    source_tier: str
    started_s: float
    store: str = ""  # the object store a cloud fetch used
    fetch_s: float = math.nan
    to_gpu_s: float = math.nan
    engine_init_s: float = math.nan
    weights_resident_s: float = math.nan
    ready_s: float = math.nan


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


class World(Arrivals, NodeLosses):
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
    def _inference_model(self, model: ModelSpec, node: str, n: int) -> InferenceModel:
        gpu = self.state.nodes[node].spec.gpu
        key = (model.name, gpu.name, n)
        inf = self._inference.get(key)
        if inf is None:
            inf = self._inference[key] = InferenceModel(model, gpu, n, self.engine, self.measured)
        return inf

    def _start_instance(self, model_name: str, node: str, source_tier: str, reason: str,
                        migrate: Migration | None = None, waiting: Request | None = None) -> SimEngine | None:
        ns = self.state.nodes[node]
        if not ns.up:
            return None  # a down node starts nothing (a hook's stale StartInstance, a migration's destination)
        model = self.state.models[model_name]
        n, per_gpu, kv = ns.footprint(model)
        if source_tier != "cloud" and (source_tier not in ns.tiers or not ns.tiers[source_tier].holds(model_name)):
            source_tier = ns.local_source(model_name)  # the policy's view was stale; load from where it is
        gpu_ids = ns.gpu_fit(per_gpu * n, per_gpu)
        if gpu_ids is None and migrate is not None:
            self._migrate(migrate, node, waiting)
            return None
        # a stop under way frees memory soon: no second round of stops (as the live gateway does); and a waiting
        # request whose own stop is still under way on another node asks for none (a policy naming another node on
        # the retry, e.g. round robin, would otherwise empty every node for one request)
        if gpu_ids is None and reason != "prewarm" and not self.stops.under_way(node) and not (
                waiting is not None and waiting.pressure_node is not None
                and self.stops.under_way(waiting.pressure_node)):
            self._execute(self.policy.on_gpu_pressure(node, model_name, self.view))
            if waiting is not None:
                waiting.pressure_node = node
            gpu_ids = ns.gpu_fit(per_gpu * n, per_gpu)
        if gpu_ids is None:
            return None
        now = self.env.now
        inst = self.state.add_instance(model_name, node, gpu_ids, per_gpu, kv, source_tier, now)
        self.gpu_ids[inst.id] = tuple(gpu_ids)
        eng = SimEngine(self.env, inst, self._inference_model(model, node, n), self._on_finish, engine=self.engine,
                        steady=self.steady)
        self.engines[inst.id] = eng
        store = self.stores.current or self.cluster.store
        inst.ready_at_s = now + estimate_load_s(source_tier, model, ns.spec, store, self.engine, n, kv,
                                                self.policy.progressive)
        self.loads[inst.id] = LoadRecord(source_tier=source_tier, started_s=now)
        self.stats.loads_by_tier[source_tier] += 1
        self._instance_row(inst, "loading", reason)
        if source_tier in LOCAL_TIERS:
            ns.tiers[source_tier].touch(model_name, now)
            self._reading[(node, source_tier, model_name)] += 1
        self.env.process(self._load(eng, source_tier, n, kv))
        self._execute(self.policy.on_load_started(inst, self.view))
        return eng

    def _load(self, eng: SimEngine, source_tier: str, n: int, kv: float):
        env = self.env
        inst = eng.state
        node = self.state.nodes[inst.node]
        model = inst.model
        rec = self.loads[inst.id]
        progressive = self.policy.progressive
        t0 = env.now
        plan, plan_hops = self.starts.plan(inst, source_tier, kv, progressive)
        start_s = plan.before_weights_s
        last_flow: Flow | None = None
        to_gpu_start = t0
        store = self.cluster.store
        if source_tier == "cloud" and plan_hops is None:
            # during a failover (or with every store out) the fetch waits for a store: part of its time
            store = yield from self.stores.wait()
            if inst.status != "loading":
                return  # lost with its node while waiting
            rec.store = store.name
            self._event("cloud_fetch", node=inst.node, store=store.name, instance=inst.id, duration_s=env.now - t0)
        hops = plan_hops or load_hops(source_tier, model, node.spec, store, n)
        # a local source copy is marked as read (not evictable) until the last hop that reads it ends; from
        # DRAM without a fetch hop that is the end of the load
        reading = source_tier in LOCAL_TIERS
        read_until = max((i for i, h in enumerate(hops) if f"{source_tier}_r" in h.links), default=len(hops) - 1)
        for i, hop in enumerate(hops):
            done = env.event()
            th = t0 if hop.phase == "fetch" else env.now
            track = progressive and hop.phase == "to_gpu"
            flow = self.fabric.transfer(inst.node, hop.links, hop.nbytes, hop.cap_Bps, hop.latency_s,
                                        done.succeed, track=track)
            if hop.phase == "to_gpu":
                to_gpu_start, last_flow = th, flow
            yield done
            if inst.status != "loading":
                return  # lost with its node: the transfer's end means nothing any more
            if reading and i == read_until:
                self._release_read(inst.node, source_tier, model.name)
                reading = False
            if hop.phase == "fetch":
                rec.fetch_s = env.now - th
                if source_tier == "cloud":
                    self.stats.cloud_bytes += hop.nbytes
                    self.stats.cloud_bytes_by_route[(store.name, node.spec.cloud)] += hop.nbytes
            else:
                rec.to_gpu_s = env.now - th
        t_w = env.now
        rec.weights_resident_s = t_w
        eng.weights_resident_s = t_w
        self._instance_row(inst, "weights_resident", "")
        start_done = t0 + start_s if self.engine.overlap_start_with_fetch else t_w + start_s
        after = plan.after_weights_s
        override_s = None
        override_n = 0
        if progressive:
            # KV allocation needs no weights: it follows engine start; the first pass streams the layers
            compute_ready = start_done + after
            ready_at = ready_time_s(t_w, start_done, after, progressive=True)
            batch = list(eng.queue)[: inst.max_num_seqs]
            if batch and last_flow is not None:
                layer_bytes = model.layer_bytes
                layer_ready = [last_flow.time_at_bytes((i + 1) * layer_bytes) for i in range(model.n_layers)]
                # the batch's sequences attend only to themselves: their prefills add up, not their lengths
                per_layer = sum(eng.inf.prefill_s(r.prompt_tokens) for r in batch) / model.n_layers
                override_s = progressive_first_token_s(layer_ready, per_layer, max(compute_ready, to_gpu_start))
                override_n = len(batch)
        else:
            ready_at = ready_time_s(t_w, start_done, after, progressive=False)
        rec.engine_init_s = ready_at - t_w
        if ready_at > env.now:
            yield env.timeout(ready_at - env.now)
        if inst.status != "loading":
            return
        inst.status = "ready"
        inst.ready_at_s = env.now
        rec.ready_s = env.now
        inst.idle_since_s = env.now
        self.starts.ready(inst, rec)
        self._instance_row(inst, "ready", "")
        self._drain(eng, override_s, override_n)
        for cb in self._on_ready.pop(inst.id, ()):
            cb()
        # the weights just passed through host memory: copies of them made now need no re-read
        self._execute(self.policy.on_load_done(inst, self.view), staged=(inst.node, model.name))
        if inst.idle:
            self._execute(self.policy.on_idle(inst, self.view))

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
    def _execute(self, acts: Iterable[Action], staged: tuple[str, str] | None = None) -> None:
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

    def _copy(self, mv: Copy, src: str | None = None, on_done: Callable[[], None] | None = None) -> bool:
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

    def _evict(self, ev: Evict) -> None:
        ns = self.state.nodes.get(ev.node)
        if ns is None or ev.tier not in ns.tiers:
            raise PolicyError(f"policy {self.policy.name!r}: cannot execute {ev}")
        tier = ns.tiers[ev.tier]
        if not ns.up or not tier.holds(ev.model) or self._reading.get((ev.node, ev.tier, ev.model), 0) > 0:
            return  # a down node moves nothing; gone already, or a load is reading it right now
        nbytes = tier.remove(ev.model)
        now = self.env.now
        self.moves.append((now, now, ev.model, ev.node, ev.tier, "", ev.kind, nbytes, 0.0))

    def _release_read(self, node: str, tier: str, model: str) -> None:
        key = (node, tier, model)
        self._reading[key] -= 1
        if self._reading[key] <= 0:
            del self._reading[key]

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

