"""A strict reader of the Prometheus text exposition format (0.0.4), for checking /metrics without
prometheus_client (it is used as well when installed)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\\\|\\"|\\n)*"'
VALUE = r"[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|NaN|Inf)"
HELP_RE = re.compile(rf"^# HELP ({NAME}) (.*)$")
TYPE_RE = re.compile(rf"^# TYPE ({NAME}) (counter|gauge|histogram|summary|untyped)$")
SAMPLE_RE = re.compile(rf"^({NAME})(\{{(?:{LABEL}(?:,{LABEL})*)?\}})? ({VALUE})(?: -?\d+)?$")
LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\\\|\\"|\\n)*)"')


@dataclass
class Family:
    name: str
    kind: str
    help: str = ""
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)


def _owner(sample: str, families: dict[str, Family]) -> Family:
    if sample in families:
        return families[sample]
    for suffix in ("_bucket", "_sum", "_count"):
        base = sample.removesuffix(suffix)
        if base != sample and base in families and families[base].kind == "histogram":
            return families[base]
    raise AssertionError(f"sample {sample!r} has no # TYPE line before it")


def parse(text: str) -> dict[str, Family]:
    """Families by name; AssertionError on any line or structure the format does not allow."""
    assert text.endswith("\n"), "the exposition must end with a newline"
    families: dict[str, Family] = {}
    helps: dict[str, str] = {}
    for n, line in enumerate(text[:-1].split("\n"), 1):
        if m := HELP_RE.match(line):
            assert m.group(1) not in helps, f"line {n}: second HELP for {m.group(1)}"
            helps[m.group(1)] = m.group(2)
        elif m := TYPE_RE.match(line):
            assert m.group(1) not in families, f"line {n}: second TYPE for {m.group(1)}"
            families[m.group(1)] = Family(m.group(1), m.group(2), helps.get(m.group(1), ""))
        elif m := SAMPLE_RE.match(line):
            labels = dict(LABEL_RE.findall(m.group(2) or ""))
            _owner(m.group(1), families).samples.append((m.group(1), labels, float(m.group(3))))
        else:
            raise AssertionError(f"line {n} is not valid exposition text: {line!r}")
    for fam in families.values():
        if fam.kind == "histogram":
            check_histogram(fam)
    return families


def check_histogram(fam: Family) -> None:
    """Buckets cumulative and increasing in `le`, ending at +Inf equal to _count."""
    buckets = [(float(lab["le"]), v) for name, lab, v in fam.samples if name == fam.name + "_bucket"]
    les = [le for le, _ in buckets]
    assert les == sorted(les) and les and math.isinf(les[-1]), f"{fam.name}: bad bucket bounds {les}"
    counts = [v for _, v in buckets]
    assert counts == sorted(counts), f"{fam.name}: buckets not cumulative {counts}"
    (count,) = [v for name, _, v in fam.samples if name == fam.name + "_count"]
    assert counts[-1] == count, f"{fam.name}: +Inf bucket {counts[-1]} != count {count}"
    assert [name for name, _, _ in fam.samples].count(fam.name + "_sum") == 1


def value(families: dict[str, Family], name: str, **labels: str) -> float:
    """The value of the one sample `name{labels}`."""
    for fam in families.values():
        for sample, lab, v in fam.samples:
            if sample == name and lab == labels:
                return v
    raise KeyError(f"no sample {name}{labels}")
