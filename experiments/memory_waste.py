"""`python -m experiments.memory_waste`: GPU memory waste, its parts, and what pooled placement, elastic KV and
defragmentation do to it, with bootstrap intervals over seeds. Writes docs/results/memory_waste.md (+ a JSON of
every run's numbers next to it) and prints one line per variant.

Variants (each a list of hydra overrides on top of the scenario; same seed = same trace for every variant):

- `default`: the scenario as configured (`seed_tiered`, static KV reservation of kv_reserve_frac x weights);
- `pooled`: `engine.gpu_pool` (weights on their tensor-parallel GPUs, KV bytes anywhere on the node);
- `elastic`: `engine.kv_elastic` (KV pages mapped on demand up to the static reservation, released when unused);
- `pooled_elastic`: both, placement asking for half the KV cap free besides the weights (`kv_elastic_fit_frac`);
- `defrag`: `policy=defrag` (core/policies/defrag.py), static KV;
- `pooled_elastic_defrag`: all three.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from experiments.compare_stats import Estimate, mean_ci, paired

MODULE = "experiments.memory_waste"
REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "results" / "memory_waste.md"
POOL = "++engine.gpu_pool=true"
ELASTIC = "++engine.kv_elastic=true"
FIT = "++engine.kv_elastic_fit_frac=0.5"  # placement asks for half the KV cap free besides the weights
VARIANTS: dict[str, tuple[str, ...]] = {
    "default": (),
    "pooled": (POOL,),
    "elastic": (ELASTIC,),
    "pooled_elastic": (POOL, ELASTIC, FIT),
    "defrag": ("policy=defrag",),
    "pooled_elastic_defrag": ("policy=defrag", POOL, ELASTIC, FIT),
}
SCENARIOS: tuple[str, ...] = ("serverless", "smoke")
CLAIM = "< 4% GPU memory waste"
#: reported metrics: key -> (label, digits as percent?)
METRICS: dict[str, str] = {
    "memory_waste_frac": "memory_waste_frac (headline)",
    "kv_unused": "(a) KV reserved, unused, while busy",
    "idle": "(b) idle instances, all they hold",
    "idle_kv": "(b) of which KV reservation",
    "loading": "instances loading, all they hold",
    "waste_with_idle": "waste incl. idle weights: (a) + (b) + loading KV",
    "cap_reserved": "reserved / GPU capacity",
    "cap_idle": "(b) idle instances / capacity",
    "cap_waste_with_idle": "waste incl. idle weights / capacity",
    "cap_stranded": "(c) stranded holes / capacity",
    "cap_unallocated": "(d) unallocated / capacity",
    "cap_headroom": "engine headroom (1 - gpu_mem_util) / capacity",
    "slo_attainment": "SLO attainment (TTFT <= 10 s)",
    "ttft_p99_s": "p99 TTFT (s)",
    "cost_usd": "cost ($)",
    "instances_started": "instances started",
    "kv_cache_too_small": "rejected kv_cache_too_small",
}
PERCENT = {"memory_waste_frac", "kv_unused", "idle", "idle_kv", "loading", "waste_with_idle", "cap_reserved",
           "cap_stranded", "cap_unallocated", "cap_headroom", "slo_attainment", "cap_idle", "cap_waste_with_idle"}


def metrics_of(summary: Mapping[str, Any]) -> dict[str, float | None]:
    """The numbers this report compares, from one run's summary."""
    parts = summary.get("memory_waste_parts") or {}
    fr = parts.get("frac_of_reserved") or {}
    fc = parts.get("frac_of_capacity") or {}
    return {
        "memory_waste_frac": summary.get("memory_waste_frac"),
        **{k: fr.get(k) for k in ("kv_unused", "idle", "idle_kv", "loading", "waste_with_idle")},
        **{f"cap_{k}": fc.get(k) for k in ("reserved", "stranded", "unallocated", "headroom", "idle",
                                           "waste_with_idle")},
        "slo_attainment": summary.get("slo_attainment"),
        "ttft_p99_s": (summary.get("ttft_s") or {}).get("p99"),
        "cost_usd": summary.get("cost_usd"),
        "instances_started": summary.get("instances_started"),
        "kv_cache_too_small": float((summary.get("reasons") or {}).get("kv_cache_too_small", 0)),
    }


