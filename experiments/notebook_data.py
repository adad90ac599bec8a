"""Data for the analysis notebooks (`notebooks/cold_starts.ipynb`, `notebooks/cost.ipynb`).

Both notebooks read one hydra sweep: `notebook_sweep(small=True)` runs it (through the real
`python -m experiments.simulate --multirun`) the first time and reuses it until the simulator's code changes
(`code_fingerprint`). Sweeps are cached
under `$TIERLAB_NB_CACHE` (default `multirun/notebooks/`), one dir per name and overrides; `TIERLAB_NB_FULL=1`
switches the notebooks to the bigger settings. The derived tables the notebooks plot (cold starts with
model sizes and the share of each load phase in their wait, the cost-latency Pareto front) are built here.

`python -m experiments.notebook_data` runs (or finds) the sweep and prints its dir; `--execute` re-executes
both notebooks in place, so the committed .ipynb files carry their outputs.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from core.loadtime import PHASES
from experiments.gather import GatherError, gather, gather_records, sweep_jobs
from experiments.setup import REPO_ROOT, load_models, load_workload

ENV_FULL = "TIERLAB_NB_FULL"
ENV_CACHE = "TIERLAB_NB_CACHE"
DEFAULT_CACHE = REPO_ROOT / "multirun" / "notebooks"
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
NOTEBOOKS: tuple[str, ...] = ("cold_starts.ipynb", "cost.ipynb")
MARKER = "notebook_sweep.json"  # written last: a sweep dir with it is complete
#: What a sweep's results depend on besides its overrides: when any of it changes, a cached sweep is stale.
SIM_SOURCES: tuple[str, ...] = ("core", "sim", "conf", "experiments/setup.py", "experiments/simulate.py",
                                "experiments/entry.py")
SWEEP_NAME = "notebooks"

POLICIES = "mvp,seed_tiered,sllm,predictive"
# 4 policies x 2 tier configs x 2 spot shares = 16 runs of the small cluster over 10 min of the code trace,
# with the 1B..70B catalog (models=multi) so model size shows; about 40 s on 2 cores.
SMALL_OVERRIDES: tuple[str, ...] = (
    "+sweep=policy_tiers_spot", f"policy={POLICIES}", "tiers=default,no_nvme", "cluster.spot_share=0.0,0.5",
    "workload.window=[0,600]", "models=multi")
# 4 x 4 x 3 = 48 runs over the first hour: a few minutes on 2 cores.
FULL_OVERRIDES: tuple[str, ...] = (
    "+sweep=policy_tiers_spot", f"policy={POLICIES}", "tiers=default,no_nvme,fast_nvme,slow_nvme",
    "cluster.spot_share=0.0,0.5,1.0", "workload.window=[0,3600]", "models=multi")

#: The parts of a cold-start request's wait, in order: before it was placed, each load phase, after ready.
WAIT_PARTS: tuple[str, ...] = ("queue", *PHASES, "after_ready")
WAIT_LABELS: dict[str, str] = {
    "queue": "queue (before placement)", "fetch": "fetch (tier -> host)", "to_gpu": "host -> GPU",
    "engine_init": "engine init", "after_ready": "after ready (batch slot)"}

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class NotebookDataError(RuntimeError):
    """A notebook's sweep could not be run or read; the message names the sweep, field or file."""


def full_requested() -> bool:
    """Whether `TIERLAB_NB_FULL=1` asks the notebooks for the bigger settings."""
    return os.environ.get(ENV_FULL, "") == "1"


def cache_dir() -> Path:
    """Where notebook sweeps are cached: `$TIERLAB_NB_CACHE`, else `multirun/notebooks/` in the repo."""
    return Path(os.environ.get(ENV_CACHE) or DEFAULT_CACHE)


def notebook_sweep(small: bool = True, out_dir: str | Path | None = None, timeout_s: float = 1800.0) -> Path:
    """The sweep both notebooks read (small or full settings), run once and cached; its dir."""
    return ensure_sweep(SWEEP_NAME, SMALL_OVERRIDES if small else FULL_OVERRIDES, out_dir, timeout_s=timeout_s)


