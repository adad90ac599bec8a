"""`python -m experiments.twin [overrides]`: run one trace slice live and in the simulator, join per request.

In order (config `conf/live/twin.yaml`, which takes calibrate.yaml's and so serve.yaml's blocks):

1. reads the workload slice (`experiments.setup.load_workload`), assigns models by the seeded Zipf law over
   the catalog (as `experiments.replay` does over the gateway's models) and clips the lengths as the replay
   does (`experiments.replay.clip_lengths`); a slice the live stack cannot serve in the configured time
   (`twin.max_live_s`, `twin.max_rate_per_s`) is a ConfigError naming the limit, before anything starts;
2. calibrates (`experiments.calibrate.run`, in-process, into OUT/calibrate) unless `calibration=PATH` names a
   calibrated.yaml;
3. live: starts `experiments.serve` as a subprocess with this very config (written to OUT/live/serve.yaml),
   replays the slice (`experiments.replay.plan` / `send_all` / `merge_records`), stops serve with Ctrl-C;
4. sim: the same Workload object (same arrivals, models, clipped lengths; row i = request i) on the calibrated
   cluster / engine / inference and the catalog's model specs, under the same policy and seed;
5. joins by request id and writes twin.parquet, fidelity.json (`experiments.twin_join`) and twin.png
   (`experiments.twin_plot`) into the output dir.

`python -m experiments.twin --report [overrides]` calibrates once, runs the twin for every policy x workload of
the config's `report` block and writes docs/fidelity.md (`experiments.twin_run_report`, `experiments.twin_report`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from core.config import build_specs
from core.errors import ConfigError
from core.inference import MeasuredTable
from core.metrics import _clean
from core.records import write_table
from core.specs import ModelSpec
from core.workload.models import assign_models
from core.workload.trace import Workload
from experiments.entry import hydra_command
from experiments.replay import (
    ReplayOptions,
    clip_lengths,
    fetch_gateway_records,
    gateway_models,
    merge_records,
    plan,
    resolve_target,
    send_all,
)
from experiments.serve_catalog import build_catalog, catalog_model_specs, engine_dtype_bytes
from experiments.setup import REPO_ROOT, load_workload
from experiments.twin_join import compare_runs, fidelity, join, run_counts
from experiments.twin_plot import twin_figure
from sim.run import simulate

log = logging.getLogger(__name__)
#: config keys that belong to the twin, not to the serve it starts
TWIN_ONLY_KEYS = ("workload", "replay", "probe", "twin", "calibration", "seed", "models", "report")
SERVE_START_TIMEOUT_S = 180.0
SERVE_STOP_TIMEOUT_S = 90.0


@dataclasses.dataclass(frozen=True)
class TwinLimits:
    """What the live stack is asked to serve at most (the `twin` block)."""

    max_live_s: float = 120.0      # span of the slice's arrivals (the live run takes real time)
    max_rate_per_s: float = 4.0    # mean arrival rate the CPU engines are asked to keep up with
    drain_s: float = 120.0         # after the last arrival: time for the last requests to finish (sim's drain too)

    def check(self, wl: Workload) -> None:
        """ConfigError naming the limit when the slice is more than the live stack serves in time."""
        span_s = float(wl.arrival_s.max()) if len(wl) else 0.0
        if span_s > self.max_live_s:
            raise ConfigError(f"twin.max_live_s: the slice's arrivals span {span_s:.1f} s, above twin.max_live_s="
                              f"{self.max_live_s:g} s that the live stack may take; shorten workload.window, "
                              "lower workload.max_requests or raise the limit")
        rate = len(wl) / max(span_s, 1.0)
        if rate > self.max_rate_per_s:
            raise ConfigError(f"twin.max_rate_per_s: the slice asks {rate:.2f} requests/s ({len(wl)} over "
                              f"{span_s:.1f} s), above twin.max_rate_per_s={self.max_rate_per_s:g} that the CPU "
                              "engines serve; use workload.time_scale > 1 or workload.subsample < 1")


def twin_workload(cfg: Mapping[str, Any], models: Sequence[str], opts: ReplayOptions) -> Workload:
    """The slice both worlds get: loaded, models assigned (the replay's seeded Zipf law), lengths clipped."""
    seed = int(cfg.get("seed", 0))
    wl_cfg = dict(cfg["workload"])
    wl = load_workload(wl_cfg, seed)
    if len(wl) == 0:
        raise ConfigError("workload: no requests left after window / max_requests / subsample")
    wl = assign_models(wl, list(models), float(wl_cfg.get("zipf_s", 1.0)), seed, only_unassigned=False)
    return clip_lengths(wl, opts)


def scaling(cfg: Mapping[str, Any], opts: ReplayOptions) -> dict[str, Any]:
    """How the trace was scaled for CPU engines (stated in fidelity.json)."""
    w = cfg["workload"]
    return {"time_scale": float(w.get("time_scale", 1.0)), "subsample": float(w.get("subsample", 1.0)),
            "window": w.get("window"), "max_requests": w.get("max_requests"),
            "max_prompt_tokens": opts.max_prompt_tokens, "max_output_tokens": opts.max_output_tokens,
            "stream_fraction": opts.stream_fraction}


# --------------------------------------------------------------------------- live


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)}


