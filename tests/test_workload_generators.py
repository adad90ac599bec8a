"""Synthetic generators, token-length samplers and Zipf model assignment."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.errors import ConfigError
from core.workload import (
    FixedLengths,
    LognormalLengths,
    TraceLengths,
    Workload,
    assign_models,
    diurnal,
    embedded_path,
    gamma,
    poisson,
    popularity,
    read_azure_llm,
    zipf_weights,
)


def cv_of_iats(wl: Workload) -> float:
    iat = np.diff(wl.arrival_s)
    return float(iat.std() / iat.mean())


# -------------------------------------------------------------------------------------------- arrivals
def test_poisson_rate_and_cv() -> None:
    wl = poisson(50.0, 2000.0, seed=1)
    assert wl.duration_s == 2000.0 and wl.name == "poisson"
    assert wl.mean_rate_per_s == pytest.approx(50.0, rel=0.015)  # 3 sigma of a Poisson count of 1e5
    assert cv_of_iats(wl) == pytest.approx(1.0, abs=0.02)
    assert wl.arrival_s[0] >= 0 and wl.arrival_s[-1] < 2000.0


@pytest.mark.parametrize("cv", [0.5, 2.5])
def test_gamma_rate_and_cv(cv: float) -> None:
    wl = gamma(20.0, cv, 5000.0, seed=2)
    assert wl.mean_rate_per_s == pytest.approx(20.0, rel=0.03)
    assert cv_of_iats(wl) == pytest.approx(cv, rel=0.05)
    assert wl.arrival_s[-1] < 5000.0


def test_gamma_long_horizon_needs_more_than_one_chunk() -> None:
    # Very bursty IATs make the first chunk fall short of the horizon sometimes; the result must still span it.
    wl = gamma(1.0, 8.0, 200.0, seed=5)
    assert len(wl) > 0 and wl.arrival_s[-1] < 200.0


def test_diurnal_peak_to_trough() -> None:
    period = 1000.0
    wl = diurnal(20.0, 4.0, period, 20 * period, seed=3)
    assert wl.mean_rate_per_s == pytest.approx(20.0, rel=0.03)
    phase = (wl.arrival_s % period) / period
    counts = np.bincount((phase * 20).astype(int), minlength=20)
    # Rate peaks at a quarter period and bottoms out at three quarters.
    assert np.argmax(counts) in (4, 5) and np.argmin(counts) in (14, 15)
    assert counts.max() / counts.min() == pytest.approx(4.0, rel=0.2)


def test_diurnal_flat_is_poisson() -> None:
    wl = diurnal(30.0, 1.0, 100.0, 1000.0, seed=4)
    assert wl.mean_rate_per_s == pytest.approx(30.0, rel=0.04)
    assert cv_of_iats(wl) == pytest.approx(1.0, abs=0.05)


GENERATORS: list[Callable[[int], Workload]] = [
    lambda seed: poisson(5.0, 100.0, seed),
    lambda seed: gamma(5.0, 2.0, 100.0, seed),
    lambda seed: diurnal(5.0, 3.0, 50.0, 100.0, seed),
]


@pytest.mark.parametrize("gen", GENERATORS)
def test_generators_are_seeded(gen: Callable[[int], Workload]) -> None:
    a, b, c = gen(9), gen(9), gen(10)
    np.testing.assert_array_equal(a.arrival_s, b.arrival_s)
    np.testing.assert_array_equal(a.prompt_tokens, b.prompt_tokens)
    assert len(a) != len(c) or not np.array_equal(a.arrival_s, c.arrival_s)


def test_lengths_do_not_change_arrivals() -> None:
    a = poisson(5.0, 100.0, seed=1)
    b = poisson(5.0, 100.0, seed=1, lengths=FixedLengths(64, 8), model="m", tenant="t")
    np.testing.assert_array_equal(a.arrival_s, b.arrival_s)
    assert set(b.prompt_tokens) == {64} and set(b.output_tokens) == {8}
    assert set(b.model) == {"m"} and set(b.tenant) == {"t"}


@pytest.mark.parametrize(
    "call",
    [
        lambda: poisson(-1.0, 10.0, 0),
        lambda: poisson(1.0, float("inf"), 0),
        lambda: gamma(1.0, 0.0, 10.0, 0),
        lambda: diurnal(1.0, 0.5, 10.0, 10.0, 0),
        lambda: diurnal(1.0, 2.0, 0.0, 10.0, 0),
        lambda: poisson(1.0, 10.0, 1.5),
        lambda: FixedLengths(0, 5),
        lambda: LognormalLengths(prompt_median=-1),
    ],
)
def test_bad_parameters(call: Callable[[], object]) -> None:
    with pytest.raises(ConfigError):
        call()


# ------------------------------------------------------------------------------------------------ lengths
def test_lognormal_lengths() -> None:
    rng = np.random.default_rng(0)
    prompt, output = LognormalLengths(500.0, 0.5, 100.0, 2.0, max_tokens=4096).sample(50_000, rng)
    assert prompt.dtype == np.int64
    assert np.median(prompt) == pytest.approx(500, rel=0.02)
    assert np.std(np.log(prompt)) == pytest.approx(0.5, rel=0.03)
    assert np.median(output) == pytest.approx(100, rel=0.05)
    assert output.min() >= 1 and output.max() == 4096  # sigma 2 hits the clip


def test_lengths_sampled_from_a_trace() -> None:
    azure = read_azure_llm(embedded_path("azure_code"))
    wl = poisson(20.0, 500.0, seed=1, lengths=TraceLengths.from_workload(azure))
    pairs = set(zip(azure.prompt_tokens.tolist(), azure.output_tokens.tolist(), strict=True))
    assert set(zip(wl.prompt_tokens.tolist(), wl.output_tokens.tolist(), strict=True)) <= pairs
    assert wl.prompt_tokens.mean() == pytest.approx(azure.prompt_tokens.mean(), rel=0.1)
    with pytest.raises(ConfigError):
        TraceLengths(np.array([], dtype=np.int64), np.array([], dtype=np.int64))


# ------------------------------------------------------------------------------------------------- models
@pytest.fixture(scope="module")
def requests() -> Workload:
    return poisson(100.0, 1000.0, seed=0, lengths=FixedLengths())


def test_zipf_zero_is_uniform(requests: Workload) -> None:
    ids = [f"m{i}" for i in range(5)]
    counts = popularity(assign_models(requests, ids, zipf_s=0.0, seed=1))
    assert set(counts) == set(ids)
    n = len(requests)
    for c in counts.values():
        assert c == pytest.approx(n / 5, rel=0.03)


def test_zipf_skew_grows_with_s(requests: Workload) -> None:
    ids = [f"m{i}" for i in range(10)]
    shares = []
    for s in (0.5, 1.0, 2.0):
        counts = popularity(assign_models(requests, ids, zipf_s=s, seed=2))
        assert next(iter(counts)) == "m0"  # rank 1 is the most popular
        assert counts["m0"] / counts["m1"] == pytest.approx(2.0**s, rel=0.05)
        shares.append(counts["m0"] / len(requests))
    assert shares[0] < shares[1] < shares[2]


def test_assign_models_keeps_existing_and_is_seeded(requests: Workload) -> None:
    half = assign_models(requests.subsample(0.5, seed=0).merge(requests.head(10)), ["pinned"], 0.0, seed=0)
    merged = half.merge(requests.window(500, 1000))
    out = assign_models(merged, ["a", "b"], zipf_s=1.0, seed=3)
    assert np.all(out.model[merged.model == "pinned"] == "pinned")
    assert set(out.model) == {"pinned", "a", "b"}
    again = assign_models(merged, ["a", "b"], zipf_s=1.0, seed=3)
    np.testing.assert_array_equal(out.model, again.model)
    everything = assign_models(merged, ["a"], zipf_s=1.0, seed=3, only_unassigned=False)
    assert set(everything.model) == {"a"}
    np.testing.assert_array_equal(out.arrival_s, merged.arrival_s)


def test_assign_models_bad_arguments(requests: Workload) -> None:
    with pytest.raises(ConfigError, match="model_ids"):
        assign_models(requests, [], 1.0, seed=0)
    with pytest.raises(ConfigError, match="model_ids"):
        assign_models(requests, ["a", ""], 1.0, seed=0)
    with pytest.raises(ConfigError, match="zipf_s"):
        assign_models(requests, ["a"], -1.0, seed=0)


@given(st.integers(1, 200), st.floats(0, 5))
def test_zipf_weights_are_a_decreasing_distribution(n: int, s: float) -> None:
    p = zipf_weights(n, s)
    assert p.sum() == pytest.approx(1.0)
    assert np.all(np.diff(p) <= 1e-15)
