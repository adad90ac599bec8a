"""`python -m experiments.simulate [overrides]`: run one simulation (or a `--multirun` sweep).

Writes records.parquet (one row per request), tier_moves.parquet, instances.parquet,
summary.json and plots into hydra's output directory, and ends with a one-line summary.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from core.errors import ConfigError
from core.records import write_table, write_tables
from core.regions import setup_from_dict
from core.response_cache_model import SimCacheConfig
from core.workload.horizon import ServegenHorizon
from experiments.entry import hydra_command
from experiments.plots import cold_start_cdf, cost_breakdown
from experiments.setup import Setup, build, resolve_path
from sim.run import SimResult, simulate, simulate_streamed


def run(cfg: dict[str, Any], out_dir: Path | None, *, progress: bool = False) -> SimResult:
    """Build from a plain config mapping, simulate, and write the outputs into `out_dir`.
    `records.stream_dir` set: the request records are streamed there instead (`run_streamed`)."""
    t0 = time.perf_counter()
    cfg = _with_horizon_seed(cfg)
    stream_dir = (cfg.get("records") or {}).get("stream_dir")
    if stream_dir:
        s, result = run_streamed(cfg, Path(str(stream_dir)), progress=progress)
    else:
        s = build(cfg)
        result = simulate(
            s.cluster, s.models, s.engine, s.policy, s.workload, measured=s.measured,
            request_timeout_s=s.sim.get("request_timeout_s", 600.0),
            drain_timeout_s=s.sim.get("drain_timeout_s", 3600.0),
            ttft_slo_s=s.sim.get("ttft_slo_s", 10.0), progress=progress, seed=int(cfg.get("seed", 0)),
            warmup_s=s.warmup_s, initial_state=s.initial_state,
            regions=setup_from_dict(cfg.get("regions")),  # +regions=... / scenario=edge_regions; absent: off
            response_cache=response_cache(cfg), steady_state=steady_state(cfg),
        )
    result.summary["workload"] = s.workload.name
    result.summary["models"] = len(s.models)
    result.summary["seed"] = int(cfg.get("seed", 0))
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        output = cfg.get("output") or {}
        if output.get("records", True) and result.records_path is None:
            write_tables(out_dir, result.requests, result.moves, result.instances)
        elif output.get("records", True):  # streamed: records.parquet is in records.stream_dir already
            write_table(out_dir / "tier_moves.parquet", result.moves)
            write_table(out_dir / "instances.parquet", result.instances)
        if output.get("records", True):
            write_table(out_dir / "events.parquet", result.events)  # faults, failovers, stores used
            write_table(out_dir / "engine_starts.parquet", result.engine_starts)  # start-up phases per instance
        # what the tiers held at the end: another run starts from it with sim.initial_state=PATH
        tmp = out_dir / "final_state.json.tmp"
        tmp.write_text(json.dumps(result.final_state, indent=1, sort_keys=True))
        tmp.replace(out_dir / "final_state.json")
        if result.records_path is not None:
            result.summary["records_path"] = str(result.records_path)
        if output.get("plots", True) and result.records_path is None:  # the CDF needs the request table
            cold_start_cdf(result.requests, out_dir / "cold_start_cdf.png", f"Cold starts: {s.policy.name}")
        if output.get("plots", True):
            cost_breakdown(result.summary, out_dir / "cost_breakdown.png")
        result.summary["total_wall_s"] = time.perf_counter() - t0
        tmp = out_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(result.summary, indent=2, sort_keys=True))
        tmp.replace(out_dir / "summary.json")
    return result


def steady_state(cfg: dict[str, Any]) -> str:
    """`sim.steady_state`: exact (default) or fast."""
    return str((cfg.get("sim") or {}).get("steady_state", "exact"))


def response_cache(cfg: dict[str, Any]) -> SimCacheConfig | None:
    """The gateway's response cache as the simulator models it (`response_cache`; null: off), errors naming it."""
    data = cfg.get("response_cache")
    if not data:
        return None
    if not isinstance(data, dict):
        raise ConfigError(f"response_cache: a mapping is needed, got {data!r}")
    try:
        return SimCacheConfig.from_mapping(data)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"response_cache: {str(exc).removeprefix('response cache: ')}") from None


