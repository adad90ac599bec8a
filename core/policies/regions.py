"""Region-aware routing: pick the region, node and weight variant by expected latency, cost and where the model is.

For a request from a client in region `c` (`req.client_region`; "" = unknown, no network term), every node that
may serve a deployment is a candidate, scored in seconds:

    score = RTT(c, node's region)                      (core.regions: access + region RTT; 0 when region_blind)
          + wait                                       (warm instance: 0 with a free slot, else the queue ahead of
                                                        it x service_s / max_num_seqs; still loading: until ready)
          + cold start if no instance is there         (estimate_load_s from the fastest tier holding the model on
                                                        that node, else the cloud store: "where the model lives")
          + s_per_usd x the request's GPU cost there   (node $/GPU-hour x GPUs the deployment takes x service_s)
          + quality_s_per_rank x the format's rank     (a quantised variant must buy its quality loss back)

Edge regions hold quantised variants only: a node in an edge region serves deployments whose weight format is one
of its region's `formats` (core/variants.py publishes them as `name@fmt`), a cloud node serves the requested
deployment. `pick` (the bundle's variant hook, called first) chooses the deployment whose best node scores lowest;
`place` then picks that deployment's best node. `region_aware=False` drops the RTT term (the region-blind baseline:
same candidates, same costs, blind to where the client is).

Pure: reads the view and the request, keeps only a cache of load-time estimates (a function of specs alone).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from core.decisions import Action, ColdStart, Decision, Queue, Route, StartInstance
from core.loadtime import estimate_load_s
from core.policies.autoscaling import KeepAlive
from core.policies.base import NO_ACTIONS, RequestView, lru_idle_stops, node_can_host, pick_instance
from core.regions import RegionTable, regions_from_dict
from core.specs import LOCAL_TIERS, TIER_RANK
from core.state import ClusterView, InstanceState, NodeState
from core.variants import VARIANT_SEP, base_deployment, variant_name

Candidate = tuple[float, int, str, Decision]  # (score s, tie-break rank, node name, decision)


class RegionRouting:
    """Placement (and variant choice) across regions by expected latency + cost; see the module docstring."""

    def __init__(self, regions: Mapping[str, Any] | RegionTable, region_aware: bool = True,
                 service_s: float = 5.0, s_per_usd: float = 100.0, quality_s_per_rank: float = 0.05,
                 evict_penalty_s: float = 1.0, base_format: str = "bf16") -> None:
        self.table = regions if isinstance(regions, RegionTable) else regions_from_dict(regions)
        if service_s <= 0 or s_per_usd < 0 or quality_s_per_rank < 0 or evict_penalty_s < 0:
            raise ValueError("service_s must be > 0; s_per_usd, quality_s_per_rank, evict_penalty_s >= 0")
        self.region_aware = region_aware
        self.service_s = service_s
        self.s_per_usd = s_per_usd
        self.quality_s_per_rank = quality_s_per_rank
        self.evict_penalty_s = evict_penalty_s
        self.base_format = base_format
        self._load_s: dict[tuple[str, str, str], float] = {}

    # ------------------------------------------------------------------ what may run where
    @staticmethod
    def fmt_of(deployment: str) -> str:
        """The weight format a deployment name carries ("" for the requested deployment itself)."""
        return deployment.split(VARIANT_SEP, 1)[1] if VARIANT_SEP in deployment else ""

    def allowed(self, node: NodeState, deployment: str) -> bool:
        """Edge nodes hold only their region's quantised formats; cloud nodes hold the requested deployment."""
        region = self.table.regions.get(node.spec.region)
        fmt = self.fmt_of(deployment)
        if region is not None and region.kind == "edge":
            return fmt in region.formats if region.formats else True
        return fmt == "" or fmt == self.base_format

    def rtt_s(self, req: RequestView, node: NodeState) -> float:
        client = getattr(req, "client_region", "")
        if not self.region_aware or not client:
            return 0.0
        return self.table.client_rtt_s(client, node.spec.region)

    # ------------------------------------------------------------------ estimates
    def _wait_s(self, inst: InstanceState, now_s: float) -> float:
        if inst.status == "loading":
            ahead = max(0, inst.waiting - inst.max_num_seqs)
            return max(0.0, inst.ready_at_s - now_s) + ahead * self.service_s / inst.max_num_seqs
        if inst.waiting == 0 and inst.active < inst.max_num_seqs:
            return 0.0
        return (inst.waiting + 1) * self.service_s / inst.max_num_seqs

    def _cold_s(self, node: NodeState, deployment: str, view: ClusterView) -> tuple[float, str]:
        src = next((t for t in LOCAL_TIERS if t in node.tiers and node.tiers[t].holds(deployment)), "cloud")
        key = (node.name, deployment, src)
        est = self._load_s.get(key)
        if est is None:
            model = view.model(deployment)
            n, _, kv = node.footprint(model)
            est = self._load_s[key] = estimate_load_s(src, model, node.spec, view.cluster.store, view.engine, n, kv)
        return est, src

    def _cost_s(self, node: NodeState, deployment: str, view: ClusterView) -> float:
        if self.s_per_usd == 0:
            return 0.0
        n = node.footprint(view.model(deployment))[0]
        return self.s_per_usd * node.spec.usd_per_gpu_hour * n * self.service_s / 3600.0

    def _quality_s(self, deployment: str) -> float:
        return self.quality_s_per_rank * _rank(deployment)

    def candidates(self, req: RequestView, deployment: str, view: ClusterView) -> list[Candidate]:
        """Every node's best way to serve `deployment` for `req`, scored (lowest first after sorting)."""
        out: list[Candidate] = []
        now = view.now_s
        by_node: dict[str, list[InstanceState]] = {}
        for inst in view.instances_of(deployment):
            by_node.setdefault(inst.node, []).append(inst)
        extra = self._quality_s(deployment)
        for node in view.nodes.values():
            if not node.up or not self.allowed(node, deployment):
                continue
            base = self.rtt_s(req, node) + self._cost_s(node, deployment, view) + extra
            best = pick_instance(by_node.get(node.name, ()))
            if best is not None:
                out.append((base + self._wait_s(best, now), 0, node.name, Route(best.id)))
            for allow_evict, penalty in ((False, 0.0), (True, self.evict_penalty_s)):
                if node_can_host(node, deployment, view, allow_evict=allow_evict):
                    load_s, src = self._cold_s(node, deployment, view)
                    out.append((base + load_s + penalty, 1 + TIER_RANK[src], node.name, ColdStart(node.name, src)))
                    break
        return out

    # ------------------------------------------------------------------ the two hooks
    def pick(self, req: RequestView, view: ClusterView) -> str:
        """The deployment to serve `req`: its own or a quantised variant, whichever's best node scores lowest."""
        options = [req.model]
        if VARIANT_SEP not in req.model:
            fmts = {f for r in self.table.regions.values() if r.kind == "edge" for f in r.formats}
            options += [name for f in sorted(fmts) if (name := variant_name(req.model, f)) in view.models]
        best: tuple[float, int, str] | None = None
        for i, dep in enumerate(options):
            cands = self.candidates(req, dep, view)
            if cands:
                key = (min(c[:3] for c in cands)[0], i, dep)
                if best is None or key < best:
                    best = key
        return best[2] if best is not None else req.model

    def place(self, req: RequestView, view: ClusterView) -> Decision:
        cands = self.candidates(req, req.model, view)
        if not cands:
            if base_deployment(req.model) != req.model and req.model not in view.models:
                return Queue("unknown_variant")
            return Queue("no_gpu_capacity")
        return min(cands, key=lambda c: c[:3])[3]


