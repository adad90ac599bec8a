"""Seeded random streams: the only way randomness enters the workload package."""

from __future__ import annotations

import operator

import numpy as np

from core.errors import ConfigError


def streams(seed: int, n: int) -> list[np.random.Generator]:
    """Return ``n`` independent generators derived from ``seed``.

    Separate streams (e.g. arrivals vs. token lengths) keep one part of a workload
    unchanged when another part's parameters change.
    """
    try:
        s = operator.index(seed)
    except TypeError as exc:
        raise ConfigError(f"seed: must be an integer, got {seed!r}") from exc
    if s < 0:
        raise ConfigError(f"seed: must be >= 0, got {s}")
    return [np.random.Generator(np.random.PCG64(child)) for child in np.random.SeedSequence(s).spawn(n)]
