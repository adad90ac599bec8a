"""`python -m experiments.calibrate`: on a tiny catalog with paced tiers, the measured bandwidths are the configured
paces (within 20%), the measured table loads, the simulator runs unchanged on the calibrated description; a tier
that is full or unwritable is a clear error naming the tier and its path, with nothing left behind."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

for _dep in ("torch", "safetensors", "tokenizers", "uvicorn"):
    pytest.importorskip(_dep)

from core.errors import ConfigError  # noqa: E402
from core.inference import measured_from_dict  # noqa: E402
from core.spec_builders import cluster_from_dict, engine_from_dict  # noqa: E402
from experiments.calibrate_probes import (  # noqa: E402
    decode_intercept_s,
    request_overheads_s,
    stream_rate_and_ttfb,
)
from experiments.calibrate_report import measured_block, step_overhead  # noqa: E402
from experiments.setup import resolve_from_file  # noqa: E402
from tests.live_serve.serving import REPO, checkpoint_cache, env, processes  # noqa: E402

MB = 1e6
NVME_R, NVME_W, SATA_R, SATA_W = 20.0, 15.0, 10.0, 8.0  # MB/s: a 10 MB checkpoint moves in 0.5 .. 1.3 s
STREAMS, STREAM_MBPS = 2, 5.0
TOLERANCE = 0.20
TIMEOUT_S = 240
BASE = ["~catalog.small-a", "~catalog.tiny-b", "progress=false",
        f"tiers.nvme.read_MBps={NVME_R}", f"tiers.nvme.write_MBps={NVME_W}",
        f"tiers.sata.read_MBps={SATA_R}", f"tiers.sata.write_MBps={SATA_W}",
        f"cloud.streams={STREAMS}", f"cloud.stream_MBps={STREAM_MBPS}"]


def _calibrate(tmp: Path, *overrides: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp / "run"
    argv = [sys.executable, "-m", "experiments.calibrate", f"hydra.run.dir={out}",
            f"checkpoint_cache={checkpoint_cache()}", *BASE, *overrides]
    return subprocess.run(argv, capture_output=True, text=True, env=env(), cwd=tmp, timeout=TIMEOUT_S), out


def _shm_dirs() -> set[str]:
    shm = Path("/dev/shm")
    return {p.name for p in shm.glob("tierlab-calibrate-*")} if shm.is_dir() else set()


def _assert_nothing_left(tmp: Path, out: Path, shm_before: set[str]) -> None:
    assert _shm_dirs() <= shm_before, "a dram root was left in /dev/shm"
    assert not list(out.glob("calibrate-work-*")), "a tier / store workdir was left"
    left = [p.cmdline for p in processes() if str(tmp) in p.cmdline or "tierlab-calibrate-" in p.cmdline]
    assert not left, f"processes left running: {left}"


def _close(measured: float, expected_MBps: float) -> bool:
    return abs(measured / (expected_MBps * MB) - 1.0) <= TOLERANCE


def test_calibrate_measures_the_paces_and_the_simulator_loads_it(tmp_path: Path) -> None:
    before = _shm_dirs()
    proc, out = _calibrate(tmp_path, "probe.repeats=2", "probe.prefill_lengths=[16,64]", "probe.decode_batches=[1,2]",
                           "probe.decode_tokens=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "calibrated:" in proc.stdout
    _assert_nothing_left(tmp_path, out, before)

    doc = yaml.safe_load((out / "calibrated.yaml").read_text())
    raw = json.loads((out / "calibration.json").read_text())
    assert raw["samples"]["tiers"] and raw["command"].startswith("python -m experiments.calibrate")
    tiers = doc["cluster"]["node_groups"][0]["tiers"]
    for name, read, write in (("nvme", NVME_R, NVME_W), ("sata", SATA_R, SATA_W)):
        assert _close(tiers[name]["read_bw_Bps"], read), (name, tiers[name])
        assert _close(tiers[name]["write_bw_Bps"], write), (name, tiers[name])
    store = doc["cluster"]["store"]
    assert store["streams"] == STREAMS and _close(store["per_stream_Bps"], STREAM_MBPS), store
    assert 0 <= store["ttfb_s"] < 1.0
    # every number is commented with its spread
    text = (out / "calibrated.yaml").read_text()
    assert "± " in text and "n=2" in text and "Calibrated by: python -m experiments.calibrate" in text

    cluster = cluster_from_dict(doc["cluster"])
    engine = engine_from_dict(doc["engine"])
    assert cluster.nodes[0].n_gpus == 1 and engine.process_start_s > 0
    # the fixed overheads are calibrated, finite and >= 0, and commented with their spread and source
    for key in ("step_overhead_s", "request_overhead_s"):
        assert key in doc["engine"] and math.isfinite(doc["engine"][key]) and doc["engine"][key] >= 0, doc["engine"]
    assert engine.step_overhead_s == doc["engine"]["step_overhead_s"]
    # the engine stop: every probed engine's POST /unload was timed, and their mean is the simulator's stop_s
    stops = [s["stop_s"] for runs in raw["samples"]["engine"].values() for s in runs]
    assert len(stops) == 2 and all(0 < x < 30 for x in stops), stops
    assert math.isclose(engine.stop_s, sum(stops) / len(stops), rel_tol=1e-3) and engine.demote_before_stop
    assert "POST /unload round trip" in text and "stop " in proc.stdout
    assert "intercept" in text and "engine first_token_s" in text
    assert raw["samples"]["steps"]["tiny-a"]["prefill_client"]
    table = measured_from_dict(doc["inference"]["measured"][0], "inference.measured[0]")
    assert table.model == "tiny-a" and table.decode_batch == (1, 2) and table.prefill_tokens_per_s > 0

    sim = subprocess.run(
        [sys.executable, "-m", "experiments.simulate", "scenario=smoke", "cluster=calibrated", "engine=calibrated",
         "inference=calibrated", "models=calibrated", f"+calibration={out / 'calibrated.yaml'}", "workload=poisson",
         "workload.max_requests=10", "workload.options.duration_s=10", f"hydra.run.dir={tmp_path / 'sim'}",
         "output.plots=false", "progress=false"],
        capture_output=True, text=True, env=env(), cwd=REPO, timeout=120)
    assert sim.returncode == 0, sim.stderr[-3000:]
    summary = json.loads((tmp_path / "sim" / "summary.json").read_text())
    assert summary["requests"] == 10 and summary["completed"] == 10, summary
    assert engine.prefill_stalls_decode  # the CPU engine mixes prefill chunks into decode steps

    # rerender=DIR: the same samples described again by this code, no probe (nothing is started, nothing left)
    again_argv = [sys.executable, "-m", "experiments.calibrate", f"hydra.run.dir={tmp_path / 'again'}",
                  f"checkpoint_cache={checkpoint_cache()}", *BASE, f"rerender={out}"]
    again = subprocess.run(again_argv, capture_output=True, text=True, env=env(), cwd=tmp_path, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"re-rendered from {out}" in again.stdout
    body = [ln for ln in text.splitlines() if not ln.startswith("# on ")]  # the header's timestamp differs
    assert [ln for ln in (tmp_path / "again" / "calibrated.yaml").read_text().splitlines()
            if not ln.startswith("# on ")] == body
    other = subprocess.run([*again_argv[:3], f"hydra.run.dir={tmp_path / 'other'}", *again_argv[4:],
                            "+catalog.tiny-x={preset: small, seed: 9}"],
                           capture_output=True, text=True, env=env(), cwd=tmp_path, timeout=180)
    assert other.returncode == 2 and "rerender:" in other.stderr and "probed" in other.stderr, other.stderr[-2000:]


def test_a_full_tier_is_a_clear_error_and_leaves_nothing(tmp_path: Path) -> None:
    before = _shm_dirs()
    proc, out = _calibrate(tmp_path, "tiers.sata.capacity=1M")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "tiers.sata" in proc.stderr and "full" in proc.stderr and "/n0/sata" in proc.stderr, proc.stderr
    assert not (out / "calibrated.yaml").exists()
    _assert_nothing_left(tmp_path, out, before)


def test_an_unwritable_tier_is_a_clear_error_and_leaves_nothing(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the tiers' workdir should be\n")
    before = _shm_dirs()
    proc, out = _calibrate(tmp_path, f"workdir={blocker}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "tiers.nvme" in proc.stderr and "not writable" in proc.stderr and str(blocker) in proc.stderr, proc.stderr
    assert blocker.read_text().startswith("a file")
    _assert_nothing_left(tmp_path, out, before)


# --------------------------------------------------------------------------- the pure parts


def test_stream_rate_and_ttfb_invert_the_fetch_model() -> None:
    nbytes, rate, latency = 10e6, 5e6, 0.05
    t1, t4 = latency + nbytes / rate, latency + nbytes / (4 * rate)
    r, lat = stream_rate_and_ttfb(nbytes, t1, t4, 4)
    assert math.isclose(r, rate) and math.isclose(lat, latency)
    assert stream_rate_and_ttfb(nbytes, t1, t1, 1) == (nbytes / t1, 0.0)


def test_from_file_replaces_a_block_and_keeps_its_other_keys(tmp_path: Path) -> None:
    path = tmp_path / "calibrated.yaml"
    path.write_text(yaml.safe_dump({"engine": {"name": "cpu", "process_start_s": 1.5}, "cluster": {"failover_s": 1}}))
    cfg = {"engine": {"from_file": str(path)}, "cluster": {"from_file": str(path), "tier_overrides": {}},
           "models": {"bases": ["llama-3.2-1b"]}}
    out = resolve_from_file(cfg)
    assert out["engine"] == {"name": "cpu", "process_start_s": 1.5}
    assert out["cluster"] == {"failover_s": 1, "tier_overrides": {}}
    assert out["models"] == cfg["models"]
    with pytest.raises(ConfigError, match=r"inference\.from_file.*no 'inference' block"):
        resolve_from_file({"inference": {"from_file": str(path)}})
    with pytest.raises(ConfigError, match=r"engine\.from_file: a yaml file is needed"):
        resolve_from_file({"engine": {"from_file": None}})


def test_overheads_from_the_step_samples() -> None:
    """Decode steps of 5 ms + 1 ms per sequence: a 5 ms intercept, taken out of the measured table."""
    decode = {1: [0.006, 0.006], 2: [0.007, 0.007], 4: [0.009, 0.009]}
    b, se = decode_intercept_s(decode)
    assert math.isclose(b, 0.005) and se < 1e-12
    assert math.isnan(decode_intercept_s({1: [0.006]})[0])
    steps = {"prefill": {16: [0.010, 0.012], 64: [0.020]}, "decode": decode,
             "prefill_client": {16: [0.030, 0.032], 64: [0.025]}}
    assert [round(x, 9) for x in request_overheads_s(steps)] == [0.02, 0.02, 0.005]
    assert request_overheads_s({"prefill": {16: [0.01]}, "decode": decode}) == []  # samples from before the change
    over = step_overhead({"m": steps})
    assert math.isclose(over.value, 0.005)
    entry, _, iter1 = measured_block("m", steps, over.value)
    assert [round(x, 9) for x in entry["decode_iter_s"].value] == [0.001, 0.002, 0.004] and math.isclose(iter1, 0.001)
    # a negative intercept is clamped to 0; one that would leave the table non-positive to 0.9 x its fastest step
    assert step_overhead({"m": {**steps, "decode": {1: [0.001], 2: [0.004]}}}).value == 0.0
    assert math.isclose(step_overhead({"m": {**steps, "decode": {1: [0.010], 2: [0.0101]}}}).value, 0.009)
    # decode not growing with batch (noise): the prefill intercept (0.010 - 16 x (0.010 / 48) here), clamped
    assert math.isnan(decode_intercept_s({1: [0.004], 2: [0.003]})[0])
    fallback = step_overhead({"m": {**steps, "decode": {1: [0.009], 2: [0.008]}}})
    assert "prefill intercept" in fallback.comment and 0 < fallback.value <= 0.9 * 0.008
