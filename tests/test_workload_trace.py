"""The `Workload` container: validation and the vectorised transforms."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import ConfigError
from core.workload import Workload, embedded_path, read_azure_llm


def make(arrivals: list[float] | np.ndarray, duration_s: float | None = None, **kw: object) -> Workload:
    arr = np.asarray(arrivals, dtype=float)
    cols = {
        "model": np.array([f"m{i % 3}" for i in range(arr.size)], dtype=object),
        "prompt_tokens": np.arange(1, arr.size + 1),
        "output_tokens": np.full(arr.size, 7),
    } | kw
    return Workload.from_columns(arr, name="t", duration_s=duration_s, **cols)  # type: ignore[arg-type]


arrival_lists = st.lists(st.floats(0, 1e4, allow_nan=False), max_size=60).map(sorted)


@pytest.fixture(scope="module")
def azure() -> Workload:
    return read_azure_llm(embedded_path("azure_code"))


# --------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"prompt_tokens": np.array([1, 0, 3])}, "prompt_tokens"),
        ({"output_tokens": np.array([1, -2, 3])}, "output_tokens"),
        ({"arrival_s": np.array([0.0, 2.0, 1.0])}, "arrival_s"),
        ({"arrival_s": np.array([-1.0, 0.0, 1.0])}, "arrival_s"),
        ({"arrival_s": np.array([0.0, np.nan, 1.0])}, "arrival_s"),
        ({"tenant": np.array(["a", "b"], dtype=object)}, "tenant"),
        ({"duration_s": 1.5}, "duration_s"),
    ],
)
def test_validation_names_the_field(change: dict, field: str) -> None:
    cols = {
        "arrival_s": np.array([0.0, 1.0, 2.0]),
        "model": np.array(["", "", ""], dtype=object),
        "tenant": np.array(["a", "b", "c"], dtype=object),
        "prompt_tokens": np.array([1, 2, 3]),
        "output_tokens": np.array([1, 2, 3]),
        "name": "t",
        "duration_s": 3.0,
    } | change
    with pytest.raises(ConfigError, match=field):
        Workload(**cols)


def test_from_columns_sorts_broadcasts_and_freezes() -> None:
    wl = Workload.from_columns([3.0, 1.0, 2.0], [30, 10, 20], [3, 1, 2], tenant="t1", name="x")
    np.testing.assert_array_equal(wl.arrival_s, [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(wl.prompt_tokens, [10, 20, 30])
    assert list(wl.model) == ["", "", ""] and list(wl.tenant) == ["t1"] * 3
    assert wl.duration_s == 3.0 and len(wl) == 3
    assert wl.arrival_s.dtype == np.float64 and wl.prompt_tokens.dtype == np.int64
    with pytest.raises(ValueError, match="read-only"):
        wl.arrival_s[0] = 5.0
    assert repr(wl) == "Workload(name='x', n=3, duration_s=3)"
    assert list(wl.to_frame().columns) == ["arrival_s", "model", "tenant", "prompt_tokens", "output_tokens"]


def test_empty_workload() -> None:
    wl = Workload.from_columns([], [], [])
    assert len(wl) == 0 and wl.duration_s == 0.0 and wl.mean_rate_per_s == 0.0
    assert len(wl.subsample(0.5, seed=0)) == 0 and len(wl.window(0, 0)) == 0


# ------------------------------------------------------------------------------------------------ subsample
def test_subsample_on_azure(azure: Workload) -> None:
    half = azure.subsample(0.3, seed=11)
    assert len(half) == pytest.approx(0.3 * len(azure), rel=0.05)
    assert half.duration_s == azure.duration_s
    np.testing.assert_array_equal(half.arrival_s, azure.subsample(0.3, seed=11).arrival_s)
    assert not np.array_equal(half.arrival_s, azure.subsample(0.3, seed=12).arrival_s)
    assert len(azure.subsample(0.0, seed=1)) == 0 and len(azure.subsample(1.0, seed=1)) == len(azure)
    with pytest.raises(ConfigError, match="frac"):
        azure.subsample(1.5, seed=0)


@settings(max_examples=60, deadline=None)
@given(arrival_lists, st.floats(0, 1), st.integers(0, 2**32))
def test_subsample_keeps_an_ordered_subset(arrivals: list[float], frac: float, seed: int) -> None:
    wl = make(arrivals)
    sub = wl.subsample(frac, seed)
    # prompt_tokens are the original row numbers + 1, so they identify the kept rows.
    rows = sub.prompt_tokens - 1
    assert np.all(np.diff(rows) > 0)
    np.testing.assert_array_equal(sub.arrival_s, wl.arrival_s[rows])
    np.testing.assert_array_equal(sub.model, wl.model[rows])
    assert sub.duration_s == wl.duration_s


# ----------------------------------------------------------------------------------------- window / head
@settings(max_examples=80, deadline=None)
@given(arrival_lists, st.floats(0, 1.2e4), st.floats(0, 5e3))
def test_window_matches_brute_force(arrivals: list[float], start: float, length: float) -> None:
    wl = make(arrivals, duration_s=max([1.5e4, *arrivals]))
    end = start + length
    win = wl.window(start, end)
    inside = (wl.arrival_s >= start) & (wl.arrival_s < end)
    np.testing.assert_array_equal(win.prompt_tokens, wl.prompt_tokens[inside])
    np.testing.assert_allclose(win.arrival_s, wl.arrival_s[inside] - start)
    assert win.duration_s == pytest.approx(length)
    assert np.all(win.arrival_s >= 0) and np.all(win.arrival_s <= length)


def test_window_on_azure(azure: Workload) -> None:
    win = azure.window(600, 1200)
    inside = (azure.arrival_s >= 600) & (azure.arrival_s < 1200)
    assert len(win) == inside.sum() > 0
    assert win.duration_s == 600 and win.arrival_s[0] >= 0
    tail = azure.window(3000)
    assert tail.duration_s == pytest.approx(azure.duration_s - 3000)
    assert len(tail) == (azure.arrival_s >= 3000).sum()  # includes the last arrival, which is at duration_s
    with pytest.raises(ConfigError, match="start_s"):
        azure.window(10, 5)


def test_head(azure: Workload) -> None:
    h = azure.head(100)
    assert len(h) == 100 and h.duration_s == azure.arrival_s[99]
    np.testing.assert_array_equal(h.output_tokens, azure.output_tokens[:100])
    assert azure.head(10**9) is azure and len(azure.head(0)) == 0


# ---------------------------------------------------------------------------------------- time_scale / merge
def test_time_scale(azure: Workload) -> None:
    fast = azure.time_scale(0.25)
    np.testing.assert_allclose(fast.arrival_s, azure.arrival_s * 0.25)
    assert fast.duration_s == pytest.approx(azure.duration_s / 4)
    assert fast.mean_rate_per_s == pytest.approx(4 * azure.mean_rate_per_s)
    np.testing.assert_array_equal(fast.prompt_tokens, azure.prompt_tokens)
    with pytest.raises(ConfigError, match="factor"):
        azure.time_scale(0)


@settings(max_examples=40, deadline=None)
@given(arrival_lists, arrival_lists)
def test_merge_is_a_sorted_union(a: list[float], b: list[float]) -> None:
    wa, wb = make(a), make(b).with_columns(tenant="other")
    merged = wa.merge(wb, name="ab")
    assert len(merged) == len(wa) + len(wb) and merged.name == "ab"
    assert np.all(np.diff(merged.arrival_s) >= 0)
    assert (merged.tenant == "other").sum() == len(wb)
    assert merged.duration_s == max(wa.duration_s, wb.duration_s)


def test_with_columns_rejects_unknown_field(azure: Workload) -> None:
    with pytest.raises(ConfigError, match="colour"):
        azure.with_columns(colour="red")
