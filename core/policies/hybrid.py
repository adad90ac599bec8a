"""LocalityForecast: locality-aware starts, a DRAM checkpoint pool, and forecast-driven keep-alive and prefetch.

It combines what the other bundles showed to work, in one hooks object that takes the bundle's autoscaling
slot (so that the placement's scale-up test, `KeepAlive.wants_new_instance`, is its own):

- locality (ServerlessLLM): `placement: startup_time` starts an instance where the estimated start-up time
  over the node's local copies is lowest; every loaded model stays in a host-DRAM pool (`pool_tier`, LRU)
  and downloads also land on local SSD (`download_tier`), so a later start is a DRAM or NVMe load;
- GPU pressure stops the idle instances whose models are forecast coldest first (LRU among equals),
  writing a model to the pool first if it is not there, so that its next start is from DRAM;
- forecast-driven keep-alive: Holt's forecaster (`core.policies.forecast`) predicts each model's arrival
  rate. An idle instance of a model expected to get fewer than `keep_arrivals` requests within `keep_alive_s`
  is stopped after only `min_keep_alive_s` if the node can reload it locally (seconds from DRAM): it costs GPU
  time and its reload is cheap. A model expected to stay busy is kept `max_keep_alive_s`, and one with no local
  copy `keep_alive_s` (a cloud reload is what hurts p99 TTFT);
- forecast-driven prefetch and pre-warm (the `predictive` bundle's): models forecast above `prefetch_rate`
  get a pool copy on the node most likely to host them; models whose forecast load exceeds their instances
  get one pre-warmed where GPUs are free (never by stopping others).

Engine start-up shortcuts (engine pools, GPU memory snapshots) are bundle options, not decisions: the yaml
(`conf/policy/locality_forecast.yaml`, key `engine_start`) is where this policy turns them on.

Pure: it reads `view.now_s` and the view, keeps only its forecaster's counts, and returns actions.
"""

from __future__ import annotations

from collections.abc import Sequence

from core.decisions import Action, StopInstance
from core.policies.autoscaling import KeepAlive
from core.policies.base import NO_ACTIONS, RequestView, _fits
from core.policies.caching import forecast_actions, pool_copies
from core.policies.forecast import HoltForecaster
from core.state import ClusterView, InstanceState, NodeState

#: local tiers from which a reload is cheap enough to stop an idle instance early (seconds, not minutes)
FAST_RELOAD: frozenset[str] = frozenset({"dram", "nvme"})


