"""`python -m experiments.variants`: weight variants, KV-cache quantisation and speculative decoding, measured.

Two parts, both written into docs/results/variants.md:

- per model (no simulation): checkpoint bytes, GPU memory reserved per instance (GPUs x bytes), KV-cache tokens,
  load time from the cloud store and from NVMe on idle links, one decode step and one prefill, for bf16 / fp8 /
  int8 / int4 (the numbers of conf/variants/cited.yaml applied to the catalog's architectures);
- simulated (`sim`), every configuration on the same seeds: memory per instance, cold starts, TTFT / TPOT, GPU
  hours and cost, each a mean over seeds with a 95% bootstrap interval over seeds, and the ratio to bf16 paired
  by seed (`experiments.compare_stats`).

    python -m experiments.variants                      # smoke x 5 seeds, serverless x 3 seeds (~3 min)
    python -m experiments.variants --scenarios smoke --seeds 3 --out /tmp/variants.md
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.catalog import architecture
from core.config import build_specs
from core.inference import InferenceModel
from core.loadtime import transfer_s
from core.state import gpus_needed
from core.variants import (
    acceptance_for_speedup,
    apply_variants,
    speculative_speedup,
    variants_from_dict,
)
from experiments.compare_stats import Estimate, mean_ci, paired
from experiments.setup import REPO_ROOT
from experiments.simulate import run

CONF_DIR = REPO_ROOT / "conf"
#: configuration label -> hydra overrides (on top of the scenario)
CONFIGS: dict[str, list[str]] = {
    "bf16": [],
    "fp8": ["+variants=fp8"],
    "int8": ["+variants=int8"],
    "int4": ["+variants=int4"],
    "kv_fp8": ["+variants=kv_fp8"],
    "spec (alpha 0.6)": ["+variants=spec"],
    "spec (alpha 0.8)": ["+variants=spec_2p8"],
    "by_class policy": ["policy=variant_by_class", "+variants=by_class"],
}
#: the configurations each scenario runs (serverless: ~11 s a run, so fewer)
SCENARIO_CONFIGS: dict[str, list[str]] = {
    "smoke": list(CONFIGS),
    "serverless": ["bf16", "fp8", "int8", "spec (alpha 0.6)"],
}
STATIC_BASES = ("llama-3.1-8b", "llama-3.1-70b")
#: the generated part of the page starts here; what is above it is kept as written
MARK = "\n## Measured\n"


def compose(overrides: Sequence[str]) -> dict[str, Any]:
    """The composed `config` with `overrides`, as plain containers."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = hydra_compose("config", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


# --------------------------------------------------------------------------- per model, no simulation
def static_rows(cfg: dict[str, Any]) -> pd.DataFrame:
    """Per base and format: bytes, memory per instance, KV tokens, load time and step times."""
    specs = build_specs(cfg)
    node = specs.cluster.nodes[0]
    store = specs.cluster.store
    table = compose(["+variants=cited"])["variants"]
    rows = []
    for base in STATIC_BASES:
        bf16 = architecture(base)
        for fmt in ("bf16", "fp8", "int8", "int4"):
            m = apply_variants([bf16], variants_from_dict({**table, "serve": fmt}))[0]
            n, per_gpu, kv = gpus_needed(m, node, specs.engine)
            inf = InferenceModel(m, node.gpu, n, specs.engine)
            rows.append({
                "model": base, "format": fmt, "weights_GB": m.weights_bytes / 1e9,
                "weights_reduction": bf16.weights_bytes / m.weights_bytes,
                "gpus": n, "reserved_GB": per_gpu * n / 1e9, "kv_tokens_k": kv / m.kv_bytes_per_token / 1e3,
                "load_cloud_s": transfer_s("cloud", m, node, store, n),
                "load_nvme_s": transfer_s("nvme", m, node, store, n) if "nvme" in node.tiers else float("nan"),
                "decode_b1_ms": inf.decode_iter_s(1, 2000) * 1e3, "decode_b32_ms": inf.decode_iter_s(32, 64000) * 1e3,
                "prefill_2k_ms": inf.prefill_s(2048) * 1e3,
            })
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- simulated
def run_metrics(cfg: dict[str, Any]) -> dict[str, float]:
    """One simulation's numbers."""
    r = run(cfg, None)
    s, req, inst = r.summary, r.requests, r.instances
    loading = inst[inst.event == "loading"]
    resident = inst[inst.event == "weights_resident"].groupby("instance").time_s.min()
    started = loading.groupby("instance").time_s.min()
    load_s = (resident - started.reindex(resident.index)).dropna()
    done = req[req.outcome == "completed"]
    return {
        "mem_per_instance_GB": float(loading.gpu_bytes.mean() / 1e9) if len(loading) else float("nan"),
        "weights_per_instance_GB": float(loading.weights_bytes.mean() / 1e9) if len(loading) else float("nan"),
        "load_s": float(load_s.mean()) if len(load_s) else float("nan"),
        "cold_starts": float(s["cold_starts"]),
        "cold_start_mean_s": float((s.get("cold_start_s") or {}).get("mean") or float("nan")),
        "ttft_mean_s": float(done.ttft_s.mean()), "ttft_p99_s": float(done.ttft_s.quantile(0.99)),
        "tpot_mean_ms": float(done.tpot_s.mean() * 1e3),
        "gpu_hours": float(s["gpu_hours"]), "cost_usd": float(s["cost_usd"]),
        "completed_frac": float(len(done) / max(1, len(req))),
        "variants": ", ".join(f"{k or 'bf16'} {v}" for k, v in req.variant.value_counts().items()),
    }


