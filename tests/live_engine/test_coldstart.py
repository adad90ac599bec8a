"""Cold-start measurement of a real engine process, both loading modes."""

from __future__ import annotations

from pathlib import Path

import pytest

from live.checkpoint import generate_checkpoint
from live.engines.coldstart import measure_cold_start


@pytest.mark.parametrize("progressive", [False, True])
def test_cold_start_sample_is_consistent(tmp_path: Path, progressive: bool) -> None:
    ckpt = generate_checkpoint(tmp_path / "ck", "tiny", seed=0)
    s = measure_cold_start(ckpt.path, progressive, threads=1, timeout_s=60)
    assert s.progressive is progressive
    assert s.cache_drop in ("drop_caches", "fadvise")
    assert 0 < s.first_token_s <= s.response_s + 0.05  # the engine's clock starts at spawn, like ours
    assert s.weights_resident_s > 0
    if not progressive:
        assert s.weights_resident_s <= s.first_token_s  # load-then-run: no token before every layer
