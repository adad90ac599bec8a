"""The analysis notebooks run headless, top to bottom, in a real kernel (nbclient) on their small sweep, so
they cannot rot; and the data helpers they stand on (experiments.notebook_data) do what they say.

One real small sweep (about a minute on two busy cores) is run once per module into a temp cache that both
notebooks then read, as they do on a fresh checkout.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

import nbformat
import numpy as np
import pandas as pd
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from core.catalog import ARCHITECTURES
from experiments import notebook_data as nbd
from experiments.gather import gather
from tests.conftest import REPO

NB_DIR = REPO / "notebooks"


@pytest.fixture(scope="module")
def nb_cache(tmp_path_factory):
    """A fresh sweep cache, named to the notebooks' kernels by the environment they inherit."""
    cache = tmp_path_factory.mktemp("nb_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(nbd.ENV_CACHE, str(cache))
        mp.delenv(nbd.ENV_FULL, raising=False)
        yield cache


@pytest.fixture(scope="module")
def sweep(nb_cache) -> Path:
    """The notebooks' small sweep, really run (hydra --multirun, joblib launcher) into the cache."""
    path = nbd.notebook_sweep(small=True)
    assert path.parent == nb_cache
    return path


@pytest.fixture(scope="module")
def cold(sweep) -> pd.DataFrame:
    return nbd.cold_starts(sweep)


@pytest.fixture(scope="module")
def executed(sweep, nb_cache, tmp_path_factory) -> dict[str, tuple[Path, Any]]:
    """Each notebook, its committed outputs removed, executed once in a temp dir: name -> (path, notebook)."""
    out = {}
    for name in nbd.NOTEBOOKS:
        work = tmp_path_factory.mktemp(name.split(".")[0])
        nb = nbformat.read(NB_DIR / name, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                cell.outputs, cell.execution_count = [], None
        nbformat.write(nb, work / name)
        out[name] = (work / name, nbd.execute_notebook(work / name, cwd=work, timeout_s=420))
    return out


def _outputs(nb: Any) -> list[Any]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


def _markdown(nb: Any) -> str:
    return "\n".join(o["data"]["text/markdown"] for o in _outputs(nb) if "text/markdown" in o.get("data", {}))


# ------------------------------------------------------------------ the notebooks, executed headless


@pytest.mark.parametrize("name", nbd.NOTEBOOKS)
def test_notebook_runs_top_to_bottom_and_draws(name, executed, sweep, nb_cache):
    path, nb = executed[name]
    outs = _outputs(nb)
    assert not [o for o in outs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outs) >= 3, "each notebook draws several figures"
    assert "- **" in _markdown(nb), "the computed conclusions are displayed"
    text = "".join(o.get("text", "") for o in outs if o.output_type == "stream")
    assert "small settings: 16 runs (policy 4 x tiers 2 x cluster.spot_share 2)" in text
    # both notebooks read the one shared sweep rather than running their own
    assert [p.name for p in nb_cache.iterdir() if not p.name.startswith(".")] == [sweep.name]
    # written back with its outputs, executed in order
    saved = nbformat.read(path, as_version=4)
    counts = [c.execution_count for c in saved.cells if c.cell_type == "code"]
    assert counts == list(range(1, len(counts) + 1))
    assert len(_outputs(saved)) == len(outs)


def test_cold_start_conclusions_are_the_sweeps_numbers(executed, cold):
    md = _markdown(executed["cold_starts.ipynb"][1])
    p99 = cold.groupby("policy").cold_start_s.quantile(0.99)
    assert f"Lowest p99 cold start: `{p99.idxmin()}` ({p99.min():.0f} s)" in md
    top = nbd.tail_breakdown(cold).loc["p99-p100", list(nbd.WAIT_PARTS)]
    assert f"**{nbd.WAIT_LABELS[top.idxmax()]}**" in md
    assert f"({int((cold.cold_start_s >= cold.cold_start_s.quantile(0.99)).sum())} requests" in md


def test_cost_conclusions_are_the_sweeps_numbers(executed, sweep):
    md = _markdown(executed["cost.ipynb"][1])
    runs = gather(sweep, write=False)
    by_spot = runs.groupby("cluster.spot_share").cost_per_1k_tokens_usd.mean()
    assert f"from ${by_spot[0.0]:.4f} to ${by_spot[0.5]:.4f}" in md
    assert by_spot[0.5] < by_spot[0.0]  # the spot price is below on-demand (conf/cluster/small.yaml)
    front = runs[nbd.pareto_front(runs, "cost_per_1k_tokens_usd", "cold_start_s.p99")]
    assert f"{len(front)} of {len(runs)} runs are on the cost / p99 cold-start front" in md


def test_committed_notebooks_carry_their_outputs():
    for name in nbd.NOTEBOOKS:
        path = NB_DIR / name
        assert path.stat().st_size < 2_000_000, f"{name}: keep figures small"
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), f"{name}: not executed in order"
        outs = _outputs(nb)
        assert not [o for o in outs if o.output_type == "error"], name
        assert any("image/png" in o.get("data", {}) for o in outs), name
        assert "- **" in _markdown(nb), name
        assert str(REPO) not in nbformat.writes(nb), f"{name}: outputs name this machine's paths"
        assert any("parameters" in c.metadata.get("tags", []) and "SMALL = True" in c.source for c in code), name


def test_a_failing_cell_fails_naming_the_notebook_and_writes_nothing(tmp_path):
    path = tmp_path / "broken.ipynb"
    kernel = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
    nbformat.write(new_notebook(cells=[new_code_cell("x = 1"), new_code_cell("raise ValueError('boom 42')")],
                                metadata=kernel), path)
    before = path.read_bytes()
    with pytest.raises(nbd.NotebookDataError, match=r"broken\.ipynb: a cell failed(.|\n)*boom 42"):
        nbd.execute_notebook(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.ipynb"]


# ------------------------------------------------------------------ ensure_sweep


def test_ensure_sweep_reuses_a_complete_sweep(sweep, capsys):
    mtime = (sweep / nbd.MARKER).stat().st_mtime_ns
    t0 = time.perf_counter()
    assert nbd.ensure_sweep(nbd.SWEEP_NAME, nbd.SMALL_OVERRIDES) == sweep
    assert time.perf_counter() - t0 < 5.0  # found, not rerun (a run takes tens of seconds)
    assert (sweep / nbd.MARKER).stat().st_mtime_ns == mtime
    assert nbd.main([]) == 0
    assert f"sweep in {sweep}" in capsys.readouterr().out
    runs = gather(sweep, write=False)
    assert len(runs) == 16 and set(runs.policy) == {"mvp", "seed_tiered", "sllm", "predictive"}
    assert (sweep / "sweep.parquet").is_file() and (sweep / "sweep_records.parquet").is_file()
    # another setting is another sweep dir
    assert nbd.sweep_key(nbd.SWEEP_NAME, nbd.FULL_OVERRIDES) != sweep.name


def test_a_sweep_run_by_older_simulator_code_is_run_again(tmp_path, capsys):
    overrides = ["policy=mvp", "cluster=small", "workload.max_requests=30", "progress=false", "output.plots=false"]
    path = nbd.ensure_sweep("tiny", overrides, tmp_path)
    marker = json.loads((path / nbd.MARKER).read_text())
    assert marker["code"] == nbd.code_fingerprint() and marker["jobs"] == 1
    assert gather(path, write=False)["requests"].tolist() == [30]
    (path / nbd.MARKER).write_text(json.dumps({**marker, "code": "older"}))
    assert nbd.ensure_sweep("tiny", overrides, tmp_path) == path
    assert "the simulator changed" in capsys.readouterr().err
    assert json.loads((path / nbd.MARKER).read_text())["code"] == marker["code"]  # run again, by this code
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, f".{path.name}.lock"])


