"""The gateway: an OpenAI-compatible front door whose routing is decided by a `core` policy bundle.

An ASGI app (starlette) served by uvicorn. It mirrors the node agents in a `core.state.ClusterState`
(nodes from the agents, tier contents from their /status, the instances it started through /load),
shows policies a `ClusterView` on a wall clock (monotonic seconds since the gateway started), and for
each request executes `bundle.place(req, view)`:

- `Route(instance)`: forward to that instance's engine (waiting while it is still loading);
- `ColdStart(node, source_tier)`: POST /load to the node's agent ("cloud" lets the agent fetch), register
  the instance, forward;
- `Queue`: wait and place again, up to `queue_timeout_s`; `Reject`: 503 with the reason.

CPU nodes have no GPU: each node gets a nominal GPU (`GatewayConfig.nominal_gpu`) so core's GPU
accounting (`NodeState.footprint`, `gpu_fit`, `add_instance`) works unchanged; models default to a
nominal `ModelSpec` small enough that several instances fit.

    POST /v1/chat/completions, POST /v1/completions   (stream and non-stream; SSE is relayed chunk by chunk)
    GET  /v1/models                                  the caller's models only
    GET  /healthz                                    {"ok": true}
    GET  /metrics                                    Prometheus text

Auth is `Authorization: Bearer <api key>`; errors use OpenAI's shape `{"error": {message, type, param, code}}`.
One row per request is kept in `core.records.REQUEST_SCHEMA` (`Gateway.records()`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import json
import logging
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import httpx
import pandas as pd
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route as HttpRoute

from core.decisions import Action, ColdStart, Copy, Evict, Queue, Reject, Route, StartInstance, StopInstance
from core.policies.base import PolicyBundle
from core.records import REQUEST_SCHEMA, frame, rows_to_columns
from core.specs import ClusterSpec, EngineSpec, GpuSpec, ModelSpec, NodeSpec, TierSpec
from core.state import CapacityError, ClusterState, ClusterView, InstanceState, NodeState

log = logging.getLogger(__name__)

TTFT_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
NOMINAL_GPU = GpuSpec("cpu-nominal", mem_bytes=80e9, hbm_Bps=100e9, flops=1e12, h2d_Bps=10e9)
NOMINAL_TIER_BW_BPS = 1e9


def default_bundle() -> PolicyBundle:
    """TierAware placement x NoCaching x KeepAlive(300 s)."""
    from core.policies.autoscaling import KeepAlive
    from core.policies.caching import NoCaching
    from core.policies.placement import TierAware

    return PolicyBundle(TierAware(), NoCaching(), KeepAlive(keep_alive_s=300), name="tier_aware")


def nominal_model(name: str) -> ModelSpec:
    """A 1B-parameter stand-in: core only needs its size for GPU accounting (~3 GB of a nominal 72 GB)."""
    return ModelSpec(name=name, params_b=1.0, n_layers=16, hidden_size=2048, n_kv_heads=8, head_dim=64)


@dataclass(frozen=True)
class AgentRef:
    """One node agent the gateway drives."""

    name: str
    url: str
    token: str


@dataclass(frozen=True)
class Tenant:
    """An API key's owner and the models it may call."""

    name: str
    models: tuple[str, ...]


@dataclass
class GatewayConfig:
    """Agents, tenants (API key -> Tenant), models and the knobs of the request path."""

    agents: list[AgentRef]
    tenants: dict[str, Tenant]
    models: dict[str, ModelSpec] = field(default_factory=dict)  # default: a nominal spec per tenant model
    nominal_gpu: GpuSpec = NOMINAL_GPU
    engine: EngineSpec = field(default_factory=lambda: EngineSpec(name="cpu", max_num_seqs=8))
    queue_timeout_s: float = 10.0
    queue_poll_s: float = 0.1
    load_timeout_s: float = 180.0
    request_timeout_s: float = 300.0
    tick: bool = True  # run the bundle's on_tick (keep-alive stops) every `bundle.tick_s`

    def __post_init__(self) -> None:
        if not self.agents:
            raise ValueError("GatewayConfig needs at least one agent")
        for tenant in self.tenants.values():
            for m in tenant.models:
                self.models.setdefault(m, nominal_model(m))


class WallClock:
    """`now`: monotonic seconds since construction (the only clock policies see)."""

    def __init__(self) -> None:
        self._t0 = time.monotonic()

    @property
    def now(self) -> float:
        return time.monotonic() - self._t0


