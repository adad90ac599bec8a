"""Arrival-rate trackers and forecasters fed by the policies' hooks (no clocks of their own)."""

from __future__ import annotations

import math
from collections import defaultdict


class WindowCounter:
    """Per-model arrival counts in fixed buckets, for "requests in the last hour" style rules."""

    __slots__ = ("_counts", "bucket_s", "horizon_buckets")

    def __init__(self, bucket_s: float = 300.0, horizon_s: float = 3600.0) -> None:
        if bucket_s <= 0 or horizon_s < bucket_s:
            raise ValueError("bucket_s must be > 0 and horizon_s >= bucket_s")
        self.bucket_s = bucket_s
        self.horizon_buckets = math.ceil(horizon_s / bucket_s)
        self._counts: dict[str, dict[int, int]] = defaultdict(dict)

    def observe(self, model: str, now_s: float) -> None:
        b = int(now_s // self.bucket_s)
        c = self._counts[model]
        c[b] = c.get(b, 0) + 1

    def count(self, model: str, now_s: float) -> int:
        """Arrivals of `model` in the horizon ending at `now_s` (bucket-granular)."""
        c = self._counts.get(model)
        if not c:
            return 0
        last = int(now_s // self.bucket_s)
        first = last - self.horizon_buckets + 1
        stale = [b for b in c if b < first]
        for b in stale:
            del c[b]
        return sum(v for b, v in c.items() if b <= last)

    def rate_per_hour(self, model: str, now_s: float) -> float:
        return self.count(model, now_s) * 3600.0 / (self.horizon_buckets * self.bucket_s)

    def models(self) -> list[str]:
        return sorted(self._counts)


class HoltForecaster:
    """Holt's linear (level + trend) smoothing of per-model arrival rates over fixed windows.

    `observe` counts arrivals; `advance(now_s)` closes every window that ended before
    `now_s`; `forecast(model, horizon_s)` predicts the rate (req/s) `horizon_s` ahead.
    With `beta = 0` it is a plain EWMA.
    """

    def __init__(self, window_s: float = 60.0, alpha: float = 0.5, beta: float = 0.2) -> None:
        if window_s <= 0 or not 0 < alpha <= 1 or not 0 <= beta <= 1:
            raise ValueError("window_s > 0, 0 < alpha <= 1, 0 <= beta <= 1 required")
        self.window_s = window_s
        self.alpha = alpha
        self.beta = beta
        self._current: dict[str, int] = defaultdict(int)
        self._level: dict[str, float] = {}
        self._trend: dict[str, float] = {}
        self._window = 0

    def observe(self, model: str, now_s: float) -> None:
        self.advance(now_s)
        self._current[model] += 1

    def advance(self, now_s: float) -> None:
        target = int(now_s // self.window_s)
        while self._window < target:
            self._close_window()
            self._window += 1

    def _close_window(self) -> None:
        models = set(self._level) | set(self._current)
        for m in models:
            rate = self._current.get(m, 0) / self.window_s
            if m not in self._level:
                self._level[m], self._trend[m] = rate, 0.0
                continue
            level, trend = self._level[m], self._trend[m]
            new_level = self.alpha * rate + (1 - self.alpha) * (level + trend)
            self._trend[m] = self.beta * (new_level - level) + (1 - self.beta) * trend
            self._level[m] = new_level
        self._current.clear()

    def forecast(self, model: str, horizon_s: float = 0.0) -> float:
        if model not in self._level:
            return 0.0
        steps = horizon_s / self.window_s
        return max(0.0, self._level[model] + steps * self._trend[model])

    def models(self) -> list[str]:
        return sorted(self._level)
