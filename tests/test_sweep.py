"""Sweeps: the tiers config group, the launcher configs, and gathering a real multirun into one table."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from core.errors import ConfigError
from core.spec_builders import cluster_from_dict
from experiments.gather import SWEEP_TABLE, GatherError, expected_jobs, gather, gather_records
from experiments.gather import main as gather_main
from experiments.plots import sweep_scatter
from tests.conftest import CONF, REPO, config

# `calibrated` names a file that `experiments.calibrate` writes (`from_file`): tests/live_serve/test_calibrate.py
CLUSTERS = sorted(p.stem for p in (CONF / "cluster").glob("*.yaml") if p.stem != "calibrated")
TIERS = sorted(p.stem for p in (CONF / "tiers").glob("*.yaml"))


def _hydra_cfg(*overrides: str) -> Any:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


# ------------------------------------------------------------------ the tiers group


def _tier_file(tiers: str) -> dict[str, Any]:
    # OmegaConf reads the file as hydra does (PyYAML alone takes 12.4e9 for a string)
    data = OmegaConf.to_container(OmegaConf.load(CONF / "tiers" / f"{tiers}.yaml"))
    assert isinstance(data, dict)
    return data


def test_every_tier_preset_applies_to_every_cluster_preset():
    assert {"default", "small_dram", "no_nvme", "fast_nvme", "slow_nvme"} <= set(TIERS)
    assert {"small", "medium", "seed_fleet", "multi_cloud"} <= set(CLUSTERS)
    for cluster in CLUSTERS:
        cfg = config(f"cluster={cluster}")["cluster"]
        base = cluster_from_dict(cfg)
        for tiers in TIERS:
            overrides = _tier_file(tiers)
            spec = cluster_from_dict({**cfg, "tier_overrides": overrides})
            assert [n.name for n in spec.nodes] == [n.name for n in base.nodes]
            for node, ref in zip(spec.nodes, base.nodes, strict=True):
                expect = {name: dict(vars(t)) for name, t in ref.tiers.items()}
                for name, fields in overrides.items():
                    if fields is None:
                        expect.pop(name)
                    else:
                        expect[name] = expect[name] | fields
                assert {name: vars(t) for name, t in node.tiers.items()} == expect, (cluster, tiers, node.name)
                assert node.gpu == ref.gpu and node.nic_Bps == ref.nic_Bps  # only the tiers change


def test_the_tiers_group_composes_and_carries_the_reference_numbers():
    def node0(tiers: str) -> Any:
        cfg = config("cluster=medium", f"tiers={tiers}")["cluster"]
        assert cfg["tier_overrides"] == _tier_file(tiers)  # the group lands in cluster.tier_overrides
        return cluster_from_dict(cfg).nodes[0]

    assert "nvme" not in node0("no_nvme").tiers
    assert node0("fast_nvme").tiers["nvme"].read_bw_Bps == 12.4e9  # nvme_gen5_seq_read, low end
    assert node0("slow_nvme").tiers["nvme"].read_bw_Bps == 3.5e9  # nvme_gen3_seq_read
    default = node0("default")
    assert default.tiers["nvme"].read_bw_Bps == 7.45e9  # nvme_gen4_seq_read
    small_dram = node0("small_dram")
    assert small_dram.tiers["dram"].capacity_bytes == 128e9
    assert small_dram.tiers["nvme"] == default.tiers["nvme"]


def test_tier_override_errors_name_the_field():
    group = {"name": "g", "n_gpus": 1, "nic_Bps": 1e9,
             "gpu": {"name": "x", "mem_bytes": 80e9, "hbm_Bps": 1e12, "flops": 1e15, "h2d_Bps": 1e10},
             "tiers": {"dram": {"capacity_bytes": 1e11, "read_bw_Bps": 5e10, "write_bw_Bps": 5e10}}}

    def build(overrides: Any) -> Any:
        return cluster_from_dict({"node_groups": [group], "tier_overrides": overrides})

    with pytest.raises(ConfigError, match=r"cluster\.tier_overrides\.gpu: unknown tier"):
        build({"gpu": {"capacity_bytes": 1e9}})
    with pytest.raises(ConfigError, match=r"cluster\.tier_overrides\.dram: expected a mapping"):
        build({"dram": 5})
    with pytest.raises(ConfigError, match=r"cluster\.tier_overrides: expected a mapping"):
        build([1])
    with pytest.raises(ConfigError, match=r"node_groups\[0\]\.tiers\.dram \(with cluster\.tier_overrides\.dram\): "
                                          r"unknown field\(s\) \['read_bw'\]"):
        build({"dram": {"read_bw": 1e9}})
    with pytest.raises(ConfigError, match=r"tiers\.dram \(with cluster\.tier_overrides\.dram\)\.read_bw_Bps must be"):
        build({"dram": {"read_bw_Bps": -1.0}})
    # a tier the group lacks is added only when complete; otherwise the missing field is named
    with pytest.raises(ConfigError, match=r"tiers\.nvme \(with cluster\.tier_overrides\.nvme\).*write_bw_Bps"):
        build({"nvme": {"capacity_bytes": 1e12, "read_bw_Bps": 7e9}})
    added = build({"nvme": {"capacity_bytes": 1e12, "read_bw_Bps": 7e9, "write_bw_Bps": 6e9}}).nodes[0]
    assert set(added.tiers) == {"dram", "nvme"}
    assert set(build({"dram": None}).nodes[0].tiers) == set()
    # from the command line, through the real composition
    with pytest.raises(ConfigError, match=r"cluster\.tier_overrides\.hbm"):
        cluster_from_dict(config("cluster=small", "+cluster.tier_overrides.hbm.capacity_bytes=1")["cluster"])


# ------------------------------------------------------------------ launchers


def test_joblib_launcher_and_the_readme_sweep_compose():
    from hydra_plugins.hydra_joblib_launcher.config import JobLibLauncherConf

    cfg = _hydra_cfg("+sweep=policy_tiers_spot")
    assert OmegaConf.get_type(cfg.hydra.launcher) is JobLibLauncherConf
    assert cfg.hydra.launcher.n_jobs == -1
    params = {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}
    assert {k: len(v) for k, v in params.items()} == {"policy": 3, "tiers": 3, "cluster.spot_share": 2}
    assert len(cfg.cluster.node_groups) == 1 and cfg.cluster.node_groups[0].count == 2  # cluster=small
    assert list(cfg.workload.window) == [0, 900]
    for group in ("policy", "tiers"):  # every swept value names a real option of its group
        assert all((CONF / group / f"{v}.yaml").is_file() for v in params[group]), params[group]


def test_slurm_launcher_config_validates_against_the_submitit_schema():
    from hydra.utils import get_class
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf

    cfg = _hydra_cfg("hydra/launcher=tierlab_slurm")
    launcher = cfg.hydra.launcher
    assert OmegaConf.get_type(launcher) is SlurmQueueConf
    assert (launcher.partition, launcher.timeout_min, launcher.cpus_per_task, launcher.mem_gb) == (None, 60, 1, 8)
    assert get_class(launcher._target_).__name__ == "SlurmLauncher"
    # the schema is enforced at composition: misspelt and mistyped keys fail
    with pytest.raises(ConfigCompositionException):
        _hydra_cfg("hydra/launcher=tierlab_slurm", "hydra.launcher.partiton=gpu")
    with pytest.raises(ConfigCompositionException):
        _hydra_cfg("hydra/launcher=tierlab_slurm", "hydra.launcher.mem_gb=lots")


#: Keyword arguments of ray.init() and of ray.remote() for functions that the config may use (Ray 2.x docs).
RAY_INIT_ARGS = {"address", "num_cpus", "num_gpus", "resources", "object_store_memory", "namespace", "runtime_env",
                 "include_dashboard", "dashboard_host", "ignore_reinit_error", "log_to_driver", "logging_level"}
RAY_REMOTE_ARGS = {"num_cpus", "num_gpus", "resources", "memory", "max_calls", "max_retries", "retry_exceptions",
                   "runtime_env", "scheduling_strategy", "num_returns"}


def test_ray_launcher_config_validates_against_its_schema(monkeypatch):
    from hydra.plugins.launcher import Launcher
    from hydra.utils import get_class

    from hydra_plugins.tierlab_ray_launcher.ray_launcher import TierlabRayLauncherConf

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    launcher = _hydra_cfg("hydra/launcher=tierlab_ray").hydra.launcher
    # by name: hydra's plugin scan executes the module apart from the import system, a second class object
    schema = OmegaConf.get_type(launcher)
    assert (schema.__module__, schema.__qualname__) == (TierlabRayLauncherConf.__module__, "TierlabRayLauncherConf")
    cls = get_class(launcher._target_)
    assert issubclass(cls, Launcher) and cls.__name__ == "TierlabRayLauncher"
    assert set(launcher.ray.init) <= RAY_INIT_ARGS and set(launcher.ray.remote) <= RAY_REMOTE_ARGS
    assert launcher.ray.init.address is None  # a local Ray unless RAY_ADDRESS names a cluster
    assert launcher.ray.remote.num_cpus == 1 and "max_calls" not in launcher.ray.remote  # workers are reused
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert _hydra_cfg("hydra/launcher=tierlab_ray").hydra.launcher.ray.init.address == "ray://head:10001"
    # the schema is enforced at composition: a misspelt key fails
    with pytest.raises(ConfigCompositionException):
        _hydra_cfg("hydra/launcher=tierlab_ray", "hydra.launcher.rayy=5")
    with pytest.raises(ConfigCompositionException):
        _hydra_cfg("hydra/launcher=tierlab_ray", "hydra.launcher.ray=5")


def test_submitit_local_and_tierlab_joblib_launchers_compose_in_their_plugins_schemas():
    from hydra_plugins.hydra_joblib_launcher.config import JobLibLauncherConf
    from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf

    local = _hydra_cfg("hydra/launcher=tierlab_submitit_local").hydra.launcher
    assert OmegaConf.get_type(local) is LocalQueueConf
    assert local._target_.endswith("submitit_launcher.LocalLauncher") and local.cpus_per_task == 1
    joblib = _hydra_cfg("hydra/launcher=tierlab_joblib").hydra.launcher
    assert OmegaConf.get_type(joblib) is JobLibLauncherConf and joblib.n_jobs == -1


def test_hydras_plugin_scan_finds_the_ray_launcher_without_importing_ray():
    """Every hydra command scans hydra_plugins: the plugin must load there (outside sys.modules) without Ray."""
    code = ("import sys; sys.modules['ray'] = None\n"  # any `import ray` now fails
            "from hydra.core.plugins import Plugins\n"
            "from hydra.plugins.launcher import Launcher\n"
            "print(sorted(c.__name__ for c in Plugins.instance().discover(Launcher)))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert "TierlabRayLauncher" in proc.stdout and "JoblibLauncher" in proc.stdout, proc.stdout


# ------------------------------------------------------------------ gather


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    """A real 2 x 2 multirun (basic launcher): policy x tiers on the small cluster, half of it spot."""
    out = tmp_path_factory.mktemp("sweep")
    exe = shutil.which("tierlab-simulate")
    assert exe, "the console script is installed with the package"
    proc = subprocess.run([exe, "--multirun", "policy=seed_tiered,sllm", "tiers=default,no_nvme", "cluster=small",
                           "cluster.spot_share=0.5", "workload.max_requests=300", "progress=false",
                           "output.plots=false", f"hydra.sweep.dir={out}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture
def sweep_copy(sweep_dir, tmp_path) -> Path:
    """A copy of the sweep that a test may damage."""
    return Path(shutil.copytree(sweep_dir, tmp_path / "sweep"))


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_gather_gives_one_row_per_job_with_its_overrides_and_its_summary(sweep_copy):
    df = gather(sweep_copy)
    assert len(df) == 4 and df["job_num"].tolist() == [0, 1, 2, 3]
    assert df.attrs["override_columns"] == ["policy", "tiers", "cluster", "cluster.spot_share", "workload.max_requests",
                                            "progress", "output.plots"]
    assert sorted(zip(df["policy"], df["tiers"], strict=True)) == [
        ("seed_tiered", "default"), ("seed_tiered", "no_nvme"), ("sllm", "default"), ("sllm", "no_nvme")]
    assert df["cluster.spot_share"].dtype == "float64" and (df["cluster.spot_share"] == 0.5).all()
    assert (df["workload.max_requests"] == 300).all() and not df["progress"].any()
    for _, row in df.iterrows():
        job = sweep_copy / row["job"]
        assert yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())[:2] == [
            f"policy={row['policy']}", f"tiers={row['tiers']}"]
        summary = _flat(json.loads((job / "summary.json").read_text()))
        for key, value in summary.items():
            col = "summary.policy" if key == "policy" else key
            assert row[col] == value or (value is None and pd.isna(row[col])), (row["job"], key)
        assert row["summary.policy"] == row["policy"]
        assert row["spot_nodes"] == 1  # 2 nodes x 0.5
        # the tier configuration reached the simulation: no NVMe, no loads from it
        if row["tiers"] == "no_nvme":
            assert row["loads_by_tier.nvme"] == 0 and row["cold_start_by_tier.nvme.count"] == 0
        else:
            assert row["loads_by_tier.nvme"] > 0
    for col in ("cold_start_s.mean", "cold_start_s.p50", "cold_start_s.p99", "ttft_s.p50", "ttft_s.p99",
                "slo_attainment", "cost_usd", "cost_breakdown_usd.gpu", "availability", "completed", "rejected",
                "failed"):
        assert col in df.columns
    written = pd.read_parquet(sweep_copy / SWEEP_TABLE)
    pd.testing.assert_frame_equal(written, df)
    assert written.attrs["override_columns"] == df.attrs["override_columns"]  # kept for the CLI and plots
    assert not list(sweep_copy.glob("*.tmp"))
    with pytest.raises(ValueError, match=r"no column 'ttft_s\.p95'"):
        sweep_scatter(df, sweep_copy / "bad.png", y="ttft_s.p95")
    assert not (sweep_copy / "bad.png").exists()


def test_gather_records_is_the_long_table_of_every_request(sweep_copy):
    df = gather(sweep_copy, write=False)
    long = gather_records(sweep_copy, columns=["request_id", "cold_start_s", "outcome"])
    assert len(long) == df["requests"].sum() == 4 * 300
    assert list(long.columns[:4]) == ["job_num", "job", "policy", "tiers"]
    by_job = long.groupby("job_num")
    assert by_job.size().tolist() == df["requests"].tolist()
    assert by_job["cold_start_s"].mean().round(9).tolist() == df["cold_start_s.mean"].round(9).tolist()
    assert (long.groupby("job_num")["tiers"].first() == df.set_index("job_num")["tiers"]).all()
    assert (sweep_copy / "sweep_records.parquet").is_file()


def test_a_missing_summary_fails_naming_the_job_unless_allowed(sweep_copy):
    victim = sorted(p for p in sweep_copy.iterdir() if p.name.startswith("2_"))[0]
    (victim / "summary.json").unlink()
    with pytest.raises(GatherError, match=rf"job 2 \(.*{victim.name}\): no summary\.json"):
        gather(sweep_copy)
    assert not (sweep_copy / SWEEP_TABLE).exists()  # nothing written on failure
    with pytest.warns(UserWarning, match=victim.name):
        df = gather(sweep_copy, allow_missing=True)
    assert df["job_num"].tolist() == [0, 1, 3] and df.attrs["missing_jobs"] == [str(victim)]


def test_gather_checks_the_job_dirs_against_the_sweep(sweep_copy, tmp_path):
    assert expected_jobs(sweep_copy) == 4
    with pytest.raises(GatherError, match="no such sweep dir"):
        gather(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GatherError, match="no job dirs"):
        gather(tmp_path / "empty")
    job1 = sorted(p for p in sweep_copy.iterdir() if p.name.startswith("1_"))[0]
    stale = sweep_copy / "4_left_over"
    shutil.copytree(job1, stale)
    hydra_yaml = stale / ".hydra" / "hydra.yaml"
    hydra_yaml.write_text(hydra_yaml.read_text().replace("    num: 1\n", "    num: 4\n"))
    with pytest.raises(GatherError, match=r"expands to 4 jobs, but job dirs \['4_left_over'\]"):
        gather(sweep_copy)
    shutil.rmtree(stale)
    shutil.rmtree(job1)
    with pytest.raises(GatherError, match=r"job number\(s\) \[1\] have no job dir"):
        gather(sweep_copy)


def test_gather_cli_prints_the_table_and_draws_the_figure(sweep_copy, capsys):
    cmd = [sys.executable, "-m", "experiments.gather", str(sweep_copy), "--plot"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["job_num", "policy", "tiers"]  # the overrides that vary, then metrics
    assert lines[-1].startswith(f"gathered 4 jobs (policy 2 x tiers 2) into {sweep_copy / SWEEP_TABLE}")
    assert (sweep_copy / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same entry point in this process (a second interpreter start costs seconds): errors, then skipping
    victim = sorted(p for p in sweep_copy.iterdir() if p.name.startswith("0_"))[0]
    (victim / "summary.json").unlink()
    assert gather_main([str(sweep_copy)]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("tierlab: error: job 0") and victim.name in err and out == ""
    assert gather_main([str(sweep_copy), "--allow-missing"]) == 0
    out, err = capsys.readouterr()
    assert f"skipped {victim}" in err and "gathered 3 jobs" in out


def test_a_joblib_sweep_runs_in_parallel_processes_and_gathers(tmp_path):
    """The README sweep's own config, cut to 2 jobs: the joblib launcher really runs them."""
    exe = shutil.which("tierlab-simulate")
    assert exe
    proc = subprocess.run([exe, "--multirun", "+sweep=policy_tiers_spot", "policy=mvp", "tiers=no_nvme",
                           "workload.max_requests=200", f"hydra.sweep.dir={tmp_path}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Joblib.Parallel" in proc.stdout + proc.stderr
    df = gather(tmp_path)
    assert df["cluster.spot_share"].tolist() == [0.0, 0.5]
    assert df["spot_nodes"].tolist() == [0, 1]  # 2 nodes x 0.5
    # same runs but half the fleet on spot: the GPU bill falls with the spot price, the requests do not change
    assert df["cost_breakdown_usd.gpu"].iloc[1] < df["cost_breakdown_usd.gpu"].iloc[0]
    assert df["completed"].iloc[0] == df["completed"].iloc[1]
