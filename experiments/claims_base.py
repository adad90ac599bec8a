"""The seed-claims audit's common ground: the claims and the regime each runs in, the settings (`SMALL`,
`FULL`), a report row (`ClaimResult`), the `Context` every scenario runs in (composed configs, memoised
simulations, figures, the row's command), the reference prices and bandwidths, and the small formatting
helpers the scenarios share. The rules live in `claims_rules`, the scenarios in `claims_load`, `claims_cost`
and `claims_fleet`, the report and its command line in `claims`."""

from __future__ import annotations

import copy
import json
import os
import shlex
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from core.errors import ConfigError
from experiments.entry import CONF_DIR
from experiments.simulate import run as simulate_config
from sim.run import SimResult

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS = REPO_ROOT / "docs"
REFERENCE = REPO_ROOT.parent / "shared" / "data" / "reference" / "prices_and_bandwidths.yaml"
MODULE = "experiments.claims"

#: The seed architecture's claims, in the order of the report.
CLAIMS: dict[str, str] = {
    "tier_access": "Tier access: GPU < 100 ms, NVMe < 2 s, SATA < 8 s, cloud < 15 s",
    "cold_start": "Cold start 3-5 min (MVP) -> 8-15 s (production)",
    "cold_start_speedup": "6-8x cold-start improvement (180 s -> 15 s)",
    "spot_cost": "54% lower infrastructure cost with 70% spot instances",
    "storage_cost": "40-60% lower storage cost from tiering",
    "memory_waste": "< 4% GPU memory waste",
    "availability": "99.9% availability with multi-cloud failover (< 2 s recovery)",
    "throughput": "24x throughput",
    "memory_pooling": "< 4% GPU memory waste with cross-GPU memory pooling and idle-time defragmentation",
    "semantic_cache": "Semantic caching at edge locations: 40-60% hit rates",
    "edge_routing": "20+ edge sites with sub-100 ms routing (multi-region routing)",
    "quantised_variants": "FP8/INT8 model variants: 2x memory reduction",
    "kv_quantisation": "KV-cache quantisation",
    "speculative_decoding": "Speculative decoding: up to 2.8x faster",
}
#: The scenario (conf/scenario) each claim runs on, and why that is the regime the claim is about.
REGIMES: dict[str, tuple[str, str]] = {
    "tier_access": ("none", "a claim about one load from each tier: the load-time model on idle links, no trace "
                    "(a busy fleet only adds contention, which the cold-start rows measure)"),
    "cold_start": ("serverless", "the claimed production cold start is that of a tiered platform reloading "
                   "models all day: 365 deployments on 4.6x the GPU memory, keep-alive expiry and eviction at every "
                   "tier, so cold starts come from DRAM, NVMe, SATA and the cloud store; on `smoke` every load is a "
                   "first load from the cloud store and the tiers are never used"),
    "cold_start_speedup": ("serverless", "the same runs as the cold-start row (the improvement is their ratio)"),
    "spot_cost": ("smoke", "a claim about the instance bill: a busy hour of the code trace keeps every node of the "
                  "group in use, so the bill is node-hours x price and the spot share decides it (tier behaviour "
                  "does not enter)"),
    "storage_cost": ("serverless", "tiering can only save storage when the catalog overflows the local disks: 11.7 "
                     "TB of deployments over 6 TB of NVMe + SATA, copies written, promoted and evicted all day; "
                     "`smoke`'s 24 deployments fit on one node's disks"),
    "memory_waste": ("smoke", "a claim about the GPU memory of serving instances: on `smoke` instances stay loaded "
                     "and serve the trace, so the waste measured is the engine's KV reservation; on `serverless` "
                     "keep-alive idling would dominate it (idle instances hold no live KV), which is a cost of "
                     "keep-alive, not of memory management"),
    "availability": ("serverless", "outages only matter when loads need an object store: on `serverless` reloads "
                     "fetch from the cloud all day, so every outage meets cold starts; on `smoke` all loads happen "
                     "in the first minutes and an outage later never matters"),
    "throughput": ("smoke", "a claim about one engine's batching: one instance of one model saturated by Poisson "
                   "arrivals (the scenario's trace only supplies the lengths of the `trace` profile)"),
    "memory_pooling": ("serverless", "pooling and defragmentation act on memory that instances reserve and leave "
                       "unused; on `serverless` 365 deployments on 4.6x the GPU memory come and go all day, so idle "
                       "and loading instances and their KV reservations are what there is to win back; on `smoke` "
                       "instances stay loaded and serve"),
    "semantic_cache": ("smoke", "a claim about repeated prompts: the Mooncake conversation trace is the one trace "
                       "here that identifies prompts (block hashes), so it replaces the scenario's trace; the "
                       "cluster and catalog do not enter the hit rate"),
    "edge_routing": ("edge_regions", "a claim about where clients are and where models run: 22 edge metros and 4 "
                     "cloud regions, clients spread over 28 metros, RTTs from cited measurements"),
    "quantised_variants": ("smoke", "a claim about bytes per model and per instance: the smoke catalog (6 bases, "
                           "1-70 B) covers the sizes, and instances stay loaded so memory per instance is measured "
                           "on serving instances"),
    "kv_quantisation": ("smoke", "a claim about the KV tokens an instance holds and its decode step: loaded, busy "
                        "instances serving the trace"),
    "speculative_decoding": ("smoke", "a claim about the decode step of serving instances: instances stay loaded "
                             "and TPOT is measured over every completed request"),
}
VERDICTS: tuple[str, ...] = ("holds", "fails", "holds only if")
MAX_CONDITIONS = 2  # a verdict names at most this many conditions; its section lists the sweep

