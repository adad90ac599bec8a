"""`python -m experiments.twin --report [overrides]`: calibrate once, run the twin per policy x workload x seed,
write docs/fidelity.md.

The `report` block of `conf/live/twin.yaml` says what to run (policies, workloads and their overrides, the
overrides shared by all) and where to write. The user's overrides (`calibration=PATH`, `report.policies=[mvp]`,
`checkpoint_cache=...`) come last. Calibration and every run are subprocesses (`python -m experiments.calibrate`,
`python -m experiments.twin`) bounded by `report.timeout_s`, so one stuck run ends with a clear error instead of
hanging the report. Each policy x workload runs once per `report.seeds` seed; `experiments.twin_seeds.summarize`
pools the seeds and bootstraps the intervals, `experiments.twin_report.render` writes the markdown (both pure,
unit-tested).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from core.errors import ConfigError
from experiments.entry import CONF_DIR
from experiments.setup import REPO_ROOT
from experiments.twin_plot import twin_figure
from experiments.twin_report import render
from experiments.twin_seeds import summarize

#: user overrides that only the twin runs take (not the calibration)
RUN_ONLY_PREFIXES = ("workload", "replay", "twin", "policy", "seed", "calibration", "report", "progress")


def compose(overrides: Sequence[str]) -> dict[str, Any]:
    """conf/live/twin.yaml with `overrides`, as plain containers (hydra's compose API, no run dir)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        cfg = hydra_compose(config_name="live/twin", overrides=list(overrides))
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    return plain


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)}


def _run(argv: list[str], log_path: Path, timeout_s: float) -> str:
    """Run `argv` (bounded), its output into `log_path`; its stdout's last line; RuntimeError if it fails."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, env=_env(), cwd=REPO_ROOT, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"{shlex.join(argv)} ran past {timeout_s:g} s") from e
    log_path.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} exited {proc.returncode}; see {log_path}:\n{proc.stderr[-2000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def calibration_summary(path: Path, line: str | None) -> dict[str, str]:
    """The calibration's key numbers for the report (from calibrated.yaml; its one-line summary if we made it)."""
    calib = yaml.safe_load(path.read_text())
    shown = path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path
    out: dict[str, str] = {"file": f"`{shown}`"}
    if line:
        out["summary"] = line.split(" (written to")[0]
    store = calib["cluster"]["store"]
    out["cloud"] = (f"{store['per_stream_Bps'] / 1e6:.2f} MB/s per stream x {store['streams']}, "
                    f"ttfb {store['ttfb_s'] * 1e3:.1f} ms")
    group = calib["cluster"]["node_groups"][0]
    for tier, t in group["tiers"].items():
        out[f"tier {tier}"] = (f"read {t['read_bw_Bps'] / 1e6:.1f} MB/s, write {t['write_bw_Bps'] / 1e6:.1f} MB/s, "
                               f"capacity {t['capacity_bytes'] / 2**20:.0f} MiB")
    out["host -> engine load"] = f"{group['gpu']['h2d_Bps'] / 1e6:.1f} MB/s"
    eng = calib["engine"]
    out["engine"] = (f"process start {eng['process_start_s']:.2f} s, request overhead "
                     f"{eng['request_overhead_s'] * 1e3:.1f} ms, step overhead {eng['step_overhead_s'] * 1e3:.2f} ms")
    return out


def run_dir(runs_dir: Path, workload: str, policy: str, seed: int) -> Path:
    """Where one seed's run of a policy x workload goes: runs_dir/<workload>/<policy>/seed<k>."""
    return runs_dir / workload / policy / f"seed{seed}"


def load_run(out: Path, workload: str) -> tuple[dict[str, Any], pd.DataFrame]:
    """One finished run: its fidelity.json (labelled with the report's workload name) and its twin.parquet."""
    fid = json.loads((out / "fidelity.json").read_text())
    fid["report_workload"] = workload
    return fid, pd.read_parquet(out / "twin.parquet")


