"""Token-based live migration (`ColdStart(..., migrate=Migration(...))`, from `StartupTime(migration=True)`), as
`sim/world.py`'s `_migrate` models it: free a node's memory for a request by moving a busy instance elsewhere.

1. The victim's model starts on the destination node (a normal load); the victim takes no new requests
   ("migrating"), the request that asked for the room waits in placement.
2. Once the destination is ready, each in-flight sequence of the victim whose engine response id is known (a
   stream's, from its first event; a whole answer's, named by the gateway with `tierlab_id` when it forwarded it,
   as it does whenever the placement may migrate) is detached (`POST {engine}/v1/tierlab/detach {"id"}`); its
   relay drops the engine's `tierlab_detached` event (or answer) and resumes the sequence on the destination
   (`tierlab_resume`), falling back to the victim if the destination cannot take it. Requests whose id is not
   known (an engine without the contract) finish on the victim. All of this is bounded by
   `GatewayConfig.migration_timeout_s`.
3. The victim is unloaded and dropped from the mirror: its memory is free for the waiting request.

If the destination fails to load, a sequence falls back to the victim, or the handover runs out of time, the
migration is recorded as failed and the victim serves on. One migration at a time frees a given node.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import httpx

from core.decisions import Migration
from live.gateway_mirror import Flight, Live

if TYPE_CHECKING:
    from live.gateway import Gateway

log = logging.getLogger("live.gateway")
POLL_S = 0.05  # how often the handover looks at the victim's sequences again


class MigrationMixin:
    """Starting migrations and handing a victim's sequences over."""

    def _begin_migration(self: Gateway, mig: Migration, node: str) -> str:
        """Start `mig`, which frees room on `node`, unless one is already under way there; the reason the
        request that asked for it waits (it is placed again meanwhile)."""
        if self._migrating.get(node):
            return "migration_in_flight"
        t0 = self.clock.now
        state = self._state()
        victim = state.instances.get(mig.instance_id)
        vlv = self.live.get(mig.instance_id)
        model = victim.model.name if victim is not None else ""

        def skip(why: str) -> str:
            self._record(t0, "migration", f"to {mig.dest_node}", model, node, mig.dest_source_tier, mig.instance_id,
                         "skipped", why)
            return "no_gpu_capacity"

        if victim is None or vlv is None or victim.status != "ready" or victim.node != node:
            return skip(f"victim {mig.instance_id} is not a ready instance on {node}")
        if victim.id in self._migration_dests:  # moving it on before its sequences arrive would ping-pong
            return skip(f"victim {mig.instance_id} is the destination of a migration under way")
        if not vlv.url:
            return skip("victim has no engine URL")
        ns, why = self._node_for(mig.dest_node, model)
        if ns is None:
            return skip(f"destination: {why}")
        src = mig.dest_source_tier
        if src != "cloud" and (src not in ns.tiers or not ns.tiers[src].holds(model)):
            src = ns.local_source(model)
        dest = self.cold_start(model, mig.dest_node, src)
        if dest is None:
            return skip(f"no room for {model} on {mig.dest_node}")
        victim.status = "migrating"  # no new requests; it serves what it has until the handover
        self._migrating[node] = 1
        self._spawn(self._run_migration(vlv, dest, t0, src))
        return "migrating"

    async def _run_migration(self: Gateway, vlv: Live, dest: Live, t0: float, src: str) -> None:
        victim = vlv.inst
        # the victim's sequences are on their way: the destination must not look idle between its load and their
        # arrival, or a keep-alive / GPU-pressure stop takes it from under them (the simulator hands over at once)
        dest.load_waiters += 1
        self._sync_counts(dest)
        self._migration_dests.add(dest.inst.id)
        try:
            outcome, why = await self._handover(vlv, dest)
        except Exception as e:  # never leave the victim stuck in "migrating"
            log.exception("migration of %s failed", victim.id)
            outcome, why = "failed", f"internal error: {e!r}"
        finally:
            self._migrating.pop(victim.node, None)
            dest.load_waiters -= 1
            self._sync_counts(dest)
            self._migration_dests.discard(dest.inst.id)
        if outcome != "done" and victim.status == "migrating" and victim.id in self._state().instances:
            victim.status = "ready"  # it serves on
        self._record(t0, "migration", f"to {dest.inst.node}", victim.model.name, victim.node, src, victim.id,
                     outcome, why)

    async def _handover(self: Gateway, vlv: Live, dest: Live) -> tuple[str, str]:
        """Move the victim's sequences to `dest`, then stop the victim; (outcome, reason)."""
        victim = vlv.inst
        loop = asyncio.get_running_loop()
        await dest.ready.wait()  # set on success and on failure; _load is bounded by load_timeout_s
        if dest.error:
            return "failed", f"destination load failed: {dest.error}"
        deadline = loop.time() + self.config.migration_timeout_s
        moved = 0
        refused: set[Flight] = set()  # detach answered 404: finishing on the victim (asked once)
        while vlv.flights:
            if victim.id not in self._state().instances:
                return "failed", "victim lost meanwhile"
            if loop.time() >= deadline:
                return "failed", f"handover timed out with {len(vlv.flights)} request(s) left on the victim"
            for flight in [f for f in vlv.flights if f.engine_id is not None and f.move_to is None
                           and f not in refused]:
                if dest.error or dest.inst.id not in self._state().instances:
                    return "failed", f"destination lost during the handover: {dest.error or 'stopped'}"
                flight.move_to = dest
                flight.moved.clear()
                if not await self._detach(vlv, flight):
                    flight.move_to = None  # finished meanwhile, or the engine refused: it ends on the victim
                    refused.add(flight)
                    continue
                try:
                    async with asyncio.timeout_at(deadline):
                        await flight.moved.wait()
                except TimeoutError:
                    return "failed", "a detached request was not resumed in time"
                if flight.lv is not dest:
                    return "failed", "the destination did not take a sequence; it resumed on the victim"
                moved += 1
            await asyncio.sleep(POLL_S)
        if victim.id not in self._state().instances:
            return "failed", "victim lost meanwhile"
        victim.status = "stopping"
        if vlv.agent_instance and self._state().nodes[victim.node].up:
            try:
                await self._agents.post(victim.node, "/unload", {"instance": vlv.agent_instance}, 30)
            except Exception as e:  # it is dropped all the same: its requests have left
                log.warning("unload of migrated %s failed: %s", victim.id, e)
        self._drop(victim, "migrated")
        return "done", f"{moved} sequence(s) moved"

    async def _detach(self: Gateway, vlv: Live, flight: Flight) -> bool:
        """Ask the victim's engine to hand `flight`'s sequence over; True if it did (its stream then ends with a
        `tierlab_detached` event that the relay acts on)."""
        assert self._http is not None
        try:
            r = await self._http.post(vlv.url + "/v1/tierlab/detach", json={"id": flight.engine_id}, timeout=10)
        except httpx.HTTPError as e:
            log.warning("detach of %s on %s failed: %r", flight.engine_id, vlv.inst.id, e)
            return False
        return r.status_code == 200
