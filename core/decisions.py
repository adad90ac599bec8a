"""What policies say: placement decisions, tier moves and scaling actions.

The simulator and the live runtime execute these in their own worlds; neither may
special-case a policy.
"""

from __future__ import annotations

from dataclasses import dataclass


# ---- placement: one per request --------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Route:
    """Send the request to an existing instance (ready, or still loading)."""

    instance_id: str


@dataclass(frozen=True, slots=True)
class Migration:
    """Free a GPU on the chosen node by moving a running instance elsewhere (ServerlessLLM-style).

    The destination loads the victim's model, then its in-flight requests resume there after
    recomputing their KV cache (token-based migration).
    """

    instance_id: str
    dest_node: str
    dest_source_tier: str
    a_s_per_token: float = 2e-5
    b_s: float = 0.5


@dataclass(frozen=True, slots=True)
class ColdStart:
    """Start a new instance of the request's model on `node`, loading from `source_tier`."""

    node: str
    source_tier: str
    migrate: Migration | None = None


@dataclass(frozen=True, slots=True)
class Queue:
    """Hold the request until capacity frees up; it is placed again then."""

    reason: str


@dataclass(frozen=True, slots=True)
class Reject:
    """Turn the request away."""

    reason: str


Decision = Route | ColdStart | Queue | Reject


# ---- tier movements -------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Copy:
    """Write a copy of `model` into `to_tier` on `node` (from its fastest copy, or the store).

    `kind` names why (promote, demote, prefetch, cache) for the records.
    """

    model: str
    node: str
    to_tier: str
    kind: str = "cache"


@dataclass(frozen=True, slots=True)
class Evict:
    """Drop `model` from `tier` on `node`."""

    model: str
    node: str
    tier: str
    kind: str = "evict"


# ---- scaling ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class StartInstance:
    """Pre-warm: start an instance of `model` on `node` from `source_tier` with no request waiting."""

    model: str
    node: str
    source_tier: str
    reason: str = "prewarm"


@dataclass(frozen=True, slots=True)
class StopInstance:
    """Unload an instance (keep-alive expiry, scale-down, GPU pressure)."""

    instance_id: str
    reason: str = "keep_alive"
    demote_to: str | None = None  # write the weights to this tier first, if not already there


Move = Copy | Evict
Action = Copy | Evict | StartInstance | StopInstance