def run_one(scenario: str, variant: str, seed: int) -> dict[str, Any]:
    """Compose and simulate one combination; its metrics and wall time."""
    from experiments.compare import compose
    from experiments.simulate import run as simulate_config

    t0 = time.perf_counter()
    res = simulate_config(compose([f"scenario={scenario}", *VARIANTS[variant], f"seed={seed}"]), None)
    return {"scenario": scenario, "variant": variant, "seed": seed, "metrics": metrics_of(res.summary),
            "wall_s": time.perf_counter() - t0}


def run_all(scenarios: Sequence[str], variants: Sequence[str], seeds: Sequence[int], workers: int) -> list[dict]:
    """Every scenario x variant x seed, in a fixed order."""
    jobs = [(s, v, k) for s in scenarios for v in variants for k in seeds]
    if workers <= 1:
        return [run_one(*j) for j in jobs]
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(run_one, *zip(*jobs, strict=True)))


def _fmt(key: str, est: Estimate) -> str:
    if est.value is None:
        return "n/a"
    if key in PERCENT:
        lo = "" if est.lo is None else f" [{100 * est.lo:.2f}, {100 * est.hi:.2f}]"
        return f"{100 * est.value:.2f}%{lo}"
    return est.text(4)


def _m(runs: list[dict], sc: str, v: str, key: str) -> list[float | None]:
    return [_metric(r["metrics"], key) for r in runs if r["scenario"] == sc and r["variant"] == v]


def _metric(m: Mapping[str, Any], key: str) -> float | None:
    """A run's metric; a capacity share of a part missing from older runs is its reserved share x reserved."""
    if m.get(key) is None and key in ("cap_idle", "cap_waste_with_idle") and m.get("cap_reserved") is not None:
        part = m.get(key[4:])
        return None if part is None else part * m["cap_reserved"]
    return m.get(key)


def _pct(est: Estimate, digits: int = 1) -> str:
    if est.value is None:
        return "n/a"
    ci = "" if est.lo is None else f" [{100 * est.lo:.{digits}f}, {100 * est.hi:.{digits}f}]"
    return f"{100 * est.value:.{digits}f}%{ci}"


