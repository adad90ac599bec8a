"""Streamed records (`records.stream_dir`, sim/record_sink.py) and chunked ServeGen horizons
(core/workload/horizon.py): a streamed run writes the same request table and the same summary as the in-memory
run of the same config; the horizon's chunks are deterministic and concatenate to the in-memory workload."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.errors import ConfigError
from core.metrics import union_length_s
from core.records import REQUEST_SCHEMA, frame, write_table
from core.workload import read_trace
from core.workload.horizon import ServegenHorizon, read_servegen_horizon
from experiments.setup import resolve_path
from experiments.simulate import run
from sim.record_sink import COMPACT_SPANS, RecordSink
from sim.stream_summary import StreamedRequests, merged_insert
from tests.conftest import config

M_SMALL = resolve_path("../shared/data/traces/alibaba_servegen/language/m-small")
needs_trace = pytest.mark.skipif(not M_SMALL.is_dir(), reason=f"ServeGen m-small not at {M_SMALL}")
# an hour of m-small at 2% of its rate (~4k requests) in 10-minute chunks, on the medium cluster with node
# failures (so instances are lost and their requests re-placed while earlier requests are already on disk)
HORIZON = ("workload=servegen_m_small_horizon", "workload.options.end_s=3600", "workload.options.chunk_s=600",
           "workload.options.rate_scale=0.02", "cluster.failure_rate_per_hour=1.0", "output.plots=false")
# keys that measure the run's wall time, or say where the records went
WALL_KEYS = ("wall_s", "requests_per_wall_s", "total_wall_s", "records_path")


# ------------------------------------------------------------------------------------------------ horizon
@needs_trace
def test_horizon_chunks_are_deterministic_and_independent_of_the_horizon_length():
    short = ServegenHorizon(M_SMALL, 3, end_s=7200.0, chunk_s=3600.0, rate_scale=0.01)
    long = ServegenHorizon(M_SMALL, 3, end_s=4 * 3600.0, chunk_s=3600.0, rate_scale=0.01)
    assert (short.n_chunks, long.n_chunks) == (2, 4)
    for k in range(2):
        a, b = short.chunk(k), long.chunk(k)
        assert len(a) > 100
        for col in ("arrival_s", "model", "tenant", "prompt_tokens", "output_tokens"):
            np.testing.assert_array_equal(getattr(a, col), getattr(b, col))
        assert a.arrival_s.min() >= k * 3600.0 and a.arrival_s.max() < (k + 1) * 3600.0
    other = ServegenHorizon(M_SMALL, 4, end_s=3600.0, chunk_s=3600.0, rate_scale=0.01).chunk(0)
    assert not np.array_equal(other.arrival_s[:50], short.chunk(0).arrival_s[:50])
    # every client is in the catalog, whichever clients the chunk happens to hold
    assert len(short.chunk(0).catalog) == len(list(M_SMALL.glob("chunk-*-trace.csv")))


@needs_trace
def test_materialised_horizon_is_the_concatenation_of_its_chunks_and_keeps_the_rate():
    opts = {"start_s": 3600.0, "end_s": 3 * 3600.0 + 900.0, "chunk_s": 3600.0, "rate_scale": 0.01}
    whole = read_trace("servegen_horizon", M_SMALL, seed=0, **opts)
    h = ServegenHorizon(M_SMALL, 0, **opts)
    parts = list(h.chunks())
    assert len(parts) == 3 and whole.duration_s == pytest.approx(2 * 3600.0 + 900.0)
    for col in ("arrival_s", "model", "tenant", "prompt_tokens", "output_tokens"):
        np.testing.assert_array_equal(getattr(whole, col), np.concatenate([getattr(p, col) for p in parts]))
    assert np.all(np.diff(whole.arrival_s) >= 0) and whole.arrival_s[0] >= 0.0
    # the counts are Poisson-like around the windows' rate x size: within 5 sigma
    expected = h.expected_requests()
    assert abs(len(whole) - expected) < 5 * math.sqrt(expected) + 50


@needs_trace
def test_horizon_errors_name_the_field():
    with pytest.raises(ConfigError, match="max_requests"):
        read_servegen_horizon(M_SMALL, 0, rate_scale=1.0, max_requests=1000)
    with pytest.raises(ConfigError, match="chunk_s"):
        ServegenHorizon(M_SMALL, 0, chunk_s=0.0)
    with pytest.raises(ConfigError, match=r"workload\.options\.seed"):
        read_trace("servegen_horizon", M_SMALL, end_s=600.0)


# ------------------------------------------------------------------------------------------------ streamed run
@pytest.fixture(scope="module")
def both_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, Path, Path]:
    """The same config run in memory and streamed (tiny chunks: many writes, many compactions)."""
    if not M_SMALL.is_dir():
        pytest.skip(f"ServeGen m-small not at {M_SMALL}")
    out = tmp_path_factory.mktemp("streams")
    mem = run(config(*HORIZON), out / "memory")
    streamed = run(config(*HORIZON, f"records.stream_dir={out / 'stream'}", "records.chunk_rows=257"),
                   out / "streamed")
    assert mem.records_path is None and streamed.requests.empty
    return mem.summary, streamed.summary, out / "memory", out / "stream"


def test_streamed_records_equal_the_in_memory_table(both_runs):
    _, summary, mem_dir, stream_dir = both_runs
    memory = pd.read_parquet(mem_dir / "records.parquet")
    streamed = pd.read_parquet(stream_dir / "records.parquet")
    assert len(memory) > 2000 and summary["records_path"] == str(stream_dir / "records.parquet")
    assert not streamed["request_id"].is_monotonic_increasing  # long requests are written after later ones
    streamed = streamed.sort_values("request_id", kind="stable").reset_index(drop=True)
    pd.testing.assert_frame_equal(streamed, memory)
    assert memory["cost_usd"].sum() > 0  # the cost shares were filled in afterwards, row for row
    for name in ("tier_moves.parquet", "instances.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(mem_dir.parent / "streamed" / name),
                                      pd.read_parquet(mem_dir / name))


def test_streamed_summary_equals_the_in_memory_summary(both_runs):
    mem, streamed, _, _ = both_runs
    assert mem["node_failures"] > 0 and mem["cold_starts"] > 0 and mem["completed"] > 0
    strip = lambda s: {k: v for k, v in s.items() if k not in WALL_KEYS}  # noqa: E731
    assert strip(streamed) == strip(mem)  # every key, percentiles and memory-waste parts included, exactly


@needs_trace
def test_the_fast_steady_state_streams_the_same_as_in_memory(tmp_path: Path):
    """`sim.steady_state=fast` with `records.stream_dir`: both paths share the world's arrivals, so the streamed
    fast run equals the in-memory fast run (and some requests did take the fast path)."""
    fast = (*HORIZON, "sim.steady_state=fast")
    mem = run(config(*fast), tmp_path / "memory").summary
    streamed = run(config(*fast, f"records.stream_dir={tmp_path / 'stream'}", "records.chunk_rows=500"),
                   tmp_path / "streamed").summary
    assert mem["steady_state_aggregated"] > 0
    strip = lambda s: {k: v for k, v in s.items() if k not in WALL_KEYS}  # noqa: E731
    assert strip(streamed) == strip(mem)


def test_radix_selected_percentiles_equal_numpys(both_runs):
    """Past `exact_cap` values the percentiles come from radix selection over the file: still numpy's, exactly;
    the means from math.fsum (within an ulp or so of np.mean)."""
    mem, _, _, stream_dir = both_runs
    st = StreamedRequests(stream_dir / "records.parquet", ttft_slo_s=mem["ttft_slo_s"], exact_cap=40)
    assert st.stats["ttft"].spilled and st.stats["e2e"].spilled
    keys = st.summary_keys(mem["cost_usd"], 1.0, mem["ttft_slo_s"])
    for name, qs in (("ttft_s", ("p50", "p99")), ("tpot_s", ("p50", "p99")), ("e2e_s", ("p50", "p99")),
                     ("cold_start_s", ("p50", "p90", "p99"))):
        for q in qs:
            assert keys[name][q] == mem[name][q], (name, q)
    assert keys["ttft_s"]["mean"] == pytest.approx(mem["ttft_s"]["mean"], rel=1e-12)


def test_radix_selection_with_ties_and_negative_values(tmp_path: Path):
    rng = np.random.default_rng(5)
    n = 3000
    ttft = np.concatenate([rng.normal(0.0, 3.0, n - 1000), np.full(600, 2.5), np.full(400, -0.0)])
    rng.shuffle(ttft)
    cols = {c: [""] * n for c in REQUEST_SCHEMA}
    cols.update({c: np.full(n, math.nan) for c in REQUEST_SCHEMA if REQUEST_SCHEMA[c] == "float64"})
    cols.update({c: np.zeros(n, dtype=np.int64) for c in REQUEST_SCHEMA if REQUEST_SCHEMA[c] == "int64"})
    cols.update(request_id=np.arange(n), cold_start=np.zeros(n, dtype=bool), outcome=["completed"] * n,
                ttft_s=ttft)
    path = write_table(tmp_path / "records.parquet", frame(REQUEST_SCHEMA, cols))
    st = StreamedRequests(path, ttft_slo_s=1.0, exact_cap=5)
    for q in (0.0, 0.001, 0.25, 0.5, 0.7, 0.99, 1.0):
        assert st.quantile("ttft", q) == float(np.quantile(ttft, q)), q
    assert st.quantile("tpot", 0.5) is None  # all NaN: nothing to take a percentile of


def test_merged_spans_have_the_union_length_of_the_raw_ones():
    rng = np.random.default_rng(2)
    raw = [(float(a), float(a + d)) for a, d in zip(rng.integers(0, 200, 300), rng.integers(0, 6, 300),
                                                    strict=True)]
    spans: list[list[float]] = []
    for a, b in raw:
        merged_insert(spans, a, b)
    assert all(spans[i][1] < spans[i + 1][0] for i in range(len(spans) - 1))  # disjoint, touching ones merged
    for lo, hi in ((0.0, 250.0), (37.5, 120.0)):
        clip = lambda iv, lo=lo, hi=hi: [(max(a, lo), min(b, hi)) for a, b in iv if min(b, hi) > max(a, lo)]  # noqa: E731
        assert union_length_s(clip(spans)) == union_length_s(clip(raw))


def test_compacting_a_gone_instances_spans_keeps_their_clipped_union(tmp_path: Path):
    rng = np.random.default_rng(4)
    sink = RecordSink(tmp_path)
    for a, d in zip(rng.uniform(0, 200, 200), rng.uniform(0, 3, 200), strict=True):
        merged_insert(sink.busy["i-1"], float(a), float(a + d))
    spans = [list(s) for s in sink.busy["i-1"]]
    lo, hi = 20.0, 180.0
    clip = lambda iv: [(max(a, lo), min(b, hi)) for a, b in iv if min(b, hi) > max(a, lo)]  # noqa: E731
    sink.n_spans = COMPACT_SPANS  # at the threshold: kept as they are (exact)
    sink.compact("i-1", lo, hi)
    assert sink.busy["i-1"] == spans
    sink.n_spans = COMPACT_SPANS + len(spans)
    sink.compact("i-1", lo, hi)
    assert len(sink.busy["i-1"]) == 1 and sink.n_spans == COMPACT_SPANS + 1
    assert union_length_s(clip(sink.busy["i-1"])) == pytest.approx(union_length_s(clip(spans)), rel=1e-12)


def test_streaming_refuses_what_it_cannot_do(tmp_path: Path):
    with pytest.raises(ValueError, match=r"records\.chunk_rows"):
        RecordSink(tmp_path, chunk_rows=0)
    with pytest.raises(ConfigError, match=r"metrics\.warmup_s"):
        run(config("workload.window=[0,600]", "metrics.warmup_s=60", f"records.stream_dir={tmp_path}"), None)
    if M_SMALL.is_dir():
        with pytest.raises(ConfigError, match=r"workload\.subsample"):
            run(config(*HORIZON, "workload.subsample=0.5", f"records.stream_dir={tmp_path}"), None)
