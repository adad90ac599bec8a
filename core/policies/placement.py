"""Placement: which instance serves a request, or where a new instance starts and from which tier."""

from __future__ import annotations

import math

from core.decisions import ColdStart, Decision, Migration, Queue, Route
from core.loadtime import estimate_load_s, link_capacities
from core.policies.autoscaling import KeepAlive
from core.policies.base import RequestView, lru_idle_stops, node_can_host, pick_instance
from core.specs import LOCAL_TIERS, TIER_RANK
from core.state import ClusterView, NodeState


class _PlacementBase:
    """Warm routing plus the scale-up test; subclasses choose where a cold start goes."""

    def __init__(self) -> None:
        self.autoscaler: KeepAlive | None = None

    def bind(self, autoscaler: object) -> None:
        self.autoscaler = autoscaler if isinstance(autoscaler, KeepAlive) else None

    def place(self, req: RequestView, view: ClusterView) -> Decision:
        insts = view.instances_of(req.model)
        best = pick_instance(insts)
        if best is not None:
            free_slot = best.status == "ready" and best.waiting == 0 and best.active < best.max_num_seqs
            if free_slot or self.autoscaler is None or not self.autoscaler.wants_new_instance(req.model, view):
                return Route(best.id)
        cold = self.cold_start(req, view)
        if cold is None:
            return Route(best.id) if best is not None else Queue("no_gpu_capacity")
        return cold

    def cold_start(self, req: RequestView, view: ClusterView) -> ColdStart | None:
        raise NotImplementedError


class RoundRobin(_PlacementBase):
    """The seed MVP: nodes in turn; every cold start downloads from the cloud store."""

    def __init__(self, source: str = "cloud") -> None:
        super().__init__()
        self.source = source
        self._next = 0

    def cold_start(self, req: RequestView, view: ClusterView) -> ColdStart | None:
        names = list(view.node_names())
        for allow_evict in (False, True):
            for k in range(len(names)):
                node = view.nodes[names[(self._next + k) % len(names)]]
                if node_can_host(node, req.model, view, allow_evict=allow_evict):
                    self._next = (self._next + k + 1) % len(names)
                    src = self.source if self.source == "cloud" else node.local_source(req.model)
                    return ColdStart(node.name, src)
        return None


class TierAware(_PlacementBase):
    """The seed's automatic tier detection: start where the model sits in the fastest tier
    (GPU -> DRAM -> NVMe -> SATA -> cloud); among equals, a node that needs no eviction, then the
    fullest node that fits (best fit keeps whole nodes free for large tensor-parallel models).

    With `price_aware`, among nodes whose source tier is equally fast the one with the lowest
    $/GPU-hour (a spot node at its spot price) wins before the other tie-breaks.
    """

    def __init__(self, price_aware: bool = False) -> None:
        super().__init__()
        self.price_aware = price_aware

    def cold_start(self, req: RequestView, view: ClusterView) -> ColdStart | None:
        best = None
        best_key = None
        for node in view.nodes.values():
            price = node.spec.usd_per_gpu_hour if self.price_aware else 0.0
            for allow_evict, penalty in ((False, 0), (True, 1)):
                if node_can_host(node, req.model, view, allow_evict=allow_evict):
                    src = node.local_source(req.model)
                    key = (TIER_RANK[src], price, penalty, node.gpu_free_total, node.name)
                    if best_key is None or key < best_key:
                        best, best_key = ColdStart(node.name, src), key
                    break
        return best


