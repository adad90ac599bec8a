"""Caching: which tiers hold which models (promote, demote, prefetch, evict)."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence

from core.decisions import Action, StartInstance
from core.policies.base import NO_ACTIONS, Hooks, RequestView, copy_with_room, lru_idle_stops, node_can_host
from core.policies.forecast import HoltForecaster, WindowCounter
from core.specs import TIER_RANK
from core.state import ClusterView, InstanceState


class NoCaching(Hooks):
    """The MVP: nothing is kept below the GPU; GPU pressure stops idle instances, LRU first."""

    def on_gpu_pressure(self, node: str, model: str, view: ClusterView) -> Sequence[Action]:
        return lru_idle_stops(node, model, view)


class SeedTiered(Hooks):
    """The seed's production rules.

    - every download from the cloud is also written to SATA (`download_tier`);
    - GPU memory needed: LRU idle instances are stopped and demoted GPU -> NVMe;
    - models with more than `promote_rate_per_hour` requests in the last hour are promoted
      NVMe -> GPU (an instance is started) when a node holding them has free GPU memory;
    - SATA -> NVMe when NVMe has space and the model was requested in the last hour.
    """

    def __init__(
        self, promote_rate_per_hour: float = 5.0, download_tier: str = "sata", demote_tier: str = "nvme",
        tick_s: float = 30.0, window_bucket_s: float = 300.0,
    ) -> None:
        self.promote_rate_per_hour = promote_rate_per_hour
        self.download_tier = download_tier
        self.demote_tier = demote_tier
        self.tick_s = tick_s
        self.rates = WindowCounter(bucket_s=window_bucket_s, horizon_s=3600.0)

    def on_arrival(self, req: RequestView, view: ClusterView) -> Sequence[Action]:
        self.rates.observe(req.model, req.arrival_s)
        return NO_ACTIONS

    def on_load_done(self, inst: InstanceState, view: ClusterView) -> Sequence[Action]:
        if inst.source_tier != "cloud":
            return NO_ACTIONS
        node = view.nodes[inst.node]
        return copy_with_room(node, inst.model.name, inst.model.weights_bytes, self.download_tier, "cache")

    def on_gpu_pressure(self, node: str, model: str, view: ClusterView) -> Sequence[Action]:
        return lru_idle_stops(node, model, view, demote_to=self.demote_tier)

    def on_tick(self, view: ClusterView) -> Sequence[Action]:
        now = view.now_s
        out: list[Action] = []
        for model in self.rates.models():
            count = self.rates.count(model, now)
            if count == 0:
                continue
            spec = view.model(model)
            has_live = any(i.status in ("ready", "loading") for i in view.instances_of(model))
            # promotion NVMe -> GPU for hot models with no instance
            if not has_live and self.rates.rate_per_hour(model, now) > self.promote_rate_per_hour:
                for node in view.nodes.values():
                    if node.tiers.get("nvme") is not None and node.tiers["nvme"].holds(model) and node_can_host(
                        node, model, view, allow_evict=False
                    ):
                        out.append(StartInstance(model, node.name, "nvme", reason="promote"))
                        break
            # SATA -> NVMe for models showing usage, where NVMe has space (no eviction)
            for node in view.nodes.values():
                sata, nvme = node.tiers.get("sata"), node.tiers.get("nvme")
                if sata is None or nvme is None or not sata.holds(model):
                    continue
                if nvme.holds(model) or nvme.incoming(model) or nvme.free_bytes < spec.weights_bytes:
                    continue
                out.extend(copy_with_room(node, model, spec.weights_bytes, "nvme", "promote"))
        return out or NO_ACTIONS


def pool_copies(inst: InstanceState, view: ClusterView, pool_tier: str,
                download_tier: str | None) -> Sequence[Action]:
    """After a load: a cloud download is also written to `download_tier`, and a model loaded from below the pool
    tier is copied into the pool (a model already in the pool gets its LRU position refreshed by the world on
    read, no action)."""
    node = view.nodes[inst.node]
    name, nbytes = inst.model.name, inst.model.weights_bytes
    out: list[Action] = []
    if download_tier and inst.source_tier == "cloud":
        out.extend(copy_with_room(node, name, nbytes, download_tier, "cache"))
    if TIER_RANK[inst.source_tier] > TIER_RANK[pool_tier]:
        out.extend(copy_with_room(node, name, nbytes, pool_tier, "cache"))
    return out or NO_ACTIONS


class LocalityLru(Hooks):
    """ServerlessLLM-style checkpoint caching: downloads land on local SSD (`download_tier`), and
    every loaded model is kept in a host-DRAM pool under LRU (`pool_tier`)."""

    def __init__(self, pool_tier: str = "dram", download_tier: str | None = "nvme") -> None:
        self.pool_tier = pool_tier
        self.download_tier = download_tier

    def on_load_done(self, inst: InstanceState, view: ClusterView) -> Sequence[Action]:
        return pool_copies(inst, view, self.pool_tier, self.download_tier)

    def on_gpu_pressure(self, node: str, model: str, view: ClusterView) -> Sequence[Action]:
        return lru_idle_stops(node, model, view)


def forecast_actions(view: ClusterView, models: Iterable[str], rate: Callable[[str], float], prefetch_tier: str,
                     prefetch_rate: float, prewarm_rate: float, service_s: float, max_prewarm: int,
                     stopping: Collection[str] = ()) -> list[Action]:
    """Act ahead of forecast arrivals, hottest model first: a model forecast at `prefetch_rate` or more is copied
    into `prefetch_tier` on the node that has it closest to the GPU (else the one with most free GPU memory), and
    one whose forecast load (rate x `service_s`) exceeds its live instances (`stopping` ones not counted) gets a
    pre-warmed instance, at most `max_prewarm` per call."""
    out: list[Action] = []
    prewarmed = 0
    for model in sorted(models, key=lambda m: (-rate(m), m)):
        r = rate(model)
        if r < prefetch_rate:
            break  # ranked: every later model is colder
        nodes = sorted((n for n in view.nodes.values() if n.up),
                       key=lambda n: (TIER_RANK[n.local_source(model)], -n.gpu_free_total, n.name))
        if not nodes:
            break
        target = nodes[0]
        if TIER_RANK[target.local_source(model)] > TIER_RANK[prefetch_tier]:
            out.extend(copy_with_room(target, model, view.model(model).weights_bytes, prefetch_tier, "prefetch"))
        live = [i for i in view.instances_of(model) if i.status in ("ready", "loading") and i.id not in stopping]
        if r >= prewarm_rate and r * service_s > len(live) and prewarmed < max_prewarm:
            for node in nodes:
                if node_can_host(node, model, view, allow_evict=False):
                    out.append(StartInstance(model, node.name, node.local_source(model), reason="prewarm"))
                    prewarmed += 1
                    break
    return out


class Predictive(LocalityLru):
    """Forecast each model's arrival rate (Holt's level + trend over windows) and act ahead of bursts.

    Every tick: models whose forecast rate `horizon_s` ahead exceeds `prefetch_rate` are
    prefetched into `prefetch_tier` on the node that will most likely host them; models whose
    forecast load (rate x `service_s`) exceeds their live instances get a pre-warmed instance.
    """

    def __init__(
        self, window_s: float = 60.0, alpha: float = 0.5, beta: float = 0.3, horizon_s: float = 120.0,
        prefetch_rate: float = 0.01, prewarm_rate: float = 0.05, service_s: float = 30.0,
        prefetch_tier: str = "dram", pool_tier: str = "dram", download_tier: str | None = "nvme",
        tick_s: float = 30.0, max_prewarm_per_tick: int = 2,
    ) -> None:
        super().__init__(pool_tier=pool_tier, download_tier=download_tier)
        self.fc = HoltForecaster(window_s=window_s, alpha=alpha, beta=beta)
        self.horizon_s = horizon_s
        self.prefetch_rate = prefetch_rate
        self.prewarm_rate = prewarm_rate
        self.service_s = service_s
        self.prefetch_tier = prefetch_tier
        self.tick_s = tick_s
        self.max_prewarm_per_tick = max_prewarm_per_tick

    def on_arrival(self, req: RequestView, view: ClusterView) -> Sequence[Action]:
        self.fc.observe(req.model, req.arrival_s)
        return NO_ACTIONS

    def on_tick(self, view: ClusterView) -> Sequence[Action]:
        self.fc.advance(view.now_s)
        out = forecast_actions(view, self.fc.models(), lambda m: self.fc.forecast(m, self.horizon_s),
                               self.prefetch_tier, self.prefetch_rate, self.prewarm_rate, self.service_s,
                               self.max_prewarm_per_tick)
        return out or NO_ACTIONS
