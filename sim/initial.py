"""Fill a world's local tiers before its first arrival (`sim.initial_state`: a file's state, or the policy's)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from core.initial_state import POLICY, InitialState, from_copies, place

if TYPE_CHECKING:
    from sim.world import World


def seed_tiers(world: World, init: InitialState | str | None) -> int:
    """Put `init`'s copies into `world`'s tiers at time 0 (`"policy"`: ask the policy's caching and autoscaling
    hooks named `initial_state(view)`, if any, for `Copy` actions that land at once). Each copy leaves a
    tier-movement row of kind `initial` (from no tier), so storage is billed from time 0. Returns the count."""
    if init is None:
        return 0
    if isinstance(init, str):
        if init != POLICY:
            raise ValueError(f"initial state {init!r}: expected an InitialState or {POLICY!r}")
        copies = []
        for hooks in (world.policy.caching, world.policy.autoscaling):
            hook = getattr(hooks, "initial_state", None)
            if hook is not None:
                copies.extend(hook(world.view))
        init = from_copies(copies, world.cluster, list(world.state.models.values()),
                           f"policy {world.policy.name!r}")
    placed = place(world.state, init)
    now = world.env.now
    for node, tier, model, nbytes in placed:
        world.moves.append((now, now, model, node, "", tier, "initial", nbytes, 0.0))
    return len(placed)