class ApiError(Exception):
    """An OpenAI-shaped error with an HTTP status."""

    TYPES: ClassVar[dict[int, str]] = {400: "invalid_request_error", 401: "authentication_error",
                                       403: "permission_error", 404: "not_found_error"}

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


@dataclass
class RequestInfo:
    """What a policy may read of a request (`core.policies.base.RequestView`), plus what the gateway records."""

    id: int
    model: str
    tenant: str
    prompt_tokens: int
    output_tokens: int
    arrival_s: float
    queue_s: float = 0.0
    cold_start: bool = False
    source_tier: str = ""
    fetch_s: float = math.nan
    engine_init_s: float = math.nan
    cold_start_s: float = math.nan
    ttft_s: float = math.nan
    e2e_s: float = math.nan
    out_tokens: int = 0
    in_tokens: int = 0
    node: str = ""
    instance: str = ""
    outcome: str = "failed"
    reason: str = ""


@dataclass
class Live:
    """Gateway-side state of an instance started via an agent."""

    inst: InstanceState
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""
    agent_instance: str = ""
    timings: dict[str, Any] = field(default_factory=dict)
    error: str = ""


class EngineFailed(Exception):
    """The engine failed before sending its first byte (the request may be retried elsewhere)."""


def _safe_model_name(name: str) -> bool:
    return bool(name) and "/" not in name and ".." not in name and "\\" not in name and name.strip() == name


