"""Regions: cloud regions and edge sites, the round-trip times between them, and where clients are.

A `RegionTable` names every region (kind `cloud` or `edge`, its coordinates, and for edge sites the weight
formats they hold) and answers `rtt_ms(a, b)`:

- a pair listed under `measured_rtt_ms` takes that value (cited measurements: conf/regions/default.yaml);
- any other pair takes the great-circle model `base_ms + inflation x 2 x distance_km / fibre_km_per_ms`, with
  `inflation` fitted (median ratio) to the measured pairs unless the config gives it.

A client in region `c` reaching a site in region `r` pays `access_ms` (its last mile to the nearest PoP) plus
`rtt_ms(c, r)`. Traces carry no client location, so clients are assigned to regions by a seeded draw from a
configured mix (`assign_client_regions`): a model, stated as one in docs/results/regions.md.

Pure: no I/O, no clock; randomness only from the seed it is handed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core.errors import ConfigError

KINDS = ("cloud", "edge")
#: light in fibre, km per ms (refractive index ~1.47: c / 1.47 ~ 204 km/ms; 200 is the usual round figure)
FIBRE_KM_PER_MS = 200.0
EARTH_RADIUS_KM = 6371.0


@dataclass(frozen=True)
class Region:
    """One region: a cloud region or an edge site (a metro with a PoP)."""

    name: str
    kind: str
    lat: float
    lon: float
    formats: tuple[str, ...] = ()  # edge: the weight formats its nodes hold (empty: any); cloud: ignored


def great_circle_km(a: Region, b: Region) -> float:
    """Haversine distance between two regions' coordinates, km."""
    p1, p2 = math.radians(a.lat), math.radians(b.lat)
    dp, dl = p2 - p1, math.radians(b.lon - a.lon)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))


def fibre_rtt_ms(a: Region, b: Region) -> float:
    """The round trip over a straight fibre between the two, ms (the lower bound the model inflates)."""
    return 2.0 * great_circle_km(a, b) / FIBRE_KM_PER_MS


@dataclass(frozen=True)
class RegionTable:
    """Every region and the RTT between any two (symmetric, 0 on the diagonal)."""

    regions: Mapping[str, Region]
    measured_ms: Mapping[frozenset[str], float]
    inflation: float
    base_ms: float
    access_ms: float
    _matrix: dict[tuple[str, str], float] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = list(self.regions)
        for i, a in enumerate(names):
            self._matrix[(a, a)] = 0.0
            for b in names[i + 1:]:
                v = self._pair_ms(a, b)
                self._matrix[(a, b)] = self._matrix[(b, a)] = v

    def _pair_ms(self, a: str, b: str) -> float:
        m = self.measured_ms.get(frozenset((a, b)))
        if m is not None:
            return float(m)
        return self.base_ms + self.inflation * fibre_rtt_ms(self.regions[a], self.regions[b])

    @property
    def names(self) -> list[str]:
        return list(self.regions)

    def of_kind(self, kind: str) -> list[str]:
        return [n for n, r in self.regions.items() if r.kind == kind]

    def kind(self, name: str) -> str:
        r = self.regions.get(name)
        return r.kind if r is not None else "cloud"

    def rtt_ms(self, a: str, b: str) -> float:
        """Region-to-region round trip, ms (a region unknown to the table: ConfigError)."""
        try:
            return self._matrix[(a, b)]
        except KeyError:
            unknown = [x for x in (a, b) if x not in self.regions]
            raise ConfigError(f"regions: unknown region(s) {unknown}; known: {self.names}") from None

    def client_rtt_s(self, client: str, region: str) -> float:
        """What a client in `client` pays to reach a site in `region` and back: access + region RTT, s."""
        return (self.access_ms + self.rtt_ms(client, region)) / 1e3

    def nearest(self, client: str, among: Sequence[str]) -> str:
        """The region of `among` with the smallest RTT from `client` (ties: by name)."""
        return min(among, key=lambda r: (self.rtt_ms(client, r), r))

    def matrix(self, names: Sequence[str] | None = None) -> np.ndarray:
        """The RTT matrix (ms) over `names` (default: every region, in table order)."""
        ns = list(names) if names is not None else self.names
        return np.array([[self.rtt_ms(a, b) for b in ns] for a in ns])


def _num(data: Mapping[str, Any], key: str, where: str, default: float | None = None) -> float:
    v = data.get(key, default)
    if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
        raise ConfigError(f"{where}.{key} must be a non-negative number, got {v!r}")
    return float(v)


def fit_inflation(regions: Mapping[str, Region], measured: Mapping[frozenset[str], float], base_ms: float) -> float:
    """Median of (measured - base) / fibre RTT over the measured pairs: how much longer real routes are."""
    ratios = []
    for pair, ms in measured.items():
        a, b = sorted(pair)
        f = fibre_rtt_ms(regions[a], regions[b])
        if f > 1.0:
            ratios.append((ms - base_ms) / f)
    if not ratios:
        raise ConfigError("regions: no measured pair to fit the inflation to; give `inflation`")
    return float(np.median(ratios))


