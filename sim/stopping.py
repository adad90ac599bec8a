"""Engine stops that take time: a stopping instance leaves routing at once but keeps its memory until it is gone.

Live, the gateway takes a stopped instance out of routing, optionally copies its weights to the demote tier
first (`live.gateway_actions._run_stop`: copy, then unload), then waits for the agent's POST /unload (the engine's
process group terminated and reaped, `live.engines.base`); only then is its memory free for the next load, and
while any stop is under way on a node it asks for no second round of GPU-pressure stops there. `EngineSpec.stop_s`
(the /unload time, measured by `experiments.calibrate`) and `EngineSpec.demote_before_stop` model that here.

With stop_s == 0 and demote_before_stop false (the defaults) a stop is what it always was in `sim.world`: the copy is
issued and the instance removed in the same instant, so every earlier result stays bit for bit the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from core.decisions import Copy
from core.state import InstanceState

if TYPE_CHECKING:
    from sim.world import World


class Stops:
    """The graceful stops (policy StopInstance, a migrated victim) of one world, and those under way per node."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.stop_s = float(world.engine.stop_s)
        self.demote_first = bool(world.engine.demote_before_stop)
        self._pending: dict[str, tuple[InstanceState, str]] = {}  # instance id -> (instance, stop reason)

    def stop(self, inst: InstanceState, reason: str, demote_to: str | None = None) -> None:
        """Stop `inst` (copying its weights to `demote_to` first, if given); its memory is freed when the stop ends."""
        w = self.world
        copying = False
        if demote_to:
            copy = Copy(inst.model.name, inst.node, demote_to, kind="demote")
            on_done = self._after_demote(inst) if self.demote_first else None
            copying = w._copy(copy, src="gpu", on_done=on_done) and self.demote_first
        if self.stop_s <= 0 and not copying:
            w._remove_instance(inst, reason)  # free, at once: the simulator as it always was
            return
        inst.status = "stopping"  # out of routing (policies see neither a ready nor a loading instance)
        self._pending[inst.id] = (inst, reason)
        if not copying:
            self._teardown(inst.id)

    def _after_demote(self, inst: InstanceState) -> Callable[[], None]:
        return lambda: self._teardown(inst.id) if inst.id in self._pending else None

    def _teardown(self, inst_id: str) -> None:
        """The engine process stops now; `stop_s` later its memory is free."""
        if self.stop_s <= 0:
            self._end(inst_id)
        else:
            self.world.env.timeout(self.stop_s).callbacks.append(lambda _e: self._end(inst_id))

    def _end(self, inst_id: str) -> None:
        entry = self._pending.pop(inst_id, None)
        if entry is None:
            return
        inst, reason = entry
        if inst.id in self.world.engines:  # not lost with its node (or ended by the run's end) meanwhile
            self.world._remove_instance(inst, reason)  # frees the memory, records "stopped", retries the pending

    def under_way(self, node: str) -> bool:
        """True while a stop on `node` still holds memory (its end frees room: no second round of stops)."""
        engines = self.world.engines
        return any(i.node == node and i.id in engines for i, _ in self._pending.values())

    def finish_all(self) -> None:
        """At the run's end: the stops still under way end now, with their own reasons."""
        for inst_id in list(self._pending):
            self._end(inst_id)
