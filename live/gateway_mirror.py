"""The gateway's mirror of the cluster: a `core.state.ClusterState` built from the agents' /status, kept in step
with them (tier contents, node health), and the per-instance bookkeeping policies read (`active`, `waiting`).

Queue accounting follows the engines: an engine runs at most `max_num_seqs` sequences and queues the rest FIFO,
so of the requests forwarded to an instance the first `max_num_seqs` are `active` and the others `waiting`,
together with the requests waiting for the instance to finish loading. That is what `core.policies.base`
(`pick_instance`, `queue_excess`) and `KeepAlive.wants_new_instance` expect, so the queue-threshold scale-up
happens live as in the simulator.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from core.specs import ClusterSpec
from core.state import CapacityError, ClusterState, ClusterView, InstanceState, NodeState, TierState
from live.gateway_nodes import NodeReport, check_budgets, live_engine, node_report, store_spec, tier_specs
from live.gateway_records import instance_event

if TYPE_CHECKING:
    from live.gateway import Gateway

log = logging.getLogger("live.gateway")


class WallClock:
    """`now`: monotonic seconds since construction (the only clock policies see)."""

    def __init__(self) -> None:
        self._t0 = time.monotonic()
        self.t0_unix = time.time()  # to put other processes' unix timestamps on this clock

    @property
    def now(self) -> float:
        return time.monotonic() - self._t0


@dataclass(eq=False)
class Flight:
    """One request forwarded to an engine, from the gateway's side: where it runs now, the engine's response id
    (read off its stream), and where a migration moves it."""

    lv: Live
    path: str
    body: dict[str, Any]
    engine_id: str | None = None  # the engine's response "id" (known from the stream's first event)
    client_id: str | None = None  # the id the client saw first: kept on every event after a move
    move_to: Live | None = None  # set by a migration just before it detaches the sequence
    moved: asyncio.Event = field(default_factory=asyncio.Event)  # the relay resumed it (or gave up)
    strip_usage: bool = False  # the gateway asked the engine for the usage chunk; the client did not
    text: Any = None  # a `live.gateway_cache.StreamText` gathering the answer when it is to be cached


@dataclass(eq=False)
class Live:
    """Gateway-side state of an instance started via an agent (or adopted)."""

    inst: InstanceState
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""
    agent_instance: str = ""
    timings: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    node_lost: bool = False  # the error is its node going down: the request is placed again
    streaming: bool = True  # the engine streams; else the gateway synthesizes the SSE stream
    chat: bool = True  # the engine serves /v1/chat/completions (else a chat request gets a 400)
    max_context: int | None = None  # the engine's context window in tokens (None: not declared)
    in_flight: int = 0  # requests forwarded to the engine and not finished
    load_waiters: int = 0  # requests routed here while it loads
    flights: set[Flight] = field(default_factory=set)


class EngineFailed(Exception):
    """The engine failed before sending its first byte (the request may be retried elsewhere)."""

    def __init__(self, message: str, connection: bool = False) -> None:
        super().__init__(message)
        self.connection = connection  # the TCP connection failed: the engine (or its node) may be gone


class NodeLost(EngineFailed):
    """The instance's node went down while the request waited for it."""