def report(user: Sequence[str]) -> Path:
    """Calibrate (unless `calibration=`), run every policy x workload x seed, write the report; its path."""
    t0 = time.monotonic()
    cfg = compose(user)
    rep = cfg["report"]
    runs_dir = (REPO_ROOT / str(rep["runs_dir"])).resolve()
    timeout_s = float(rep.get("timeout_s", 300))
    shared = [str(o) for o in rep.get("overrides") or []]
    seeds = [int(s) for s in rep.get("seeds") or [int(cfg.get("seed", 0))]]
    calib_user = [o for o in user if not o.lstrip("+~").startswith(RUN_ONLY_PREFIXES)]
    line = None
    reuse = bool(rep.get("reuse", False))  # a rerun that only re-renders (or resumes): keep what is there
    # keep every live half and the calibration's samples; rerun only the simulated halves, on the calibration
    # described again by this code (after a simulator or calibration-description change: no live run, minutes)
    resimulate = bool(rep.get("resimulate", False))
    if resimulate:
        out = runs_dir / "calibrate"
        if not (out / "calibration.json").is_file():
            raise ConfigError(f"report.resimulate: no calibration samples at {out / 'calibration.json'}")
        print(f"re-describing the calibration in {out}", flush=True)
        line = _run([sys.executable, "-m", "experiments.calibrate", f"hydra.run.dir={out}", "progress=false",
                     *shared, *calib_user, f"rerender={out}"], runs_dir / "calibrate.log", timeout_s)
        calibration = out / "calibrated.yaml"
    elif cfg.get("calibration"):
        calibration = Path(str(cfg["calibration"])).expanduser().resolve()
        if not calibration.is_file():
            raise ConfigError(f"calibration: no file at {calibration}")
    elif reuse and (runs_dir / "calibrate" / "calibrated.yaml").is_file():
        calibration = runs_dir / "calibrate" / "calibrated.yaml"
        line = next((ln for ln in (runs_dir / "calibrate.log").read_text().splitlines()
                     if ln.startswith("calibrated:")), None) if (runs_dir / "calibrate.log").is_file() else None
    else:
        out = runs_dir / "calibrate"
        print(f"calibrating into {out}", flush=True)
        line = _run([sys.executable, "-m", "experiments.calibrate", f"hydra.run.dir={out}", "progress=false",
                     *shared, *calib_user], runs_dir / "calibrate.log", timeout_s)
        calibration = out / "calibrated.yaml"
    run_user = [o for o in user if not o.startswith(("report.", "calibration="))]
    groups: list[dict[str, Any]] = []
    figure_runs: list[pd.DataFrame] = []
    fig_wl, fig_policy = rep["figure"]
    workloads: Mapping[str, Any] = rep["workloads"]
    if fig_wl not in workloads or fig_policy not in rep["policies"]:  # before hours of runs, not after
        raise ConfigError(f"report.figure: {fig_wl} / {fig_policy} is not among the workloads and policies run")
    for wl_name, wl in workloads.items():
        for policy in rep["policies"]:
            runs = []
            for seed in seeds:
                out = run_dir(runs_dir, wl_name, policy, seed)
                t = time.monotonic()
                if reuse and not resimulate and (out / "fidelity.json").is_file():
                    print(f"reusing {out}", flush=True)
                else:  # seed= last: each run gets its report seed whatever the user's overrides say
                    if resimulate and not (out / "live" / "records.parquet").is_file():
                        raise ConfigError(f"report.resimulate: {out} has no live half to reuse")
                    again = [f"reuse_live={out}"] if resimulate else []
                    result = _run([sys.executable, "-m", "experiments.twin", f"hydra.run.dir={out}",
                                   "progress=false", f"calibration={calibration}", f"policy={policy}", *shared,
                                   *[str(o) for o in wl.get("overrides") or []], *run_user, f"seed={seed}", *again],
                                  out.with_suffix(".log"), timeout_s)
                    print(f"[{time.monotonic() - t:.0f} s] {result}", flush=True)
                runs.append(load_run(out, wl_name))
            groups.append(summarize(runs))
            if (wl_name, policy) == (fig_wl, fig_policy):
                figure_runs = [j for _, j in runs]
    out_md = (REPO_ROOT / str(rep["out"])).resolve()
    fig_dir = (REPO_ROOT / str(rep["figure_dir"])).resolve()
    # the figure pools the seeds' requests, as the tables do
    twin_figure(pd.concat(figure_runs, ignore_index=True), fig_dir / "twin.png",
                f"twin: {fig_policy}, {fig_wl}, seeds {', '.join(map(str, seeds))} pooled")
    runs_shown = runs_dir.relative_to(REPO_ROOT) if runs_dir.is_relative_to(REPO_ROOT) else runs_dir
    meta = {
        "command": shlex.join(["python", "-m", "experiments.twin", "--report", *user]),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.node()} ({os.cpu_count()} shared CPU cores, {platform.python_version()}), CPU "
                   "engines (engine.kind=cpu, 1 torch thread each), loopback only; the live stack and the "
                   "replay client share the cores",
        "steady": rep.get("steady", "steady"),
        "workloads": {k: v.get("about", "") for k, v in workloads.items()},
        "calibration": calibration_summary(calibration, line),
        "figure": os.path.relpath(fig_dir / "twin.png", out_md.parent),
        "figure_caption": f"The `{fig_policy}` / `{fig_wl}` runs, all seeds pooled: per request sim vs live "
                          "cold-start latency and TTFT (top, y = x dashed), and their CDFs (bottom).",
        "notes": [f"Seeds: {', '.join(map(str, seeds))} (`report.seeds`), one run per policy x workload x seed",
                  f"Shared overrides (calibration and every run): `{' '.join(shared)}`",
                  f"Runs: `{runs_shown}/<workload>/<policy>/seed<k>` (twin.parquet, fidelity.json, twin.png, "
                  "live/serve.log)",
                  f"Wall time of this invocation: {time.monotonic() - t0:.0f} s" + (
                      " (report.reuse=true: the runs and calibration above were reused, not rerun)" if reuse and not
                      resimulate else " (report.resimulate=true: the live halves and the calibration's samples were "
                      "reused; the calibration's description and every simulated half were redone)" if resimulate
                      else "")],
        "discussion": _discussion_file(fig_dir),
        "inference": _inference_fit(fig_dir),
        "inference_doc": os.path.relpath(fig_dir / "inference.md", out_md.parent),
    }
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(render(groups, meta))
    return out_md


def _discussion_file(fig_dir: Path) -> list[str]:
    """Hand-written discussion kept beside the figure (discussion.md), if any: reruns keep it, numbers regenerate."""
    p = fig_dir / "discussion.md"
    return p.read_text().rstrip().splitlines() if p.is_file() else []


def _inference_fit(fig_dir: Path) -> dict[str, Any] | None:
    """`python -m experiments.inference_fit`'s result kept beside the figure (inference.json), if any."""
    p = fig_dir / "inference.json"
    return json.loads(p.read_text()) if p.is_file() else None


def report_main(argv: Sequence[str]) -> None:
    """`--report` entry: errors end the process with status 2 and one line."""
    try:
        path = report(argv)
    except (ConfigError, RuntimeError) as exc:
        print(f"tierlab twin --report: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"report written to {path}")
