"""The gateway's Prometheus metrics: counters and histograms it keeps, and the text exposition (format 0.0.4).

Kept by hand rather than through prometheus_client (not a dependency): a few counters, two histograms and
gauges read off the cluster mirror when scraped.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

TTFT_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
OUTCOMES = ("completed", "rejected", "failed")


def label_value(value: str) -> str:
    """A label value escaped as the exposition format requires (backslash, double quote, newline)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if isinstance(value, float) else str(value)


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{label_value(v)}"' for k, v in labels.items()) + "}"


def family(name: str, kind: str, help_text: str,
           samples: Iterable[tuple[Mapping[str, str], float]], suffix: str = "") -> list[str]:
    """HELP and TYPE lines, then one line per (labels, value) sample of `name + suffix`."""
    out = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    out += [f"{name}{suffix}{_labels(lab)} {_num(v)}" for lab, v in samples]
    return out


class Histogram:
    """Cumulative buckets, sum and count of observed values (NaN observations are ignored)."""

    def __init__(self, buckets: Sequence[float]) -> None:
        if list(buckets) != sorted(buckets):
            raise ValueError(f"histogram buckets must be increasing, got {buckets}")
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)  # cumulative: counts[i] = observations <= buckets[i]
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        if math.isnan(value):
            return
        self.count += 1
        self.sum += value
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1

    def lines(self, name: str, help_text: str) -> list[str]:
        out = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        for b, n in zip(self.buckets, self.counts, strict=True):
            out.append(f'{name}_bucket{{le="{b}"}} {n}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {_num(self.sum)}")
        out.append(f"{name}_count {self.count}")
        return out


class GatewayMetrics:
    """What the gateway counts as requests finish and instances start."""

    def __init__(self) -> None:
        self.requests_by_outcome: Counter[str] = Counter()
        self.cold_starts_by_tier: Counter[str] = Counter()
        self.ttft_s = Histogram(TTFT_BUCKETS_S)
        self.tpot_s = Histogram(TPOT_BUCKETS_S)

    def request_done(self, outcome: str, ttft_s: float, tpot_s: float) -> None:
        self.requests_by_outcome[outcome] += 1
        self.ttft_s.observe(ttft_s)
        self.tpot_s.observe(tpot_s)

    def cold_start(self, source_tier: str) -> None:
        self.cold_starts_by_tier[source_tier] += 1

    def render(self, *, instances_ready: int, instances_loading: int, queue_depth: int,
               agents_up: Mapping[str, bool]) -> str:
        """The exposition text: these counters and histograms plus the gauges passed in (read at scrape time)."""
        out = family("tierlab_requests_total", "counter", "Requests finished, by outcome.",
                     [({"outcome": o}, self.requests_by_outcome[o]) for o in OUTCOMES])
        out += family("tierlab_cold_starts_total", "counter", "Instances started, by source tier.",
                      [({"source_tier": t}, n) for t, n in sorted(self.cold_starts_by_tier.items())])
        out += self.ttft_s.lines("tierlab_ttft_seconds", "Time to first token seen by the gateway.")
        out += self.tpot_s.lines("tierlab_tpot_seconds", "Time per output token after the first (streams).")
        out += family("tierlab_instances", "gauge", "Engine instances in the gateway's mirror, by status.",
                      [({"status": "ready"}, instances_ready), ({"status": "loading"}, instances_loading)])
        out += family("tierlab_loads_in_flight", "gauge", "Instances being loaded (cold starts under way).",
                      [({}, instances_loading)])
        out += family("tierlab_queue_depth", "gauge", "Requests waiting for placement or for their instance to load.",
                      [({}, queue_depth)])
        n_up = sum(1 for up in agents_up.values() if up)
        out += family("tierlab_agents", "gauge", "Node agents, by health.",
                      [({"state": "up"}, n_up), ({"state": "down"}, len(agents_up) - n_up)])
        out += family("tierlab_agent_up", "gauge", "1 while the node's agent answers, else 0.",
                      [({"node": n}, int(up)) for n, up in sorted(agents_up.items())])
        return "\n".join(out) + "\n"
