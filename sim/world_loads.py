"""How the simulated world starts an instance and loads it: GPU room (asking the policy to free some), the
load's hops through the fabric from its source tier or a store, engine start and readiness. A mixin of
`sim.world.World`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from core.decisions import Migration
from core.inference import InferenceModel
from core.loadtime import estimate_load_s, load_hops, progressive_first_token_s, ready_time_s
from core.specs import LOCAL_TIERS, ModelSpec
from sim.engine import SimEngine
from sim.fabric import Flow
from sim.request import Request

if TYPE_CHECKING:
    from sim.world import World


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



class Loads:
    """`World`'s instance starts: `_start_instance` (GPU room, the load record) and `_load` (its SimPy process)."""

    def _inference_model(self: World, model: ModelSpec, node: str, n: int) -> InferenceModel:
        gpu = self.state.nodes[node].spec.gpu
        key = (model.name, gpu.name, n)
        inf = self._inference.get(key)
        if inf is None:
            inf = self._inference[key] = InferenceModel(model, gpu, n, self.engine, self.measured)
        return inf

    def _start_instance(self: World, model_name: str, node: str, source_tier: str, reason: str,
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

    def _load(self: World, eng: SimEngine, source_tier: str, n: int, kv: float):
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