def sweep_key(name: str, overrides: Sequence[str]) -> str:
    """The cache dir name of a sweep: its name and a hash of its overrides (another setting, another dir)."""
    digest = hashlib.sha256(json.dumps(list(overrides)).encode()).hexdigest()[:10]
    return f"{name}-{digest}"


def code_fingerprint(root: Path = REPO_ROOT) -> str:
    """A hash of the files the simulation's results depend on (`SIM_SOURCES`, caches left out)."""
    h = hashlib.sha256()
    for rel in SIM_SOURCES:
        path = root / rel
        files = sorted(f for f in path.rglob("*") if f.is_file() and "__pycache__" not in f.parts) \
            if path.is_dir() else [path]
        for f in files:
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def ensure_sweep(name: str, overrides: Sequence[str], out_dir: str | Path | None = None, *,
                 timeout_s: float = 1800.0) -> Path:
    """Run `python -m experiments.simulate --multirun <overrides>` into `out_dir/<name>-<hash>` unless that
    sweep is already there from the same simulator code (`code_fingerprint`), and return its dir, gathered
    (`sweep.parquet`, `sweep_records.parquet`).

    The sweep runs into a hidden temp dir renamed into place once every job has its outputs, so a failed or
    interrupted run leaves no partial sweep; concurrent callers wait on a lock and share one run. A sweep
    that fails or outlives `timeout_s` (its whole process group is killed) raises NotebookDataError.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise NotebookDataError(f"ensure_sweep: name must be letters, digits, '_', '.' or '-', got {name!r}")
    if isinstance(overrides, str) or not all(isinstance(o, str) and o for o in overrides):
        raise NotebookDataError(f"ensure_sweep({name}): overrides must be a list of non-empty strings, "
                                f"got {overrides!r}")
    for o in overrides:
        if o.split("=", 1)[0].lstrip("+~") in ("hydra.sweep.dir", "hydra.run.dir", "--multirun", "-m"):
            raise NotebookDataError(f"ensure_sweep({name}): override {o!r} is set by ensure_sweep itself")
    root = Path(out_dir) if out_dir is not None else cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    key = sweep_key(name, overrides)
    final = root / key
    code = code_fingerprint()
    with _locked(root / f".{key}.lock"):
        done = _marker(final)
        if done is not None and done.get("code") == code:
            return final
        if done is not None:
            print(f"sweep {name!r}: the simulator changed since {final} was run; running it again", file=sys.stderr)
        tmp = root / f".{key}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)  # stale, or a sweep that never finished (no marker)
        try:
            _run_sweep(name, list(overrides), tmp, timeout_s)
            try:
                runs = gather(tmp)
                gather_records(tmp)
            except GatherError as exc:
                raise NotebookDataError(f"sweep {name!r}: its outputs are incomplete: {exc}") from None
            marker = {"name": name, "overrides": list(overrides), "jobs": len(runs), "code": code}
            (tmp / MARKER).write_text(json.dumps(marker, indent=2))
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _marker(sweep_dir: Path) -> dict[str, Any] | None:
    """The completion marker of a cached sweep, or None when there is none (or it is unreadable: rerun)."""
    try:
        data = json.loads((sweep_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _run_sweep(name: str, overrides: list[str], sweep_dir: Path, timeout_s: float) -> None:
    cmd = [sys.executable, "-m", "experiments.simulate", "--multirun", *overrides, f"hydra.sweep.dir={sweep_dir}"]
    sweep_dir.mkdir(parents=True)
    log = sweep_dir / "sweep.log"
    with log.open("w") as out:
        # its own session: on timeout or interrupt the launcher's worker processes go with it
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise NotebookDataError(f"sweep {name!r}: still running after {timeout_s:.0f} s, stopped "
                                    f"(command: {' '.join(cmd[1:])})") from None
        except BaseException:
            _kill_group(proc)
            raise
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").strip().splitlines()[-15:])
        raise NotebookDataError(f"sweep {name!r} failed (exit {rc}; command: {' '.join(cmd[1:])}):\n{tail}")


def _kill_group(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """Stop the sweep's whole process group (hydra and the launcher's workers): SIGTERM, then SIGKILL what is
    left after `grace_s`; returns once no process of the group is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.05)  # reap our own child, so it does not linger as a zombie
            try:
                os.killpg(proc.pid, 0)  # workers outlive the launcher by a moment
            except ProcessLookupError:
                return
            time.sleep(0.05)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ------------------------------------------------------------------ tables the notebooks plot


