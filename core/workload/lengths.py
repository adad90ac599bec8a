"""Token-length samplers: fixed, lognormal, or resampled from a trace. All draw from a caller's generator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from core.errors import ConfigError
from core.workload.trace import Workload


class TokenSampler(Protocol):
    """Draws ``n`` (prompt_tokens, output_tokens) pairs, both int64 arrays of values >= 1."""

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class FixedLengths:
    """Every request has the same prompt and output length."""

    prompt_tokens: int = 1000
    output_tokens: int = 300

    def __post_init__(self) -> None:
        for field in ("prompt_tokens", "output_tokens"):
            if getattr(self, field) < 1:
                raise ConfigError(f"FixedLengths.{field}: must be >= 1, got {getattr(self, field)}")

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Constant columns; ``rng`` is unused but kept for the common interface."""
        return np.full(n, self.prompt_tokens, dtype=np.int64), np.full(n, self.output_tokens, dtype=np.int64)


@dataclass(frozen=True)
class LognormalLengths:
    """Independent lognormal prompt and output lengths, given by median and log-space sigma, rounded and clipped."""

    prompt_median: float = 1000.0
    prompt_sigma: float = 1.0
    output_median: float = 300.0
    output_sigma: float = 1.0
    max_tokens: int = 32768

    def __post_init__(self) -> None:
        for field in ("prompt_median", "output_median"):
            if not getattr(self, field) > 0:
                raise ConfigError(f"LognormalLengths.{field}: must be > 0, got {getattr(self, field)}")
        for field in ("prompt_sigma", "output_sigma"):
            if not getattr(self, field) >= 0:
                raise ConfigError(f"LognormalLengths.{field}: must be >= 0, got {getattr(self, field)}")
        if self.max_tokens < 1:
            raise ConfigError(f"LognormalLengths.max_tokens: must be >= 1, got {self.max_tokens}")

    def _draw(self, n: int, median: float, sigma: float, rng: np.random.Generator) -> np.ndarray:
        values = np.rint(rng.lognormal(np.log(median), sigma, size=n))
        return np.clip(values, 1, self.max_tokens).astype(np.int64)

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Prompt lengths first, then output lengths, from the same stream."""
        prompt = self._draw(n, self.prompt_median, self.prompt_sigma, rng)
        return prompt, self._draw(n, self.output_median, self.output_sigma, rng)


@dataclass(frozen=True, eq=False)
class TraceLengths:
    """Resample (prompt, output) pairs with replacement from a trace.

    Pairs are drawn jointly, so any correlation between prompt and output length in the trace is kept.
    """

    prompt_tokens: np.ndarray
    output_tokens: np.ndarray

    def __post_init__(self) -> None:
        if len(self.prompt_tokens) == 0 or len(self.prompt_tokens) != len(self.output_tokens):
            raise ConfigError("TraceLengths: need equal-length, non-empty prompt_tokens and output_tokens")

    @classmethod
    def from_workload(cls, wl: Workload) -> TraceLengths:
        """Use a workload's length columns as the empirical distribution."""
        return cls(wl.prompt_tokens, wl.output_tokens)

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Uniform row indices with replacement."""
        idx = rng.integers(0, len(self.prompt_tokens), size=n)
        return self.prompt_tokens[idx].astype(np.int64), self.output_tokens[idx].astype(np.int64)
