"""Readers against the real traces (shared copies next to the repo, and the copies embedded in the package)."""

from __future__ import annotations

import csv
import filecmp
import time
from pathlib import Path

import numpy as np
import pytest

from core.errors import ConfigError
from core.workload import (
    EMBEDDED,
    LognormalLengths,
    Workload,
    embedded_path,
    popularity,
    read_azure_llm,
    read_mooncake,
    read_servegen,
    read_trace,
)

TRACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "traces"
needs_shared = pytest.mark.skipif(not TRACES.is_dir(), reason=f"shared traces not found at {TRACES} (../shared)")

AZURE_CODE = embedded_path("azure_code")
DEEPSEEK = embedded_path("servegen_deepseek_r1")
MOONCAKE = TRACES / "mooncake_fast25" / "conversation_trace.jsonl"


def servegen_expected_count(directory: Path, start_s: float = 0.0, end_s: float = np.inf) -> float:
    """Independent reference: sum of rate * (window overlap) over active windows, read with the csv module."""
    total = 0.0
    for f in directory.glob("chunk-*-trace.csv"):
        with f.open() as fh:
            for ts, rate, _cv, pattern, _shape, _scale in csv.reader(fh):
                if pattern:
                    lo, hi = max(float(ts), start_s), min(float(ts) + 600, end_s)
                    total += float(rate) * max(hi - lo, 0.0)
    return total


@pytest.fixture(scope="module")
def azure() -> Workload:
    return read_azure_llm(AZURE_CODE)


@pytest.fixture(scope="module")
def deepseek_day() -> tuple[Workload, float]:
    t0 = time.perf_counter()
    wl = read_servegen(DEEPSEEK, seed=7)
    return wl, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------- embedded data
def test_embedded_files_exist_with_licenses() -> None:
    assert AZURE_CODE.is_file()
    assert (AZURE_CODE.parent / "LICENSE-CC-BY-4.0.txt").is_file()
    assert "Splitwise" in (AZURE_CODE.parent / "ATTRIBUTION.md").read_text()
    assert DEEPSEEK.is_dir() and len(list(DEEPSEEK.glob("chunk-*-trace.csv"))) == 73
    assert "Apache License" in (DEEPSEEK / "LICENSE-APACHE-2.0.txt").read_text()
    assert "2505.09999" in (DEEPSEEK / "ATTRIBUTION.md").read_text()
    assert set(EMBEDDED) == {"azure_code", "servegen_deepseek_r1"}


def test_embedded_path_unknown_name() -> None:
    with pytest.raises(ConfigError, match="azure_code"):
        embedded_path("nope")


@needs_shared
def test_embedded_copies_are_byte_identical() -> None:
    assert filecmp.cmp(AZURE_CODE, TRACES / "azure_llm_2023" / AZURE_CODE.name, shallow=False)
    upstream = TRACES / "alibaba_servegen" / "reason" / "deepseek-r1"
    names = sorted(p.name for p in upstream.glob("chunk-*-trace.csv"))
    assert names == sorted(p.name for p in DEEPSEEK.glob("chunk-*-trace.csv"))
    match, mismatch, errors = filecmp.cmpfiles(upstream, DEEPSEEK, names, shallow=False)
    assert (len(match), mismatch, errors) == (73, [], [])


# ---------------------------------------------------------------------------------------------------- Azure
def test_azure_code_trace(azure: Workload) -> None:
    assert len(azure) == 8819
    assert azure.name == "azure_code"
    assert azure.arrival_s[0] == 0.0
    assert azure.duration_s == pytest.approx(3435.9, abs=0.1)
    assert azure.arrival_s[-1] == azure.duration_s
    assert np.all(np.diff(azure.arrival_s) >= 0)
    assert azure.prompt_tokens.mean() == pytest.approx(2048, abs=1)
    assert np.median(azure.prompt_tokens) == 1469
    assert (azure.prompt_tokens.min(), azure.prompt_tokens.max()) == (3, 7437)
    assert azure.output_tokens.mean() == pytest.approx(27.9, abs=0.05)
    assert set(azure.model) == {""} and set(azure.tenant) == {"default"}
    # Second row of the file: 2023-11-16 18:17:04.0319600 vs first 18:17:03.9799600.
    assert azure.arrival_s[1] == pytest.approx(0.052, abs=1e-9)
    assert (azure.prompt_tokens[1], azure.output_tokens[1]) == (3180, 8)


