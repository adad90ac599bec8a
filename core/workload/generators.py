"""Seeded synthetic arrival processes (Poisson, gamma renewal, diurnal) returning `Workload`s.

Arrivals and token lengths use separate streams of the seed, so swapping the length model keeps arrivals.
"""

from __future__ import annotations

import math

import numpy as np

from core.errors import ConfigError
from core.workload.lengths import LognormalLengths, TokenSampler
from core.workload.rng import streams
from core.workload.trace import DEFAULT_TENANT, UNASSIGNED, Workload


def _check(rate_per_s: float, duration_s: float) -> None:
    if not (math.isfinite(rate_per_s) and rate_per_s >= 0):
        raise ConfigError(f"rate_per_s: must be finite and >= 0, got {rate_per_s}")
    if not (math.isfinite(duration_s) and duration_s >= 0):
        raise ConfigError(f"duration_s: must be finite and >= 0, got {duration_s}")


def _build(
    arrival_s: np.ndarray,
    duration_s: float,
    length_rng: np.random.Generator,
    lengths: TokenSampler | None,
    model: str,
    tenant: str,
    name: str,
) -> Workload:
    """Attach lengths and labels to sorted arrivals; shared by every generator."""
    prompt, output = (lengths or LognormalLengths()).sample(arrival_s.size, length_rng)
    return Workload(
        arrival_s=arrival_s,
        model=np.full(arrival_s.size, model, dtype=object),
        tenant=np.full(arrival_s.size, tenant, dtype=object),
        prompt_tokens=prompt,
        output_tokens=output,
        name=name,
        duration_s=duration_s,
    )


def _poisson_times(rate_per_s: float, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    """Homogeneous Poisson arrivals on [0, duration): Poisson count, then sorted uniform times."""
    n = rng.poisson(rate_per_s * duration_s)
    return np.sort(rng.uniform(0.0, duration_s, size=n))


def poisson(
    rate_per_s: float,
    duration_s: float,
    seed: int,
    *,
    lengths: TokenSampler | None = None,
    model: str = UNASSIGNED,
    tenant: str = DEFAULT_TENANT,
    name: str = "poisson",
) -> Workload:
    """Poisson arrivals at ``rate_per_s`` over ``[0, duration_s)``; lengths default to `LognormalLengths()`."""
    _check(rate_per_s, duration_s)
    arrival_rng, length_rng = streams(seed, 2)
    times = _poisson_times(rate_per_s, duration_s, arrival_rng)
    return _build(times, duration_s, length_rng, lengths, model, tenant, name)


def gamma(
    rate_per_s: float,
    cv: float,
    duration_s: float,
    seed: int,
    *,
    lengths: TokenSampler | None = None,
    model: str = UNASSIGNED,
    tenant: str = DEFAULT_TENANT,
    name: str = "gamma",
) -> Workload:
    """Renewal process with gamma inter-arrival times of mean ``1/rate_per_s`` and coefficient of variation ``cv``.

    cv = 1 is Poisson; cv > 1 is burstier, cv < 1 more regular. The first arrival is one IAT after 0.
    """
    _check(rate_per_s, duration_s)
    if not (math.isfinite(cv) and cv > 0):
        raise ConfigError(f"cv: must be finite and > 0, got {cv}")
    arrival_rng, length_rng = streams(seed, 2)
    times = np.empty(0)
    if rate_per_s > 0 and duration_s > 0:
        shape = 1.0 / cv**2
        scale = 1.0 / (rate_per_s * shape)
        expected = rate_per_s * duration_s
        chunks, t = [], 0.0
        # Draw in chunks sized to overshoot the horizon with high probability; loop only for the rare shortfall.
        while t < duration_s:
            n = int(expected + 6 * cv * math.sqrt(expected) + 16)
            part = t + np.cumsum(arrival_rng.gamma(shape, scale, size=n))
            chunks.append(part)
            t = float(part[-1])
        times = np.concatenate(chunks)
        times = times[times < duration_s]
    return _build(times, duration_s, length_rng, lengths, model, tenant, name)


def diurnal(
    mean_rate_per_s: float,
    peak_to_trough: float,
    period_s: float,
    duration_s: float,
    seed: int,
    *,
    phase_s: float = 0.0,
    lengths: TokenSampler | None = None,
    model: str = UNASSIGNED,
    tenant: str = DEFAULT_TENANT,
    name: str = "diurnal",
) -> Workload:
    """Non-homogeneous Poisson with rate ``mean * (1 + a*sin(2π(t - phase_s)/period_s))`` (thinning).

    ``a = (p - 1)/(p + 1)`` for ``p = peak_to_trough``, so max/min rate equals ``p``; p = 1 is plain Poisson.
    The peak is at ``phase_s + period_s/4``.
    """
    _check(mean_rate_per_s, duration_s)
    if not (math.isfinite(peak_to_trough) and peak_to_trough >= 1):
        raise ConfigError(f"peak_to_trough: must be finite and >= 1, got {peak_to_trough}")
    if not (math.isfinite(period_s) and period_s > 0):
        raise ConfigError(f"period_s: must be finite and > 0, got {period_s}")
    arrival_rng, length_rng = streams(seed, 2)
    a = (peak_to_trough - 1.0) / (peak_to_trough + 1.0)
    candidates = _poisson_times(mean_rate_per_s * (1.0 + a), duration_s, arrival_rng)
    accept_p = (1.0 + a * np.sin(2.0 * np.pi * (candidates - phase_s) / period_s)) / (1.0 + a)
    times = candidates[arrival_rng.random(candidates.size) < accept_p]
    return _build(times, duration_s, length_rng, lengths, model, tenant, name)