def test_a_failing_sweep_names_itself_and_leaves_no_partial_dir(tmp_path):
    with pytest.raises(nbd.NotebookDataError, match=r"sweep 'bad' failed \(exit \d+(.|\n)*no_such_policy"):
        nbd.ensure_sweep("bad", ["policy=no_such_policy", "workload.max_requests=20"], tmp_path)
    assert [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


class _SeenPopen(subprocess.Popen):
    """The real Popen, remembering what it started (to look for the sweep's process group afterwards)."""

    started: ClassVar[list[subprocess.Popen]] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _SeenPopen.started.append(self)


@pytest.fixture
def seen_popen(monkeypatch) -> list[subprocess.Popen]:
    _SeenPopen.started = []
    monkeypatch.setattr(nbd.subprocess, "Popen", _SeenPopen)
    return _SeenPopen.started


def _group(pgid: int) -> list[int]:
    """Live processes of process group `pgid` (/proc/<pid>/stat: state and pgid follow the command)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # ended while we looked
            if int(fields[2]) == pgid and fields[0] != "Z":
                pids.append(int(proc.name))
    return pids


def test_a_sweep_past_its_timeout_is_stopped(tmp_path, seen_popen):
    with pytest.raises(nbd.NotebookDataError, match=r"sweep 'slow': still running after 2 s"):
        nbd.ensure_sweep("slow", list(nbd.SMALL_OVERRIDES), tmp_path, timeout_s=2)
    assert len(seen_popen) == 1 and _group(seen_popen[0].pid) == []
    assert [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_an_interrupted_sweep_takes_its_launcher_workers_with_it(tmp_path, seen_popen):
    """Ctrl-C while the joblib workers run: the whole process group goes, and no partial sweep stays."""
    main = threading.get_ident()
    workers: list[int] = []

    def interrupt_once_workers_run() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if seen_popen:
                workers[:] = [p for p in _group(seen_popen[0].pid) if p != seen_popen[0].pid]
                if len(workers) >= 3:  # two resource trackers and at least one loky worker
                    break
            time.sleep(0.2)
        signal.pthread_kill(main, signal.SIGINT)

    watcher = threading.Thread(target=interrupt_once_workers_run, daemon=True)
    watcher.start()
    with pytest.raises(KeyboardInterrupt):
        nbd.ensure_sweep("interrupted", ["+sweep=policy_tiers_spot", "policy=mvp,sllm", "tiers=default",
                                         "cluster.spot_share=0.0", "workload.window=[0,3600]"], tmp_path)
    watcher.join()
    assert len(workers) >= 3, "the launcher and its workers had started"
    assert _group(seen_popen[0].pid) == []
    assert [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


@pytest.mark.parametrize(("name", "overrides", "match"), [
    ("a/b", ["policy=mvp"], "name must be"),
    ("ok", "policy=mvp", "overrides must be a list"),
    ("ok", ["policy=mvp", ""], "overrides must be a list"),
    ("ok", ["hydra.sweep.dir=/tmp/x"], "'hydra.sweep.dir=/tmp/x' is set by ensure_sweep"),
])
def test_bad_arguments_are_refused_naming_them(name, overrides, match, tmp_path):
    with pytest.raises(nbd.NotebookDataError, match=match):
        nbd.ensure_sweep(name, overrides, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_the_environment_switches_settings_and_cache(monkeypatch):
    monkeypatch.setenv(nbd.ENV_FULL, "1")
    assert nbd.full_requested()
    monkeypatch.setenv(nbd.ENV_FULL, "0")
    assert not nbd.full_requested()
    monkeypatch.setenv(nbd.ENV_CACHE, "/somewhere/else")
    assert nbd.cache_dir() == Path("/somewhere/else")
    monkeypatch.delenv(nbd.ENV_CACHE)
    assert nbd.cache_dir() == REPO / "multirun" / "notebooks"
    assert "multirun/" in (REPO / ".gitignore").read_text().split()  # the default cache is never committed


# ------------------------------------------------------------------ the tables the notebooks plot


def test_cold_starts_carry_catalog_sizes_and_wait_parts_that_add_up(cold):
    assert len(cold) > 1000 and cold.cold_start.all() and (cold.outcome == "completed").all()
    base = cold.model.str.split("/ft-").str[0]
    assert np.allclose(cold.params_b, base.map(lambda b: ARCHITECTURES[b][0]).astype(float))
    assert cold.params_b.nunique() == 6  # models=multi: 1B .. 70B
    parts = cold[[f"{p}_wait_s" for p in nbd.WAIT_PARTS]]
    assert (parts >= 0).all().all()
    assert np.allclose(parts.sum(axis=1), cold.queue_s.fillna(0) + cold.cold_start_s, atol=1e-6)
    # a request never waits longer in a phase than the load spent in it
    for phase in ("fetch", "to_gpu", "engine_init"):
        assert (cold[f"{phase}_wait_s"] <= cold[f"{phase}_s"].fillna(0) + 1e-6).all(), phase
    assert np.allclose(cold.load_start_s + cold.fetch_s.fillna(0) + cold.to_gpu_s + cold.engine_init_s,
                       cold.ready_s, atol=1e-6)


def test_wait_parts_of_a_request_that_joined_a_load_in_flight():
    # load at 10 s: fetch 5 s, to_gpu 1 s, engine init 2 s, ready at 18 s. The request arrives at 11 s, is placed
    # at 12 s (queue 1 s) and has its first token at 22 s after a 1 s prefill: cold_start_s = 22 - 12 - 1 = 9
    row = pd.DataFrame([{"arrival_s": 11.0, "ttft_s": 11.0, "prefill_s": 1.0, "queue_s": 1.0, "cold_start_s": 9.0,
                         "fetch_s": 5.0, "to_gpu_s": 1.0, "engine_init_s": 2.0, "load_start_s": 10.0,
                         "ready_s": 18.0}])
    got = nbd.wait_parts(row).iloc[0].to_dict()
    assert got == {"queue_wait_s": 1.0, "fetch_wait_s": 3.0, "to_gpu_wait_s": 1.0, "engine_init_wait_s": 2.0,
                   "after_ready_wait_s": 3.0}
    # from DRAM there is no fetch hop (fetch_s NaN): placed at 10 s, waits to 15 s
    dram = row.assign(fetch_s=math.nan, ready_s=13.0, arrival_s=10.0, ttft_s=6.0, queue_s=0.0, cold_start_s=5.0)
    got = nbd.wait_parts(dram).iloc[0].to_dict()
    assert got == {"queue_wait_s": 0.0, "fetch_wait_s": 0.0, "to_gpu_wait_s": 1.0, "engine_init_wait_s": 2.0,
                   "after_ready_wait_s": 2.0}
    with pytest.raises(nbd.NotebookDataError, match=r"missing columns \['ready_s'\]"):
        nbd.wait_parts(row.drop(columns="ready_s"))


def test_tail_breakdown_covers_every_request_once(cold):
    bands = nbd.tail_breakdown(cold)
    assert list(bands.index) == ["p0-p50", "p50-p90", "p90-p99", "p99-p100"]
    assert bands.n.sum() == len(cold)
    top = cold[cold.cold_start_s >= cold.cold_start_s.quantile(0.99)]
    assert bands.loc["p99-p100", "fetch"] == pytest.approx(top.fetch_wait_s.mean())
    with pytest.raises(nbd.NotebookDataError, match="bands must be increasing"):
        nbd.tail_breakdown(cold, bands=(0.0, 0.9, 0.5))


def test_pareto_front_keeps_the_rows_nothing_beats():
    df = pd.DataFrame({"cost": [1, 2, 3, 2, 4, math.nan, 1], "p99": [5, 3, 4, 3, 1, 0, 6]})
    # (3, 4) is beaten by (2, 3), (1, 6) by (1, 5); equal rows do not beat each other; NaN is never on it
    assert nbd.pareto_front(df, "cost", "p99").tolist() == [True, True, False, True, True, False, False]
    with pytest.raises(nbd.NotebookDataError, match="no column 'latency'"):
        nbd.pareto_front(df, "cost", "latency")