def run_live(cfg: Mapping[str, Any], wl: Workload, opts: ReplayOptions, out_dir: Path) -> tuple[pd.DataFrame, float]:
    """Serve (subprocess, this config), replay `wl`, stop; the merged records and the replay's wall time."""
    out_dir.mkdir(parents=True, exist_ok=True)
    serve_cfg = {k: v for k, v in cfg.items() if k not in TWIN_ONLY_KEYS}
    serve_cfg.update(port=0, progress=False)
    (out_dir / "serve.yaml").write_text(yaml.safe_dump(serve_cfg, sort_keys=False))
    run_dir = out_dir / "serve"
    argv = [sys.executable, "-m", "experiments.serve", "--config-dir", str(out_dir), "--config-name", "serve",
            f"hydra.run.dir={run_dir}"]
    log_path = out_dir / "serve.log"
    with open(log_path, "w") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=out_dir)
    try:
        info_path = run_dir / "serve.json"
        deadline = time.monotonic() + SERVE_START_TIMEOUT_S
        while not info_path.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"experiments.serve did not start (exit {proc.poll()}); {log_path}:\n"
                                   f"{log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        target = resolve_target({"serve_json": str(info_path)})
        served = set(gateway_models(target))
        if not set(wl.model.tolist()) <= served:
            raise ConfigError(f"catalog: the gateway serves {sorted(served)}, the slice asks "
                              f"{sorted(set(wl.model.tolist()))}")
        seed = int(cfg.get("seed", 0))
        rows = plan(wl, opts, seed)
        wall_s = asyncio.run(send_all(target, rows, opts, seed, progress=False))
        records = merge_records(rows, fetch_gateway_records(target))
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=SERVE_STOP_TIMEOUT_S)
        if proc.returncode != 0:
            log.warning("experiments.serve exited %s; see %s", proc.returncode, log_path)
        return records, wall_s
    finally:
        if proc.poll() is None:
            proc.kill()  # its agents and engines exit with it (--exit-with-parent)
            proc.wait()


# --------------------------------------------------------------------------- sim


def _same_size_tables(measured: Sequence[MeasuredTable], specs: Mapping[str, ModelSpec]) -> list[MeasuredTable]:
    """Calibration probes one checkpoint per size: a model without its own table gets a same-size one's."""
    tables = {t.model: t for t in measured}
    out = list(measured)
    for name, spec in specs.items():
        if name in tables:
            continue
        twin = next((t for m, t in tables.items() if m in specs and specs[m].weights_bytes == spec.weights_bytes),
                    None)
        if twin is not None:
            out.append(dataclasses.replace(twin, model=name))
    return out


