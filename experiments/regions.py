"""`python -m experiments.regions`: edge regions and multi-region routing, region-aware vs region-blind.

Runs scenario=edge_regions (22 edge sites + 4 AWS regions, conf/scenario/edge_regions.yaml) with the
region-aware policy and with the same policy blind to where clients are (no RTT term, no near-region replicas),
on the same seeds, and writes docs/results/regions.md: the region table (cited RTTs and the fitted model), the
share of requests whose routing RTT is under 100 ms, RTT and TTFT percentiles and cost, each a mean over seeds
with a 95% bootstrap interval over seeds, and the ratio aware / blind paired by seed.

    python -m experiments.regions                     # 3 seeds x 2 policies (~30 s)
    python -m experiments.regions --seeds 5 --out /tmp/regions.md
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from core.regions import RegionTable, regions_from_dict
from experiments.compare_stats import mean_ci, paired
from experiments.setup import REPO_ROOT
from experiments.simulate import run
from experiments.variants import compose
from sim.regions import summary as rtt_summary

MARK = "\n## Measured\n"
MODES = {"region-aware": "true", "region-blind": "false"}
METRICS = (("share_rtt_under_100ms", "share RTT < 100 ms"), ("rtt_ms_p50", "RTT p50 ms"),
           ("rtt_ms_p99", "RTT p99 ms"), ("ttft_p50_s", "TTFT p50 s"), ("ttft_p99_s", "TTFT p99 s"),
           ("edge_share", "served at edge"), ("own_site_share", "served at own metro"), ("cost_usd", "cost $"),
           ("gpu_usd", "GPU $"), ("egress_usd", "egress $"), ("completed_frac", "completed"))


def overrides(mode: str, seed: int) -> list[str]:
    flag = MODES[mode]
    return ["scenario=edge_regions", f"seed={seed}", "progress=false", f"policy.placement.region_aware={flag}"]


def run_metrics(cfg: dict[str, Any], table: RegionTable) -> dict[str, float]:
    """One simulation's numbers."""
    r = run(cfg, None)
    req, s = r.requests, r.summary
    done = req[req.outcome == "completed"]
    rtt = rtt_summary(req, table)
    kinds = done.node.map(lambda n: "edge" if str(n).startswith("edge-") else "cloud")
    breakdown = s.get("cost_breakdown_usd") or {}
    return {
        "share_rtt_under_100ms": rtt.get("share_rtt_under_100ms", float("nan")),
        "rtt_ms_p50": rtt.get("rtt_ms_p50", float("nan")), "rtt_ms_p99": rtt.get("rtt_ms_p99", float("nan")),
        "ttft_p50_s": float(done.ttft_s.quantile(0.5)), "ttft_p99_s": float(done.ttft_s.quantile(0.99)),
        "edge_share": float((kinds == "edge").mean()) if len(done) else float("nan"),
        # served by the edge site in the client's own metro (node names are edge-<site>-<i>)
        "own_site_share": float((done.node.str.split("-").str[1] == done.client_region).mean()) if len(done)
        else float("nan"),
        "cost_usd": float(s["cost_usd"]), "gpu_usd": float(breakdown.get("gpu", float("nan"))),
        "egress_usd": float(breakdown.get("egress", float("nan"))),
        "completed_frac": float(len(done) / max(1, len(req))),
        "fleet_cost_usd": float(s.get("fleet_cost_usd", float("nan"))),
        "sites_serving": float(done.node.nunique()),
    }


def table_lines(table: RegionTable) -> list[str]:
    """The cloud-region RTT matrix and each edge site's nearest cloud region."""
    clouds = table.of_kind("cloud")
    lines = [f"Fitted route inflation over straight fibre: {table.inflation:.3f} (median over the "
             f"{len(table.measured_ms)} measured pairs); base {table.base_ms:g} ms; client access {table.access_ms:g}"
             " ms.", "", "RTT between cloud regions, ms (measured pairs as given; see conf/regions/default.yaml):", "",
             "| | " + " | ".join(clouds) + " |", "|---" * (len(clouds) + 1) + "|"]
    for a in clouds:
        lines.append(f"| {a} | " + " | ".join(f"{table.rtt_ms(a, b):.0f}" for b in clouds) + " |")
    lines += ["", "Each edge site: nearest cloud region and its RTT (model), ms:", "",
              "| site | nearest cloud | RTT ms | site | nearest cloud | RTT ms |", "|---|---|---|---|---|---|"]
    edges = table.of_kind("edge")
    cells = [(e, table.nearest(e, clouds)) for e in edges]
    for i in range(0, len(cells), 2):
        row = []
        for e, c in cells[i:i + 2]:
            row += [e, c, f"{table.rtt_ms(e, c):.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def report(results: dict[str, list[dict[str, float]]], table: RegionTable, seeds: int, command: str,
           head: str) -> str:
    lines = [head.rstrip(), "", MARK.strip(), "", f"Command: `{command}` (scenario=edge_regions, seeds 0..{seeds - 1};"
             " mean [95% bootstrap interval over seeds])", "", *table_lines(table), "",
             "| policy | " + " | ".join(n for _, n in METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for mode, runs in results.items():
        lines.append(f"| {mode} | " + " | ".join(mean_ci([r[k] for r in runs]).text(3) for k, _ in METRICS) + " |")
    aware, blind = results["region-aware"], results["region-blind"]
    lines += ["", "Ratio region-aware / region-blind, paired by seed:", "",
              "| " + " | ".join(n for _, n in METRICS) + " |", "|---" * len(METRICS) + "|",
              "| " + " | ".join(paired([a[k] for a in aware], [b[k] for b in blind]).ratio.text(3)
                                for k, _ in METRICS) + " |", "",
              f"Always-on fleet (every node billed for the run, both policies): "
              f"${np.mean([r['fleet_cost_usd'] for r in aware]):.2f}; sites serving (mean): region-aware "
              f"{np.mean([r['sites_serving'] for r in aware]):.1f}, region-blind "
              f"{np.mean([r['sites_serving'] for r in blind]):.1f}.", ""]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default=str(REPO_ROOT / "docs" / "results" / "regions.md"))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    table = regions_from_dict(compose(overrides("region-aware", 0))["regions"])
    results: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    for seed in range(args.seeds):
        for mode in MODES:
            t1 = time.perf_counter()
            m = run_metrics(compose(overrides(mode, seed)), table)
            results[mode].append(m)
            print(f"{mode:13s} seed {seed}: <100 ms {m['share_rtt_under_100ms']:.3f}, RTT p50 {m['rtt_ms_p50']:.1f} ms,"
                  f" TTFT p50 {m['ttft_p50_s']:.3f} s p99 {m['ttft_p99_s']:.3f} s, ${m['cost_usd']:.2f} "
                  f"({time.perf_counter() - t1:.1f} s)", flush=True)
    command = "python -m experiments.regions " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    old = out.read_text() if out.exists() else ""
    head = old.split(MARK)[0] if MARK in old else old or "# Edge regions and multi-region routing"
    out.write_text(report(results, table, args.seeds, command.strip(), head))
    print(f"wrote {out} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