def model_sizes(job_dir: str | Path) -> dict[str, float]:
    """Deployment name -> billions of parameters, from the catalog the job ran with (rebuilt from its
    `.hydra/config.yaml` exactly as `experiments.setup` builds it)."""
    path = Path(job_dir) / ".hydra" / "config.yaml"
    try:
        cfg = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise NotebookDataError(f"{path}: cannot read the job's config ({exc})") from None
    if not isinstance(cfg, Mapping) or "models" not in cfg or "workload" not in cfg:
        raise NotebookDataError(f"{path}: no models or workload section")
    return dict(_sizes(json.dumps([cfg["models"], cfg["workload"], cfg.get("seed", 0)], sort_keys=True)))


_SIZE_CACHE: dict[str, tuple[tuple[str, float], ...]] = {}


def _sizes(key: str) -> tuple[tuple[str, float], ...]:
    # the jobs of a sweep mostly share one catalog: rebuild it once
    if key not in _SIZE_CACHE:
        models_cfg, workload_cfg, seed = json.loads(key)
        models, _ = load_models(models_cfg, load_workload(workload_cfg, int(seed)), int(seed))
        _SIZE_CACHE[key] = tuple((m.name, m.params_b) for m in models)
    return _SIZE_CACHE[key]


def cold_starts(sweep_dir: str | Path) -> pd.DataFrame:
    """Every completed cold-start request of the sweep (the override columns, the record's columns),
    with `params_b` (its model's size), its load's `load_start_s`, `ready_s` and `weights_bytes`, and the
    seconds of its wait in each of `WAIT_PARTS` (`<part>_wait_s`, see `wait_parts`)."""
    root = Path(sweep_dir)
    recs = gather_records(root, write=False)
    cold = recs[recs["cold_start"] & recs["outcome"].eq("completed") & recs["cold_start_s"].notna()].copy()
    jobs = {j.num: j.path for j in sweep_jobs(root)}
    sizes = pd.concat([pd.Series(model_sizes(path), name="params_b").rename_axis("model").reset_index()
                       .assign(job_num=num) for num, path in jobs.items()], ignore_index=True)
    cold = cold.merge(sizes, on=["job_num", "model"], how="left", validate="many_to_one")
    if cold["params_b"].isna().any():
        bad = cold.loc[cold["params_b"].isna(), ["job", "model"]].drop_duplicates().head(3).values.tolist()
        raise NotebookDataError(f"{root}: models not in their job's catalog: {bad}")
    loads = pd.concat([_load_times(num, path) for num, path in jobs.items()], ignore_index=True)
    cold = cold.merge(loads, on=["job_num", "instance"], how="left", validate="many_to_one")
    if cold["load_start_s"].isna().any() or cold["ready_s"].isna().any():
        bad = cold.loc[cold["ready_s"].isna(), ["job", "instance"]].drop_duplicates().head(3).values.tolist()
        raise NotebookDataError(f"{root}: cold starts on instances without loading/ready rows: {bad}")
    parts = wait_parts(cold)
    return pd.concat([cold.reset_index(drop=True), parts.reset_index(drop=True)], axis=1)


