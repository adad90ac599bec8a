"""The seed-claims audit's verdict rules: the bound each claim puts on its measured numbers (`Bound`,
`BOUNDS`), how a verdict is worded from a rule's outcome and the sweep's passing conditions (`verdict`,
`verdict_kind`), and one rule per kind of claim (`rule_*`). Pure functions of the measured numbers, so
that each verdict in the report can be checked from the values stored with it."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from experiments.claims_base import MAX_CONDITIONS


@dataclass(frozen=True)
class Bound:
    """A claimed bound on one measured number: value < `below`, value <= `at_most`, value >= `at_least`."""

    below: float | None = None
    at_most: float | None = None
    at_least: float | None = None

    def ok(self, value: float | None) -> bool:
        """Whether `value` meets every part of the bound (an unmeasured value meets none)."""
        if value is None or not math.isfinite(value):
            return False
        return ((self.below is None or value < self.below) and (self.at_most is None or value <= self.at_most)
                and (self.at_least is None or value >= self.at_least))

    def text(self) -> str:
        """e.g. ">= 180 and <= 300"."""
        parts = [f">= {self.at_least:g}" if self.at_least is not None else "",
                 f"< {self.below:g}" if self.below is not None else "",
                 f"<= {self.at_most:g}" if self.at_most is not None else ""]
        return " and ".join(p for p in parts if p)


#: The bound each claim puts on its measured numbers.
BOUNDS: dict[str, Bound] = {
    "access_gpu_s": Bound(below=0.1),
    "access_nvme_s": Bound(below=2.0),
    "access_sata_s": Bound(below=8.0),
    "access_cloud_s": Bound(below=15.0),
    "mvp_cold_start_s": Bound(at_least=180.0, at_most=300.0),
    "production_cold_start_s": Bound(at_most=15.0),  # faster than 8 s contradicts no promise
    "cold_start_speedup": Bound(at_least=6.0),  # a larger speed-up is more than claimed, not less
    "spot_saving": Bound(at_least=0.54),
    "storage_saving": Bound(at_least=0.40),  # a larger saving is more than claimed, not less
    "memory_waste_frac": Bound(below=0.04),
    "availability": Bound(at_least=0.999),
    "failover_recovery_s": Bound(below=2.0),
    "throughput_ratio": Bound(at_least=24.0),
    # issue 15's production features
    "pooled_memory_waste_frac": Bound(below=0.04),
    "slo_attainment_change": Bound(at_least=-0.005),  # "at no loss of SLO attainment": within half a point
    "cache_hit_rate": Bound(at_least=0.40),  # a higher rate is more than claimed, not less
    "edge_sites": Bound(at_least=20.0),
    "rtt_under_100ms_share": Bound(at_least=0.99),
    "variant_memory_reduction": Bound(at_least=2.0),
    "kv_capacity_ratio": Bound(at_least=2.0),
    "spec_speedup": Bound(at_least=2.8),
}


def verdict(ok: bool, conditions: Sequence[str]) -> str:
    """`holds` if the rule passed in the scenario itself, else `holds only if <conditions>` when it passed
    under some of the sweep's conditions, else `fails`."""
    if ok:
        return "holds"
    if conditions:
        more = len(conditions) - MAX_CONDITIONS
        return "holds only if " + "; or ".join(conditions[:MAX_CONDITIONS]) + (
            f"; or {more} more condition{'s' if more > 1 else ''} of the sweep" if more > 0 else "")
    return "fails"


def verdict_kind(v: str) -> str:
    """`holds`, `fails` or `holds only if` (the verdict without its condition)."""
    for kind in ("holds only if", "holds", "fails"):
        if v == kind or (kind == "holds only if" and v.startswith(kind + " ")):
            return kind
    raise ValueError(f"not a verdict: {v!r}")


def largest_within(sizes_b: Sequence[float], times_s: Sequence[float], bound: Bound) -> float | None:
    """The largest size such that every size up to it meets `bound` (None if the smallest does not)."""
    best = None
    for size, t in sorted(zip(sizes_b, times_s, strict=True)):
        if not bound.ok(t):
            break
        best = size
    return best


def rule_tier_access(largest_b: Mapping[str, float | None], catalog_max_b: float) -> str:
    """Each tier's bound must hold for every model up to the catalog's largest; a tier whose bound fails
    even for the smallest model fails the claim; otherwise it holds only up to the sizes found."""
    if any(v is None for v in largest_b.values()):
        return "fails"
    short = {t: v for t, v in largest_b.items() if v is not None and v < catalog_max_b}
    conds = [" and ".join(f"models <= {v:.1f} B params from {t}" for t, v in short.items())] if short else []
    return verdict(not short, conds)


def rule_cold_start(mvp_s: float | None, production_s: float | None,
                    sweep: Sequence[tuple[str, float | None, float | None]]) -> str:
    """The MVP's mean cold start must lie in 3-5 min and production's be at most 15 s, both in the same
    scenario; sweep points `(condition, mvp_s, production_s)` where both hold give the conditions."""
    both = lambda m, p: BOUNDS["mvp_cold_start_s"].ok(m) and BOUNDS["production_cold_start_s"].ok(p)  # noqa: E731
    return verdict(both(mvp_s, production_s), [c for c, m, p in sweep if both(m, p)])


def rule_at_reference(key: str, value: float | None, sweep: Sequence[tuple[str, float | None]]) -> str:
    """`BOUNDS[key]` on the scenario's value; sweep points `(condition, value)` that meet it give the
    conditions (speed-up, spot saving, storage saving, memory waste, throughput)."""
    bound = BOUNDS[key]
    return verdict(bound.ok(value), [c for c, v in sweep if bound.ok(v)])


def rule_availability(availability: float | None, recovery_s: float | None,
                      sweep: Sequence[tuple[str, float | None, float | None]]) -> str:
    """Availability >= 99.9% and every failover recovered in < 2 s, in the scenario; sweep points
    `(condition, availability, max recovery)` meeting both give the conditions. A run without any
    failover has no recovery to judge, so it proves nothing about the recovery part."""
    both = lambda a, r: BOUNDS["availability"].ok(a) and BOUNDS["failover_recovery_s"].ok(r)  # noqa: E731
    return verdict(both(availability, recovery_s), [c for c, a, r in sweep if both(a, r)])


def rule_edge_routing(sites: int, share: float | None, sweep: Sequence[tuple[str, int, float | None]]) -> str:
    """At least 20 edge sites and >= 99% of requests within 100 ms of the region serving them; sweep points
    `(condition, sites, share)` meeting both give the conditions."""
    both = lambda n, s: BOUNDS["edge_sites"].ok(n) and BOUNDS["rtt_under_100ms_share"].ok(s)  # noqa: E731
    return verdict(both(sites, share), [c for c, n, s in sweep if both(n, s)])


def rule_memory_pooling(waste: float | None, slo_change: float | None,
                        sweep: Sequence[tuple[str, float | None, float | None]]) -> str:
    """Memory waste < 4% at no loss of SLO attainment (change vs the scenario without the mechanism); sweep
    points `(condition, waste, SLO change)` meeting both give the conditions."""
    both = lambda w, d: (BOUNDS["pooled_memory_waste_frac"].ok(w)  # noqa: E731
                         and BOUNDS["slo_attainment_change"].ok(d))
    return verdict(both(waste, slo_change), [c for c, w, d in sweep if both(w, d)])
