"""Loader throughput vs a raw sequential read of the same file, cold page cache, measured in the same run.

The ratio (tierlab bytes/s over raw `readinto` bytes/s) is what is checked, so a slow or noisy
disk slows both sides alike. The issue's target is >= 0.9; the floor asserted here is looser
(0.6) so that a 2-core shared machine cannot flake it. `scripts/bench_loader.py` runs the same
comparison on a ~1 GB checkpoint and prints a table.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

from live.checkpoint import generate_checkpoint  # noqa: E402
from live.loader import load  # noqa: E402
from live.page_cache import evict_page_cache  # noqa: E402
from scripts.bench_loader import compare_loaders  # noqa: E402

MIN_RATIO = 0.6
TARGET_RATIO = 0.9


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The `small` preset: ~100 MB of bf16 weights in 14 layers."""
    return generate_checkpoint(tmp_path_factory.mktemp("bench") / "small", "small", seed=0).path


def test_loader_vs_raw_read_cold_cache(benchmark, checkpoint, report_metric):
    path = checkpoint / "model.safetensors"

    def cold():  # setup must return None to keep `args`
        evict_page_cache(path)

    loaded = benchmark.pedantic(load, args=(checkpoint,), setup=cold, rounds=3, iterations=1)
    assert loaded.timing.bytes_read == path.stat().st_size and len(loaded.tensors) == 3 + 9 * 14
    del loaded
    report = compare_loaders(checkpoint, rounds=3)
    ratio = report.ratio("tierlab")
    benchmark.extra_info.update({"size_bytes": report.size_bytes, "cache_method": report.cache_method,
                                 **{f"{m}_GBps": report.GBps(m) for m in report.results},
                                 **{f"{m}_ratio": report.ratio(m) for m in report.results}})
    report_metric("loader.tierlab_over_raw_read", ratio, "higher")
    print(f"\n{report.table()}\ntierlab / raw = {ratio:.2f} (target >= {TARGET_RATIO}, asserted >= {MIN_RATIO})")
    assert ratio >= MIN_RATIO