# Local-tier storage prices: ASSUMPTIONS, not in the reference file (it prices object stores only).
# NVMe is priced like a cloud SSD volume (AWS EBS gp3 list price, us-east-1), SATA like a throughput
# volume of about the SATA tier's bandwidth (AWS EBS st1 list price); host DRAM comes with the instance.
TIER_PRICE_USD_PER_GB_MONTH: dict[str, float] = {"nvme": 0.08, "sata": 0.045, "dram": 0.0}


# ============================================================================== settings
@dataclass(frozen=True)
class Settings:
    """How big each scenario is: `small` for CI, `full` for the committed report."""

    name: str
    cluster: str  # the headline cluster preset (conf/cluster)
    window_s: tuple[float, float] | None  # slice of each scenario's trace (None: all of it)
    bases: tuple[str, ...]  # the cold-start sweep: every deployment of the scenario on one of these bases
    spot_nodes: int  # nodes of the spot scenario's one group (10: 70% is 7 nodes exactly)
    spot_shares: tuple[float, ...]
    kv_fracs: tuple[float, ...]
    load_scales: tuple[float, ...]  # workload.time_scale values of the memory-waste sweep
    outage_rates: tuple[float, ...]  # store outages per store-hour
    failovers_s: tuple[float, ...]
    seeds: tuple[int, ...]
    tp_profiles: tuple[str, ...]
    tp_batches: tuple[int, ...]
    tp_duration_s: float
    grid_points: int


