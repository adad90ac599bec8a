"""The `Workload`: a columnar, arrival-sorted request trace with vectorised transforms."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from core.errors import ConfigError
from core.workload.rng import streams

# Column name -> numpy dtype; the single source of truth for coercion and validation.
COLUMNS: dict[str, type | np.dtype] = {
    "arrival_s": np.float64,
    "model": object,
    "tenant": object,
    "prompt_tokens": np.int64,
    "output_tokens": np.int64,
}

UNASSIGNED = ""  # model id of a request that no model has been assigned to yet
DEFAULT_TENANT = "default"


def _readonly(values: object, dtype: type | np.dtype) -> np.ndarray:
    """Coerce to a 1-D array of ``dtype`` and return a read-only view (the caller's array stays writable)."""
    arr = np.asarray(values, dtype=dtype)
    if arr.ndim != 1:
        raise ConfigError(f"workload columns must be 1-D, got shape {arr.shape}")
    view = arr.view()
    view.flags.writeable = False
    return view


def _labels(value: str | Sequence[str] | np.ndarray | None, n: int, default: str) -> np.ndarray:
    """A per-request string column from a scalar (broadcast) or a sequence."""
    if value is None:
        value = default
    if isinstance(value, str):
        return np.full(n, value, dtype=object)
    return np.asarray(value, dtype=object)


@dataclass(frozen=True, eq=False, repr=False)
class Workload:
    """Requests as equal-length numpy columns, sorted by ``arrival_s``.

    Construction coerces dtypes and validates, so a `Workload` is always consistent;
    columns are read-only views. ``model == ""`` means no model assigned yet.
    """

    arrival_s: np.ndarray
    model: np.ndarray
    tenant: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    name: str
    duration_s: float
    # deployments the workload declares besides those its requests name (e.g. a ServeGen client's fine-tunes
    # that get no request in a window): part of the catalog, so that it does not depend on the slice
    catalog: tuple[str, ...] = ()
    # per request, the prompt's prefix-cache block ids (a tuple of ints; Mooncake's ``hash_ids``), or None when
    # the trace has none: optional, so every other trace and generator is unchanged (core/prefix_cache.py)
    prefix_blocks: np.ndarray | None = None

    def __post_init__(self) -> None:
        for col, dtype in COLUMNS.items():
            object.__setattr__(self, col, _readonly(getattr(self, col), dtype))
        object.__setattr__(self, "duration_s", float(self.duration_s))
        object.__setattr__(self, "catalog", tuple(self.catalog))
        if self.prefix_blocks is not None:
            object.__setattr__(self, "prefix_blocks", _block_column(self.prefix_blocks))
            if len(self.prefix_blocks) != len(self.arrival_s):
                raise ConfigError(f"workload {self.name!r}: field 'prefix_blocks' has length "
                                  f"{len(self.prefix_blocks)}, arrival_s has {len(self.arrival_s)}")
        self.validate()

    @classmethod
    def from_columns(
        cls,
        arrival_s: Sequence[float] | np.ndarray,
        prompt_tokens: Sequence[int] | np.ndarray,
        output_tokens: Sequence[int] | np.ndarray,
        *,
        model: str | Sequence[str] | np.ndarray | None = None,
        tenant: str | Sequence[str] | np.ndarray | None = None,
        name: str = "workload",
        duration_s: float | None = None,
        prefix_blocks: Sequence[Sequence[int]] | np.ndarray | None = None,
    ) -> Workload:
        """Build from possibly unsorted columns: scalars broadcast, rows are stably sorted by arrival.

        ``duration_s`` defaults to the last arrival. ``prefix_blocks``: per request, its prompt's block ids.
        """
        arrival = np.asarray(arrival_s, dtype=np.float64)
        n = arrival.size
        cols = {
            "arrival_s": arrival,
            "model": _labels(model, n, UNASSIGNED),
            "tenant": _labels(tenant, n, DEFAULT_TENANT),
            "prompt_tokens": np.asarray(prompt_tokens),
            "output_tokens": np.asarray(output_tokens),
        }
        _check_lengths(name, cols)
        blocks = _block_column(prefix_blocks) if prefix_blocks is not None else None
        if blocks is not None and len(blocks) != n:
            raise ConfigError(f"workload {name!r}: field 'prefix_blocks' has length {len(blocks)}, arrival_s has {n}")
        if n > 1 and np.any(arrival[1:] < arrival[:-1]):
            order = np.argsort(arrival, kind="stable")
            cols = {k: v[order] for k, v in cols.items()}
            blocks = blocks[order] if blocks is not None else None
        if duration_s is None:
            duration_s = float(cols["arrival_s"][-1]) if n else 0.0
        return cls(**cols, name=name, duration_s=duration_s, prefix_blocks=blocks)

    # ----------------------------------------------------------------- checks
    def validate(self) -> None:
        """Raise `ConfigError` naming the field if the columns are inconsistent."""
        cols = {col: getattr(self, col) for col in COLUMNS}
        _check_lengths(self.name, cols)
        arr = self.arrival_s
        where = f"workload {self.name!r}"
        if not np.all(np.isfinite(arr)):
            raise ConfigError(f"{where}: field 'arrival_s' has a non-finite value at row {_first(~np.isfinite(arr))}")
        if arr.size and arr[0] < 0:
            raise ConfigError(f"{where}: field 'arrival_s' must be >= 0, row 0 is {arr[0]}")
        if arr.size > 1 and np.any(bad := arr[1:] < arr[:-1]):
            raise ConfigError(f"{where}: field 'arrival_s' is not sorted (row {_first(bad) + 1} goes back in time)")
        for col in ("prompt_tokens", "output_tokens"):
            if np.any(bad := getattr(self, col) <= 0):
                i = _first(bad)
                raise ConfigError(f"{where}: field {col!r} must be > 0, row {i} is {getattr(self, col)[i]}")
        if not np.isfinite(self.duration_s) or (arr.size and self.duration_s < arr[-1]) or self.duration_s < 0:
            last = arr[-1] if arr.size else 0.0
            raise ConfigError(f"{where}: field 'duration_s' = {self.duration_s} must be finite and >= {last}")

    # ------------------------------------------------------------- basics
    def __len__(self) -> int:
        return int(self.arrival_s.size)

    def __repr__(self) -> str:
        return f"Workload(name={self.name!r}, n={len(self)}, duration_s={self.duration_s:.6g})"

    @property
    def mean_rate_per_s(self) -> float:
        """Requests per second over the whole span (0 for an empty span)."""
        return len(self) / self.duration_s if self.duration_s > 0 else 0.0

    def to_frame(self) -> pd.DataFrame:
        """The columns as a pandas DataFrame (one row per request)."""
        return pd.DataFrame({col: getattr(self, col) for col in COLUMNS})

    def _select(self, rows: slice | np.ndarray, *, shift_s: float = 0.0, duration_s: float, name: str) -> Workload:
        """Keep ``rows`` (order-preserving), subtract ``shift_s`` from arrivals; shared by all row filters."""
        cols = {col: getattr(self, col)[rows] for col in COLUMNS}
        if shift_s:
            cols["arrival_s"] = cols["arrival_s"] - shift_s
        blocks = self.prefix_blocks[rows] if self.prefix_blocks is not None else None
        return Workload(**cols, name=name, duration_s=duration_s, catalog=self.catalog, prefix_blocks=blocks)

    def with_columns(self, **columns: np.ndarray | str) -> Workload:
        """A copy with some columns replaced (e.g. ``model=...``); scalars broadcast for label columns."""
        known = [*COLUMNS, "name", "duration_s"]
        if unknown := set(columns) - set(known):
            raise ConfigError(f"with_columns: unknown field(s) {sorted(unknown)}; known: {known}")
        cols: dict[str, object] = {col: getattr(self, col) for col in COLUMNS}
        cols |= {"name": self.name, "duration_s": self.duration_s, "catalog": self.catalog,
                 "prefix_blocks": self.prefix_blocks}
        for key, value in columns.items():
            cols[key] = _labels(value, len(self), "") if key in ("model", "tenant") else value
        return Workload(**cols)  # type: ignore[arg-type]

    # --------------------------------------------------------- transforms
    def subsample(self, frac: float, seed: int) -> Workload:
        """Keep each request independently with probability ``frac`` (seeded); the span is unchanged."""
        if not 0.0 <= frac <= 1.0:
            raise ConfigError(f"subsample: frac must be in [0, 1], got {frac}")
        (rng,) = streams(seed, 1)
        keep = rng.random(len(self)) < frac
        return self._select(keep, duration_s=self.duration_s, name=self.name)

    def time_scale(self, factor: float) -> Workload:
        """Multiply arrival times and duration by ``factor`` (< 1 compresses time, i.e. raises the rate)."""
        if not (np.isfinite(factor) and factor > 0):
            raise ConfigError(f"time_scale: factor must be finite and > 0, got {factor}")
        return self.with_columns(arrival_s=self.arrival_s * factor, duration_s=self.duration_s * factor)

    def window(self, start_s: float, end_s: float | None = None) -> Workload:
        """Requests arriving in ``[start_s, end_s)``, re-based so ``start_s`` becomes 0."""
        end = self.duration_s if end_s is None else end_s
        if not (0 <= start_s <= end):
            raise ConfigError(f"window: need 0 <= start_s <= end_s, got start_s={start_s}, end_s={end_s}")
        lo, hi = np.searchsorted(self.arrival_s, [start_s, end], side="left")
        # Without an explicit end the window reaches past the last arrival, so include arrivals at exactly `end`.
        if end_s is None:
            hi = len(self)
        return self._select(slice(lo, hi), shift_s=start_s, duration_s=max(end, start_s) - start_s, name=self.name)

    def head(self, n: int) -> Workload:
        """The first ``n`` requests; the span ends at the last kept arrival (or stays if nothing is cut)."""
        if n < 0:
            raise ConfigError(f"head: n must be >= 0, got {n}")
        if n >= len(self):
            return self
        duration = float(self.arrival_s[n - 1]) if n else 0.0
        return self._select(slice(0, n), duration_s=duration, name=self.name)

    def merge(self, *others: Workload, name: str | None = None) -> Workload:
        """Superpose workloads on one time axis (stable by input order at equal arrivals); span = longest."""
        parts = (self, *others)
        cols = {col: np.concatenate([getattr(w, col) for w in parts]) for col in COLUMNS}
        order = np.argsort(cols["arrival_s"], kind="stable")
        blocks = None
        if any(w.prefix_blocks is not None for w in parts):  # a part without block ids shares no prefix
            blocks = np.concatenate([w.prefix_blocks if w.prefix_blocks is not None else _block_column([()] * len(w))
                                     for w in parts])[order]
        return Workload(
            **{k: v[order] for k, v in cols.items()},
            name=name or "+".join(w.name for w in parts),
            duration_s=max(w.duration_s for w in parts),
            catalog=tuple(dict.fromkeys(m for w in parts for m in w.catalog)),
            prefix_blocks=blocks,
        )


def _block_column(values: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
    """A read-only 1-D object array of int tuples (one per request), however the block ids came."""
    if isinstance(values, np.ndarray) and values.dtype == object and not values.flags.writeable:
        return values  # already one (a transform's slice of a workload's column)
    arr = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        arr[i] = v if isinstance(v, tuple) else tuple(v)
    arr.flags.writeable = False
    return arr


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _check_lengths(name: str, cols: dict[str, np.ndarray]) -> None:
    n = len(cols["arrival_s"])
    for col, values in cols.items():
        if len(values) != n:
            raise ConfigError(f"workload {name!r}: field {col!r} has length {len(values)}, arrival_s has {n}")
