"""Cold-start measurement of a real engine process, both loading modes, and the engine's read cap."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from live.checkpoint import generate_checkpoint
from live.engines.base import REPO_ROOT
from live.engines.coldstart import measure_cold_start


@pytest.mark.parametrize(("progressive", "max_read_MBps"), [(False, None), (True, 40.0)])
def test_cold_start_sample_is_consistent(tmp_path: Path, progressive: bool, max_read_MBps: float | None) -> None:
    ckpt = generate_checkpoint(tmp_path / "ck", "tiny", seed=0)
    s = measure_cold_start(ckpt.path, progressive, threads=1, timeout_s=60, max_read_MBps=max_read_MBps)
    assert s.progressive is progressive
    assert s.cache_drop in ("drop_caches", "fadvise")
    assert 0 < s.imports_done_s <= s.ready_s < s.first_token_s <= s.response_s + 0.05  # spawn is t0 on both sides
    assert s.forward_s == pytest.approx(s.first_token_s - s.ready_s)
    n_groups = ckpt.n_layers + 2
    assert len(s.group_resident_s) == len(s.group_computed_s) == n_groups
    assert all(c >= r for c, r in zip(s.group_computed_s, s.group_resident_s, strict=True))
    assert s.weights_resident_s == pytest.approx(max(s.group_resident_s))
    assert s.read_s is not None and s.read_s > 0 and s.load_s > 0  # both modes read through the loader
    if max_read_MBps is not None:  # the ~10 MB file at 40 MB/s: at least 0.25 s of reading
        size_bytes = (ckpt.path / "model.safetensors").stat().st_size
        assert s.read_s >= 0.99 * size_bytes / (max_read_MBps * 1e6)
    if progressive:
        assert s.ready_s < s.weights_resident_s  # serving began before the weights were all in
    else:
        assert s.weights_resident_s <= s.ready_s  # load-then-run: nothing runs before every layer


def test_engine_rejects_a_bad_read_cap_before_loading(tmp_path: Path) -> None:
    ckpt = generate_checkpoint(tmp_path / "ck", "tiny", seed=0)
    done = subprocess.run(
        [sys.executable, "-m", "live.engines.cpu_server", "--model-dir", str(ckpt.path), "--max-read-MBps", "0"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2 and "--max-read-MBps must be > 0" in done.stderr