def simulate_all(scenarios: Sequence[str], seeds: dict[str, int]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for sc in scenarios:
        for label in SCENARIO_CONFIGS[sc]:
            for seed in range(seeds[sc]):
                t0 = time.perf_counter()
                cfg = compose([f"scenario={sc}", f"seed={seed}", "progress=false", *CONFIGS[label]])
                m = run_metrics(cfg)
                out.setdefault((sc, label), []).append(m)
                print(f"{sc:10s} {label:18s} seed {seed}: tpot {m['tpot_mean_ms']:.2f} ms, ttft "
                      f"{m['ttft_mean_s']:.3f} s, cost ${m['cost_usd']:.1f} ({time.perf_counter() - t0:.1f} s)",
                      flush=True)
    return out


METRICS = (("mem_per_instance_GB", "GPU GB / instance"), ("load_s", "weights load s"),
           ("cold_start_mean_s", "cold start mean s"), ("ttft_mean_s", "TTFT mean s"),
           ("ttft_p99_s", "TTFT p99 s"), ("tpot_mean_ms", "TPOT mean ms"), ("gpu_hours", "GPU h"),
           ("cost_usd", "cost $"))


def _est(e: Estimate) -> str:
    return e.text(3)


def sim_tables(results: dict[tuple[str, str], list[dict[str, Any]]], scenario: str) -> list[str]:
    labels = [lab for (sc, lab) in results if sc == scenario]
    base = results[(scenario, "bf16")]
    lines = ["| config | " + " | ".join(name for _, name in METRICS) + " |",
             "|---" * (len(METRICS) + 1) + "|"]
    for lab in labels:
        runs = results[(scenario, lab)]
        lines.append(f"| {lab} | " + " | ".join(_est(mean_ci([r[k] for r in runs])) for k, _ in METRICS) + " |")
    lines += ["", f"Ratio to bf16, paired by seed ({scenario}; 95% bootstrap interval over seeds):", "",
              "| config | " + " | ".join(name for _, name in METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for lab in labels:
        if lab == "bf16":
            continue
        runs = results[(scenario, lab)]
        cells = [paired([r[k] for r in runs], [b[k] for b in base]).ratio.text(3) for k, _ in METRICS]
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    lines += ["", "Requests served per variant (seed 0): " + "; ".join(
        f"{lab}: {results[(scenario, lab)][0]['variants']}" for lab in labels), ""]
    return lines


def spec_table() -> list[str]:
    lines = ["| k | c | alpha 0.5 | 0.6 | 0.7 | 0.8 | 0.9 | alpha for 2.8x |", "|---|---|---|---|---|---|---|---|"]
    for k in (2, 4, 8):
        for c in (0.0, 0.05, 0.1):
            cells = [f"{speculative_speedup(a, k, c):.2f}" for a in (0.5, 0.6, 0.7, 0.8, 0.9)]
            need = acceptance_for_speedup(2.8, k, c)
            lines.append(f"| {k} | {c} | " + " | ".join(cells) + f" | {need:.3f} |" if need is not None
                         else f"| {k} | {c} | " + " | ".join(cells) + " | unreachable |")
    return lines


def _fmt_static(df: pd.DataFrame) -> list[str]:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(f"{v:.3g}" if isinstance(v, float | np.floating) else str(v)
                                       for v in r.tolist()) + " |")
    return lines


def report(static: pd.DataFrame, results: dict[tuple[str, str], list[dict[str, Any]]], seeds: dict[str, int],
           command: str, head: str = "# Weight variants, KV-cache quantisation, speculative decoding") -> str:
    """The markdown: `head` (the hand-written part of the page), then the measured tables."""
    lines = [head.rstrip(), "", MARK.strip(), "", f"Command: `{command}`", "",
             "### Per model (roofline + load model, H100 node of the medium cluster, no simulation)", "",
             *_fmt_static(static), "",
             "`reserved_GB` keeps the bf16 deployment's KV reserve (engine.kv_reserve_frac x bf16 weights), so a"
             " variant holds as many KV tokens as bf16; `load_*_s` is the weights' transfer on idle links.", "",
             "### Speculative decoding speed-up (Leviathan et al. 2023, Theorem 3.8)", "", *spec_table(), ""]
    for sc in sorted({sc for sc, _ in results}):
        lines += [f"### Simulated: scenario={sc}, {seeds[sc]} seeds (0..{seeds[sc] - 1}); mean [95% interval]", "",
                  *sim_tables(results, sc)]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenarios", default="smoke,serverless")
    ap.add_argument("--seeds", type=int, default=0, help="seeds per scenario (0: smoke 5, serverless 3)")
    ap.add_argument("--out", default=str(REPO_ROOT / "docs" / "results" / "variants.md"))
    args = ap.parse_args(argv)
    scenarios = [s for s in args.scenarios.split(",") if s]
    seeds = {sc: args.seeds or (5 if sc == "smoke" else 3) for sc in scenarios}
    t0 = time.perf_counter()
    static = static_rows(compose(["scenario=smoke"]))
    print(static.to_string(index=False))
    results = simulate_all(scenarios, seeds)
    command = "python -m experiments.variants " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    old = out.read_text() if out.exists() else ""
    # the hand-written part of the page (everything above MARK, or the whole page before its first run) is kept
    text = report(static, results, seeds, command.strip(), head=old.split(MARK)[0] if MARK in old else
                  old or "# Weight variants, KV-cache quantisation, speculative decoding")
    out.write_text(text)
    print(f"wrote {args.out} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
