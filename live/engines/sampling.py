"""Token sampling for the CPU engine: greedy, temperature and nucleus (top-p) sampling, one uniform draw per
token from a generator that depends only on (seed, position), so a sequence moved to another engine draws what
it would have drawn where it started."""

from __future__ import annotations

import secrets

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One splitmix64 output for state `x`: a well-mixed 64-bit value (neighbouring inputs look unrelated)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def position_seed(seed: int, position: int) -> int:
    """The 63-bit seed of the draw for generated token `position` (0-based) of a sequence seeded with `seed`."""
    if position < 0:
        raise ValueError(f"position must be >= 0, got {position}")
    return _splitmix64(_splitmix64(seed & _MASK64) ^ position) >> 1


def position_generator(seed: int, position: int) -> torch.Generator:
    """A generator whose draws depend only on (seed, position).

    Why: a sequence that moves to another engine mid-generation (detach, resume elsewhere) must draw the
    same tokens as if it had never moved, so no random state may carry over from one token to the next.
    """
    return torch.Generator().manual_seed(position_seed(seed, position))


def sample_token(
    logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None
) -> int:
    """Greedy when temperature <= 0; else temperature + nucleus (top-p) sampling with one uniform draw.

    The token is found by inverting the cumulative distribution at a single uniform from `generator`, so
    a draw consumes exactly one random number (see `position_generator`).
    """
    if temperature <= 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1).double()
    order: torch.Tensor | None = None
    if top_p < 1.0:
        probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        keep = (torch.cumsum(probs, dim=-1) - probs) < top_p
        probs = probs * keep
    cdf = torch.cumsum(probs, dim=-1)
    u = torch.rand((), generator=generator, dtype=torch.float64) * cdf[-1]
    # the first entry whose cumulative mass exceeds u: it has mass > 0 since u < cdf[-1] (the clamp only
    # guards against rounding)
    pick = min(int(torch.searchsorted(cdf, u, right=True)), probs.numel() - 1)
    return int(order[pick]) if order is not None else pick


def random_seed() -> int:
    """A fresh 63-bit seed for a request that did not ask for one."""
    return secrets.randbits(63)
