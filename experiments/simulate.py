"""`python -m experiments.simulate [overrides]`: run one simulation (or a `--multirun` sweep).

Writes records.parquet (one row per request), tier_moves.parquet, instances.parquet,
summary.json and plots into hydra's output directory, and ends with a one-line summary.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from core.records import write_table, write_tables
from core.regions import setup_from_dict
from experiments.entry import hydra_command
from experiments.plots import cold_start_cdf, cost_breakdown
from experiments.setup import build
from sim.run import SimResult, simulate


def run(cfg: dict[str, Any], out_dir: Path | None, *, progress: bool = False) -> SimResult:
    """Build from a plain config mapping, simulate, and write the outputs into `out_dir`."""
    t0 = time.perf_counter()
    s = build(cfg)
    result = simulate(
        s.cluster, s.models, s.engine, s.policy, s.workload, measured=s.measured,
        request_timeout_s=s.sim.get("request_timeout_s", 600.0),
        drain_timeout_s=s.sim.get("drain_timeout_s", 3600.0),
        ttft_slo_s=s.sim.get("ttft_slo_s", 10.0), progress=progress, seed=int(cfg.get("seed", 0)),
        warmup_s=s.warmup_s, initial_state=s.initial_state,
        regions=setup_from_dict(cfg.get("regions")),  # +regions=... / scenario=edge_regions; absent: off
    )
    result.summary["workload"] = s.workload.name
    result.summary["models"] = len(s.models)
    result.summary["seed"] = int(cfg.get("seed", 0))
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        output = cfg.get("output") or {}
        if output.get("records", True):
            write_tables(out_dir, result.requests, result.moves, result.instances)
            write_table(out_dir / "events.parquet", result.events)  # faults, failovers, stores used
            write_table(out_dir / "engine_starts.parquet", result.engine_starts)  # start-up phases per instance
        # what the tiers held at the end: another run starts from it with sim.initial_state=PATH
        tmp = out_dir / "final_state.json.tmp"
        tmp.write_text(json.dumps(result.final_state, indent=1, sort_keys=True))
        tmp.replace(out_dir / "final_state.json")
        if output.get("plots", True):
            cold_start_cdf(result.requests, out_dir / "cold_start_cdf.png", f"Cold starts: {s.policy.name}")
            cost_breakdown(result.summary, out_dir / "cost_breakdown.png")
        result.summary["total_wall_s"] = time.perf_counter() - t0
        tmp = out_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(result.summary, indent=2, sort_keys=True))
        tmp.replace(out_dir / "summary.json")
    return result


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