def test_azure_read_is_fast() -> None:
    read_azure_llm(AZURE_CODE)  # warm imports and caches
    t0 = time.perf_counter()
    read_azure_llm(AZURE_CODE)
    assert time.perf_counter() - t0 < 0.5


@needs_shared
def test_azure_shared_copy_reads_the_same(azure: Workload) -> None:
    other = read_azure_llm(TRACES / "azure_llm_2023" / "AzureLLMInferenceTrace_code.csv")
    np.testing.assert_array_equal(other.arrival_s, azure.arrival_s)
    np.testing.assert_array_equal(other.prompt_tokens, azure.prompt_tokens)


# ------------------------------------------------------------------------------------------------- Mooncake
@needs_shared
def test_mooncake_conversation_trace() -> None:
    wl = read_mooncake(MOONCAKE)
    assert len(wl) == 12031
    assert wl.name == "mooncake_conversation"
    assert wl.arrival_s[0] == 0.0
    assert wl.duration_s == pytest.approx(3537, abs=0.5)
    assert wl.prompt_tokens.mean() == pytest.approx(12035, abs=1)
    assert np.median(wl.prompt_tokens) == 6909
    assert wl.output_tokens.mean() == pytest.approx(342.6, abs=0.1)
    assert (wl.prompt_tokens[0], wl.output_tokens[0]) == (6758, 500)
    assert set(wl.model) == {""}


# ------------------------------------------------------------------------------------------------- ServeGen
def test_servegen_deepseek_day(deepseek_day: tuple[Workload, float]) -> None:
    wl, elapsed = deepseek_day
    expected = servegen_expected_count(DEEPSEEK)
    assert expected == pytest.approx(1.38e6, rel=0.01)
    assert len(wl) == pytest.approx(expected, rel=0.01)
    assert wl.duration_s == 86400
    assert wl.arrival_s[0] >= 0 and wl.arrival_s[-1] < 86400
    clients = {int(p.name.split("-")[1]) for p in DEEPSEEK.glob("chunk-*-trace.csv")}
    assert set(popularity(wl)) == {f"deepseek-r1/client-{c}" for c in clients}
    assert len(set(wl.tenant)) == len(clients) == 73
    assert wl.name == "servegen_deepseek-r1"
    assert elapsed < 5.0, f"generating the deepseek-r1 day took {elapsed:.2f} s"