def _rank(deployment: str) -> int:
    """A crude quality rank from the format name (bf16 0, fp8 1, int8 2, int4 3, others 1)."""
    fmt = RegionRouting.fmt_of(deployment)
    return {"": 0, "bf16": 0, "fp8": 1, "int8": 2, "int4": 3}.get(fmt, 1)


class RegionKeepAlive(KeepAlive):
    """Keep-alive autoscaling plus near-region replicas: when a request is about to be served from a region more
    than `replicate_ms` further (RTT) from its client than the nearest node that may hold its deployment (or one
    of that node's quantised variants), an instance is started there in the background, so that the region's
    next requests are served near. Idle instances idle for at least `min_idle_s` may be stopped to make room.
    `region_aware=False`: plain `KeepAlive` (the region-blind baseline)."""

    def __init__(self, regions: Mapping[str, Any] | RegionTable, region_aware: bool = True,
                 replicate_ms: float = 50.0, min_idle_s: float = 30.0, **keep_alive: Any) -> None:
        super().__init__(**keep_alive)
        self.router = RegionRouting(regions, region_aware=region_aware)
        self.region_aware = region_aware
        self.replicate_ms = replicate_ms
        self.min_idle_s = min_idle_s

    def on_arrival(self, req: RequestView, view: ClusterView) -> Sequence[Action]:
        client = getattr(req, "client_region", "")
        if not self.region_aware or not client:
            return NO_ACTIONS
        router, table = self.router, self.router.table
        base = base_deployment(req.model)
        family = {base, *(variant_name(base, f) for r in table.regions.values() for f in r.formats)}
        served_ms = math.inf  # the nearest region where the family is warm or loading
        for dep in family:
            for inst in view.instances_of(dep):
                if inst.status in ("ready", "loading"):
                    served_ms = min(served_ms, table.rtt_ms(client, view.nodes[inst.node].spec.region))
        best: tuple[float, str, str] | None = None  # (rtt ms, node, deployment)
        for node in view.nodes.values():
            if not node.up:
                continue
            rtt = table.rtt_ms(client, node.spec.region)
            if rtt + self.replicate_ms >= served_ms or (best is not None and rtt >= best[0]):
                continue
            dep = req.model if router.allowed(node, req.model) else next(
                (d for d in sorted(family) if d in view.models and router.allowed(node, d)), None)
            if dep is not None:
                best = (rtt, node.name, dep)
        if best is None:
            return NO_ACTIONS
        _, name, dep = best
        node = view.nodes[name]
        if any(t in node.tiers and node.tiers[t].incoming(dep) for t in LOCAL_TIERS):
            return NO_ACTIONS
        src = router._cold_s(node, dep, view)[1]
        if node_can_host(node, dep, view, allow_evict=False):
            return [StartInstance(dep, name, src, reason="region_replica")]
        stops = lru_idle_stops(name, dep, view)
        now = view.now_s
        if not stops or any(now - node.instances[s.instance_id].idle_since_s < self.min_idle_s for s in stops):
            return NO_ACTIONS
        return [*stops, StartInstance(dep, name, src, reason="region_replica")]
