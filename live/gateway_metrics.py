"""The gateway's Prometheus metrics, through `prometheus_client`: a custom collector that reads the gateway's
request records, instance events and cluster mirror when scraped (nothing is counted on the request path).

Every gateway has its own `CollectorRegistry` (tests run several in one process); `GatewayMetrics.exposition()`
is its text (format 0.0.4, `generate_latest`). What it exposes (labels bounded by the catalog and the tenant
config: a model outside the catalog is `model="_unknown"`, a request that failed authentication `tenant=""`):

    tierlab_requests_total{model,tenant,outcome}          requests finished (records' rows)
    tierlab_tokens_total{model,tenant,kind}                prompt / output tokens of completed requests
    tierlab_ttft_seconds{model}, tierlab_tpot_seconds{model}, tierlab_queue_seconds{model}   histograms
    tierlab_cold_starts_total{model,source_tier}           instances started (loaded from a tier or the cloud)
    tierlab_cold_start_requests_total{model,source_tier}   requests served by a cold start
    tierlab_cold_start_phase_seconds{source_tier,phase}    histogram per phase of cold requests (fetch, to_gpu,
                                                           engine_init, wait = the request's extra wait)
    tierlab_cost_usd{model,tenant}, tierlab_cost_per_1k_tokens_usd{model,tenant}   the records' cost rule
    tierlab_instances{status}, tierlab_model_instances{model,status}, tierlab_loads_in_flight,
    tierlab_queue_depth, tierlab_model_queue_depth{model}, tierlab_engine_requests_in_flight{model},
    tierlab_agents{state}, tierlab_agent_up{node}          gauges read off the mirror
    tierlab_response_cache_hits_total{model,tenant,kind}  requests the response cache answered (exact, semantic)
    tierlab_response_cache_lookups_total, tierlab_response_cache_entries   when the cache is on
    tierlab_gateway_asyncio_tasks                          tasks of the gateway's event loop at scrape time (the
                                                           soak's leak check, `experiments.soak`)

The records are read incrementally (a cursor over the appended rows); cold rows are re-read at every scrape
because their phases are completed after the request (the engine's own read, `_add_engine_read`).
"""

from __future__ import annotations

import asyncio
import bisect
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from core.records import REQUEST_SCHEMA
from live.gateway_records import request_frame

if TYPE_CHECKING:
    from live.gateway import Gateway

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
QUEUE_BUCKETS_S = (0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
PHASE_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 180.0)
OUTCOMES = ("completed", "rejected", "failed")
PHASES = {"fetch": "fetch_s", "to_gpu": "to_gpu_s", "engine_init": "engine_init_s", "wait": "cold_start_s"}
OTHER_MODEL = "_unknown"  # a model outside the catalog (a bounded label)
_COL = {name: i for i, name in enumerate(REQUEST_SCHEMA)}


