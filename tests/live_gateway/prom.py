"""Reading /metrics in tests: Prometheus' own parser (`prometheus_client.parser.text_string_to_metric_families`),
plus the checks a histogram must pass and look-ups of one sample or of a sum over label values."""

from __future__ import annotations

import math

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families


def parse(text: str) -> dict[str, Metric]:
    """Families by name (a counter's without `_total`, as the parser names it); every histogram checked."""
    assert text.endswith("\n"), "the exposition must end with a newline"
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for fam in families.values():
        if fam.type == "histogram":
            check_histogram(fam)
    return families


def check_histogram(fam: Metric) -> None:
    """For each label set: buckets cumulative and increasing in `le`, ending at +Inf equal to _count."""
    series: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
    counts: dict[tuple[tuple[str, str], ...], float] = {}
    for s in fam.samples:
        key = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
        if s.name == fam.name + "_bucket":
            series.setdefault(key, []).append((float(s.labels["le"]), s.value))
        elif s.name == fam.name + "_count":
            counts[key] = s.value
    assert set(series) == set(counts), f"{fam.name}: buckets and counts for different label sets"
    for key, buckets in series.items():
        les = [le for le, _ in buckets]
        assert les == sorted(les) and math.isinf(les[-1]), f"{fam.name}{key}: bad bucket bounds {les}"
        values = [v for _, v in buckets]
        assert values == sorted(values), f"{fam.name}{key}: buckets not cumulative {values}"
        assert values[-1] == counts[key], f"{fam.name}{key}: +Inf bucket {values[-1]} != count {counts[key]}"


def value(families: dict[str, Metric], name: str, **labels: str) -> float:
    """The value of the one sample `name{labels}` (exactly these labels)."""
    for fam in families.values():
        for s in fam.samples:
            if s.name == name and s.labels == labels:
                return s.value
    raise KeyError(f"no sample {name}{labels}")


def total(families: dict[str, Metric], name: str, **labels: str) -> float:
    """The sum of the samples `name{...}` whose labels include `labels` (0 when there is none)."""
    return sum(s.value for fam in families.values() for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))