class Gateway:
    """Cluster mirror, policy execution, forwarding, metrics and records."""

    def __init__(self, config: GatewayConfig, bundle: PolicyBundle | None = None) -> None:
        self.config = config
        self.bundle = bundle or default_bundle()
        self.clock = WallClock()
        self.agents = {a.name: a for a in config.agents}
        self.state: ClusterState | None = None
        self.view: ClusterView | None = None
        self.live: dict[str, Live] = {}
        self._rows: list[tuple[Any, ...]] = []
        self._ids = itertools.count(1)
        self._http: httpx.AsyncClient | None = None
        self._tick_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.requests_by_outcome: Counter[str] = Counter()
        self.cold_starts_by_tier: Counter[str] = Counter()
        self.ttft_buckets = [0] * len(TTFT_BUCKETS_S)
        self.ttft_count = 0
        self.ttft_sum = 0.0

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Read every agent's /status and build the cluster mirror."""
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(self.config.request_timeout_s, connect=5.0))
        statuses = await asyncio.gather(*(self._agent_status(a) for a in self.config.agents))
        nodes = []
        for agent, st in zip(self.config.agents, statuses, strict=True):
            tiers = {name: TierSpec(name, float(t["capacity_bytes"]), NOMINAL_TIER_BW_BPS, NOMINAL_TIER_BW_BPS)
                     for name, t in (st or {}).get("tiers", {}).items()}
            nodes.append(NodeSpec(agent.name, self.config.nominal_gpu, 1, 1e9, tiers))
        self.state = ClusterState(ClusterSpec(tuple(nodes)), list(self.config.models.values()), self.config.engine)
        self.view = ClusterView(self.state, self.clock)
        for agent, st in zip(self.config.agents, statuses, strict=True):
            if st is None:
                self.state.nodes[agent.name].up = False
            else:
                self._sync_tiers(self.state.nodes[agent.name], st)
        if self.config.tick and self.bundle.tick_s:
            self._tick_task = asyncio.create_task(self._tick_loop(self.bundle.tick_s))

    def _spawn(self, coro: Any) -> None:
        """Run `coro` in the background, keeping a reference until it ends."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """Stop the tick loop and close the HTTP client (instances stay with their agents)."""
        if self._tick_task is not None:
            self._tick_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tick_task
        if self._http is not None:
            await self._http.aclose()

    async def _tick_loop(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.execute(self.bundle.on_tick(self._view()))
            except Exception:  # a failed action must not end the loop
                log.exception("tick actions failed")

    # ------------------------------------------------------------------ agents

    def _headers(self, agent: AgentRef) -> dict[str, str]:
        return {"Authorization": f"Bearer {agent.token}"}

    async def _agent_status(self, agent: AgentRef) -> dict[str, Any] | None:
        assert self._http is not None
        try:
            r = await self._http.get(agent.url + "/status", headers=self._headers(agent), timeout=10)
            r.raise_for_status()
            return r.json()
        except (httpx.HTTPError, ValueError) as e:
            log.warning("agent %s unreachable: %s", agent.name, e)
            return None

    async def _agent_post(self, node: str, path: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert self._http is not None
        agent = self.agents[node]
        r = await self._http.post(agent.url + path, json=body, headers=self._headers(agent), timeout=timeout)
        if r.status_code != 200:
            raise RuntimeError(f"agent {node} {path} -> {r.status_code}: {r.text[:300]}")
        return r.json()

    def _sync_tiers(self, ns: NodeState, status: dict[str, Any]) -> None:
        """Make the mirror's tier contents equal to the agent's (model bytes as on disk)."""
        now = self.clock.now
        for name, t in status.get("tiers", {}).items():
            ts = ns.tiers.get(name)
            if ts is None:
                continue
            held = {m: b for m, b in t.get("models", {}).items() if m in self.state.models}  # type: ignore[union-attr]
            for m in list(ts.entries):
                if m not in held:
                    ts.remove(m)
            for m, b in held.items():
                if not ts.holds(m) and not ts.incoming(m):
                    with contextlib.suppress(CapacityError):
                        ts.reserve(m, float(b))
                        ts.commit(m, now)

    async def refresh(self, node: str) -> None:
        """Re-read one node's tier contents."""
        st = await self._agent_status(self.agents[node])
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
                    await self.stop_instance(a.instance_id, a.demote_to)
                elif isinstance(a, Copy):
                    await self._agent_post(a.node, "/tiers/copy", {"model": a.model, "to_tier": a.to_tier},
                                           self.config.load_timeout_s)
                    await self.refresh(a.node)
                elif isinstance(a, Evict):
                    await self._agent_post(a.node, "/tiers/evict", {"model": a.model, "tier": a.tier}, 30)
                    await self.refresh(a.node)
                elif isinstance(a, StartInstance):
                    lv = self.cold_start(a.model, a.node, a.source_tier)
                    if lv is not None:
                        await lv.ready.wait()
            except Exception as e:  # an action failing is logged, never fatal
                log.warning("action %s failed: %s", a, e)

    async def stop_instance(self, instance_id: str, demote_to: str | None = None) -> None:
        """Unload an idle instance (optionally copying its weights to `demote_to` first)."""
        lv = self.live.get(instance_id)
        inst = self._state().instances.get(instance_id)
        if lv is None or inst is None or not inst.idle:
            return
        inst.status = "stopping"
        if demote_to is not None:
            with contextlib.suppress(Exception):
                await self._agent_post(inst.node, "/tiers/copy", {"model": inst.model.name, "to_tier": demote_to},
                                       self.config.load_timeout_s)
        with contextlib.suppress(Exception):
            await self._agent_post(inst.node, "/unload", {"instance": lv.agent_instance}, 30)
        self._drop(inst)
        await self.refresh(inst.node)

    def _drop(self, inst: InstanceState) -> None:
        if inst.id in self._state().instances:
            self._state().remove_instance(inst)
        self.live.pop(inst.id, None)

    def cold_start(self, model: str, node: str, source_tier: str) -> Live | None:
        """Reserve GPU room on `node` and start loading `model` there in the background; None if no room."""
        state, view = self._state(), self._view()
        ns = state.nodes[node]
        n, per_gpu, kv = ns.footprint(state.models[model])
        gpu_ids = ns.gpu_fit(per_gpu * n, per_gpu)
        if gpu_ids is None:
            return None
        inst = state.add_instance(model, node, gpu_ids, per_gpu, kv, source_tier, self.clock.now)
        lv = Live(inst)
        self.live[inst.id] = lv
        self.cold_starts_by_tier[source_tier] += 1
        self._spawn(self._load(lv, source_tier))
        self.bundle.on_load_started(inst, view)
        return lv

    async def _load(self, lv: Live, source_tier: str) -> None:
        inst = lv.inst
        body: dict[str, Any] = {"model": inst.model.name}
        if source_tier != "cloud":
            body["source_tier"] = source_tier
        try:
            out = await self._agent_post(inst.node, "/load", body, self.config.load_timeout_s)
            lv.url = out["instance"]["url"]
            lv.agent_instance = out["instance"]["id"]
            lv.timings = out.get("timings", {})
            inst.status = "ready"
            inst.ready_at_s = self.clock.now
            inst.idle_since_s = inst.last_used_s = inst.ready_at_s
        except Exception as e:  # any failure ends this instance; waiters see lv.error
            lv.error = f"load of {inst.model.name} on {inst.node} failed: {e}"
            log.warning(lv.error)
            self._drop(inst)
        finally:
            lv.ready.set()
        await self.refresh(inst.node)
        if not lv.error:
            await self.execute(self.bundle.on_load_done(inst, self._view()))

    async def _place(self, req: RequestInfo, exclude: set[str]) -> Live:
        """Ask the bundle until it names an instance (waiting for it to be ready); raise ApiError(503) if not."""
        view = self._view()
        deadline = time.monotonic() + self.config.queue_timeout_s
        t0 = time.monotonic()
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
        if lv.error:
            raise EngineFailed(lv.error)
        req.cold_start = cold
        req.source_tier = inst.source_tier if cold else "gpu"
        req.node, req.instance = inst.node, inst.id
        if cold:
            hops = lv.timings.get("fetch_s") or []
            req.fetch_s = float(sum(h.get("duration_s", 0.0) for h in hops)) if hops else math.nan
            req.engine_init_s = float(lv.timings.get("engine_start_s", 0.0) + lv.timings.get("ready_s", 0.0))
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
                self._spawn(self.execute(self.bundle.on_idle(inst, self._view())))

    async def handle(self, request: Request, path: str) -> Response:
        """Authenticate, validate, place (retrying once if the engine fails before its first byte), forward."""
        tenant = self._tenant(request)
        body = await self._validate(request, path, tenant)
        req = RequestInfo(next(self._ids), body["model"], tenant.name, self._prompt_tokens(body),
                          int(body.get("max_tokens") or body.get("max_completion_tokens") or 16), self.clock.now)
        t_arrival = time.monotonic()
        await self.execute(self.bundle.on_arrival(req, self._view()))
        failed: set[str] = set()
        for attempt in range(2):
            try:
                lv = await self._place(req, failed)
            except ApiError as e:
                self._finish(req, t_arrival, "rejected", e.code or "rejected")
                return e.response()
            except (EngineFailed, TimeoutError) as e:
                if attempt == 0:
                    continue
                self._finish(req, t_arrival, "failed", "load_failed")
                return ApiError(502, str(e) or "engine load timed out", "load_failed").response()
            try:
                return await self._forward(lv, path, body, req, t_arrival)
            except EngineFailed as e:
                failed.add(lv.inst.id)
                log.warning("engine %s failed before its first byte: %s", lv.inst.id, e)
                self._retire(lv)
                if attempt == 1:
                    self._finish(req, t_arrival, "failed", "engine_failed")
                    return ApiError(502, f"engine failed: {e}", "engine_failed").response()
        raise AssertionError("unreachable")

    def _retire(self, lv: Live) -> None:
        """Forget an instance whose engine failed (and ask its agent to stop it)."""
        inst = lv.inst
        if inst.id in self._state().instances:
            self._drop(inst)
            if lv.agent_instance:
                self._spawn(self._quiet_unload(inst.node, lv.agent_instance))

    async def _quiet_unload(self, node: str, agent_instance: str) -> None:
        with contextlib.suppress(Exception):
            await self._agent_post(node, "/unload", {"instance": agent_instance}, 30)

    async def _forward(self, lv: Live, path: str, body: dict[str, Any], req: RequestInfo,
                       t_arrival: float) -> Response:
        assert self._http is not None
        self._begin(lv)
        try:
            upstream = await self._http.send(self._http.build_request("POST", lv.url + path, json=body), stream=True)
        except httpx.HTTPError as e:
            self._end(lv)
            raise EngineFailed(str(e)) from None
        if upstream.status_code >= 500:
            await upstream.aclose()
            self._end(lv)
            raise EngineFailed(f"HTTP {upstream.status_code}")
        if not body.get("stream"):
            try:
                raw = await upstream.aread()
            except httpx.HTTPError as e:
                self._end(lv)
                raise EngineFailed(str(e)) from None
            finally:
                await upstream.aclose()
            self._end(lv)
            ok = upstream.status_code == 200
            if ok:
                with contextlib.suppress(ValueError, AttributeError):
                    usage = json.loads(raw).get("usage") or {}
                    req.in_tokens = int(usage.get("prompt_tokens", 0))
                    req.out_tokens = int(usage.get("completion_tokens", 0))
                req.ttft_s = time.monotonic() - t_arrival  # non-stream: the first token arrives with the rest
            reason = "" if ok else f"engine_{upstream.status_code}"
            self._finish(req, t_arrival, "completed" if ok else "failed", reason)
            return Response(raw, status_code=upstream.status_code, media_type="application/json")
        if upstream.status_code != 200:
            raw = await upstream.aread()
            await upstream.aclose()
            self._end(lv)
            self._finish(req, t_arrival, "failed", f"engine_{upstream.status_code}")
            return Response(raw, status_code=upstream.status_code, media_type="application/json")
        chunks = upstream.aiter_raw()
        try:
            first = await chunks.__anext__()
        except (httpx.HTTPError, StopAsyncIteration) as e:
            await upstream.aclose()
            self._end(lv)
            raise EngineFailed(f"stream ended before its first byte: {e!r}") from None
        return StreamingResponse(self._relay(lv, upstream, first, chunks, req, t_arrival),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _relay(self, lv: Live, upstream: httpx.Response, first: bytes, chunks: AsyncIterator[bytes],
                     req: RequestInfo, t_arrival: float) -> AsyncIterator[bytes]:
        """Yield SSE bytes as they come; TTFT is the first chunk carrying text."""
        outcome, reason, buf = "failed", "client_disconnected", b""
        try:
            chunk: bytes | None = first
            while chunk is not None:
                if b"data: [DONE]" in buf + chunk:
                    # the client has the whole answer once this chunk is out: a client that hangs up
                    # right after [DONE] (the openai client does) was served, not disconnected
                    outcome, reason = "completed", ""
                buf = self._scan_sse(buf + chunk, req, t_arrival)
                yield chunk
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    chunk = None
            outcome, reason = "completed", ""
        except httpx.HTTPError as e:
            outcome, reason = "failed", f"engine_stream_error: {type(e).__name__}"
        finally:
            await upstream.aclose()
            self._end(lv)
            self._finish(req, t_arrival, outcome, reason)

    def _scan_sse(self, buf: bytes, req: RequestInfo, t_arrival: float) -> bytes:
        """Read complete `data:` lines for text and usage; return the incomplete rest."""
        *lines, rest = buf.split(b"\n")
        for line in lines:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            with contextlib.suppress(ValueError, AttributeError, IndexError, TypeError):
                msg = json.loads(line[6:])
                if msg.get("usage"):
                    req.in_tokens = int(msg["usage"].get("prompt_tokens", 0))
                    req.out_tokens = int(msg["usage"].get("completion_tokens", 0))
                choice = (msg.get("choices") or [{}])[0]
                text = choice.get("text") or (choice.get("delta") or {}).get("content")
                if text:
                    if math.isnan(req.ttft_s):
                        req.ttft_s = time.monotonic() - t_arrival
                    if not msg.get("usage"):
                        req.out_tokens += 1  # one chunk per token, until the usage chunk says otherwise
        return rest

    def _finish(self, req: RequestInfo, t_arrival: float, outcome: str, reason: str) -> None:
        req.outcome, req.reason = outcome, reason
        req.e2e_s = time.monotonic() - t_arrival
        self.requests_by_outcome[outcome] += 1
        if not math.isnan(req.ttft_s):
            self.ttft_count += 1
            self.ttft_sum += req.ttft_s
            for i, b in enumerate(TTFT_BUCKETS_S):
                if req.ttft_s <= b:
                    self.ttft_buckets[i] += 1
        self._rows.append((req.id, req.tenant, req.model, req.arrival_s, req.queue_s, req.cold_start,
                           req.source_tier, req.fetch_s, math.nan, req.engine_init_s, req.cold_start_s, math.nan,
                           req.ttft_s, math.nan, req.e2e_s, req.in_tokens or req.prompt_tokens, req.out_tokens,
                           req.node, req.instance, outcome, reason, math.nan))

    # ------------------------------------------------------------------ validation

    def _tenant(self, request: Request) -> Tenant:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        key = key.strip()
        if scheme.lower() == "bearer" and key:
            for known, tenant in self.config.tenants.items():
                if hmac.compare_digest(known.encode(), key.encode()):
                    return tenant
        raise ApiError(401, "missing or invalid API key (Authorization: Bearer <key>)", "invalid_api_key")

    async def _validate(self, request: Request, path: str, tenant: Tenant) -> dict[str, Any]:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"could not parse the JSON body: {e}", "invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the JSON body must be an object", "invalid_json")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "you must provide a 'model' string", "missing_required_parameter", "model")
        if not _safe_model_name(model):
            raise ApiError(400, f"invalid model name {model!r}", "invalid_model_name", "model")
        need = "messages" if path.endswith("chat/completions") else "prompt"
        if need not in body:
            raise ApiError(400, f"you must provide a '{need}' parameter", "missing_required_parameter", need)
        for k in ("max_tokens", "max_completion_tokens"):
            v = body.get(k)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise ApiError(400, f"'{k}' must be a non-negative integer, got {v!r}", "invalid_value", k)
        if model not in self.config.models:
            raise ApiError(404, f"the model '{model}' does not exist", "model_not_found", "model")
        if model not in tenant.models:
            raise ApiError(403, f"tenant '{tenant.name}' may not use model '{model}'", "model_not_allowed", "model")
        return body

    @staticmethod
    def _prompt_tokens(body: dict[str, Any]) -> int:
        """A rough estimate (4 characters a token) for the policy; the engine's usage replaces it."""
        text = json.dumps(body.get("messages", body.get("prompt", "")))
        return max(1, len(text) // 4)

    # ------------------------------------------------------------------ outputs

    def records(self) -> pd.DataFrame:
        """One row per finished request, in `core.records.REQUEST_SCHEMA`."""
        return frame(REQUEST_SCHEMA, rows_to_columns(REQUEST_SCHEMA, self._rows))

    def metrics_text(self) -> str:
        """Prometheus exposition: requests by outcome, cold starts by source tier, TTFT histogram."""
        out = ["# HELP tierlab_requests_total Requests finished, by outcome.", "# TYPE tierlab_requests_total counter"]
        for o in ("completed", "rejected", "failed"):
            out.append(f'tierlab_requests_total{{outcome="{o}"}} {self.requests_by_outcome[o]}')
        out += ["# HELP tierlab_cold_starts_total Instances started, by source tier.",
                "# TYPE tierlab_cold_starts_total counter"]
        for t, n in sorted(self.cold_starts_by_tier.items()):
            out.append(f'tierlab_cold_starts_total{{source_tier="{t}"}} {n}')
        out += ["# HELP tierlab_ttft_seconds Time to first token seen by the gateway.",
                "# TYPE tierlab_ttft_seconds histogram"]
        for b, n in zip(TTFT_BUCKETS_S, self.ttft_buckets, strict=True):
            out.append(f'tierlab_ttft_seconds_bucket{{le="{b}"}} {n}')
        out.append(f'tierlab_ttft_seconds_bucket{{le="+Inf"}} {self.ttft_count}')
        out.append(f"tierlab_ttft_seconds_sum {self.ttft_sum}")
        out.append(f"tierlab_ttft_seconds_count {self.ttft_count}")
        insts = self.state.instances.values() if self.state is not None else ()
        out += ["# TYPE tierlab_instances gauge",
                f'tierlab_instances{{status="ready"}} {sum(1 for i in insts if i.ready)}',
                f'tierlab_instances{{status="loading"}} {sum(1 for i in insts if i.loading)}']
        return "\n".join(out) + "\n"


def create_app(gateway: Gateway) -> Starlette:
    """The ASGI app over `gateway`; its lifespan builds the cluster mirror."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    def completion(path: str) -> Any:
        async def endpoint(request: Request) -> Response:
            try:
                return await gateway.handle(request, path)
            except ApiError as e:
                return e.response()
        return endpoint

    async def models(request: Request) -> Response:
        try:
            tenant = gateway._tenant(request)
        except ApiError as e:
            return e.response()
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "tierlab"} for m in tenant.models]
        return JSONResponse({"object": "list", "data": data})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"ok": True, "started": gateway.state is not None})

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(gateway.metrics_text(), media_type="text/plain; version=0.0.4")

    routes = [
        HttpRoute("/healthz", healthz),
        HttpRoute("/metrics", metrics),
        HttpRoute("/v1/models", models),
        HttpRoute("/v1/completions", completion("/v1/completions"), methods=["POST"]),
        HttpRoute("/v1/chat/completions", completion("/v1/chat/completions"), methods=["POST"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)