def _load_times(job_num: int, job_dir: Path) -> pd.DataFrame:
    path = job_dir / "instances.parquet"
    try:
        inst = pd.read_parquet(path, columns=["time_s", "instance", "event", "weights_bytes"])
    except (OSError, ValueError) as exc:
        raise NotebookDataError(f"{path}: cannot read ({exc})") from None
    out = {}
    for event, col in (("loading", "load_start_s"), ("ready", "ready_s")):
        rows = inst[inst["event"] == event]
        if rows["instance"].duplicated().any():
            raise NotebookDataError(f"{path}: an instance has several {event!r} rows")
        out[col] = rows.set_index("instance")["time_s"]
        if event == "loading":
            out["weights_bytes"] = rows.set_index("instance")["weights_bytes"]
    df = pd.DataFrame(out).rename_axis("instance").reset_index()
    df["instance"] = df["instance"].astype("string")
    return df.assign(job_num=job_num)


def _overlap(a0: np.ndarray, a1: np.ndarray, b0: np.ndarray, b1: np.ndarray) -> np.ndarray:
    return np.clip(np.minimum(a1, b1) - np.maximum(a0, b0), 0.0, None)


def wait_parts(cold: pd.DataFrame) -> pd.DataFrame:
    """Split each cold-start request's wait (`queue_s + cold_start_s`) into `<part>_wait_s` columns, one per
    `WAIT_PARTS`, that sum to it.

    The load ran fetch, host->GPU copy and engine init back to back from `load_start_s` to `ready_s`
    (`sim.world`); the request was placed on it at `arrival + ttft - prefill - cold_start_s` (the definition
    of `cold_start_s` in `sim.run`) and waited `cold_start_s` from then. Its wait in each phase is the
    overlap of the two intervals, a request that joined a load late saw only the phases' ends, and the
    time it still waited after the instance was ready (for a batch slot) is `after_ready`.
    """
    need = ("arrival_s", "ttft_s", "prefill_s", "queue_s", "cold_start_s", "fetch_s", "to_gpu_s",
            "engine_init_s", "load_start_s", "ready_s")
    missing = [c for c in need if c not in cold.columns]
    if missing:
        raise NotebookDataError(f"wait_parts: missing columns {missing}")
    f = {c: cold[c].to_numpy(dtype=float) for c in need}
    placed = f["arrival_s"] + f["ttft_s"] - f["prefill_s"] - f["cold_start_s"]
    end = placed + f["cold_start_s"]
    edges = [f["load_start_s"]]
    for phase in PHASES[:-1]:  # a load without a fetch hop (from DRAM) has fetch_s NaN: zero long
        edges.append(edges[-1] + np.nan_to_num(f[f"{phase}_s"]))
    edges.append(f["ready_s"])
    out = {"queue_wait_s": np.nan_to_num(f["queue_s"])}
    for i, phase in enumerate(PHASES):
        out[f"{phase}_wait_s"] = _overlap(placed, end, edges[i], edges[i + 1])
    out["after_ready_wait_s"] = _overlap(placed, end, f["ready_s"], np.full_like(end, np.inf))
    return pd.DataFrame(out, index=cold.index)


def tail_breakdown(cold: pd.DataFrame, bands: Sequence[float] = (0.0, 0.5, 0.9, 0.99, 1.0),
                   by: str = "cold_start_s") -> pd.DataFrame:
    """Mean seconds of each wait part (`WAIT_PARTS`) over the requests in each quantile band of `by`
    (rows "p0-p50", ..., "p99-p100"), plus `n`: where the time of the fastest and the slowest cold starts goes."""
    if len(cold) == 0:
        raise NotebookDataError("tail_breakdown: no cold-start requests")
    if len(bands) < 2 or list(bands) != sorted(bands) or bands[0] < 0 or bands[-1] > 1:
        raise NotebookDataError(f"tail_breakdown: bands must be increasing quantiles in [0, 1], got {bands!r}")
    qs = cold[by].quantile(list(bands)).to_numpy()
    rows = {}
    for (lo, hi), (qlo, qhi) in zip(pairwise(bands), pairwise(qs), strict=True):
        last = hi == bands[-1]
        sel = cold[(cold[by] >= qlo) & ((cold[by] <= qhi) if last else (cold[by] < qhi))]
        label = f"p{lo * 100:g}-p{hi * 100:g}"
        rows[label] = {**{p: sel[f"{p}_wait_s"].mean() for p in WAIT_PARTS}, "n": len(sel)}
    return pd.DataFrame.from_dict(rows, orient="index")