def run_sim(cfg: Mapping[str, Any], calibration: Path, wl: Workload, specs: Mapping[str, ModelSpec],
            limits: TwinLimits, out_dir: Path) -> pd.DataFrame:
    """The slice on the calibrated description with the catalog's specs and the same policy and seed."""
    try:
        calib = yaml.safe_load(calibration.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"calibration: cannot read {calibration} ({e})") from None
    if not isinstance(calib, Mapping) or not all(isinstance(calib.get(k), Mapping)
                                                 for k in ("cluster", "engine", "inference")):
        raise ConfigError(f"calibration: {calibration} is not an experiments.calibrate calibrated.yaml")
    cluster = json.loads(json.dumps(calib["cluster"]))
    for group in cluster.get("node_groups") or []:
        group["count"] = int(cfg.get("nodes", group.get("count", 1)))  # as many nodes as the live run
    gw = cfg.get("gateway") or {}
    specs_all = build_specs({"cluster": cluster, "engine": calib["engine"], "inference": calib["inference"],
                             "policy": cfg["policy"]})
    result = simulate(specs_all.cluster, list(specs.values()), specs_all.engine, specs_all.policy, wl,
                      measured=_same_size_tables(specs_all.measured, specs),
                      request_timeout_s=float(gw.get("queue_timeout_s", 30.0)), drain_timeout_s=limits.drain_s,
                      ttft_slo_s=float(cfg.get("ttft_slo_s", 10.0)), seed=int(cfg.get("seed", 0)))
    out_dir.mkdir(parents=True, exist_ok=True)
    write_table(out_dir / "records.parquet", result.requests)
    write_table(out_dir / "instances.parquet", result.instances)
    write_table(out_dir / "tier_moves.parquet", result.moves)
    (out_dir / "summary.json").write_text(json.dumps(_clean(result.summary), indent=2, sort_keys=True))
    return result.requests


# --------------------------------------------------------------------------- the twin


def _table(path: Path) -> pd.DataFrame | None:
    """A parquet table if the run wrote it (a live run stopped before its summary has none)."""
    return pd.read_parquet(path) if path.is_file() else None


def reused_live(run_dir: Path, wl: Workload) -> tuple[pd.DataFrame, float]:
    """The live half of an earlier twin run of the same slice (`reuse_live=RUN_DIR`): its records and live wall
    time. Only the simulated half and the join run again, e.g. after a simulator change. A run of another slice
    (different request ids, models or arrivals) is an error naming `reuse_live`."""
    path = run_dir / "live" / "records.parquet"
    if not path.is_file():
        raise ConfigError(f"reuse_live: no live records at {path}")
    live = pd.read_parquet(path)
    mine = pd.DataFrame({"request_id": np.arange(len(wl)), "model": wl.model, "arrival_s": wl.arrival_s})
    theirs = live.set_index("request_id").reindex(mine["request_id"])
    if len(live) != len(wl) or not (theirs["model"].to_numpy() == mine["model"].to_numpy()).all() \
            or not np.allclose(theirs["arrival_s"].to_numpy(dtype=float), mine["arrival_s"].to_numpy()):
        raise ConfigError(f"reuse_live: {path} holds another slice ({len(live)} requests) than this run's "
                          f"({len(wl)}): same workload, seed and replay clipping are needed")
    old = run_dir / "fidelity.json"
    wall_s = json.loads(old.read_text()).get("live_wall_s", math.nan) if old.is_file() else math.nan
    return live, float(wall_s if wall_s is not None else math.nan)


def calibrate_first(cfg: dict[str, Any], out_dir: Path) -> Path:
    """experiments.calibrate in-process into `out_dir`; the calibrated.yaml's path."""
    from experiments import calibrate

    line = calibrate.run(cfg, out_dir)
    print(line, flush=True)
    return out_dir / "calibrated.yaml"