SMALL = Settings(
    name="small", cluster="small", window_s=(0.0, 900.0), bases=("llama-3.2-3b", "llama-3.1-8b", "qwen2.5-32b"),
    spot_nodes=10, spot_shares=(0.0, 0.7, 1.0), kv_fracs=(0.02, 0.5), load_scales=(1.0,),
    outage_rates=(1.0, 4.0), failovers_s=(30.0, 1.0), seeds=(0,), tp_profiles=("chat", "trace"),
    tp_batches=(1, 16, 256), tp_duration_s=120.0, grid_points=60,
)
FULL = Settings(
    name="full", cluster="medium", window_s=None,
    bases=("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "qwen2.5-14b", "qwen2.5-32b", "llama-3.1-70b"),
    spot_nodes=10, spot_shares=(0.0, 0.3, 0.5, 0.7, 0.8, 1.0),
    kv_fracs=(0.02, 0.05, 0.1, 0.25, 0.5, 1.0), load_scales=(1.0, 0.25), outage_rates=(0.25, 1.0, 4.0),
    failovers_s=(30.0, 5.0, 1.0), seeds=(0, 1, 2), tp_profiles=("chat", "long", "trace"),
    tp_batches=(1, 2, 4, 8, 16, 32, 64, 128, 256), tp_duration_s=300.0, grid_points=160,
)

#: The model of the tier-access row's reference point and of the throughput scenario.
TP_MODEL = "llama-3.1-8b"


# ============================================================================ results
@dataclass
class ClaimResult:
    """One row of the report and its section."""

    key: str
    claim: str
    scenario: str
    measured: str
    verdict: str
    rule: str
    command: str
    figure: str  # relative to the report's folder
    evidence: list[str] = field(default_factory=list)
    regime: str = ""  # why the scenario is the right regime for the claim (REGIMES)
    assumptions: list[str] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    """What every scenario needs: settings, where figures go, composed configs and memoised runs."""

    settings: Settings
    out: Path
    runs: dict[str, SimResult] = field(default_factory=dict)
    composed: dict[tuple[str, ...], dict[str, Any]] = field(default_factory=dict)

    @property
    def fig_dir(self) -> Path:
        return self.out / "claims"

    def command(self, key: str) -> str:
        """The command that regenerates row `key` of this report."""
        parts = ["python", "-m", MODULE]
        if self.settings.name == "small":
            parts.append("--small")
        if self.out.resolve() != DOCS.resolve():
            parts += ["--out", str(self.out)]
        return shlex.join([*parts, "--claim", key])

    def config(self, *overrides: str, scenario: str = "smoke") -> dict[str, Any]:
        """The composed config (as `python -m experiments.simulate scenario=<scenario> <overrides>` sees it),
        quiet, without outputs, local tiers priced (TIER_PRICE_USD_PER_GB_MONTH) and the settings' trace window."""
        from hydra import compose, initialize_config_dir
        from omegaconf import OmegaConf

        key = (scenario, *overrides)
        if key in self.composed:  # composing takes longer than many of the runs
            return copy.deepcopy(self.composed[key])
        window = self.settings.window_s
        extra = [f"scenario={scenario}", *([f"workload.window=[{window[0]:g},{window[1]:g}]"] if window else [])]
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("config", overrides=[*extra, *overrides])
        plain = OmegaConf.to_container(cfg, resolve=True)
        assert isinstance(plain, dict)
        plain["progress"] = False
        plain["output"] = {"plots": False, "records": False}
        for group in plain["cluster"]["node_groups"]:
            for name, tier in (group.get("tiers") or {}).items():
                tier.setdefault("price_usd_per_gb_month", TIER_PRICE_USD_PER_GB_MONTH[name])
        self.composed[key] = plain
        return copy.deepcopy(plain)

    def run(self, cfg: Mapping[str, Any], requests: bool = False) -> SimResult:
        """Simulate `cfg` once per distinct config in this process; only the summary is kept (and the
        request table if `requests`), the rest of the tables are dropped to save memory."""
        key = json.dumps(cfg, sort_keys=True, default=str)
        kept = self.runs.get(key)
        if kept is None or (requests and kept.requests.empty and kept.summary["requests"]):
            res = simulate_config(copy.deepcopy(dict(cfg)), None)
            kept = self.runs[key] = SimResult(res.requests if requests else res.requests.iloc[:0],
                                              res.moves.iloc[:0], res.instances.iloc[:0], res.summary,
                                              res.events.iloc[:0])
        return kept

    def figure(self, key: str, draw: Callable[[Path], Path]) -> str:
        """Draw figure `key` whole or not at all; returns its path relative to the report."""
        self.fig_dir.mkdir(parents=True, exist_ok=True)
        path = self.fig_dir / f"{key}.png"
        tmp = self.fig_dir / f".{key}.{uuid.uuid4().hex}.png"
        try:
            draw(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return f"claims/{key}.png"


def reference(entry_id: str) -> dict[str, Any]:
    """The entry `entry_id` of ../shared/data/reference/prices_and_bandwidths.yaml."""
    try:
        data = yaml.safe_load(REFERENCE.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{REFERENCE}: cannot read the reference prices and bandwidths ({exc})") from exc
    for section in (data.values() if isinstance(data, dict) else ()):
        if isinstance(section, list):
            for entry in section:
                if isinstance(entry, dict) and entry.get("id") == entry_id:
                    return entry
    raise ConfigError(f"{REFERENCE}: no entry with id {entry_id!r}")


def _s(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{digits}f} s"


def _pct(x: float | None, digits: int = 0) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def _mean_cold_start(summary: Mapping[str, Any]) -> float | None:
    return (summary.get("cold_start_s") or {}).get("mean")