def _with_horizon_seed(cfg: dict[str, Any]) -> dict[str, Any]:
    """`servegen_horizon` draws from the run's seed (as `servegen` does) unless its options name one."""
    wl = cfg.get("workload") or {}
    if wl.get("kind") != "servegen_horizon" or "seed" in (wl.get("options") or {}):
        return cfg
    return {**cfg, "workload": {**wl, "options": {**(wl.get("options") or {}), "seed": int(cfg.get("seed", 0))}}}


def run_streamed(cfg: dict[str, Any], stream_dir: Path, *, progress: bool = False) -> tuple[Setup, SimResult]:
    """`sim.run.simulate_streamed` from a config: a `servegen_horizon` workload is generated chunk by chunk (the
    specs are built on its first chunk, whose catalog names every client); any other workload is built whole and
    only its records are streamed. Refuses what streaming cannot do, naming the field."""
    wl = cfg["workload"]
    if wl.get("kind") == "servegen_horizon":
        for key, neutral in (("window", None), ("time_scale", 1.0), ("subsample", 1.0), ("max_requests", None)):
            if wl.get(key, neutral) != neutral:
                raise ConfigError(f"workload.{key}: must be {neutral} when records.stream_dir streams a "
                                  "servegen_horizon workload; cut it with options.start_s/end_s/rate_scale")
        opts = dict(wl.get("options") or {})
        horizon = ServegenHorizon(resolve_path(str(wl["path"])), **opts)
        first = {**opts, "end_s": min(horizon.end_s, horizon.start_s + horizon.chunk_s)}
        s = build({**cfg, "workload": {**wl, "options": first}})
        chunks: Any = horizon.chunks()
        expected: float | None = horizon.expected_requests()
    else:
        s = build(cfg)
        chunks, expected = [s.workload], len(s.workload)
    if s.warmup_s > 0:
        raise ConfigError("metrics.warmup_s: must be 0 with records.stream_dir (the warm-up cut needs every record)")
    if cfg.get("regions"):
        raise ConfigError("regions: not supported with records.stream_dir (per-request client regions)")
    if cfg.get("response_cache"):
        raise ConfigError("response_cache: not supported with records.stream_dir (it keys every prompt of the run)")
    rec = cfg.get("records") or {}
    result = simulate_streamed(
        s.cluster, s.models, s.engine, s.policy, chunks, stream_dir, chunk_rows=int(rec.get("chunk_rows", 50_000)),
        measured=s.measured, request_timeout_s=s.sim.get("request_timeout_s", 600.0),
        drain_timeout_s=s.sim.get("drain_timeout_s", 3600.0), ttft_slo_s=s.sim.get("ttft_slo_s", 10.0),
        progress=progress, seed=int(cfg.get("seed", 0)), initial_state=s.initial_state,
        expected_requests=expected, steady_state=steady_state(cfg))
    return s, result


def one_line(summary: dict[str, Any]) -> str:
    """e.g. "simulated 86400 s in 9.8 s wall, 2.9k req/s (seed_tiered: 28000 requests, 27990 completed, 0 rejected,
    10 failed; 4100 cold starts: nvme 600, sata 1500, cloud 2000; mean cold start 30.1 s; $1234.56)"."""
    rate = summary.get("requests_per_wall_s") or 0.0
    cs = (summary.get("cold_start_s") or {}).get("mean")
    cs_txt = f"{cs:.2f} s" if cs is not None else "n/a"
    # completed cold-start requests by the tier their instance loaded from (summary.json's cold_start_by_tier)
    by_tier = ", ".join(f"{tier} {row['count']}" for tier, row in (summary.get("cold_start_by_tier") or {}).items())
    warm = f" after a {summary['warmup_s']:.0f} s warm-up" if summary.get("warmup_s") else ""
    return (f"simulated {summary['sim_s']:.0f} s in {summary['wall_s']:.1f} s wall, {rate / 1e3:.1f}k req/s "
            f"({summary.get('policy')}: {summary['requests']} requests{warm}, {summary['completed']} completed, "
            f"{summary['rejected']} rejected, {summary['failed']} failed; {summary['cold_starts']} cold starts"
            f"{': ' + by_tier if by_tier else ''}; mean cold start {cs_txt}; ${summary['cost_usd']:.2f})")


def _command(cfg: dict[str, Any], out_dir: Path) -> str:
    result = run(cfg, out_dir, progress=bool(cfg.get("progress", True)))
    print(f"outputs in {out_dir}")
    return one_line(result.summary)


def main() -> None:
    """Console-script entry point (`tierlab-simulate`)."""
    hydra_command("config", _command)


if __name__ == "__main__":
    main()
