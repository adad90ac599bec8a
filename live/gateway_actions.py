"""Carrying out the policies' actions live, as `sim/world.py` does in simulated time, and recording each one.

`Gateway.execute(actions)` never waits: the mirror changes at once (a copy reserves its tier space, an eviction
frees it, a stop takes the instance out of routing, a start registers a loading instance), so the next decision
sees `incoming` copies and loading instances and issues no duplicates; the agent calls run in the background.

- `StartInstance` (pre-warm, promotion): an instance is registered and loaded like a request's cold start; a load
  that fails drops it (no instance stays "loading").
- `Copy` (promote, prefetch, cache, demote): reserve -> POST /tiers/copy -> commit, or abort on failure. A copy
  waits for the evictions issued before it on the same tier (`copy_with_room` frees room, then copies).
- `Evict`: removed from the mirror at once, then POST /tiers/evict; skipped while a loading instance reads it.
- `StopInstance`: only an idle instance (as in the simulator); with `demote_to`, its weights are copied there
  first, then it is unloaded. Its memory stays reserved in the mirror until the unload is done.

Every action leaves one row in `Gateway.actions()` (`ACTION_COLUMNS`): when it was issued (gateway clock),
what it was, and whether it was `done`, `failed` or `skipped`, with the reason and how long it took.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd

from core.decisions import Action, Copy, Evict, StartInstance, StopInstance
from core.state import NodeState
from live.gateway_agents import AgentRefused, AgentUnreachable
from live.gateway_mirror import Live

if TYPE_CHECKING:
    from live.gateway import Gateway

log = logging.getLogger("live.gateway")

#: Columns of `Gateway.actions()`: issue time (gateway clock, s), action kind (start_instance, stop_instance,
#: copy, evict, migration), its own kind or reason (prewarm, promote, cache, demote, keep_alive, ...), model,
#: node, tier (source / destination), instance, outcome (done | failed | skipped), reason, duration_s.
ACTION_COLUMNS = ("time_s", "kind", "detail", "model", "node", "tier", "instance", "outcome", "reason",
                  "duration_s")


class ActionsMixin:
    """`execute` and the background work of each action kind; `actions()` the record."""

    # ------------------------------------------------------------------ records

    def _record(self: Gateway, t0: float, kind: str, detail: str, model: str, node: str, tier: str, instance: str,
                outcome: str, reason: str = "") -> None:
        self._actions.append((t0, kind, detail, model, node, tier, instance, outcome, reason, self.clock.now - t0))
        if outcome != "done":
            log.info("action %s %s %s on %s: %s (%s)", kind, detail, model, node, outcome, reason)

    def actions(self: Gateway) -> pd.DataFrame:
        """Every policy action so far, one row each (`ACTION_COLUMNS`), in the order they were issued."""
        df = pd.DataFrame(list(self._actions), columns=list(ACTION_COLUMNS))
        return df.sort_values("time_s", kind="stable").reset_index(drop=True)

    # ------------------------------------------------------------------ dispatch

    def execute(self: Gateway, actions: Sequence[Action]) -> None:
        """Carry out caching / autoscaling actions: the mirror changes now, the agents' work runs in the
        background. Never raises and never blocks (a failing action is recorded)."""
        for a in actions:
            try:
                if isinstance(a, StopInstance):
                    self._stop_action(a)
                elif isinstance(a, Copy):
                    self._copy_action(a)
                elif isinstance(a, Evict):
                    self._evict_action(a)
                elif isinstance(a, StartInstance):
                    self._start_action(a)
                else:
                    self._record(self.clock.now, type(a).__name__, "", "", "", "", "", "skipped",
                                 f"not an action: {a!r}")
            except Exception as e:  # a bug here must not take down the caller (a request or the tick loop)
                log.exception("action %s failed", a)
                self._record(self.clock.now, type(a).__name__, "", getattr(a, "model", ""), getattr(a, "node", ""),
                             "", "", "failed", f"internal error: {e!r}")

    def _node_for(self: Gateway, node: str, model: str | None = None) -> tuple[NodeState | None, str]:
        """The node's mirror if an action can be carried out there now, else (None, why not)."""
        state = self._state()
        ns = state.nodes.get(node)
        if ns is None:
            return None, f"unknown node {node!r}"
        if model is not None and model not in state.models:
            return None, f"unknown model {model!r}"
        if not ns.up:
            return None, "node_down"
        if not self.agents[node].url:
            return None, "no_agent (an adopted-only node: nothing can be loaded or moved there)"
        return ns, ""

    # ------------------------------------------------------------------ start

    def _start_action(self: Gateway, a: StartInstance) -> None:
        t0 = self.clock.now
        ns, why = self._node_for(a.node, a.model)
        if ns is None:
            self._record(t0, "start_instance", a.reason, a.model, a.node, a.source_tier, "", "skipped", why)
            return
        src = a.source_tier
        if src != "cloud" and (src not in ns.tiers or not ns.tiers[src].holds(a.model)):
            src = ns.local_source(a.model)  # the policy's view was stale: load from where it is (as the sim does)
        lv = self.cold_start(a.model, a.node, src)
        if lv is None:
            self._record(t0, "start_instance", a.reason, a.model, a.node, src, "", "skipped", "no_gpu_capacity")
            return
        self._spawn(self._await_start(lv, t0, a.reason))

    async def _await_start(self: Gateway, lv: Live, t0: float, reason: str) -> None:
        await lv.ready.wait()  # set by _load on success and on failure (bounded by load_timeout_s)
        inst = lv.inst
        self._record(t0, "start_instance", reason, inst.model.name, inst.node, inst.source_tier, inst.id,
                     "failed" if lv.error else "done", lv.error)

    def cold_start(self: Gateway, model: str, node: str, source_tier: str) -> Live | None:
        """Reserve GPU room on `node` and start loading `model` there in the background; None if no room."""
        if not self._state().nodes[node].up or not self.agents[node].url:  # no agent: nothing can load there
            return None
        inst = self._register(model, node, source_tier)
        if inst is None:
            return None
        lv = Live(inst)
        self.live[inst.id] = lv
        self._spawn(self._load(lv, source_tier))
        self.execute(self.bundle.on_load_started(inst, self._view()))
        return lv

    async def _load(self: Gateway, lv: Live, source_tier: str) -> None:
        inst = lv.inst
        # "cloud" is sent too: the agent then fetches even if one of its tiers holds the model (mvp's promise)
        body: dict[str, Any] = {"model": inst.model.name, "source_tier": source_tier}
        try:
            try:
                out = await self._agents.post(inst.node, "/load", body, self.config.load_timeout_s)
            except AgentRefused as e:
                if e.code != "insufficient_storage" or source_tier == "cloud":
                    raise
                # the tier to copy into is full (another writer, a stale view): serve the request anyway, from
                # where the model is or from the cloud into host memory (the agent's choice with no tier named)
                log.warning("load of %s on %s: tier %s is full, loading without it (%s)", inst.model.name,
                            inst.node, source_tier, e)
                out = await self._agents.post(inst.node, "/load", {"model": inst.model.name},
                                              self.config.load_timeout_s)
                out.setdefault("timings", {})["fallback_from"] = source_tier  # records name the real source
            agent_instance = out["instance"]["id"]
            url = out["instance"]["url"]
        except Exception as e:  # any failure ends this instance; waiters see lv.error
            if not lv.error:  # (a node marked down has already told them)
                lv.error = f"load of {inst.model.name} on {inst.node} failed: {e}"
                lv.node_lost = isinstance(e, AgentUnreachable)
                log.warning(lv.error)
            self._drop(inst, "load_failed")
            lv.ready.set()
            return
        if lv.error:  # its node was marked down meanwhile and the request went elsewhere: no orphan engine
            self._spawn(self._quiet_unload(inst.node, agent_instance))
            return
        lv.url = url
        lv.agent_instance = agent_instance
        lv.streaming = out["instance"].get("streaming", True) is not False
        lv.chat = out["instance"].get("chat", True) is not False
        ctx = out["instance"].get("max_context")
        lv.max_context = ctx if isinstance(ctx, int) and not isinstance(ctx, bool) and ctx > 0 else None
        lv.timings = out.get("timings", {})
        self._mark_ready(lv)
        await self.refresh(inst.node)
        if inst.id in self._state().instances:
            self.execute(self.bundle.on_load_done(inst, self._view()))
            if inst.idle:
                self.execute(self.bundle.on_idle(inst, self._view()))

    # ------------------------------------------------------------------ tier moves

    def _copy_action(self: Gateway, a: Copy) -> asyncio.Task[None] | None:
        t0 = self.clock.now
        ns, why = self._node_for(a.node, a.model)
        tier = ns.tiers.get(a.to_tier) if ns is not None else None
        if ns is not None and tier is None:
            why = f"unknown tier {a.to_tier!r} on node {a.node!r} (it has {sorted(ns.tiers)})"
        elif tier is not None:
            nbytes = self._state().models[a.model].weights_bytes
            if tier.holds(a.model):
                why = "already_held"
            elif tier.incoming(a.model):
                why = "already_incoming"
            elif tier.free_bytes + 1e-6 < nbytes:
                why = f"no_room (free {tier.free_bytes:.0f} B, needs {nbytes:.0f} B)"
        if tier is None or why:
            self._record(t0, "copy", a.kind, a.model, a.node, a.to_tier, "", "skipped", why)
            return None
        tier.reserve(a.model, nbytes)  # policies now see it incoming: no duplicate copy
        return self._spawn(self._run_copy(a, t0))

    async def _run_copy(self: Gateway, a: Copy, t0: float, instance: str = "") -> None:
        tier = self._state().nodes[a.node].tiers[a.to_tier]
        try:
            await self._settled(a.node, a.to_tier)
            out = await self._agents.post(a.node, "/tiers/copy", {"model": a.model, "to_tier": a.to_tier},
                                          self.config.load_timeout_s)
        except BaseException as e:  # cancelled (the gateway stops) included: the reservation must not leak
            tier.abort(a.model)
            if not isinstance(e, Exception):
                raise
            self._record(t0, "copy", a.kind, a.model, a.node, a.to_tier, instance, "failed", str(e))
            return
        if tier.incoming(a.model):
            tier.commit(a.model, self.clock.now)
        self._record(t0, "copy", a.kind, a.model, a.node, a.to_tier, instance, "done",
                     f"from {out.get('from_tier', '?')}")
        await self.refresh(a.node)

    async def _settled(self: Gateway, node: str, tier: str) -> None:
        """Wait for the evictions issued earlier on (node, tier): the room a copy was planned into."""
        pending = [t for t in self._tier_ops.get((node, tier), ()) if not t.done()]
        if pending:
            await asyncio.wait(pending)

    def _evict_action(self: Gateway, a: Evict) -> None:
        t0 = self.clock.now
        ns, why = self._node_for(a.node, a.model)
        tier = ns.tiers.get(a.tier) if ns is not None else None
        if ns is not None and tier is None:
            why = f"unknown tier {a.tier!r} on node {a.node!r} (it has {sorted(ns.tiers)})"
        elif ns is not None and tier is not None:
            readers = [i.id for i in ns.instances.values()
                       if i.loading and i.model.name == a.model and i.source_tier == a.tier]
            if not tier.holds(a.model):
                why = "not_held"
            elif readers:
                why = f"tier_in_use (loading {readers})"
        if tier is None or why:
            self._record(t0, "evict", a.kind, a.model, a.node, a.tier, "", "skipped", why)
            return
        tier.remove(a.model)  # the room is free for the policy's next move now
        task = self._spawn(self._run_evict(a, t0))
        ops = self._tier_ops.setdefault((a.node, a.tier), set())
        ops.add(task)
        task.add_done_callback(ops.discard)

    async def _run_evict(self: Gateway, a: Evict, t0: float) -> None:
        try:
            await self._agents.post(a.node, "/tiers/evict", {"model": a.model, "tier": a.tier}, 30)
        except Exception as e:
            self._record(t0, "evict", a.kind, a.model, a.node, a.tier, "", "failed", str(e))
            await self.refresh(a.node)  # the mirror takes back what the agent still holds
            return
        self._record(t0, "evict", a.kind, a.model, a.node, a.tier, "", "done")

    # ------------------------------------------------------------------ stop

    def _stop_action(self: Gateway, a: StopInstance) -> asyncio.Task[None] | None:
        t0 = self.clock.now
        inst = self._state().instances.get(a.instance_id)
        lv = self.live.get(a.instance_id)
        if inst is None or lv is None:
            self._record(t0, "stop_instance", a.reason, "", "", a.demote_to or "", a.instance_id, "skipped",
                         "unknown_instance")
            return None
        if not inst.idle:  # as in the simulator: only an idle instance is stopped
            self._record(t0, "stop_instance", a.reason, inst.model.name, inst.node, a.demote_to or "", inst.id,
                         "skipped", f"not_idle ({inst.status}, active {inst.active}, waiting {inst.waiting})")
            return None
        inst.status = "stopping"  # out of routing now; its memory is freed once the engine is gone
        demote = None
        if a.demote_to is not None:
            copy = Copy(inst.model.name, inst.node, a.demote_to, kind="demote")
            demote = self._copy_action(copy)  # reserves now, or records why not
        self._stopping[inst.node] = self._stopping.get(inst.node, 0) + 1
        return self._spawn(self._run_stop(lv, a, demote, t0))

    async def _run_stop(self: Gateway, lv: Live, a: StopInstance, demote: asyncio.Task[None] | None,
                        t0: float) -> None:
        inst = lv.inst
        try:
            if demote is not None:
                await asyncio.wait([demote])  # copy, then unload (the copy records its own outcome)
            outcome, why = "done", ""
            if lv.agent_instance and self._state().nodes[inst.node].up:
                try:
                    await self._agents.post(inst.node, "/unload", {"instance": lv.agent_instance}, 30)
                except Exception as e:
                    outcome, why = "failed", f"unload: {e}"
            elif lv.agent_instance:
                outcome, why = "failed", "node_down (the instance went with its node)"
            else:
                why = "adopted instance: forgotten, its engine left running"
            self._drop(inst, a.reason)
            self._record(t0, "stop_instance", a.reason, inst.model.name, inst.node, a.demote_to or "", inst.id,
                         outcome, why)
        finally:
            self._stopping[inst.node] -= 1
        await self.refresh(inst.node)

    async def stop_instance(self: Gateway, instance_id: str, demote_to: str | None = None,
                            reason: str = "stopped") -> None:
        """Unload an idle instance (optionally copying its weights to `demote_to` first); returns when done."""
        task = self._stop_action(StopInstance(instance_id, reason=reason, demote_to=demote_to))
        if task is not None:
            await task