def findings(runs: list[dict], sc: str = "serverless") -> list[str]:
    """The report's conclusions, computed from the runs (claim vs measured, what meets it, what bounds the rest)."""
    have = {r["variant"] for r in runs if r["scenario"] == sc}
    if "default" not in have:
        return []
    out = []
    d = {k: mean_ci(_m(runs, sc, "default", k)) for k in ("memory_waste_frac", "kv_unused", "idle_kv", "idle",
                                                           "loading", "cap_stranded")}
    out.append(f"- **Claim vs measured.** The seed claims {CLAIM}. tierlab measures `memory_waste_frac` "
               f"{_pct(d['memory_waste_frac'], 2)} on `{sc}` with the default engine (static KV reservation of "
               f"kv_reserve_frac = 0.5 x weights, so 0.5 / 1.5 = 33.3% of every instance is KV cache). Its parts: KV "
               f"reserved but unused while busy {_pct(d['kv_unused'])}, the KV reservation of idle instances "
               f"{_pct(d['idle_kv'])}, of loading ones the rest. Fragmentation is not it: stranded holes are "
               f"{_pct(d['cap_stranded'], 2)} of GPU capacity.")
    for v in ("pooled_elastic", "elastic", "pooled_elastic_defrag"):
        if v not in have:
            continue
        w = mean_ci(_m(runs, sc, v, "memory_waste_frac"))
        slo = paired(_m(runs, sc, v, "slo_attainment"), _m(runs, sc, "default", "slo_attainment"))
        cost = paired(_m(runs, sc, v, "cost_usd"), _m(runs, sc, "default", "cost_usd"))
        meets = w.value is not None and w.value < 0.04 and slo.diff.lo is not None and slo.diff.lo >= 0
        diff = slo.diff
        out.append(f"- **`{v}`**: `memory_waste_frac` {_pct(w, 3)}; SLO attainment {100 * diff.value:+.2f} pp "
                   f"[{100 * diff.lo:+.2f}, {100 * diff.hi:+.2f}] against `default` ({slo.diff_verdict}); cost x"
                   f"{cost.ratio.text(3)}. " + ("Under 4% with no loss of SLO attainment: **the goal is met** on "
                                               f"`{sc}`." if meets else "The goal is not met by this variant.")
                   if diff.value is not None and diff.lo is not None else f"- `{v}`: too few seeds")
    best = "pooled_elastic_defrag" if "pooled_elastic_defrag" in have else "default"
    b = {k: mean_ci(_m(runs, sc, best, k)) for k in ("waste_with_idle", "idle", "loading", "cap_idle")}
    if "defrag" in have:
        cap = {v: mean_ci(_m(runs, sc, v, "cap_idle")) for v in ("default", "defrag")}
        res = {v: mean_ci(_m(runs, sc, v, "cap_reserved")) for v in ("default", "defrag")}
        out.append(f"- **Defragmentation** (`defrag` against `default`): idle instances hold {_pct(cap['defrag'])} of "
                   f"GPU capacity-time instead of {_pct(cap['default'])}, reserved memory {_pct(res['defrag'])} "
                   f"instead of {_pct(res['default'])}; the headline does not move (it counts idle weights as held, "
                   "and an idle instance keeps its share of KV reservation until it stops).")
    out.append(f"- **What bounds the rest.** Counting idle instances' weights as waste too (`waste_with_idle`), "
               f"`{best}` still wastes {_pct(b['waste_with_idle'])} of reserved memory-time ({_pct(b['cap_idle'])} "
               f"of capacity), almost all of it idle instances ({_pct(b['idle'])}: keep-alive, the memory a warm "
               f"start costs); loading instances hold a further {_pct(b['loading'])} (weights arriving, not counted). "
               "Idle memory is not reservation slack: stopping idle instances sooner turns their next "
               "request into a reload of at least the engine start (~6 s with progressive loading from DRAM / NVMe, "
               "against a 10 s TTFT SLO), which is why `defrag` stops only instances of models whose requests come "
               "more than keep-alive apart and whose reload is local, and why that part cannot reach 4% without "
               "giving up warm starts. Loading time is set by the tiers' bandwidth (cloud and SATA fetches of "
               "large deployments). The headline's ~0% under elastic KV is close to a construction: live KV is "
               "tracked exactly and mapped in 32 MiB pages, and no fragmentation inside the KV pool, page-mapping "
               "time or remote-KV attention cost is modelled (the seed's < 4% figure is PagedAttention's KV "
               "fragmentation, which tierlab does not model either).")
    return out


def smoke_findings(runs: list[dict], sc: str = "smoke") -> list[str]:
    """One line on the scenario without memory pressure: what each variant costs in SLO attainment there."""
    have = [v for v in dict.fromkeys(r["variant"] for r in runs if r["scenario"] == sc) if v != "default"]
    if not have or not any(r["scenario"] == sc and r["variant"] == "default" for r in runs):
        return []
    parts = []
    for v in have:
        p = paired(_m(runs, sc, v, "slo_attainment"), _m(runs, sc, "default", "slo_attainment")).diff
        if p.value is not None and p.lo is not None:
            parts.append(f"`{v}` {100 * p.value:+.2f} pp [{100 * p.lo:+.2f}, {100 * p.hi:+.2f}]")
    return [f"- **`{sc}`** (no memory pressure), SLO attainment against `default`: " + "; ".join(parts) + ". "
            "Elastic KV without pooling packs instances by their weights and their KV growth then competes on a GPU: "
            "requests wait for pages, the autoscaler starts more instances (cold starts). With pooled placement and "
            "`kv_elastic_fit_frac` 0.5 the loss is a fraction of a point, which is the price of the variant on this "
            "scenario: the `serverless` goal holds, a no-loss claim on `smoke` would not for the elastic variants."]


