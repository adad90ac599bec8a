"""`scripts/bench_gateway_ab.py`: two gateway trees in front of one null engine, same run (here the working tree
twice: each side must start its own gateway process from the tree it names and carry load through it)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("uvicorn")

REPO = Path(__file__).resolve().parents[2]


def test_two_trees_are_measured_against_direct_in_one_run() -> None:
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (apt-get install wrk)")
    proc = subprocess.run([sys.executable, "scripts/bench_gateway_ab.py", "--tree", ".", "--tree", str(REPO),
                           "--rounds", "2", "--seconds", "1"], cwd=REPO, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {m[1]: (float(m[2].replace(",", "")), float(m[3]), float(m[4]))
            for m in re.finditer(r"^\s*(\S+): +([\d,]+) req/s .* CPU ([\d.]+) ms/req +req/s over direct ([\d.]+)",
                                 proc.stdout, re.M)}
    assert len(rows) == 3 and "direct" in rows, proc.stdout
    for side, (rps, cpu_ms, ratio) in rows.items():
        assert rps > 0 and cpu_ms > 0, (side, proc.stdout)
        assert (ratio == 1.0) == (side == "direct"), (side, proc.stdout)
    assert proc.stderr.count("round ") == 2 * 3  # progress: every side of every round


def test_a_tree_that_is_not_tierlab_is_refused_by_name(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "scripts/bench_gateway_ab.py", "--tree", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and f"--tree {tmp_path}" in proc.stderr, proc.stderr
