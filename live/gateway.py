"""The gateway: an OpenAI-compatible front door whose routing is decided by a `core` policy bundle.

An ASGI app (starlette) served by uvicorn. It mirrors the node agents in a `core.state.ClusterState`
(nodes from the agents, tier contents from their /status, the instances it started through /load),
shows policies a `ClusterView` on a wall clock (monotonic seconds since the gateway started), and for
each request executes `bundle.place(req, view)`:

- `Route(instance)`: forward to that instance's engine (waiting while it is still loading);
- `ColdStart(node, source_tier)`: POST /load to the node's agent ("cloud" lets the agent fetch), register
  the instance, forward;
- `Queue`: wait and place again, up to `queue_timeout_s`; `Reject`: 503 with the reason.

Faults: a background loop polls every agent's /healthz; after `health_failures` misses in a row (or at once
on a connection error from /load or /status, or when an engine's connection fails and its agent does not
answer) the node is marked down: its instances are dropped, requests waiting on them are placed again, and
placement (`core.policies.base.node_can_host`) starts models elsewhere. When the agent answers again the node
is marked up, its tiers are re-read and engines it still runs that the gateway forgot are unloaded. An engine
that fails before its first byte is retired and the request retried once elsewhere (else 502); one that dies
mid-stream ends the client's stream with an SSE error event. `request_timeout_s` bounds every request.

CPU nodes have no GPU: each node gets a nominal GPU (`GatewayConfig.nominal_gpu`) so core's GPU
accounting (`NodeState.footprint`, `gpu_fit`, `add_instance`) works unchanged; models default to a
nominal `ModelSpec` small enough that several instances fit.

    POST /v1/chat/completions, POST /v1/completions   (stream and non-stream; SSE is relayed event by event,
                                                      or synthesized for engines that cannot stream)
    GET  /v1/models                                  the caller's models only
    GET  /healthz                                    {"ok": true, "started"}
    GET  /metrics                                    Prometheus text
    GET  /admin/records                              the request records as JSON (Bearer <admin_token>)

Auth is `Authorization: Bearer <api key>`; errors use OpenAI's shape `{"error": {message, type, param, code}}`.
Every completion response carries `x-tierlab-request-id`, the request_id of its row in `records()`
(`core.records.REQUEST_SCHEMA`; rejected requests have rows too).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route as HttpRoute

from core.decisions import Action, ColdStart, Copy, Evict, Queue, Reject, Route, StartInstance, StopInstance
from core.policies.base import PolicyBundle
from core.records import REQUEST_SCHEMA, frame, rows_to_columns
from core.specs import ClusterSpec, NodeSpec, TierSpec
from core.state import CapacityError, ClusterState, ClusterView, InstanceState, NodeState, TierState
from live import gateway_sse as sse
from live.gateway_agents import AgentClient, AgentUnreachable, connection_error
from live.gateway_api import (
    ApiError,
    Tenant,
    authenticate,
    bearer,
    include_usage,
    parse_body,
    prompt_tokens,
    token_matches,
    validate,
)
from live.gateway_config import (
    DEFAULT_NODE_PRICE_PER_HOUR,
    NOMINAL_GPU,
    NOMINAL_TIER_BW_BPS,
    AgentRef,
    GatewayConfig,
    default_bundle,
    nominal_model,
)
from live.gateway_metrics import GatewayMetrics
from live.gateway_records import (
    RequestInfo,
    apply_load_timings,
    instance_event,
    instance_frame,
    records_json,
    request_frame,
    request_row,
    tpot,
    write_request_records,
)

__all__ = ["DEFAULT_NODE_PRICE_PER_HOUR", "NOMINAL_GPU", "AgentRef", "ApiError", "Gateway", "GatewayConfig",
           "RequestInfo", "Tenant", "create_app", "default_bundle", "nominal_model"]

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-tierlab-request-id"
SSE_HEADERS = {"Cache-Control": "no-cache"}
JSON_HEADERS = {"Content-Type": "application/json"}


class WallClock:
    """`now`: monotonic seconds since construction (the only clock policies see)."""

    def __init__(self) -> None:
        self._t0 = time.monotonic()
        self.t0_unix = time.time()  # to put other processes' unix timestamps on this clock

    @property
    def now(self) -> float:
        return time.monotonic() - self._t0


@dataclass
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


class EngineFailed(Exception):
    """The engine failed before sending its first byte (the request may be retried elsewhere)."""

    def __init__(self, message: str, connection: bool = False) -> None:
        super().__init__(message)
        self.connection = connection  # the TCP connection failed: the engine (or its node) may be gone


class NodeLost(EngineFailed):
    """The instance's node went down while the request waited for it."""