class Histogram:
    """Bucket counts (not cumulative), sum and count of observed values; NaN observations are ignored."""

    def __init__(self, buckets: Sequence[float]) -> None:
        if list(buckets) != sorted(buckets):
            raise ValueError(f"histogram buckets must be increasing, got {buckets}")
        self.bounds = tuple(float(b) for b in buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0

    @property
    def count(self) -> int:
        return sum(self.counts)

    def observe(self, value: float) -> None:
        if math.isnan(value):
            return
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        """(le, cumulative count) pairs ending at +Inf, as `HistogramMetricFamily.add_metric` takes them."""
        out, total = [], 0
        for le, n in zip([*map(str, self.bounds), "+Inf"], self.counts, strict=True):
            total += n
            out.append((le, total))
        return out


def histograms(name: str, doc: str, labels: Sequence[str],
                hists: Iterable[tuple[Sequence[str], Histogram]]) -> HistogramMetricFamily:
    fam = HistogramMetricFamily(name, doc, labels=list(labels))
    for values, h in hists:
        fam.add_metric(list(values), h.cumulative(), h.sum)
    return fam


def samples(family: CounterMetricFamily | GaugeMetricFamily,
             values: Iterable[tuple[Sequence[str], float]]) -> CounterMetricFamily | GaugeMetricFamily:
    for labels, v in values:
        family.add_metric(list(labels), v)
    return family


class GatewayMetrics(Collector):
    """The gateway's collector and its registry (`exposition()` is what GET /metrics answers)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.registry = CollectorRegistry(auto_describe=False)
        self._rows_seen = 0
        self._events_seen = 0
        self.requests: Counter[tuple[str, str, str]] = Counter()  # (model, tenant, outcome)
        self.tokens: Counter[tuple[str, str, str]] = Counter()  # (model, tenant, prompt|output), completed only
        self.served: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0])  # (instance, model, tenant)
        self.cold_starts: Counter[tuple[str, str]] = Counter()  # (model, source tier), instances
        self.cold_requests: Counter[tuple[str, str]] = Counter()
        self.cache_hits: Counter[tuple[str, str, str]] = Counter()  # (model, tenant, exact|semantic)
        self.ttft: dict[str, Histogram] = defaultdict(lambda: Histogram(TTFT_BUCKETS_S))
        self.tpot: dict[str, Histogram] = defaultdict(lambda: Histogram(TPOT_BUCKETS_S))
        self.queue: dict[str, Histogram] = defaultdict(lambda: Histogram(QUEUE_BUCKETS_S))
        self._cold_rows: list[int] = []
        self.registry.register(self)

    def exposition(self) -> bytes:
        """The Prometheus text of this gateway's registry."""
        return generate_latest(self.registry)

    # ------------------------------------------------------------------ label bounds

    def _catalog(self) -> set[str]:
        gw = self.gateway
        names = set(gw.config.models) | {m for t in gw.config.tenants.values() for m in t.models}
        return names | (set(gw.state.models) if gw.state is not None else set())

    # ------------------------------------------------------------------ reading the records

    def _read_rows(self) -> None:
        rows = self.gateway._rows
        catalog = self._catalog()
        # tenants of the config and of keys added since (keys file, /admin/keys): bounded by what admins add
        tenants = {t.name for t in self.gateway.config.tenants.values()} | {
            p.name for p in self.gateway.keys.principals() if p.role == "tenant"}
        for i in range(self._rows_seen, len(rows)):
            row = rows[i]
            model = row[_COL["model"]] if row[_COL["model"]] in catalog else OTHER_MODEL
            tenant = row[_COL["tenant"]] if row[_COL["tenant"]] in tenants else ""
            outcome = row[_COL["outcome"]]
            self.requests[model, tenant, outcome] += 1
            if row[_COL["cache"]]:
                self.cache_hits[model, tenant, row[_COL["cache"]]] += 1
            self.ttft[model].observe(row[_COL["ttft_s"]])
            self.tpot[model].observe(row[_COL["tpot_s"]])
            if outcome == "rejected":
                continue
            self.queue[model].observe(row[_COL["queue_s"]])
            if row[_COL["cold_start"]]:
                self._cold_rows.append(i)
                self.cold_requests[model, row[_COL["source_tier"]]] += 1
            if outcome == "completed":
                prompt, output = int(row[_COL["prompt_tokens"]]), int(row[_COL["output_tokens"]])
                self.tokens[model, tenant, "prompt"] += prompt
                self.tokens[model, tenant, "output"] += output
                served = self.served[row[_COL["instance"]], model, tenant]
                served[0] += prompt
                served[1] += output
        self._rows_seen = len(rows)

    def _read_events(self) -> None:
        events = self.gateway._events
        catalog = self._catalog()
        for event in events[self._events_seen:]:
            _, _, model, _, kind, source_tier = event[:6]
            if kind == "loading" and source_tier != "gpu":  # "gpu": an adopted engine, no cold start
                self.cold_starts[model if model in catalog else OTHER_MODEL, source_tier] += 1
        self._events_seen = len(events)

    def _phases(self) -> dict[tuple[str, str], Histogram]:
        rows = self.gateway._rows
        out: dict[tuple[str, str], Histogram] = defaultdict(lambda: Histogram(PHASE_BUCKETS_S))
        for i in self._cold_rows:
            row = rows[i]
            for phase, col in PHASES.items():
                out[row[_COL["source_tier"]], phase].observe(row[_COL[col]])
        return out

    def _costs(self) -> dict[tuple[str, str], float]:
        """USD per (model, tenant) under the records' rule (`live.gateway_records.request_frame`), computed over
        one row per (instance, model, tenant) with its tokens summed: a request's share is linear in its tokens."""
        gw = self.gateway
        if gw.state is None or not self.served:
            return {}
        blank = dict.fromkeys(REQUEST_SCHEMA, math.nan) | {"cold_start": False, "outcome": "completed",
                                                           "reason": "", "source_tier": "", "node": "",
                                                           "cache": "", "cached_tokens": 0,
                                                           "variant": "", "client_region": ""}
        rows = [tuple((blank | {"request_id": n, "model": model, "tenant": tenant, "instance": inst,
                                "prompt_tokens": p, "output_tokens": o}).values())
                for n, ((inst, model, tenant), (p, o)) in enumerate(self.served.items())]
        df = request_frame(rows, list(gw._events), gw.state.cluster, gw.clock.now)
        return {k: float(v) for k, v in df.groupby(["model", "tenant"])["cost_usd"].sum().items()}

    # ------------------------------------------------------------------ the collector

    def collect(self) -> Iterator[Metric]:
        self._read_rows()
        self._read_events()
        yield samples(CounterMetricFamily("tierlab_requests", "Requests finished, by model, tenant and outcome.",
                                           labels=["model", "tenant", "outcome"]),
                       sorted(self.requests.items()))
        yield samples(CounterMetricFamily("tierlab_tokens", "Prompt and output tokens of completed requests.",
                                           labels=["model", "tenant", "kind"]), sorted(self.tokens.items()))
        yield histograms("tierlab_ttft_seconds", "Time to first token seen by the gateway.", ["model"],
                          [((m,), h) for m, h in sorted(self.ttft.items())])
        yield histograms("tierlab_tpot_seconds", "Time per output token after the first (streams).", ["model"],
                          [((m,), h) for m, h in sorted(self.tpot.items())])
        yield histograms("tierlab_queue_seconds", "Time from arrival to an instance being chosen.", ["model"],
                          [((m,), h) for m, h in sorted(self.queue.items())])
        yield samples(CounterMetricFamily("tierlab_cold_starts", "Instances started, by model and source tier.",
                                           labels=["model", "source_tier"]), sorted(self.cold_starts.items()))
        yield samples(CounterMetricFamily("tierlab_cold_start_requests", "Requests served by a cold start.",
                                           labels=["model", "source_tier"]), sorted(self.cold_requests.items()))
        yield histograms("tierlab_cold_start_phase_seconds",
                          "Cold requests' phases: fetch (tier hops and the engine's read), to_gpu, engine_init, "
                          "wait (the request's extra wait for its instance).", ["source_tier", "phase"],
                          sorted(self._phases().items()))
        yield from self._cache_families()
        yield from self._cost_families()
        yield from self._mirror_families()
        yield from self._loop_families()

    def _cache_families(self) -> Iterator[Metric]:
        yield samples(CounterMetricFamily("tierlab_response_cache_hits", "Requests the response cache answered "
                                           "(no engine), by model, tenant and kind (exact, semantic).",
                                           labels=["model", "tenant", "kind"]), sorted(self.cache_hits.items()))
        rc = self.gateway.response_cache
        if rc is not None:  # on: its lookups (cacheable requests) and what it holds
            yield CounterMetricFamily("tierlab_response_cache_lookups", "Cacheable requests looked up in the "
                                      "response cache.", value=rc.cache.stats.lookups)
            yield GaugeMetricFamily("tierlab_response_cache_entries", "Answers held by the response cache (all "
                                    "tenants' partitions).", value=len(rc.cache))

    def _cost_families(self) -> Iterator[Metric]:
        costs = self._costs()
        yield samples(GaugeMetricFamily("tierlab_cost_usd", "GPU cost of the completed requests so far "
                                         "(instance cost split by tokens).", labels=["model", "tenant"]),
                       sorted(costs.items()))
        per_1k = []
        for (model, tenant), usd in sorted(costs.items()):
            tokens = self.tokens[model, tenant, "prompt"] + self.tokens[model, tenant, "output"]
            if tokens:
                per_1k.append(((model, tenant), usd / tokens * 1000.0))
        yield samples(GaugeMetricFamily("tierlab_cost_per_1k_tokens_usd", "USD per 1,000 tokens served.",
                                         labels=["model", "tenant"]), per_1k)

    def _mirror_families(self) -> Iterator[Metric]:
        gw = self.gateway
        insts = list(gw.state.instances.values()) if gw.state is not None else []
        agents_up = {n: ns.up for n, ns in gw.state.nodes.items()} if gw.state is not None else {}
        ready = sum(1 for i in insts if i.ready)
        loading = sum(1 for i in insts if i.loading)
        by_model: Counter[tuple[str, str]] = Counter()
        for i in insts:
            by_model[i.model.name, "ready" if i.ready else "loading" if i.loading else i.status] += 1
        in_flight: Counter[str] = Counter()
        for lv in list(gw.live.values()):
            in_flight[lv.inst.model.name] += lv.in_flight
        yield samples(GaugeMetricFamily("tierlab_instances", "Engine instances in the gateway's mirror, by status.",
                                         labels=["status"]), [(("ready",), ready), (("loading",), loading)])
        yield samples(GaugeMetricFamily("tierlab_model_instances", "Engine instances by model and status.",
                                         labels=["model", "status"]), sorted(by_model.items()))
        yield GaugeMetricFamily("tierlab_loads_in_flight", "Instances being loaded (cold starts under way).",
                                value=loading)
        yield GaugeMetricFamily("tierlab_queue_depth", "Requests waiting for placement or for their instance "
                                "to load.", value=gw.queued)
        yield samples(GaugeMetricFamily("tierlab_model_queue_depth", "Requests waiting, by model.",
                                         labels=["model"]),
                       [((m,), n) for m, n in sorted(gw.queued_by_model.items())])
        yield samples(GaugeMetricFamily("tierlab_engine_requests_in_flight", "Requests forwarded to engines and "
                                         "not finished, by model.", labels=["model"]),
                       [((m,), n) for m, n in sorted(in_flight.items())])
        n_up = sum(1 for up in agents_up.values() if up)
        yield samples(GaugeMetricFamily("tierlab_agents", "Node agents, by health.", labels=["state"]),
                       [(("up",), n_up), (("down",), len(agents_up) - n_up)])
        yield samples(GaugeMetricFamily("tierlab_agent_up", "1 while the node's agent answers, else 0.",
                                         labels=["node"]), [((n,), int(up)) for n, up in sorted(agents_up.items())])

    def _loop_families(self) -> Iterator[Metric]:
        # read-only: counting the loop's tasks changes nothing; a scrape from outside a running loop (a test calling
        # exposition() directly) has no loop to count, so the gauge is left out rather than reported as 0
        try:
            n_tasks = len(asyncio.all_tasks())
        except RuntimeError:
            return
        yield GaugeMetricFamily("tierlab_gateway_asyncio_tasks", "Tasks of the gateway's event loop (not done) at "
                                "scrape time; flat under steady load, else tasks leak.", value=n_tasks)
