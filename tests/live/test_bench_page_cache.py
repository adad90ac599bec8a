"""scripts/bench_page_cache.py, the measurement behind safetensors' page-cache rate, run for real on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("safetensors")

from experiments.serverlessllm import read_page_cache_measurement

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_page_cache.py"


def test_cpu_run_writes_a_measurement_the_experiment_reads(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--preset", "tiny",
                           "--dir", str(tmp_path / "ck"), "--out", str(out), "--repeats", "3"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    res = json.loads((out / "page_cache.json").read_text())
    size = (tmp_path / "ck" / "tiny" / "model.safetensors").stat().st_size
    assert res["size_bytes"] == size and res["device"] == "cpu"
    assert set(res) == {"size_bytes", "device", "safetensors_cpu_warm", "tierlab_cpu_warm", "h2d_pageable"}
    for key in ("safetensors_cpu_warm", "tierlab_cpu_warm"):
        assert len(res[key]["times_s"]) == 3 and min(res[key]["times_s"]) > 0
    m = read_page_cache_measurement(out / "page_cache.json", "tierlab_cpu_warm")
    assert m.size_bytes == size and list(m.times_s) == res["tierlab_cpu_warm"]["times_s"]
    assert m.rate_Bps == pytest.approx(size / ((m.times_s[1] + m.times_s[2]) / 2))


def test_one_repeat_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--repeats", "1",
                           "--dir", str(tmp_path), "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--repeats" in proc.stderr
    assert list(tmp_path.iterdir()) == []