def test_servegen_per_window_counts_match_rates(deepseek_day: tuple[Workload, float]) -> None:
    wl, _ = deepseek_day
    # Client 35 is the heaviest; every active window must hold floor or ceil of rate * 600 requests.
    rows = list(csv.reader((DEEPSEEK / "chunk-35-trace.csv").open()))
    mine = wl.arrival_s[wl.tenant == "client-35"]
    counts = np.bincount((mine // 600).astype(int), minlength=144)
    for i, (_ts, rate, _cv, pattern, _shape, _scale) in enumerate(rows):
        target = float(rate) * 600 if pattern else 0.0
        assert np.floor(target) <= counts[i] <= np.ceil(target), (i, target, counts[i])


def test_servegen_arrivals_follow_fitted_cv() -> None:
    # A busy Gamma window of client 35 (rate 11.52/s, cv 0.48 in the trace): rescaling keeps the CV.
    wl = read_servegen(DEEPSEEK / "chunk-35-trace.csv", seed=1, start_s=43200, end_s=43800)
    iat = np.diff(wl.arrival_s)
    row = next(r for r in csv.reader((DEEPSEEK / "chunk-35-trace.csv").open()) if r[0] == "43200")
    assert iat.std() / iat.mean() == pytest.approx(float(row[2]), rel=0.15)


def test_servegen_determinism_and_streams() -> None:
    kw = {"start_s": 36000.0, "end_s": 43200.0}
    a = read_servegen(DEEPSEEK, seed=1, **kw)
    b = read_servegen(DEEPSEEK, seed=1, **kw)
    c = read_servegen(DEEPSEEK, seed=2, **kw)
    for col in ("arrival_s", "model", "prompt_tokens", "output_tokens"):
        np.testing.assert_array_equal(getattr(a, col), getattr(b, col))
    assert len(a) != len(c) or not np.array_equal(a.arrival_s, c.arrival_s)
    # Arrivals come from their own stream: another length model leaves them untouched.
    d = read_servegen(DEEPSEEK, seed=1, prompt_median=50.0, **kw)
    np.testing.assert_array_equal(a.arrival_s, d.arrival_s)
    assert np.median(d.prompt_tokens) < np.median(a.prompt_tokens)


def test_servegen_slice_and_rate_scale() -> None:
    start, end = 40_000.0, 47_300.0  # not window-aligned on purpose
    base = read_servegen(DEEPSEEK, seed=3, start_s=start, end_s=end)
    assert base.duration_s == end - start
    assert base.arrival_s[0] >= 0 and base.arrival_s[-1] < end - start
    expected = servegen_expected_count(DEEPSEEK, start, end)
    assert len(base) == pytest.approx(expected, rel=0.02)
    doubled = read_servegen(DEEPSEEK, seed=3, start_s=start, end_s=end, rate_scale=2.0)
    assert len(doubled) == pytest.approx(2 * expected, rel=0.02)


def test_servegen_lengths_lognormal_defaults(deepseek_day: tuple[Workload, float]) -> None:
    wl, _ = deepseek_day
    assert np.median(wl.prompt_tokens) == pytest.approx(1000, rel=0.02)
    assert np.median(wl.output_tokens) == pytest.approx(300, rel=0.02)
    assert wl.prompt_tokens.min() >= 1 and wl.prompt_tokens.max() <= 32768
    fixed = read_servegen(DEEPSEEK, seed=1, end_s=3600, lengths=LognormalLengths(10, 0.0, 5, 0.0))
    assert set(fixed.prompt_tokens) == {10} and set(fixed.output_tokens) == {5}


def test_servegen_single_file_and_group_names(tmp_path: Path) -> None:
    one = read_servegen(DEEPSEEK / "chunk-35-trace.csv", seed=0, end_s=7200)
    assert set(one.model) == {"deepseek-r1/client-35"} and set(one.tenant) == {"client-35"}
    (tmp_path / "m-small").mkdir()
    (tmp_path / "m-small" / "chunk-4-trace.csv").write_text("0,1.0,1.0,Gamma,1.0,1.0\n600,0,0,,0,0\n")
    wl = read_servegen(tmp_path / "m-small", seed=0)
    assert set(wl.model) == {"m-small/client-4"} and wl.duration_s == 1200
    assert np.all(wl.arrival_s < 600)
    renamed = read_servegen(tmp_path / "m-small", seed=0, group="mine")
    assert set(renamed.model) == {"mine/client-4"}


@needs_shared
def test_servegen_refuses_huge_generation() -> None:
    msmall = TRACES / "alibaba_servegen" / "language" / "m-small"
    with pytest.raises(ConfigError, match="max_requests"):
        read_servegen(msmall, seed=0)
    hour = read_servegen(msmall, seed=0, start_s=0, end_s=60)
    assert len(hour) == pytest.approx(servegen_expected_count(msmall, 0, 60), rel=0.05)


# ---------------------------------------------------------------------------------------------- registry
def test_read_trace_dispatch() -> None:
    assert len(read_trace("azure_llm", AZURE_CODE)) == 8819
    wl = read_trace("servegen", DEEPSEEK / "chunk-35-trace.csv", seed=0, end_s=600)
    assert len(wl) > 0
    with pytest.raises(ConfigError, match=r"'azure_llm', 'mooncake', 'servegen'"):
        read_trace("burstgpt", AZURE_CODE)


def test_missing_file_is_clear(tmp_path: Path) -> None:
    for reader in (read_azure_llm, read_mooncake):
        with pytest.raises(FileNotFoundError, match="trace file not found"):
            reader(tmp_path / "missing.csv")
    with pytest.raises(FileNotFoundError, match="missing"):
        read_servegen(tmp_path / "missing", seed=0)