class StartupTime(_PlacementBase):
    """ServerlessLLM-style locality-aware placement: minimise estimated startup time.

    A node's estimate is its loading-queue wait (bytes still to move on its links over their
    bandwidth) plus the model's load time from the fastest tier holding it there. With
    `migration`, a node whose GPUs are held by busy instances can still be chosen: one of
    them is live-migrated (token-based, `migration_a_s_per_token * tokens + migration_b_s`)
    to another node that can host it.
    """

    def __init__(self, migration: bool = False, migration_a_s_per_token: float = 2e-5,
                 migration_b_s: float = 0.5, reuse_horizon_s: float = 60.0) -> None:
        super().__init__()
        self.migration = migration
        self.a = migration_a_s_per_token
        self.b = migration_b_s
        self.reuse_horizon_s = reuse_horizon_s

    def _estimate(self, node: NodeState, model_name: str, view: ClusterView) -> tuple[float, str]:
        """(estimated startup time, source tier): the fastest of the node's copies and the cloud store."""
        model = view.model(model_name)
        n, _, kv = node.footprint(model)
        caps = link_capacities(node.spec)
        wait = max((b / caps[link] for link, b in node.loads_in_flight.items() if link in caps), default=0.0)
        sources = [t for t in LOCAL_TIERS if t in node.tiers and node.tiers[t].holds(model_name)] + ["cloud"]
        load, src = min((estimate_load_s(s, model, node.spec, view.cluster.store, view.engine, n, kv), TIER_RANK[s], s)
                        for s in sources)[::2]
        return wait + load, src

    def cold_start(self, req: RequestView, view: ClusterView) -> ColdStart | None:
        best: ColdStart | None = None
        best_key: tuple | None = None
        for node in view.nodes.values():
            if not node.up:
                continue
            t, src = self._estimate(node, req.model, view)
            rank = TIER_RANK[src]
            if node_can_host(node, req.model, view, allow_evict=False):
                cand, key = ColdStart(node.name, src), (round(t, 3), 0, rank, node.gpu_free_total, node.name)
            elif node_can_host(node, req.model, view, allow_evict=True):
                # stopping idle instances is charged their expected reload: a busy model's next request would be a
                # cold start. Without the charge a local copy beat a free node by a few seconds and warm instances
                # of busy models were stopped without any memory pressure; a rarely used one is cheap to stop.
                penalty = self._eviction_cost(node, req.model, view)
                cand, key = ColdStart(node.name, src), (round(t + penalty, 3), 1, rank, node.gpu_free_total,
                                                        node.name)
            elif self.migration and (mig := self._migration(node, req, view)) is not None:
                cand, key = (ColdStart(node.name, src, migrate=mig[0]),
                             (round(t + mig[1], 3), 2, rank, 0.0, node.name))
            else:
                continue
            # among nodes of one kind: the fastest estimate, then the fastest local copy, then the fullest that
            # fits (best fit keeps whole nodes free for large tensor-parallel models). Ties are common: engine
            # start (process start, capture, compile) hides a small model's fetch, so a DRAM copy and a cloud
            # download estimate the same; the estimate does not see the NIC and store a download would share
            # with later loads, nor the second pool copy it would make, so the local copy wins.
            if best_key is None or key < best_key:
                best, best_key = cand, key
        return best

    def _eviction_cost(self, node: NodeState, model_name: str, view: ClusterView) -> float:
        """Expected reload time the idle instances stopped to host `model_name` would cause: each one's reload on
        `node`, weighted by how recently it was used (exp(-idle time / reuse_horizon_s)): an instance used a moment
        ago is likely to be asked again (a busy model between requests), one idle for long is not (a burst that
        ended; ServeGen's clients come in sessions)."""
        now = view.now_s
        cost = 0.0
        for stop in lru_idle_stops(node.name, model_name, view):
            victim = node.instances[stop.instance_id]
            p_reuse = math.exp(-max(now - victim.last_used_s, 0.0) / self.reuse_horizon_s)
            cost += p_reuse * self._estimate(node, victim.model.name, view)[0]
        return cost

    def _migration(self, node: NodeState, req: RequestView, view: ClusterView) -> tuple[Migration, float] | None:
        """Cheapest busy instance on `node` that could move elsewhere and free room for the request."""
        need_model = view.model(req.model)
        n_need, per_gpu, _ = node.footprint(need_model)
        options = []
        for victim in node.instances.values():
            if victim.status != "ready" or victim.model.name == req.model:
                continue
            # freeing the victim must be enough
            free = list(node.gpu_free_bytes)
            for g in victim.gpu_ids:
                free[g] += victim.gpu_bytes / len(victim.gpu_ids)
            if sum(1 for f in free if f + 1e-6 >= per_gpu) < n_need:
                continue
            for dest in view.nodes.values():
                if dest.name == node.name or not node_can_host(dest, victim.model.name, view, allow_evict=False):
                    continue
                t, src = self._estimate(dest, victim.model.name, view)
                tokens = victim.kv_used_bytes / max(victim.model.kv_bytes_per_token, 1.0)
                cost = self.a * tokens + self.b
                options.append((cost, t, victim.id, dest.name, src))
        if not options:
            return None
        cost, t, vid, dest, src = min(options)
        # the new instance waits for the victim to leave: its load on the destination plus the handover
        return Migration(vid, dest, src, self.a, self.b), t + cost

