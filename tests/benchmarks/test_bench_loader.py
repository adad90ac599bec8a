"""Loader throughput vs a raw sequential read of the same file, cold page cache, measured in the same run.

The ratio (tierlab bytes/s over raw `readinto` bytes/s) is what is checked, so a slow or noisy
disk slows both sides alike. The issue's target is >= 0.9; the floor asserted here is looser
(0.6) so that a 2-core shared machine cannot flake it. `scripts/bench_loader.py` runs the same
comparison on a ~1 GB checkpoint and prints a table (`--max-shard-mib 200`: on the same weights in shards).

The sharded benchmark does the same on the checkpoint written as shards + `model.safetensors.index.json`:
the raw read reads every shard in turn; the loader reads them all in one pool of threads.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

from live.checkpoint import generate_checkpoint, shard_checkpoint  # noqa: E402
from live.loader import load  # noqa: E402
from live.page_cache import evict_page_cache  # noqa: E402
from scripts.bench_loader import compare_loaders  # noqa: E402

MIN_RATIO = 0.6
TARGET_RATIO = 0.9
SHARD_BYTES = 24 << 20  # the ~100 MB checkpoint in 5 shards, layers across shard boundaries


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The `small` preset: ~100 MB of bf16 weights in 14 layers."""
    return generate_checkpoint(tmp_path_factory.mktemp("bench") / "small", "small", seed=0).path


@pytest.fixture(scope="module")
def sharded(checkpoint, tmp_path_factory):
    """The same weights as shards + index, as transformers' `save_pretrained(max_shard_size=...)` lays them out."""
    out = tmp_path_factory.mktemp("bench") / "small-sharded"
    shard_checkpoint(checkpoint, out, SHARD_BYTES)
    return out


def _loader_vs_raw_read(benchmark, ckpt, weights, report_metric, metric):
    """Time `load(ckpt)` cold, then compare it with the raw read in one run; report and floor the ratio."""

    def cold():  # setup must return None to keep `args`
        for path in weights:
            evict_page_cache(path)

    loaded = benchmark.pedantic(load, args=(ckpt,), setup=cold, rounds=3, iterations=1)
    assert loaded.timing.bytes_read == sum(p.stat().st_size for p in weights) and len(loaded.tensors) == 3 + 9 * 14
    del loaded
    report = compare_loaders(ckpt, rounds=3)
    ratio = report.ratio("tierlab")
    benchmark.extra_info.update({"size_bytes": report.size_bytes, "cache_method": report.cache_method,
                                 "files": len(weights), **{f"{m}_GBps": report.GBps(m) for m in report.results},
                                 **{f"{m}_ratio": report.ratio(m) for m in report.results}})
    report_metric(metric, ratio, "higher")
    print(f"\n{report.table()}\ntierlab / raw = {ratio:.2f} (target >= {TARGET_RATIO}, asserted >= {MIN_RATIO})")
    assert ratio >= MIN_RATIO


def test_loader_vs_raw_read_cold_cache(benchmark, checkpoint, report_metric):
    _loader_vs_raw_read(benchmark, checkpoint, [checkpoint / "model.safetensors"], report_metric,
                        "loader.tierlab_over_raw_read")


def test_sharded_loader_vs_raw_read_cold_cache(benchmark, sharded, report_metric):
    weights = sorted(sharded.glob("model-*-of-*.safetensors"))
    assert len(weights) >= 3
    _loader_vs_raw_read(benchmark, sharded, weights, report_metric, "loader.sharded_tierlab_over_raw_read")