def pareto_front(df: pd.DataFrame, x: str, y: str) -> pd.Series:
    """True for the rows no other row beats on both `x` and `y` (lower is better on both; a row with an
    equal value on one and a lower one on the other beats it). Rows with a missing value are never on it."""
    for col in (x, y):
        if col not in df.columns:
            raise NotebookDataError(f"pareto_front: no column {col!r}")
    xs = df[x].to_numpy(dtype=float)
    ys = df[y].to_numpy(dtype=float)
    ok = ~(np.isnan(xs) | np.isnan(ys))
    on = np.zeros(len(df), dtype=bool)
    for i in np.flatnonzero(ok):
        beaten = ok & (xs <= xs[i]) & (ys <= ys[i]) & ((xs < xs[i]) | (ys < ys[i]))
        on[i] = not beaten.any()
    return pd.Series(on, index=df.index, name="pareto")


# ------------------------------------------------------------------ executing the notebooks


def execute_notebook(path: str | Path, out_path: str | Path | None = None, *, cwd: str | Path | None = None,
                     timeout_s: float = 900.0) -> Any:
    """Execute a notebook top to bottom in a fresh `python3` kernel (cells run in `cwd`, default the
    notebook's dir) and write it with its outputs to `out_path` (default: in place, through a temp file).
    A cell that raises fails with NotebookDataError naming the notebook and the cell; nothing is written."""
    try:
        import nbformat
        from nbclient import NotebookClient
        from nbclient.exceptions import CellExecutionError, CellTimeoutError
    except ImportError as exc:
        raise NotebookDataError(f"executing notebooks needs nbclient, nbformat and ipykernel "
                                f"(pip install -e '.[test]'): {exc}") from None
    src = Path(path)
    nb = nbformat.read(src, as_version=4)
    # no per-cell timestamps: the committed notebooks change only when their outputs do
    client = NotebookClient(nb, timeout=int(timeout_s), kernel_name="python3", startup_timeout=120,
                            record_timing=False, resources={"metadata": {"path": str(cwd or src.parent)}})
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError) as exc:
        raise NotebookDataError(f"{src}: a cell failed:\n{exc}") from None
    dest = Path(out_path) if out_path is not None else src
    tmp = dest.with_suffix(".ipynb.tmp")
    nbformat.write(nb, tmp)
    tmp.replace(dest)
    return nb


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: run (or find) the notebooks' sweep and print its dir; `--execute` re-executes the notebooks."""
    ap = argparse.ArgumentParser(prog="python -m experiments.notebook_data", description=__doc__.splitlines()[0])
    ap.add_argument("--execute", action="store_true",
                    help=f"execute {', '.join(NOTEBOOKS)} in place (their outputs are written into them)")
    ap.add_argument("--full", action="store_true", help=f"the bigger settings (same as {ENV_FULL}=1)")
    ap.add_argument("--cache", type=Path, help=f"sweep cache dir (default ${ENV_CACHE} or {DEFAULT_CACHE})")
    args = ap.parse_args(argv)
    if args.cache is not None:
        os.environ[ENV_CACHE] = str(args.cache.resolve())  # the notebooks' kernels inherit it
    if args.full:
        os.environ[ENV_FULL] = "1"
    try:
        t0 = time.perf_counter()
        sweep = notebook_sweep(small=not full_requested())
        print(f"sweep in {sweep} ({time.perf_counter() - t0:.1f} s)")
        if args.execute:
            for name in NOTEBOOKS:
                t0 = time.perf_counter()
                execute_notebook(NOTEBOOK_DIR / name)
                print(f"executed {NOTEBOOK_DIR / name} in {time.perf_counter() - t0:.1f} s")
    except NotebookDataError as exc:
        print(f"tierlab: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