class MirrorMixin:
    """Building the mirror, agent health (node down / up), tier sync, instance registration and accounting."""

    def _build_mirror(self: Gateway, statuses: list[dict[str, Any] | None]) -> None:
        """The ClusterState from the agents' reports (see `live.gateway_nodes`); ConfigError on a budget that
        fits no model."""
        c = self.config
        store = store_spec(statuses)
        reports: dict[str, NodeReport] = {
            a.name: node_report(a.name, st, c.nominal_gpu, c.engine.max_num_seqs, c.price_per_hour(a.name),
                                store is not None)
            for a, st in zip(c.agents, statuses, strict=True)}
        check_budgets(reports, list(c.models.values()))
        cluster = ClusterSpec(tuple(r.spec for r in reports.values()))
        if store is not None:
            cluster = dataclasses.replace(cluster, store=store)
        self.state = ClusterState(cluster, list(c.models.values()), live_engine(c.engine))
        self.view = ClusterView(self.state, self.clock)
        self._paced_store = store is not None
        self._max_num_seqs = {n: r.max_num_seqs for n, r in reports.items()}
        self.engine_kinds = {n: r.engine_kind for n, r in reports.items()}
        for agent, st in zip(c.agents, statuses, strict=True):
            if st is not None:
                self._sync_tiers(self.state.nodes[agent.name], st)
            elif agent.url:
                self.state.nodes[agent.name].up = False
                log.warning("agent %s is down at start; the health loop will bring it in", agent.name)

    def _state(self: Gateway) -> ClusterState:
        if self.state is None:
            raise RuntimeError("gateway not started")
        return self.state

    def _view(self: Gateway) -> ClusterView:
        if self.view is None:
            raise RuntimeError("gateway not started")
        return self.view

    # ------------------------------------------------------------------ health

    async def _health_loop(self: Gateway, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            await asyncio.gather(*(self.check_agent(a.name) for a in self.config.agents if a.url),
                                 return_exceptions=True)

    async def check_agent(self: Gateway, node: str) -> bool:
        """One health check of `node`'s agent: count a miss (marking the node down at `health_failures`), or
        clear the count (marking a down node up again). True if it answered."""
        ok = await self._agents.healthy(node)
        ns = self._state().nodes[node]
        if ok:
            self._health_misses[node] = 0
            if not ns.up and node not in self._reviving:
                self._reviving.add(node)
                try:
                    await self._node_up(node)
                finally:
                    self._reviving.discard(node)
        else:
            self._health_misses[node] += 1
            if self._health_misses[node] >= self.config.health_failures:
                self._node_down(node, f"{self._health_misses[node]} health checks missed")
        return ok

    def _node_down(self: Gateway, node: str, why: str) -> None:
        """Mark `node` down: drop its instances; requests waiting on them are placed again."""
        if self.state is None:  # during start(): the mirror is built with the node down
            return
        ns = self.state.nodes[node]
        if not ns.up:
            return
        ns.up = False
        log.warning("node %s marked down: %s", node, why)
        for inst in list(ns.instances.values()):
            lv = self.live.get(inst.id)
            self._drop(inst, "node_down")
            if lv is not None:
                lv.error, lv.node_lost = f"node {node} went down ({why})", True
                lv.ready.set()  # wake the requests waiting for it

    async def _node_up(self: Gateway, node: str) -> None:
        """The agent answers again: re-read its description and tiers, unload engines the gateway no longer
        knows, mark it up."""
        st = await self._agents.status(node)
        if st is None:
            return
        ns = self._state().nodes[node]
        c = self.config
        try:
            report = node_report(node, st, c.nominal_gpu, c.engine.max_num_seqs, c.price_per_hour(node),
                                 self._paced_store)
            missing = {n: t for n, t in tier_specs(node, st).items() if n not in ns.tiers}
        except ValueError as e:  # a malformed description keeps the node out, loudly
            log.error("node %s answers again but its /status is unusable: %s", node, e)
            return
        # a down node holds no instances: its GPU accounting can start afresh with what the agent says now
        ns.spec = dataclasses.replace(ns.spec, gpu=report.spec.gpu, tiers={**ns.spec.tiers, **missing})
        ns.gpu_free_bytes = [report.spec.gpu.mem_bytes * ns.engine.gpu_mem_util] * ns.spec.n_gpus
        ns._footprints.clear()
        self._max_num_seqs[node] = report.max_num_seqs
        ns.tiers.update({n: TierState(t) for n, t in missing.items()})
        self._sync_tiers(ns, st)
        # the node had no instances in the mirror while down, so every engine the agent still runs is an orphan
        for inst in st.get("instances", []):
            if isinstance(inst, dict) and isinstance(inst.get("id"), str):
                self._spawn(self._quiet_unload(node, inst["id"]))
        self._health_misses[node] = 0
        ns.up = True
        log.warning("node %s is up again", node)

    # ------------------------------------------------------------------ tiers

    def _sync_tiers(self: Gateway, ns: NodeState, status: dict[str, Any]) -> None:
        """Make the mirror's tier contents equal to the agent's (model bytes as on disk); copies in flight keep
        their reservation."""
        now = self.clock.now
        for name, t in status.get("tiers", {}).items():
            ts = ns.tiers.get(name)
            if ts is None:
                continue
            held = {m: b for m, b in t.get("models", {}).items() if m in self._state().models}
            for m in list(ts.entries):
                if m not in held:
                    ts.remove(m)
            for m, b in held.items():
                if not ts.holds(m) and not ts.incoming(m):
                    with contextlib.suppress(CapacityError):
                        ts.reserve(m, float(b))
                        ts.commit(m, now)

    async def refresh(self: Gateway, node: str) -> None:
        """Re-read one node's tier contents (nothing while it is down)."""
        if not self._state().nodes[node].up:
            return
        st = await self._agents.status(node)
        if st is not None:
            self._sync_tiers(self._state().nodes[node], st)

    # ------------------------------------------------------------------ instances

    def _register(self: Gateway, model: str, node: str, source_tier: str) -> InstanceState | None:
        """Reserve GPU room on `node` for an instance of `model` in the mirror; None if there is none."""
        state = self._state()
        ns = state.nodes[node]
        n, per_gpu, kv = ns.footprint(state.models[model])
        gpu_ids = ns.gpu_fit(per_gpu * n, per_gpu)
        if gpu_ids is None:
            return None
        inst = state.add_instance(model, node, gpu_ids, per_gpu, kv, source_tier, self.clock.now)
        inst.max_num_seqs = self._max_num_seqs.get(node, inst.max_num_seqs)  # the node's engine's batch limit
        self._events.append(instance_event(inst.started_s, inst, "loading"))
        return inst

    def _mark_ready(self: Gateway, lv: Live) -> None:
        inst = lv.inst
        inst.status = "ready"
        inst.ready_at_s = self.clock.now
        inst.idle_since_s = inst.last_used_s = inst.ready_at_s
        self._events.append(instance_event(inst.ready_at_s, inst, "ready"))
        lv.ready.set()

    def _drop(self: Gateway, inst: InstanceState, reason: str) -> None:
        if inst.id in self._state().instances:
            self._state().remove_instance(inst)
            self._events.append(instance_event(self.clock.now, inst, "stopped", reason))
        self.live.pop(inst.id, None)

    @staticmethod
    def _sync_counts(lv: Live) -> None:
        """`active` / `waiting` as the engine has them: the first max_num_seqs forwarded requests run, the rest
        queue in the engine (FIFO), and requests waiting for the load wait too."""
        inst = lv.inst
        inst.active = min(lv.in_flight, inst.max_num_seqs)
        inst.waiting = lv.load_waiters + lv.in_flight - inst.active

    def _begin(self: Gateway, flight: Flight) -> None:
        lv = flight.lv
        lv.in_flight += 1
        lv.flights.add(flight)
        self._sync_counts(lv)

    def _end(self: Gateway, flight: Flight, served: bool = True) -> None:
        """The flight left its instance (finished, failed, or moved away when `served` is False)."""
        lv = flight.lv
        if flight not in lv.flights:
            return  # already ended (a relay's finally after a failed resume)
        lv.flights.discard(flight)
        lv.in_flight -= 1
        self._sync_counts(lv)
        inst = lv.inst
        inst.last_used_s = self.clock.now
        if served:
            inst.served += 1
        if inst.idle:
            inst.idle_since_s = inst.last_used_s
            if inst.id in self._state().instances:
                actions = self.bundle.on_idle(inst, self._view())
                if actions:  # most policies have nothing to do
                    self.execute(actions)

    async def _quiet_unload(self: Gateway, node: str, agent_instance: str) -> None:
        with contextlib.suppress(Exception):
            await self._agents.post(node, "/unload", {"instance": agent_instance}, 30)