def run(cfg: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Check, (calibrate,) run live, run sim, join; writes twin.parquet, fidelity.json, twin.png. The fidelity."""
    out_dir.mkdir(parents=True, exist_ok=True)
    opts = ReplayOptions(**dict(cfg.get("replay") or {}))
    limits = TwinLimits(**dict(cfg.get("twin") or {}))
    progress = bool(cfg.get("progress", False))
    entries = build_catalog(cfg.get("catalog") or {}, str(cfg.get("checkpoint_cache", "~/.cache/tierlab")), progress)
    specs = catalog_model_specs(entries, engine_dtype_bytes(cfg))
    wl = twin_workload(cfg, [e.name for e in entries], opts)
    limits.check(wl)  # before anything starts
    calibration = Path(str(cfg["calibration"])).expanduser() if cfg.get("calibration") else None
    if calibration is not None and not calibration.is_file():
        raise ConfigError(f"calibration: no file at {calibration}")
    if calibration is None:
        calibration = calibrate_first(cfg, out_dir / "calibrate")
    sim = run_sim(cfg, calibration, wl, specs, limits, out_dir / "sim")  # fast: first, so a sim error costs no live run
    if cfg.get("reuse_live"):
        live, wall_s = reused_live(Path(str(cfg["reuse_live"])).expanduser(), wl)
        if (out_dir / "live").resolve() != (Path(str(cfg["reuse_live"])).expanduser() / "live").resolve():
            (out_dir / "live").mkdir(parents=True, exist_ok=True)
            write_table(out_dir / "live" / "records.parquet", live)
    else:
        live, wall_s = run_live(cfg, wl, opts, out_dir / "live")
        write_table(out_dir / "live" / "records.parquet", live)
    joined = join(live, sim)
    policy = cfg["policy"].get("name") if isinstance(cfg.get("policy"), Mapping) else None
    live_dir = (Path(str(cfg["reuse_live"])).expanduser() if cfg.get("reuse_live") else out_dir) / "live" / "serve"
    fid = fidelity(live, sim, joined, extra={
        "policy": policy, "workload": wl.name, "seed": int(cfg.get("seed", 0)), "calibration": str(calibration),
        "scaling": scaling(cfg, opts), "live_wall_s": wall_s, "models": sorted(set(wl.model.tolist())),
        "run": compare_runs(run_counts(_table(live_dir / "instances.parquet"), _table(live_dir / "tier_moves.parquet"),
                                       _table(live_dir / "actions.parquet")),
                            run_counts(_table(out_dir / "sim" / "instances.parquet"),
                                       _table(out_dir / "sim" / "tier_moves.parquet")))})
    write_table(out_dir / "twin.parquet", joined)
    (out_dir / "fidelity.json").write_text(json.dumps(_clean(fid), indent=2))
    twin_figure(joined, out_dir / "twin.png", f"twin: {policy}, {wl.name}, seed {fid['seed']}")
    return fid


def one_line(fid: Mapping[str, Any]) -> str:
    """e.g. "twin: 10 live, 10 sim, 10 joined; cold start median |err| 0.31, TTFT 0.12; decisions agree 0.80"."""
    def err(m: str) -> str:
        v = (fid.get(m) or {}).get("median_abs_err")
        return "n/a" if v is None else f"{v:.2f}"

    r = fid["requests"]
    lost = len(r["lost_live"]) + len(r["missing_live"])
    agree = fid.get("decision_agreement")
    text = (f"twin ({fid.get('policy')}, {fid.get('workload')}, seed {fid.get('seed')}): {r['live']} live, "
            f"{r['sim']} sim, {r['joined']} joined; median |rel err| cold start {err('cold_start_s')}, TTFT "
            f"{err('ttft_s')}, TPOT {err('tpot_s')}, e2e {err('e2e_s')}; decisions agree "
            f"{'n/a' if agree is None else f'{agree:.2f}'}")
    if lost:
        text += f"; LIVE LOST {lost} request(s): {dict(list(r['lost_live'].items())[:5])} missing {r['missing_live']}"
    return text


def _command(cfg: dict[str, Any], out_dir: Path) -> str:
    logging.getLogger().setLevel(str(cfg.get("log_level", "warning")).upper())
    logging.getLogger("httpx").setLevel(logging.WARNING)
    fid = run(cfg, out_dir)
    print(f"outputs in {out_dir}")
    return one_line(fid)


def main() -> None:
    """Console-script style entry point; `--report` runs every policy x workload and writes docs/fidelity.md."""
    if "--report" in sys.argv[1:]:
        from experiments.twin_run_report import report_main

        report_main([a for a in sys.argv[1:] if a != "--report"])
        return
    hydra_command("live/twin", _command, prog="tierlab twin")


if __name__ == "__main__":
    main()
