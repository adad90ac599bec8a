"""Distributed sweeps run for real: the same 4-run multirun through a local Ray cluster (hydra/launcher=tierlab_ray)
and through Submitit's local executor (hydra/launcher=tierlab_submitit_local) gathers into the very table that the
joblib launcher gives (the simulations are deterministic; only the wall times differ)."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml

from experiments.gather import gather
from tests.conftest import REPO

#: policy 2 x tiers 2 on the small cluster, half of it spot: 4 short runs (~1 s of simulation each)
SWEEP = ["policy=seed_tiered,sllm", "tiers=default,no_nvme", "cluster=small", "cluster.spot_share=0.5",
         "workload.max_requests=200", "progress=false", "output.plots=false"]
#: the summary's wall-clock measurements: the only columns that may differ between launchers
WALL_COLUMNS = ["wall_s", "total_wall_s", "requests_per_wall_s"]
RUN_TIMEOUT_S = 240


def _multirun(sweep_dir: Path, *launcher: str, env: dict[str, str] | None = None) -> str:
    exe = shutil.which("tierlab-simulate")
    assert exe, "the console script is installed with the package"
    proc = subprocess.run([exe, "--multirun", *SWEEP, *launcher, f"hydra.sweep.dir={sweep_dir}"],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _table(sweep_dir: Path) -> pd.DataFrame:
    df = gather(sweep_dir)
    assert len(df) == 4 and df["job_num"].tolist() == [0, 1, 2, 3]
    return df.drop(columns=WALL_COLUMNS)


@pytest.fixture(scope="module")
def joblib_table(tmp_path_factory) -> pd.DataFrame:
    """The reference: the sweep through hydra's joblib launcher, as the README runs sweeps."""
    out = tmp_path_factory.mktemp("joblib")
    log = _multirun(out, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    assert "Joblib.Parallel" in log
    return _table(out)


def _job_ids(sweep_dir: Path) -> list[str]:
    return [yaml.safe_load((job / ".hydra" / "hydra.yaml").read_text())["hydra"]["job"]["id"]
            for job in sorted(p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir())]


# ------------------------------------------------------------------ Ray


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _pids_using(marker: str) -> list[int]:
    """Processes whose command line names `marker` (this test's own Ray temp dir): what is left of its cluster."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker.encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:  # gone meanwhile
                pass
    return pids


@dataclass(frozen=True)
class RayCluster:
    address: str
    temp_dir: Path
    env: dict[str, str]  # for a driver of this cluster: RAY_ADDRESS and its auth token


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    """A real Ray head on 127.0.0.1 with 2 CPUs (`ray start --head --block`, in its own session), torn down by
    its process group; every port is a free one, so it cannot clash with another Ray on this machine."""
    pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[distributed]'")
    ray_exe = shutil.which("ray")
    assert ray_exe, "the ray package installs the `ray` command"
    # short: Ray's unix socket paths live under it (a 107-byte limit)
    temp_dir = Path(tempfile.mkdtemp(prefix="tlray", dir="/tmp"))
    port, agent, agent_grpc, env_agent, metrics, node_mgr, obj_mgr, worker_lo = _free_ports(8)
    # a token of its own (not ~/.ray/auth_token); and every server on 127.0.0.1 only: Ray otherwise swaps the
    # loopback address for the machine's own and listens there (its single-machine mode for macOS/Windows)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    log = (temp_dir / "head.log").open("w")
    head = subprocess.Popen(
        [ray_exe, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}",
         "--object-store-memory=100000000",  # no Ray Client server: it needs ray[client]
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}",
         f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
         f"--min-worker-port={worker_lo}", f"--max-worker-port={worker_lo + 50}"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while "Ray runtime started" not in (temp_dir / "head.log").read_text():
            assert head.poll() is None, f"ray start exited {head.returncode}: {(temp_dir / 'head.log').read_text()}"
            assert time.monotonic() < deadline, f"no Ray head within 90 s: {(temp_dir / 'head.log').read_text()}"
            time.sleep(0.5)
        yield RayCluster(address, temp_dir, {**env, "RAY_ADDRESS": address})
    finally:
        # SIGTERM to `ray start --block` alone: it drains the node and stops what it started (~5 s); signalling
        # the whole group would stop the GCS first and leave it waiting 30 s for it
        head.terminate()
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)  # anything of its group that outlived it
        log.close()
        deadline = time.monotonic() + 15
        while (left := _pids_using(str(temp_dir))) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in left:  # only processes of this cluster: they name its temp dir
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_a_sweep_on_a_local_ray_cluster_gathers_into_the_joblib_table(ray_cluster, joblib_table, tmp_path):
    log = _multirun(tmp_path, "hydra/launcher=tierlab_ray", env=ray_cluster.env)
    # the driver joined the cluster of the fixture rather than starting a Ray of its own
    assert "Connected to Ray cluster." in log and "Started a local Ray instance" not in log
    assert "Ray launcher: 4 jobs on 2 CPUs" in log
    pd.testing.assert_frame_equal(_table(tmp_path), joblib_table)
    # each job ran as a Ray task (hydra.job.id is the task's id), in a worker of that cluster, which logged it
    ids = _job_ids(tmp_path)
    assert len(set(ids)) == 4 and all(len(i) >= 32 and int(i, 16) >= 0 for i in ids), ids
    worker_logs = "".join(p.read_text(errors="replace")
                          for p in (ray_cluster.temp_dir / "session_latest" / "logs").glob("worker-*.out"))
    for job in joblib_table["job"]:
        assert f"outputs in {tmp_path / job}" in worker_logs, job


def test_ray_sweep_errors_name_the_config_key_or_the_job(ray_cluster, tmp_path):
    exe = shutil.which("tierlab-simulate")
    assert exe

    def sweep(*overrides: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([exe, "--multirun", "cluster=small", "workload.max_requests=20", "progress=false",
                               "output.plots=false", "hydra/launcher=tierlab_ray", *overrides,
                               f"hydra.sweep.dir={tmp_path}"],
                              capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=ray_cluster.env, cwd=REPO)

    # a keyword Ray refuses: before any job is sent
    proc = sweep("+hydra.launcher.ray.remote.num_cpuz=1")
    assert proc.returncode != 0 and "Connected to Ray cluster" not in proc.stderr
    assert "hydra.launcher.ray.remote: Invalid option keyword num_cpuz" in proc.stderr, proc.stderr[-2000:]
    # a config error inside one job (tierlab exits 2 there): the sweep fails naming the job and the field, at once
    # rather than after Ray's retries of a worker that looked crashed
    proc = sweep("cluster.spot_share=0.5,7")
    assert proc.returncode != 0
    assert "job 1 exited with status 2" in proc.stderr, proc.stderr[-2000:]
    assert "cluster.spot_share must be a number in [0, 1], got 7" in proc.stdout + proc.stderr


# ------------------------------------------------------------------ Submitit


def test_a_sweep_through_submitits_local_executor_gathers_into_the_joblib_table(joblib_table, tmp_path):
    """The Slurm launcher's path (submitit pickles each job, runs it, reads its result back) with the local
    executor standing in for sbatch."""
    _multirun(tmp_path, "hydra/launcher=tierlab_submitit_local")
    pd.testing.assert_frame_equal(_table(tmp_path), joblib_table)
    # submitit's own records: one folder per job with its pickled result and its log
    folders = sorted(p for p in (tmp_path / ".submitit").iterdir() if p.name.isdigit())  # not the "%j" template
    assert len(folders) == 4
    for folder in folders:
        assert list(folder.glob("*_result.pkl")), folder
        assert "outputs in" in "".join(p.read_text() for p in folder.glob("*.out"))
    assert len(set(_job_ids(tmp_path))) == 4
