"""Progressive loading vs load-then-run: first-request TTFT of a cold CPU engine, measured in the same run.

Both modes start the real engine process on the same `small` checkpoint (~100 MB, bf16) in the same
directory, with the page cache emptied before each start and the order alternating between rounds
(`scripts/bench_progressive.py`, which prints the same table for more rounds, bigger presets and an
emulated slow tier). Both TTFT medians and their ratio go into `benchmark.extra_info`.

Only a loose bound is asserted: on this shared 2-core machine the engine's imports alone swing by
seconds between starts, and at ~100 MB on a fast disk progressive loading can hide little (the read
takes ~0.1-0.3 s), so the check is that progressive loading is not markedly slower (ratio <= MAX_RATIO;
before the fix it was ~1.3 on a quiet machine) and that it did overlap: the engine served before
the last layer was resident.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("tokenizers")
pytest.importorskip("httpx")

from live.checkpoint import generate_checkpoint
from scripts.bench_progressive import compare_progressive

ROUNDS = 2  # 4 engine starts: ~20-40 s here
MAX_RATIO = 1.5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return generate_checkpoint(tmp_path_factory.mktemp("bench") / "small", "small", seed=0).path


def test_progressive_vs_load_then_run_first_token(benchmark, checkpoint):
    report = benchmark.pedantic(compare_progressive, args=(checkpoint, ROUNDS), rounds=1, iterations=1)
    medians = {mode: report.median(mode) for mode in report.samples}
    benchmark.extra_info.update({
        "size_bytes": report.size_bytes, "rounds": report.rounds, "load_avg_1m": report.load_avg_1m,
        **{f"{mode}_ttft_s": ttft for mode, ttft in medians.items()},
        **{f"{mode}_after_imports_s": report.median(mode, "after_imports_s") for mode in report.samples},
        "ratio": report.ratio(), "ratio_after_imports": report.ratio("after_imports_s"),
        "paired_ratio": report.paired_ratio(), "paired_ratio_after_imports": report.paired_ratio("after_imports_s"),
    })  # fmt: skip
    print(f"\n{report.table()}\n{report.summary()} (asserted <= {MAX_RATIO})")
    assert all(len(samples) == ROUNDS for samples in report.samples.values())
    for s in report.samples["progressive"]:
        assert s.ready_s < s.weights_resident_s  # it served while layers were still arriving
    for s in report.samples["load-then-run"]:
        assert s.weights_resident_s <= s.ready_s < s.first_token_s
    assert report.ratio() <= MAX_RATIO