class Gateway:
    """Cluster mirror, agent health, policy execution, forwarding, metrics and records."""

    def __init__(self, config: GatewayConfig, bundle: PolicyBundle | None = None) -> None:
        self.config = config
        self.bundle = bundle or default_bundle()
        self.clock = WallClock()
        self.agents = {a.name: a for a in config.agents}
        self.state: ClusterState | None = None
        self.view: ClusterView | None = None
        self.live: dict[str, Live] = {}
        self.metrics = GatewayMetrics()
        self.queued = 0  # requests waiting for placement or for their instance to load
        self._rows: list[tuple[Any, ...]] = []
        self._events: list[tuple[Any, ...]] = []  # instance lifecycle, INSTANCE_SCHEMA
        self._ids = itertools.count(1)
        self._health_misses = dict.fromkeys(self.agents, 0)
        self._reviving: set[str] = set()
        self._http: httpx.AsyncClient | None = None
        self._agents: AgentClient = None  # type: ignore[assignment]  # built by start(), on the event loop
        self._loops: list[asyncio.Task[None]] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Read every agent's /status, build the cluster mirror, start the health and tick loops."""
        c = self.config
        timeout = httpx.Timeout(c.request_timeout_s, connect=c.connect_timeout_s)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        # trust_env=False: the cluster is reached directly, never through a proxy from the environment
        self._http = httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False)
        self._agents = AgentClient(self._http, self.agents, self._node_down, c.health_timeout_s)
        statuses = await asyncio.gather(*(self._agents.status(a.name) for a in c.agents))
        nodes = [NodeSpec(a.name, c.nominal_gpu, 1, 1e9, self._tier_specs(st), od_usd_per_hour=c.price_per_hour(a.name))
                 for a, st in zip(c.agents, statuses, strict=True)]
        self.state = ClusterState(ClusterSpec(tuple(nodes)), list(c.models.values()), c.engine)
        self.view = ClusterView(self.state, self.clock)
        for agent, st in zip(c.agents, statuses, strict=True):
            if st is not None:
                self._sync_tiers(self.state.nodes[agent.name], st)
            elif agent.url:
                self.state.nodes[agent.name].up = False
                log.warning("agent %s is down at start; the health loop will bring it in", agent.name)
        if c.health_interval_s > 0:
            self._loops.append(asyncio.create_task(self._health_loop(c.health_interval_s)))
        if c.tick and self.bundle.tick_s:
            self._loops.append(asyncio.create_task(self._tick_loop(self.bundle.tick_s)))

    def _spawn(self, coro: Any) -> None:
        """Run `coro` in the background, keeping a reference until it ends."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """Stop the loops and background tasks and close the HTTP client (instances stay with their agents)."""
        for task in [*self._loops, *self._tasks]:
            task.cancel()
        for task in [*self._loops, *self._tasks]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._loops.clear()
        if self._http is not None:
            await self._http.aclose()

    async def _tick_loop(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.execute(self.bundle.on_tick(self._view()))
            except Exception:  # a failed action must not end the loop
                log.exception("tick actions failed")

    # ------------------------------------------------------------------ agents and their health

    @staticmethod
    def _tier_specs(status: dict[str, Any] | None) -> dict[str, TierSpec]:
        return {name: TierSpec(name, float(t["capacity_bytes"]), NOMINAL_TIER_BW_BPS, NOMINAL_TIER_BW_BPS)
                for name, t in (status or {}).get("tiers", {}).items()}

    async def _health_loop(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            await asyncio.gather(*(self.check_agent(a.name) for a in self.config.agents if a.url),
                                 return_exceptions=True)

    async def check_agent(self, node: str) -> bool:
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

    def _node_down(self, node: str, why: str) -> None:
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

    async def _node_up(self, node: str) -> None:
        """The agent answers again: re-read its tiers, unload engines the gateway no longer knows, mark it up."""
        st = await self._agents.status(node)
        if st is None:
            return
        ns = self._state().nodes[node]
        missing = {n: t for n, t in self._tier_specs(st).items() if n not in ns.tiers}
        if missing:  # the agent was down when the gateway started: its tiers are news
            ns.spec = dataclasses.replace(ns.spec, tiers={**ns.spec.tiers, **missing})
            ns.tiers.update({n: TierState(t) for n, t in missing.items()})
        self._sync_tiers(ns, st)
        # the node had no instances in the mirror while down, so every engine the agent still runs is an orphan
        for inst in st.get("instances", []):
            if isinstance(inst, dict) and isinstance(inst.get("id"), str):
                self._spawn(self._quiet_unload(node, inst["id"]))
        self._health_misses[node] = 0
        ns.up = True
        log.warning("node %s is up again", node)

    def _sync_tiers(self, ns: NodeState, status: dict[str, Any]) -> None:
        """Make the mirror's tier contents equal to the agent's (model bytes as on disk)."""
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

    async def refresh(self, node: str) -> None:
        """Re-read one node's tier contents (nothing while it is down)."""
        if not self._state().nodes[node].up:
            return
        st = await self._agents.status(node)
        if st is not None:
            self._sync_tiers(self._state().nodes[node], st)

    # ------------------------------------------------------------------ policy execution

    def _state(self) -> ClusterState:
        if self.state is None:
            raise RuntimeError("gateway not started")
        return self.state

    def _view(self) -> ClusterView:
        if self.view is None:
            raise RuntimeError("gateway not started")
        return self.view

    async def execute(self, actions: Sequence[Action]) -> None:
        """Carry out caching / autoscaling actions through the agents."""
        for a in actions:
            try:
                if isinstance(a, StopInstance):
                    await self.stop_instance(a.instance_id, a.demote_to, a.reason)
                elif isinstance(a, Copy):
                    await self._agents.post(a.node, "/tiers/copy", {"model": a.model, "to_tier": a.to_tier},
                                           self.config.load_timeout_s)
                    await self.refresh(a.node)
                elif isinstance(a, Evict):
                    await self._agents.post(a.node, "/tiers/evict", {"model": a.model, "tier": a.tier}, 30)
                    await self.refresh(a.node)
                elif isinstance(a, StartInstance):
                    lv = self.cold_start(a.model, a.node, a.source_tier)
                    if lv is not None:
                        await lv.ready.wait()
            except Exception as e:  # an action failing is logged, never fatal
                log.warning("action %s failed: %s", a, e)

    async def stop_instance(self, instance_id: str, demote_to: str | None = None, reason: str = "stopped") -> None:
        """Unload an idle instance (optionally copying its weights to `demote_to` first)."""
        lv = self.live.get(instance_id)
        inst = self._state().instances.get(instance_id)
        if lv is None or inst is None or not inst.idle:
            return
        inst.status = "stopping"
        if demote_to is not None:
            with contextlib.suppress(Exception):
                await self._agents.post(inst.node, "/tiers/copy", {"model": inst.model.name, "to_tier": demote_to},
                                       self.config.load_timeout_s)
        if lv.agent_instance:
            with contextlib.suppress(Exception):
                await self._agents.post(inst.node, "/unload", {"instance": lv.agent_instance}, 30)
        self._drop(inst, reason)
        await self.refresh(inst.node)

    def _drop(self, inst: InstanceState, reason: str) -> None:
        if inst.id in self._state().instances:
            self._state().remove_instance(inst)
            self._events.append(instance_event(self.clock.now, inst, "stopped", reason))
        self.live.pop(inst.id, None)

    def _register(self, model: str, node: str, source_tier: str) -> InstanceState | None:
        """Reserve GPU room on `node` for an instance of `model` in the mirror; None if there is none."""
        state = self._state()
        ns = state.nodes[node]
        n, per_gpu, kv = ns.footprint(state.models[model])
        gpu_ids = ns.gpu_fit(per_gpu * n, per_gpu)
        if gpu_ids is None:
            return None
        inst = state.add_instance(model, node, gpu_ids, per_gpu, kv, source_tier, self.clock.now)
        self._events.append(instance_event(inst.started_s, inst, "loading"))
        return inst

    def _mark_ready(self, lv: Live) -> None:
        inst = lv.inst
        inst.status = "ready"
        inst.ready_at_s = self.clock.now
        inst.idle_since_s = inst.last_used_s = inst.ready_at_s
        self._events.append(instance_event(inst.ready_at_s, inst, "ready"))
        lv.ready.set()

    def cold_start(self, model: str, node: str, source_tier: str) -> Live | None:
        """Reserve GPU room on `node` and start loading `model` there in the background; None if no room."""
        if not self._state().nodes[node].up or not self.agents[node].url:  # no agent: nothing can load there
            return None
        inst = self._register(model, node, source_tier)
        if inst is None:
            return None
        lv = Live(inst)
        self.live[inst.id] = lv
        self.metrics.cold_start(source_tier)
        self._spawn(self._load(lv, source_tier))
        self.bundle.on_load_started(inst, self._view())
        return lv

    def adopt_instance(self, model: str, node: str, url: str, streaming: bool = True) -> str:
        """Serve `model` from an engine already running at `url` on `node` (no agent involved); its instance id.

        For benchmarks and engines started by hand. Call it from the gateway's event loop, or while no request
        is in flight (it changes the mirror).
        """
        state = self._state()
        if model not in state.models:
            raise ValueError(f"adopt_instance: unknown model {model!r}; known: {sorted(state.models)}")
        if node not in state.nodes:
            raise ValueError(f"adopt_instance: unknown node {node!r}; known: {sorted(state.nodes)}")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"adopt_instance: url must be http(s)://host:port, got {url!r}")
        inst = self._register(model, node, "gpu")
        if inst is None:
            raise CapacityError(f"adopt_instance: no GPU room for {model!r} on node {node!r}")
        lv = Live(inst, url=url.rstrip("/"), streaming=streaming)
        self.live[inst.id] = lv
        self._mark_ready(lv)
        return inst.id

    async def _load(self, lv: Live, source_tier: str) -> None:
        inst = lv.inst
        body: dict[str, Any] = {"model": inst.model.name}
        if source_tier != "cloud":
            body["source_tier"] = source_tier
        try:
            out = await self._agents.post(inst.node, "/load", body, self.config.load_timeout_s)
        except Exception as e:  # any failure ends this instance; waiters see lv.error
            if not lv.error:  # (a node marked down has already told them)
                lv.error = f"load of {inst.model.name} on {inst.node} failed: {e}"
                lv.node_lost = isinstance(e, AgentUnreachable)
                log.warning(lv.error)
            self._drop(inst, "load_failed")
            lv.ready.set()
            return
        agent_instance = out["instance"]["id"]
        if lv.error:  # its node was marked down meanwhile and the request went elsewhere: no orphan engine
            self._spawn(self._quiet_unload(inst.node, agent_instance))
            return
        lv.url = out["instance"]["url"]
        lv.agent_instance = agent_instance
        lv.streaming = out["instance"].get("streaming", True) is not False
        lv.timings = out.get("timings", {})
        self._mark_ready(lv)
        await self.refresh(inst.node)
        await self.execute(self.bundle.on_load_done(inst, self._view()))

    async def _place(self, req: RequestInfo, exclude: set[str]) -> Live:
        """Ask the bundle until it names an instance, and wait for it to be ready.

        ApiError(503) on Reject or when nothing is found within `queue_timeout_s`; NodeLost / EngineFailed
        if the instance's load failed; TimeoutError if it did not load within `load_timeout_s`.
        """
        view = self._view()
        t0 = time.monotonic()
        deadline = t0 + self.config.queue_timeout_s
        self.queued += 1
        try:
            while True:
                decision = self.bundle.place(req, view)
                lv: Live | None = None
                reason = ""
                if isinstance(decision, Route):
                    lv = self.live.get(decision.instance_id)
                    reason = "routed_to_unknown_instance"
                    if lv is not None and decision.instance_id in exclude:
                        lv, reason = None, "only_failed_instance"
                elif isinstance(decision, ColdStart):
                    lv = self.cold_start(req.model, decision.node, decision.source_tier)
                    if lv is None:
                        await self.execute(self.bundle.on_gpu_pressure(decision.node, req.model, view))
                        lv = self.cold_start(req.model, decision.node, decision.source_tier)
                    reason = "no_gpu_capacity"
                elif isinstance(decision, Queue):
                    reason = decision.reason
                elif isinstance(decision, Reject):
                    raise ApiError(503, f"rejected: {decision.reason}", decision.reason)
                if lv is not None:
                    break
                if time.monotonic() >= deadline:
                    raise ApiError(503, f"no capacity for {req.model!r}: {reason}", reason)
                await asyncio.sleep(self.config.queue_poll_s)
            req.queue_s = time.monotonic() - t0
            inst = lv.inst
            cold = inst.status == "loading"
            inst.waiting += 1
            try:
                if cold:
                    await asyncio.wait_for(lv.ready.wait(), self.config.load_timeout_s)
            finally:
                inst.waiting -= 1
        finally:
            self.queued -= 1
        if lv.error:
            raise (NodeLost if lv.node_lost else EngineFailed)(lv.error)
        req.cold_start = cold
        req.source_tier = inst.source_tier if cold else "gpu"
        req.node, req.instance = inst.node, inst.id
        if cold:
            apply_load_timings(req, lv.timings)
            req.cold_start_s = time.monotonic() - t0 - req.queue_s
        return lv

    # ------------------------------------------------------------------ requests

    def _begin(self, lv: Live) -> None:
        lv.inst.active += 1

    def _end(self, lv: Live) -> None:
        inst = lv.inst
        inst.active = max(0, inst.active - 1)
        inst.served += 1
        inst.last_used_s = self.clock.now
        if inst.idle:
            inst.idle_since_s = inst.last_used_s
            if inst.id in self._state().instances:
                actions = self.bundle.on_idle(inst, self._view())
                if actions:  # most policies have nothing to do: no task per request then
                    self._spawn(self.execute(actions))

    async def handle(self, request: Request, path: str) -> Response:
        """Authenticate, validate, place and forward one completion request; every outcome leaves a row."""
        req = RequestInfo(next(self._ids), "", "", 0, 0, self.clock.now)
        t_arrival = time.monotonic()
        deadline = asyncio.get_running_loop().time() + self.config.request_timeout_s
        try:
            tenant = authenticate(request, self.config.tenants)
            req.tenant = tenant.name
            raw = await request.body()
            body = parse_body(raw)
            if isinstance(body.get("model"), str):
                req.model = body["model"]
            validate(body, path, tenant, self.config.models)
        except ApiError as e:
            self._finish(req, t_arrival, "rejected", e.code or "rejected")
            response = e.response()
        else:
            req.prompt_tokens = prompt_tokens(body)
            req.output_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
            try:
                await self.execute(self.bundle.on_arrival(req, self._view()))
                response = await self._serve(req, body, raw, path, t_arrival, deadline)
            except Exception as e:  # a bug must still answer and leave its row
                log.exception("request %d failed", req.id)
                response = self._fail(req, t_arrival, 500, f"internal error: {e!r}", "internal_error")
        response.headers[REQUEST_ID_HEADER] = str(req.id)
        return response

    def _fail(self, req: RequestInfo, t_arrival: float, status: int, message: str, code: str) -> Response:
        self._finish(req, t_arrival, "failed", code)
        return ApiError(status, message, code).response()

    async def _serve(self, req: RequestInfo, body: dict[str, Any], raw: bytes, path: str, t_arrival: float,
                     deadline: float) -> Response:
        """Place and forward; one retry after an engine or load failure, and a new placement each time the
        chosen instance's node is lost (at most once per node)."""
        failed: set[str] = set()
        retries, replacements = 1, len(self.agents)
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    lv = await self._place(req, failed)
            except ApiError as e:
                self._finish(req, t_arrival, "rejected", e.code or "rejected")
                return e.response()
            except NodeLost as e:
                if replacements > 0:
                    replacements -= 1
                    continue
                return self._fail(req, t_arrival, 502, str(e), "node_down")
            except (EngineFailed, TimeoutError) as e:
                if isinstance(e, TimeoutError) and asyncio.get_running_loop().time() >= deadline:
                    return self._fail(req, t_arrival, 504, "request timed out waiting for an engine", "timeout")
                if retries > 0:
                    retries -= 1
                    continue
                return self._fail(req, t_arrival, 502, str(e) or "engine load timed out", "load_failed")
            try:
                return await self._forward(lv, path, body, raw, req, t_arrival, deadline)
            except EngineFailed as e:
                failed.add(lv.inst.id)
                log.warning("engine %s failed before its first byte: %s", lv.inst.id, e)
                if await self._engine_lost(lv, e) and replacements > 0:
                    replacements -= 1
                    continue
                if retries > 0:
                    retries -= 1
                    continue
                return self._fail(req, t_arrival, 502, f"engine failed: {e}", "engine_failed")

    async def _engine_lost(self, lv: Live, err: BaseException) -> bool:
        """Retire a failed engine; after a connection failure ask its agent, and mark the node down if it is
        silent too. True if the node is down."""
        self._retire(lv)
        node = lv.inst.node
        agent = self.agents[node]
        connection = getattr(err, "connection", False) or connection_error(err)
        if not connection or not agent.url:
            return False
        if not await self._agents.healthy(node):
            self._node_down(node, f"engine {lv.inst.id} unreachable and agent silent")
        return not self._state().nodes[node].up

    def _retire(self, lv: Live) -> None:
        """Forget an instance whose engine failed (and ask its agent to stop it)."""
        inst = lv.inst
        if inst.id in self._state().instances:
            self._drop(inst, "engine_failed")
            if lv.agent_instance and self._state().nodes[inst.node].up:
                self._spawn(self._quiet_unload(inst.node, lv.agent_instance))

    async def _quiet_unload(self, node: str, agent_instance: str) -> None:
        with contextlib.suppress(Exception):
            await self._agents.post(node, "/unload", {"instance": agent_instance}, 30)

    async def _forward(self, lv: Live, path: str, body: dict[str, Any], raw: bytes, req: RequestInfo,
                       t_arrival: float, deadline: float) -> Response:
        """Send the request (`raw`, the client's bytes, parsed as `body`) to `lv`'s engine. EngineFailed before
        the first byte; after it, the outcome is the response's (a stream that breaks ends with an SSE error
        event)."""
        assert self._http is not None
        stream = bool(body.get("stream"))
        synthesize = stream and not lv.streaming
        usage_chunk = include_usage(body)
        if synthesize:  # the engine cannot stream: ask for the whole answer and stream it ourselves
            body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")} | {"stream": False}
            raw = json.dumps(body).encode()
        self._begin(lv)
        upstream: httpx.Response | None = None
        try:
            async with asyncio.timeout_at(deadline):
                # the client's bytes as they came: no second JSON encoding on the hot path
                request = self._http.build_request("POST", lv.url + path, content=raw, headers=JSON_HEADERS)
                upstream = await self._http.send(request, stream=True)
                if upstream.status_code >= 500:
                    raise EngineFailed(f"HTTP {upstream.status_code}")
                if stream and not synthesize and upstream.status_code == 200:
                    chunks = upstream.aiter_raw()
                    first = await anext(chunks, None)
                    if first is None:
                        raise EngineFailed("stream ended before its first byte")
                    relay = self._relay(lv, upstream, first, chunks, req, t_arrival, deadline)
                    upstream = None  # the relay owns it now
                    return StreamingResponse(relay, media_type="text/event-stream", headers=SSE_HEADERS)
                answer_raw = await upstream.aread()
        except (TimeoutError, httpx.TimeoutException):
            self._end(lv)
            return self._fail(req, t_arrival, 504, "the engine did not answer in time", "timeout")
        except httpx.HTTPError as e:
            self._end(lv)
            raise EngineFailed(f"{type(e).__name__}: {e}", connection=connection_error(e)) from None
        except EngineFailed:
            self._end(lv)
            raise
        finally:
            if upstream is not None:
                await upstream.aclose()
        self._end(lv)
        status = upstream.status_code
        if status != 200:
            self._finish(req, t_arrival, "failed", f"engine_{status}")
            return Response(answer_raw, status_code=status, media_type="application/json")
        req.ttft_s = time.monotonic() - t_arrival  # non-stream: the first token arrives with the rest
        try:
            answer = json.loads(answer_raw)
            usage = answer.get("usage") or {}
            req.in_tokens = int(usage.get("prompt_tokens", 0))
            req.out_tokens = int(usage.get("completion_tokens", 0))
        except (ValueError, AttributeError, TypeError):
            return self._fail(req, t_arrival, 502, "the engine's answer is not OpenAI JSON", "bad_engine_answer")
        self._finish(req, t_arrival, "completed", "")
        if synthesize:
            content = sse.synthesize_stream(answer, path.endswith("chat/completions"), usage_chunk)
            return Response(content, media_type="text/event-stream", headers=SSE_HEADERS)
        return Response(answer_raw, status_code=200, media_type="application/json")

    async def _relay(self, lv: Live, upstream: httpx.Response, first: bytes, chunks: AsyncIterator[bytes],
                     req: RequestInfo, t_arrival: float, deadline: float) -> AsyncIterator[bytes]:
        """Yield the engine's SSE events whole, as they come (TTFT is the first event carrying text). If the
        engine fails mid-stream, or the request's time is up, end with an SSE error event instead."""
        outcome, reason, pending = "failed", "client_disconnected", b""
        req.token_stream = True
        idle_s = self.config.stream_idle_timeout_s
        loop = asyncio.get_running_loop()
        lost: BaseException | None = None
        try:
            try:
                chunk: bytes | None = first
                while chunk is not None:
                    pending += chunk
                    cut = sse.complete_end(pending)
                    if cut:
                        out, pending = pending[:cut], pending[cut:]
                        if sse.DONE in out:
                            # the client has the whole answer once this is out: a client that hangs up
                            # right after [DONE] (the openai client does) was served, not disconnected
                            outcome, reason = "completed", ""
                        self._scan(out, req, t_arrival)
                        yield out
                    async with asyncio.timeout_at(min(deadline, loop.time() + idle_s)):
                        chunk = await anext(chunks, None)
                if pending:  # a last event without its blank line
                    self._scan(pending, req, t_arrival)
                    yield pending
                outcome, reason = "completed", ""
            except (httpx.HTTPError, TimeoutError) as e:
                if outcome != "completed":
                    timed_out = isinstance(e, TimeoutError | httpx.TimeoutException)
                    reason = "timeout" if timed_out else "engine_stream_error"
                    outcome, lost = "failed", (None if timed_out else e)
                    message = ("the engine went silent or the request ran out of time" if timed_out
                               else f"the engine failed mid-stream: {type(e).__name__}")
                    yield sse.error_event(message, reason)
        finally:
            # bookkeeping before the one await: a cancelled stream (client gone) may not get past it
            self._end(lv)
            self._finish(req, t_arrival, outcome, reason)
            if lost is not None:
                self._spawn(self._engine_lost(lv, lost))
            await upstream.aclose()

    @staticmethod
    def _scan(events: bytes, req: RequestInfo, t_arrival: float) -> None:
        """Read whole SSE events for text (TTFT, tokens) and usage."""
        for msg in sse.data_messages(events):
            usage = msg.get("usage")
            if isinstance(usage, dict):
                req.in_tokens = int(usage.get("prompt_tokens", 0) or 0)
                req.out_tokens = int(usage.get("completion_tokens", 0) or 0)
            choices = msg.get("choices")
            choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
            delta = choice.get("delta")
            text = choice.get("text") or (delta.get("content") if isinstance(delta, dict) else None)
            if text:
                if math.isnan(req.ttft_s):
                    req.ttft_s = time.monotonic() - t_arrival
                if not usage:
                    req.out_tokens += 1  # one chunk per token, until the usage chunk says otherwise

    def _finish(self, req: RequestInfo, t_arrival: float, outcome: str, reason: str) -> None:
        """Close the request's record (once) and count it."""
        if req.finished:
            return
        req.finished = True
        req.outcome, req.reason = outcome, reason
        req.e2e_s = time.monotonic() - t_arrival
        if req.token_stream:
            req.tpot_s = tpot(req.e2e_s, req.ttft_s, req.out_tokens)
        self.metrics.request_done(outcome, req.ttft_s, req.tpot_s)
        self._rows.append(request_row(req))
        lv = self.live.get(req.instance) if req.cold_start else None
        if lv is not None and lv.url:
            self._spawn(self._add_engine_read(lv, req, len(self._rows) - 1))

    async def _add_engine_read(self, lv: Live, req: RequestInfo, row: int, wait_s: float = 10.0) -> None:
        """Add the engine's own weight read (tier -> host memory, from its GET /stats `load_s`) to a cold row.

        The agent times the tier-to-tier hops; the engine reads the weights from its tier itself, and with
        progressive loading that read ends only after the first forward pass began, so it is asked for
        once the request is done. Engines without /stats (Tokasaurus) keep the agent's hops alone.
        """
        assert self._http is not None
        read_s = lv.timings.get("read_s")
        deadline = time.monotonic() + wait_s
        while read_s is None:
            try:
                r = await self._http.get(lv.url + "/stats", timeout=2.0)
                stats = r.json() if r.status_code == 200 else {}
            except (httpx.HTTPError, ValueError):
                return
            read_s = stats.get("load_s")
            if read_s is None:
                if not stats or time.monotonic() > deadline:
                    return
                await asyncio.sleep(0.2)
            elif "read_s" not in lv.timings and not stats.get("progressive"):
                # without progressive loading the engine was ready only after the read: not init time
                lv.timings["ready_s"] = max(0.0, float(lv.timings.get("ready_s", 0.0)) - float(read_s))
        lv.timings["read_s"] = float(read_s)
        apply_load_timings(req, lv.timings)
        self._rows[row] = request_row(req)

    # ------------------------------------------------------------------ outputs

    def records(self) -> pd.DataFrame:
        """One row per finished request, in `core.records.REQUEST_SCHEMA`, costs as of now."""
        rows, events = list(self._rows), list(self._events)  # a snapshot: requests keep finishing meanwhile
        if self.state is None:
            return frame(REQUEST_SCHEMA, rows_to_columns(REQUEST_SCHEMA, rows))
        return request_frame(rows, events, self.state.cluster, self.clock.now)

    def instance_events(self) -> pd.DataFrame:
        """Instance lifecycle (loading, ready, stopped with a reason) in `core.records.INSTANCE_SCHEMA`."""
        return instance_frame(self._events)

    def write_records(self, out_dir: str | Path) -> Path:
        """Write `records()` to `out_dir/records.parquet` (never a partial file); its path."""
        return write_request_records(out_dir, self.records())

    def metrics_text(self) -> str:
        """Prometheus exposition: requests, cold starts, TTFT / TPOT histograms, instances, queue, agents."""
        insts = list(self.state.instances.values()) if self.state is not None else []
        agents_up = {n: ns.up for n, ns in self.state.nodes.items()} if self.state is not None else {}
        return self.metrics.render(instances_ready=sum(1 for i in insts if i.ready),
                                   instances_loading=sum(1 for i in insts if i.loading),
                                   queue_depth=self.queued, agents_up=agents_up)


