"""ServeGen over long horizons, generated in time chunks (`workload.kind: servegen_horizon`).

`read_servegen` draws a whole span with one random stream, so its arrays must fit in memory (14 days of
language/m-small is ~1.4e9 requests). Here the span ``[start_s, end_s)`` is cut into chunks of ``chunk_s``
aligned on ``start_s``; chunk k draws its arrivals and lengths from its own streams (``SeedSequence(seed)``'s
k-th child), so chunk k is the same whatever ``end_s`` is, a two-day horizon starts with the one-day one, and
`servegen_horizon_chunks` (one chunk in memory at a time) and `read_servegen_horizon` (their concatenation)
yield identical requests. A ServeGen window that straddles a chunk boundary is split in two, each part with its
share of the window's expected count (the same law as `read_servegen`, not the same draws).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from core.errors import ConfigError
from core.workload.lengths import LognormalLengths
from core.workload.readers import (
    SERVEGEN_WINDOW_S,
    _existing,
    _load_servegen,
    _servegen_arrivals,
    _servegen_files,
    _Windows,
)
from core.workload.rng import streams
from core.workload.trace import Workload


def _check(seed: int, start_s: float, end_s: float | None, chunk_s: float, rate_scale: float) -> None:
    streams(seed, 1)  # the seed's own checks (an integer >= 0)
    if not (math.isfinite(chunk_s) and chunk_s > 0):
        raise ConfigError(f"chunk_s: must be finite and > 0, got {chunk_s}")
    if not (math.isfinite(rate_scale) and rate_scale > 0):
        raise ConfigError(f"rate_scale: must be finite and > 0, got {rate_scale}")
    if not (math.isfinite(start_s) and start_s >= 0) or (end_s is not None and not end_s >= start_s):
        raise ConfigError(f"start_s/end_s: need 0 <= start_s <= end_s, got start_s={start_s}, end_s={end_s}")


class ServegenHorizon:
    """The parsed windows of one ServeGen group and how to cut them into chunks (parsed once, drawn per chunk)."""

    def __init__(self, path: str | Path, seed: int, *, start_s: float = 0.0, end_s: float | None = None,
                 chunk_s: float = 3600.0, rate_scale: float = 1.0, prompt_median: float = 1000.0,
                 prompt_sigma: float = 1.0, output_median: float = 300.0, output_sigma: float = 1.0,
                 max_tokens: int = 32768, window_s: float = SERVEGEN_WINDOW_S, group: str | None = None,
                 name: str | None = None) -> None:
        _check(seed, float(start_s), end_s, float(chunk_s), float(rate_scale))
        p = _existing(path, allow_dir=True)
        dir_group, files = _servegen_files(p)
        self.group = group or dir_group
        self.windows = _load_servegen(files, window_s)
        w = self.windows
        self.start_s = float(start_s)
        self.end_s = float((w.start + w.size).max(initial=start_s)) if end_s is None else float(end_s)
        self.chunk_s = float(chunk_s)
        self.rate_scale = float(rate_scale)
        self.seed = int(seed)
        self.lengths = LognormalLengths(prompt_median, prompt_sigma, output_median, output_sigma, max_tokens)
        ids = [cid for cid, _ in files]
        self.models = np.asarray([f"{self.group}/client-{cid}" for cid in ids], dtype=object)
        self.tenants = np.asarray([f"client-{cid}" for cid in ids], dtype=object)
        self.name = name or f"servegen_{self.group}_horizon"

    @property
    def n_chunks(self) -> int:
        return max(1, math.ceil((self.end_s - self.start_s) / self.chunk_s - 1e-9))

    def expected_requests(self) -> float:
        """Mean request count over the horizon (the sum of every clipped window's rate x size)."""
        w = self._clip(self.start_s, self.end_s)
        return float(np.sum(w.rate * self.rate_scale * w.size * (w.pattern != 0)))

    def _clip(self, lo_s: float, hi_s: float) -> _Windows:
        w = self.windows
        lo, hi = np.maximum(w.start, lo_s), np.minimum(w.start + w.size, hi_s)
        return _Windows(w.client, lo, np.maximum(hi - lo, 0.0), w.rate, w.pattern, w.shape, w.scale)

    def chunk(self, k: int) -> Workload:
        """Chunk k: the requests of ``[start_s + k*chunk_s, min(end_s, start_s + (k+1)*chunk_s))``, with arrival
        times counted from ``start_s`` (so chunks concatenate into one trace)."""
        if not 0 <= k < self.n_chunks:
            raise ConfigError(f"chunk: {k} is outside 0..{self.n_chunks - 1}")
        lo = self.start_s + k * self.chunk_s
        hi = min(self.end_s, lo + self.chunk_s)
        # the k-th child of the seed (independent of how many chunks there are), split into arrivals and lengths
        child = np.random.SeedSequence(self.seed, spawn_key=(k,))  # = SeedSequence(seed).spawn(k + 1)[k]
        arrival_rng, length_rng = (np.random.Generator(np.random.PCG64(s)) for s in child.spawn(2))
        arrival, client = _servegen_arrivals(self._clip(lo, hi), arrival_rng, self.rate_scale)
        order = np.argsort(arrival, kind="stable")
        arrival, client = arrival[order] - self.start_s, client[order]
        prompt, output = self.lengths.sample(arrival.size, length_rng)
        return Workload(arrival_s=arrival, model=self.models[client], tenant=self.tenants[client],
                        prompt_tokens=prompt, output_tokens=output, name=f"{self.name}[{k}]",
                        duration_s=hi - self.start_s, catalog=tuple(self.models.tolist()))

    def chunks(self) -> Iterator[Workload]:
        """Every chunk in time order, one at a time."""
        for k in range(self.n_chunks):
            yield self.chunk(k)


def servegen_horizon_chunks(path: str | Path, seed: int, **options: object) -> Iterator[Workload]:
    """The horizon's chunks in time order (see the module docstring), one in memory at a time."""
    return ServegenHorizon(path, seed, **options).chunks()  # type: ignore[arg-type]


def read_servegen_horizon(path: str | Path, seed: int, *, max_requests: int = 20_000_000,
                          **options: object) -> Workload:
    """The whole horizon in memory: the concatenation of `servegen_horizon_chunks` (refused over
    ``max_requests`` expected requests: stream it with ``records.stream_dir`` instead)."""
    h = ServegenHorizon(path, seed, **options)  # type: ignore[arg-type]
    expected = h.expected_requests()
    if expected > max_requests:
        raise ConfigError(f"max_requests: {path} would generate ~{expected:.3g} requests over "
                          f"[{h.start_s}, {h.end_s}) s, more than max_requests={max_requests}; stream it "
                          "(records.stream_dir) or narrow start_s/end_s or lower rate_scale")
    parts = list(h.chunks())
    cols = {c: np.concatenate([getattr(p, c) for p in parts])
            for c in ("arrival_s", "model", "tenant", "prompt_tokens", "output_tokens")}
    return Workload(**cols, name=h.name, duration_s=h.end_s - h.start_s, catalog=tuple(h.models.tolist()))