def report(runs: list[dict], *, seeds: Sequence[int], command: str, wall_s: float) -> str:
    """The markdown report: the definition, findings, then per scenario a table of every variant and SLO
    differences."""
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    lines = [DEFINITION.strip(), "", "## Findings", "", *findings(runs), *smoke_findings(runs), "", "## Measured", "",
             "Variants (hydra overrides on top of `scenario=<name> seed=<k>`): "
             + "; ".join(f"`{v}`: `{' '.join(VARIANTS[v]) or '(none)'}`" for v in variants) + ".", "",
             f"Command: `{command}` ({wall_s:.0f} s wall). Seeds {', '.join(map(str, seeds))}; each cell is the "
             "mean over seeds with a 95% bootstrap interval over seeds (experiments.compare_stats). Fractions of "
             "*reserved* GPU memory-time unless marked *capacity*.", ""]
    scen = list(dict.fromkeys(r["scenario"] for r in runs))
    for sc in scen:
        by = {v: [r for r in runs if r["scenario"] == sc and r["variant"] == v] for v in variants}
        lines += [f"### `{sc}`", "", "| metric | " + " | ".join(f"`{v}`" for v in variants) + " |",
                  "|---|" + "---|" * len(variants)]
        for key, label in METRICS.items():
            cells = [_fmt(key, mean_ci([_metric(r["metrics"], key) for r in by[v]])) for v in variants]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines += ["", "Paired against `default` (same seeds): SLO attainment difference, p99 TTFT and cost ratios.",
                  "", "| variant | SLO attainment a - b | p99 TTFT a / b | cost a / b |", "|---|---|---|---|"]
        base = by.get("default", [])
        for v in variants:
            if v == "default" or not base:
                continue
            cells = []
            for key, kind in (("slo_attainment", "diff"), ("ttft_p99_s", "ratio"), ("cost_usd", "ratio")):
                p = paired([r["metrics"][key] for r in by[v]], [r["metrics"][key] for r in base])
                est, ver = (p.diff, p.diff_verdict) if kind == "diff" else (p.ratio, p.ratio_verdict)
                txt = (f"{100 * est.value:+.2f} pp [{100 * est.lo:+.2f}, {100 * est.hi:+.2f}]"
                       if kind == "diff" and est.value is not None and est.lo is not None else est.text(3))
                cells.append(f"{txt} ({ver})")
            lines.append(f"| `{v}` | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


DEFINITION = """
# GPU memory waste: defined, decomposed, attacked

Claim audited (experiments/claims_base.py `memory_waste`): **"< 4% GPU memory waste"**. The default run
(`python -m experiments.simulate`, scenario `serverless`, seed 0) reports `memory_waste_frac` 0.3327 (~33%).

## Definition (core/memory_waste.py, sim/memory.py)

`memory_waste_frac` is unchanged (core.metrics.memory_waste_frac): 1 - (weights + live KV) / reserved, over GPU
memory-time (byte-seconds) that instances reserved. It is now reported with its parts in the summary key
`memory_waste_parts` (`byte_s`, `frac_of_reserved`, `frac_of_capacity`). An instance's life is split into
*loading* (start -> ready), *busy* (ready, at least one request routed to it and unfinished) and *idle* (ready
with none: waiting out keep-alive, or stopping). Its reserved memory-time R splits exactly into

| part | what | counted in `memory_waste_frac` |
|---|---|---|
| useful | weights while busy + live KV cache | no |
| (a) `kv_unused` | KV cache reserved (mapped) while busy, holding no live sequence | yes |
| (b) `idle` | all an idle instance holds: weights (`idle` - `idle_kv`), KV reservation (`idle_kv`) | only `idle_kv` |
| `loading` | all a loading instance holds; its KV part is `loading_kv` | only `loading_kv` |

so `memory_waste_frac` = (kv_unused + idle_kv + loading_kv) / reserved (`waste_kv`), and `waste_with_idle` =
(kv_unused + idle + loading_kv) / reserved also counts the weights of idle instances as waste. GPU memory no
instance holds is reported against the fleet's GPU capacity-time (n_gpus x memory x run length), not counted as
waste (as before): (c) `stranded`: free bytes on a GPU too small for the smallest deployment of the catalog at
its start (with `gpu_pool`: the node's free total, when that is too small); (d) `unallocated`: the rest of the
free memory; `headroom`: the (1 - gpu_mem_util) share the engine never uses. Instances never take whole devices
here: they reserve bytes on their GPUs (several small instances share one GPU), so "a whole GPU assigned beyond
what its instance reserves" is zero by construction; a GPU's bytes left by its instances are in (c) or (d).

Accounting: an instance's busy time is the union of [placed, finished] of the requests routed to it (a request
re-queued after its instance was lost counts on its final instance only; a migrated victim's busy time ends when
its requests leave). With elastic KV the pages beyond the minimum are mapped only while sequences run, so the busy
part of R is R minus (base bytes x loading and idle seconds), exactly.

## Mechanisms (all off by default; every default result is unchanged, bit for bit)

- **Pooled placement** (`engine.gpu_pool=true`, core/state.py `NodeState.pool_plan`): an instance's weights are
  sharded over its tensor-parallel GPUs (as before), its KV cache may take bytes on any GPU of its node when its
  own GPUs lack room (memory pooled over the node's interconnect: engines that can attend over KV on another GPU,
  as Infinite-LLM's DistAttention does, only). Not modelled: the slower attention over remote KV.
- **Elastic KV** (`engine.kv_elastic=true`, `kv_page_bytes` 32 MiB, `kv_elastic_min_frac` 0): an instance starts
  with its weights only and maps KV pages as sequences are admitted, up to its static reservation as a cap
  (`can_ever_fit` unchanged), and unmaps them when sequences end (kvcached-style virtual KV). A request whose pages
  cannot be mapped waits in its instance's queue until pages are released on the node. Placement reserves the
  weights only, or with `kv_elastic_fit_frac` > 0 asks for that share of the KV cap free besides (not mapped): with
  0, instances pack by weights and on `smoke` (no memory pressure) their KV growth then competes (p99 TTFT up).
  Not modelled: the time of mapping pages.
- **Defragmentation** (`policy=defrag`, core/policies/defrag.py, conf/policy/defrag.yaml): seed_tiered whose
  keep-alive, on quiet nodes, stops idle instances early when their reload is cheap (a DRAM / NVMe copy on the
  node, or a demote to DRAM on the way out; estimated reload <= 7 s): after 30 s idle for models whose mean gap
  between requests is >= 300 s (their next request would find keep-alive expired anyway); busier models are left
  to keep-alive (also stopping them after 3 x their gap, `gap_mult: 3`, cost `smoke` 4.7 points of SLO
  attainment and multiplied its p99 TTFT by 12). The cost is the world's own: demote copies and reloads from the
  local tier. Packing by migration is not done: stranded memory, all it could win, is under 0.5% of capacity in
  every variant (tables below).

Live: none of this has been run live, and `live/` reports no `memory_waste_frac` (live/outputs.py writes NaN)
nor its parts. Pooled placement has nothing to pool there: the gateway plans each node as one memory budget of
weight bytes (live/gateway_nodes.py: one "GPU" per node, gpu_mem_util 1, kv_reserve_frac 0). Elastic KV needs an
engine that maps KV pages on demand (kvcached-style); Tokasaurus is started with a fixed `kv_cache_num_tokens`
(live/engines/tokasaurus.py), so it is not available. The defrag policy is pure and its actions (StopInstance with
`demote_to`) are ones the gateway executes (live/gateway_actions.py), so `policy=defrag` could serve live as it is,
but that has not been tried.
"""


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry: run the variants, write the report, print one line per scenario x variant."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--scenario", action="append", help=f"scenario(s) (default: {', '.join(SCENARIOS)})")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--from-json", type=Path, help="re-render the report from a previous run's JSON (no runs)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    cmd = shlex.join(["python", "-m", MODULE, *argv])
    if args.from_json:
        data = json.loads(args.from_json.read_text())
        runs, wall, cmd = data["runs"], data["wall_s"], data["command"]
    else:
        runs = run_all(args.scenario or list(SCENARIOS), args.variants, args.seeds, args.workers)
        wall = time.perf_counter() - t0
    seeds = sorted({r["seed"] for r in runs})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report(runs, seeds=seeds, command=cmd, wall_s=wall))
    if not args.from_json:
        args.out.with_name(args.out.stem + "_runs.json").write_text(
            json.dumps({"command": cmd, "wall_s": wall, "runs": runs}, indent=1) + "\n")
    for sc in dict.fromkeys(r["scenario"] for r in runs):
        for v in dict.fromkeys(r["variant"] for r in runs):
            rs = [r["metrics"] for r in runs if r["scenario"] == sc and r["variant"] == v]
            w = mean_ci([m["memory_waste_frac"] for m in rs]).value or 0.0
            slo = mean_ci([m["slo_attainment"] for m in rs]).value or 0.0
            print(f"{sc:<10} {v:<22} memory_waste_frac {100 * w:6.2f}%  SLO {100 * slo:5.1f}%")
    print(f"wrote {args.out} ({wall:.0f} s)")


if __name__ == "__main__":
    main()