def create_app(gateway: Gateway) -> Starlette:
    """The ASGI app over `gateway`; its lifespan builds the cluster mirror and stops the loops."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    def completion(path: str) -> Any:
        async def endpoint(request: Request) -> Response:
            return await gateway.handle(request, path)
        return endpoint

    async def models(request: Request) -> Response:
        try:
            tenant = authenticate(request, gateway.config.tenants)
        except ApiError as e:
            return e.response()
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "tierlab"} for m in tenant.models]
        return JSONResponse({"object": "list", "data": data})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"ok": True, "started": gateway.state is not None})

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(gateway.metrics_text(), media_type="text/plain; version=0.0.4")

    async def admin_records(request: Request) -> Response:
        if not token_matches(bearer(request), gateway.config.admin_token):
            return ApiError(401, "missing or invalid admin token (Authorization: Bearer <admin_token>)",
                            "invalid_admin_token").response()
        # a long run has many rows: build the JSON off the event loop (records() copies the row lists first)
        return JSONResponse(await asyncio.to_thread(lambda: records_json(gateway.records())))

    routes = [
        HttpRoute("/healthz", healthz),
        HttpRoute("/metrics", metrics),
        HttpRoute("/admin/records", admin_records),
        HttpRoute("/v1/models", models),
        HttpRoute("/v1/completions", completion("/v1/completions"), methods=["POST"]),
        HttpRoute("/v1/chat/completions", completion("/v1/chat/completions"), methods=["POST"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)