class LocalityForecast(KeepAlive):
    """Locality + DRAM pool + forecast-driven keep-alive, prefetch and pre-warm (module docstring)."""

    def __init__(
        self, keep_alive_s: float = 300.0, scale_up_queue: float = 4.0, tick_s: float = 10.0,
        count_loading: bool = True, min_instances: int = 0,
        min_keep_alive_s: float = 30.0, max_keep_alive_s: float = 900.0, keep_arrivals: float = 1.0,
        window_s: float = 60.0, alpha: float = 0.5, beta: float = 0.3, horizon_s: float = 60.0,
        keep_horizon_s: float = 0.0,
        prefetch_rate: float = 0.005, prewarm_rate: float = 0.05, service_s: float = 5.0,
        max_prewarm_per_tick: int = 1, pool_tier: str = "dram", download_tier: str | None = "nvme",
        min_residency_s: float = 0.0,
    ) -> None:
        super().__init__(keep_alive_s=keep_alive_s, scale_up_queue=scale_up_queue, tick_s=tick_s,
                         count_loading=count_loading, min_instances=min_instances)
        if not 0 <= min_keep_alive_s <= keep_alive_s <= max_keep_alive_s:
            raise ValueError("0 <= min_keep_alive_s <= keep_alive_s <= max_keep_alive_s required")
        if keep_arrivals <= 0 or min(horizon_s, keep_horizon_s) < 0 or service_s <= 0 or max_prewarm_per_tick < 0:
            raise ValueError("keep_arrivals, service_s > 0 and horizons, max_prewarm_per_tick >= 0 required")
        self.min_keep_alive_s = min_keep_alive_s
        self.max_keep_alive_s = max_keep_alive_s
        self.keep_arrivals = keep_arrivals
        self.fc = HoltForecaster(window_s=window_s, alpha=alpha, beta=beta)
        self.horizon_s = horizon_s
        self.keep_horizon_s = keep_horizon_s
        self.prefetch_rate = prefetch_rate
        self.prewarm_rate = prewarm_rate
        self.service_s = service_s
        self.max_prewarm_per_tick = max_prewarm_per_tick
        self.pool_tier = pool_tier
        self.download_tier = download_tier
        self.min_residency_s = min_residency_s

    # ------------------------------------------------------------------ forecast
    def rate(self, model: str, horizon_s: float | None = None) -> float:
        """Forecast arrivals per second of `model`, `horizon_s` (default: the policy's) ahead; 0 if never seen."""
        return self.fc.forecast(model, self.horizon_s if horizon_s is None else horizon_s)

    def ttl_s(self, inst: InstanceState, view: ClusterView) -> float:
        """How long `inst` may stay idle before it is stopped (module docstring: forecast-driven keep-alive).

        The rate here looks only `keep_horizon_s` ahead (default 0: the smoothed level, no trend): a trend
        extrapolated over a minute turns negative after one empty window and would stop a steadily used
        model between two of its requests (measured: 3x more reloads on the smoke scenario)."""
        rate = self.rate(inst.model.name, self.keep_horizon_s)
        if rate * self.keep_alive_s >= self.keep_arrivals:
            return self.max_keep_alive_s  # busy model: a stop now would be followed by a reload soon
        node = view.nodes[inst.node]
        if node.local_source(inst.model.name) in FAST_RELOAD:
            return self.min_keep_alive_s  # quiet model, cheap reload: stop paying for the GPUs
        return self.keep_alive_s

    # ------------------------------------------------------------------ hooks
    def on_arrival(self, req: RequestView, view: ClusterView) -> Sequence[Action]:
        self.fc.observe(req.model, req.arrival_s)
        return NO_ACTIONS

    def on_load_done(self, inst: InstanceState, view: ClusterView) -> Sequence[Action]:
        return pool_copies(inst, view, self.pool_tier, self.download_tier)

    def on_gpu_pressure(self, node: str, model: str, view: ClusterView) -> Sequence[Action]:
        return self.pressure_stops(view.nodes[node], model, view)

    def on_tick(self, view: ClusterView) -> Sequence[Action]:
        now = view.now_s
        self.fc.advance(now)
        out: list[Action] = list(self._expire(view))
        stopping = {a.instance_id for a in out if isinstance(a, StopInstance)}
        out += forecast_actions(view, self.fc.models(), self.rate, self.pool_tier, self.prefetch_rate,
                                self.prewarm_rate, self.service_s, self.max_prewarm_per_tick, stopping)
        return out or NO_ACTIONS

    # ------------------------------------------------------------------ helpers
    def _expire(self, view: ClusterView) -> list[StopInstance]:
        """Idle instances past their forecast-driven keep-alive, keeping `min_instances` per model."""
        now = view.now_s
        live: dict[str, int] = {}
        for inst in view.instances.values():
            if inst.status in ("ready", "loading"):
                live[inst.model.name] = live.get(inst.model.name, 0) + 1
        out: list[StopInstance] = []
        for inst in sorted(view.instances.values(), key=lambda i: (i.idle_since_s, i.id)):
            if inst.idle and now - inst.idle_since_s >= self.ttl_s(inst, view):
                m = inst.model.name
                if live.get(m, 0) > self.min_instances:
                    live[m] -= 1
                    out.append(StopInstance(inst.id, reason="keep_alive"))
        return out

    def pressure_stops(self, node: NodeState, model: str, view: ClusterView) -> list[StopInstance]:
        """Stop idle instances on `node` until `model` fits: coldest forecast first, then least recently
        used; each victim's model is written to the pool first unless it is there. Nothing if it cannot fit."""
        n, per_gpu, _ = node.footprint(view.model(model))
        free = list(node.gpu_free_bytes)
        if _fits(free, n, per_gpu):
            return []
        now = view.now_s
        # an instance ready for less than min_residency_s is not a victim: under a burst, stopping it would
        # only start another reload of the same model (thrashing)
        res = self.min_residency_s
        idle = sorted((i for i in node.instances.values() if i.idle and (res <= 0 or now - i.ready_at_s >= res)),
                      key=lambda i: (self.rate(i.model.name), i.last_used_s, i.id))
        pool = node.tiers.get(self.pool_tier)
        out: list[StopInstance] = []
        for inst in idle:
            share = inst.gpu_bytes / len(inst.gpu_ids)
            for g in inst.gpu_ids:
                free[g] += share
            demote = None
            if pool is not None and not pool.holds(inst.model.name) and not pool.incoming(inst.model.name):
                demote = self.pool_tier
            out.append(StopInstance(inst.id, reason="gpu_pressure", demote_to=demote))
            if _fits(free, n, per_gpu):
                return out
        return []