def regions_from_dict(data: Mapping[str, Any], where: str = "regions") -> RegionTable:
    """The `regions` config block (conf/regions/*.yaml): `sites`, `measured_rtt_ms`, model parameters."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping")
    sites = data.get("sites")
    if not isinstance(sites, Mapping) or not sites:
        raise ConfigError(f"{where}.sites: expected a non-empty mapping of region name -> {{kind, lat, lon}}")
    edge_formats = tuple(str(f) for f in (data.get("edge_formats") or ()))
    regions: dict[str, Region] = {}
    for name, s in sites.items():
        sw = f"{where}.sites.{name}"
        if not isinstance(s, Mapping):
            raise ConfigError(f"{sw}: expected a mapping")
        kind = str(s.get("kind", ""))
        if kind not in KINDS:
            raise ConfigError(f"{sw}.kind must be one of {KINDS}, got {kind!r}")
        lat, lon = s.get("lat"), s.get("lon")
        if not isinstance(lat, int | float) or not isinstance(lon, int | float) or abs(lat) > 90 or abs(lon) > 180:
            raise ConfigError(f"{sw}: lat/lon must be numbers in [-90, 90] / [-180, 180], got {lat!r}, {lon!r}")
        formats = tuple(str(f) for f in (s.get("formats") or ())) or (edge_formats if kind == "edge" else ())
        regions[str(name)] = Region(str(name), kind, float(lat), float(lon), formats)
    measured: dict[frozenset[str], float] = {}
    for i, row in enumerate(data.get("measured_rtt_ms") or ()):
        rw = f"{where}.measured_rtt_ms[{i}]"
        if not isinstance(row, Sequence) or len(row) < 3:
            raise ConfigError(f"{rw}: expected [region_a, region_b, rtt_ms]")
        a, b, ms = str(row[0]), str(row[1]), row[2]
        for x in (a, b):
            if x not in regions:
                raise ConfigError(f"{rw}: unknown region {x!r}")
        if a == b or not isinstance(ms, int | float) or ms <= 0:
            raise ConfigError(f"{rw}: two different regions and a positive RTT, got {row!r}")
        key = frozenset((a, b))
        if key in measured and measured[key] != float(ms):
            raise ConfigError(f"{rw}: {a}-{b} given twice with different RTTs")
        measured[key] = float(ms)
    base_ms = _num(data, "base_ms", where, 0.0)
    infl = data.get("inflation")
    inflation = fit_inflation(regions, measured, base_ms) if infl is None else _num(data, "inflation", where)
    if inflation < 1.0:
        raise ConfigError(f"{where}.inflation must be >= 1 (no route beats straight fibre), got {inflation}")
    return RegionTable(regions=regions, measured_ms=measured, inflation=inflation, base_ms=base_ms,
                       access_ms=_num(data, "access_ms", where, 0.0))


@dataclass(frozen=True)
class RegionSetup:
    """Regions for one run: the table, and how clients are spread over regions (`client_mix`, drawn with the
    run's seed per request or per tenant)."""

    table: RegionTable
    client_mix: Mapping[str, float]
    by: str = "request"  # request | tenant


def setup_from_dict(data: Mapping[str, Any] | None, where: str = "regions") -> RegionSetup | None:
    """The `regions` block as a `RegionSetup`; None when absent (regions off: every result as before)."""
    if not data:
        return None
    table = regions_from_dict(data, where)
    mix_raw = data.get("client_mix") or {}
    if not isinstance(mix_raw, Mapping) or not mix_raw:
        raise ConfigError(f"{where}.client_mix: expected a non-empty mapping region -> weight")
    mix: dict[str, float] = {}
    for r in mix_raw:
        if str(r) not in table.regions:
            raise ConfigError(f"{where}.client_mix: unknown region {r!r}")
        mix[str(r)] = _num(mix_raw, r, f"{where}.client_mix")
    if sum(mix.values()) <= 0:
        raise ConfigError(f"{where}.client_mix: weights must not all be 0")
    by = str(data.get("clients_by", "request"))
    if by not in ("request", "tenant"):
        raise ConfigError(f"{where}.clients_by must be request or tenant, got {by!r}")
    return RegionSetup(table, mix, by)


def assign_client_regions(n: int, mix: Mapping[str, float], seed: int,
                          tenants: Sequence[str] | None = None) -> list[str]:
    """A client region per request, drawn from `mix` (weights) with a generator seeded by `seed` alone.

    With `tenants`, each distinct tenant (sorted) draws one region and all its requests share it.
    """
    names = sorted(mix)
    p = np.array([mix[r] for r in names], dtype=float)
    p /= p.sum()
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), 0x5E61])))
    if tenants is None:
        idx = rng.choice(len(names), size=n, p=p)
        return [names[i] for i in idx]
    uniq = sorted(set(tenants))
    pick = dict(zip(uniq, (names[i] for i in rng.choice(len(names), size=len(uniq), p=p)), strict=True))
    return [pick[t] for t in tenants]
