"""The gateway: an OpenAI-compatible front door whose routing is decided by a `core` policy bundle.

An ASGI app (starlette) served by uvicorn. It mirrors the node agents in a `core.state.ClusterState`
(`live.gateway_mirror`: nodes as their agents describe them, `live.gateway_nodes`; tier contents from their
/status; the instances it started through /load), shows policies a `ClusterView` on a wall clock (monotonic
seconds since the gateway started), and for each request executes `bundle.place(req, view)`
(`live.gateway_forward`):

- `Route(instance)`: forward to that instance's engine (waiting while it is still loading);
- `ColdStart(node, source_tier)`: POST /load to the node's agent ("cloud" lets the agent fetch), register
  the instance, forward; with `migrate`, a busy instance is live-migrated away first (`live.gateway_migration`);
- `Queue`: wait and place again, up to `queue_timeout_s`; `Reject`: 503 with the reason.

Caching and autoscaling actions (`Copy`, `Evict`, `StartInstance`, `StopInstance`) are carried out in the
background and each is recorded (`live.gateway_actions`, `Gateway.actions()`, GET /admin/actions).

Faults: a background loop polls every agent's /healthz; after `health_failures` misses in a row (or at once
on a connection error from /load or /status, or when an engine's connection fails and its agent does not
answer) the node is marked down: its instances are dropped, requests waiting on them are placed again, and
placement (`core.policies.base.node_can_host`) starts models elsewhere. When the agent answers again the node
is marked up, its tiers are re-read and engines it still runs that the gateway forgot are unloaded. An engine
that fails before its first byte is retired and the request retried once elsewhere (else 502); one that dies
mid-stream ends the client's stream with an SSE error event. `request_timeout_s` bounds every request.

    POST /v1/chat/completions, POST /v1/completions   (stream and non-stream; SSE is relayed event by event,
                                                      or synthesized for engines that cannot stream)
    GET  /v1/models                                  the caller's models only (with `model_details`: the
                                                     chat template in use, as the CPU engine shows it)
    GET  /healthz                                    {"ok": true, "started"}
    GET  /metrics                                    Prometheus text (prometheus_client; `live.gateway_metrics`)
    GET  /openapi.json                               the OpenAPI 3.1 document of these endpoints
                                                     (`live.gateway_openapi`)
    GET  /admin/records, /admin/actions, /admin/audit records, actions, the audit log (operator or admin key)
    POST /admin/tiers/copy, /admin/tiers/evict       an operator's tier moves (`live.gateway_admin`)
    GET, POST /admin/keys, DELETE /admin/keys/{key_id}  key management (admin key)

Auth is `Authorization: Bearer <key>`; each key has a role (tenant, operator, admin) and each route needs a
permission its role holds (`live.gateway_auth`); keys are held as their sha256 only. Every /admin call is written
to the hash-chained audit log (`GatewayConfig.audit_log`). Errors use OpenAI's shape
`{"error": {message, type, param, code}}`.
Before any placement a request is checked against the limits (`GatewayConfig`): body size (413, before the rest
is read), parameters no engine honours (400 `unsupported_parameter`), a prompt that certainly exceeds the model's
context (400 `context_length_exceeded`), and the tenant's rate, token quota and concurrency (`live.gateway_limits`,
429 with `Retry-After`). Client errors, an engine's 4xx included, are recorded as `rejected`.
Every completion response carries `x-tierlab-request-id`, the request_id of its row in `records()`
(`core.records.REQUEST_SCHEMA`; rejected requests have rows too).
With `GatewayConfig.response_cache` on, a deterministic request whose answer (or a similar prompt's, same tenant)
is cached is answered after the limits without the policy or an engine (`live.gateway_cache`); a 200 says which
in `x-tierlab-cache` (exact, semantic, miss, off) and the row in its `cache` column.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import ssl
import time
from collections import Counter
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route as HttpRoute

from core.policies.base import PolicyBundle
from core.records import REQUEST_SCHEMA, frame, rows_to_columns
from core.response_cache import CacheConfig
from core.state import CapacityError, ClusterState, ClusterView
from live.audit import AuditLog
from live.gateway_actions import ACTION_COLUMNS, ActionsMixin
from live.gateway_admin import admin_routes, audit
from live.gateway_agents import AgentClient, agent_routes
from live.gateway_api import (
    ApiError,
    Tenant,
    bearer,
    check_context,
    completion_limit,
    parse_body,
    prefix_keys,
    prompt_tokens,
    prompt_tokens_lower_bound,
    read_body,
    validate,
)
from live.gateway_auth import PREHASHED, KeyStore, allowed, config_principals, stored_digest
from live.gateway_cache import CACHE_HEADER, GatewayCache
from live.gateway_config import (
    DEFAULT_NODE_PRICE_PER_HOUR,
    NOMINAL_GPU,
    AgentRef,
    GatewayConfig,
    default_bundle,
    nominal_model,
)
from live.gateway_forward import ForwardMixin
from live.gateway_limits import Limiter, LimitExceeded, Permit, retry_after_header
from live.gateway_metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from live.gateway_metrics import GatewayMetrics
from live.gateway_migration import MigrationMixin
from live.gateway_mirror import EngineFailed, Flight, Live, MirrorMixin, NodeLost, WallClock, log
from live.gateway_openapi import openapi_endpoint
from live.gateway_records import (
    CLIENT_REGION_HEADER,
    RequestInfo,
    instance_frame,
    request_frame,
    write_request_records,
)
from live.gateway_upstream import Upstream
from live.gateway_variants import pick_variant
from live.tracing import Tracing, span

__all__ = ["ACTION_COLUMNS", "DEFAULT_NODE_PRICE_PER_HOUR", "NOMINAL_GPU", "AgentRef", "ApiError", "EngineFailed",
           "Flight", "Gateway", "GatewayConfig", "Live", "NodeLost", "RequestInfo", "Tenant", "WallClock",
           "create_app", "default_bundle", "nominal_model"]

REQUEST_ID_HEADER = "x-tierlab-request-id"


class Gateway(MirrorMixin, ActionsMixin, MigrationMixin, ForwardMixin):
    """Cluster mirror, agent health, policy execution, forwarding, metrics and records."""

    def __init__(self, config: GatewayConfig, bundle: PolicyBundle | None = None) -> None:
        self.config = config
        self.bundle = bundle or default_bundle()
        # the placement may live-migrate: whole (non-streaming) answers then get an engine id up front (one more
        # JSON encoding per request, paid only by bundles that can migrate)
        self.may_migrate = bool(getattr(self.bundle.placement, "migration", False))
        self.clock = WallClock()
        self.agents = {a.name: a for a in config.agents}
        self.state: ClusterState | None = None
        self.view: ClusterView | None = None
        self.live: dict[str, Live] = {}
        self.metrics = GatewayMetrics(self)  # read when scraped: nothing is counted on the request path
        self.tracing = Tracing(config.tracing, "tierlab-gateway")
        self.queued = 0  # requests waiting for placement or for their instance to load
        self.queued_by_model: Counter[str] = Counter()  # the same, by model
        self.loop: asyncio.AbstractEventLoop | None = None  # the event loop it runs on, once started
        self.engine_kinds: dict[str, str] = {}  # node -> engine kind its agent reports ("" if none)
        self._rows: list[tuple[Any, ...]] = []
        self._events: list[tuple[Any, ...]] = []  # instance lifecycle, INSTANCE_SCHEMA
        self._actions: list[tuple[Any, ...]] = []  # policy actions, ACTION_COLUMNS
        self._ids = itertools.count(1)
        self._health_misses = dict.fromkeys(self.agents, 0)
        self._reviving: set[str] = set()
        self._max_num_seqs: dict[str, int] = {}
        self._paced_store = False
        self._stopping: dict[str, int] = {}  # node -> stops under way (their memory is freed when they end)
        self._migrating: dict[str, int] = {}  # node -> 1 while a migration frees it
        self._migration_dests: set[str] = set()  # instances a migration under way moves sequences onto
        self._tier_ops: dict[tuple[str, str], set[asyncio.Task[None]]] = {}  # evictions under way per tier
        self._http: httpx.AsyncClient | None = None  # agents, /stats, detach: the control plane
        self._upstream: Upstream = None  # type: ignore[assignment]  # requests to engines; built by start()
        self._agents: AgentClient = None  # type: ignore[assignment]  # built by start(), on the event loop
        self._loops: list[asyncio.Task[None]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self.limiter = Limiter(config.limits, lambda: self.clock.now)  # type: ignore[arg-type]  # normalized
        self._permits: dict[int, Permit] = {}  # request id -> its limiter permit, released by `_finish`
        self._refused = config.refused_params
        cache_cfg = config.response_cache
        assert isinstance(cache_cfg, CacheConfig)  # normalized by GatewayConfig
        # the edge response cache (`live.gateway_cache`); None: off
        self.response_cache = GatewayCache(cache_cfg, lambda: self.clock.now) if cache_cfg.enabled else None
        self.prefix_routing = bool(getattr(self.bundle.placement, "reads_prefix_blocks", False))
        self.audit = AuditLog(config.audit_log) if config.audit_log else None
        self.keys = KeyStore(config_principals(config.tenants, config.admin_token, config.principals),
                             config.keys_file, set(config.models), self._keys_reloaded)
        # no key stays in plain text: the config's own keys become their stored form (which a config also accepts,
        # so a config can build a second gateway)
        config.tenants = {PREHASHED + stored_digest(k): t for k, t in config.tenants.items()}
        config.admin_token = PREHASHED + stored_digest(config.admin_token) if config.admin_token else ""

    def _keys_reloaded(self, outcome: str, details: dict[str, Any]) -> None:
        """Audit a re-read of the keys file (called on the request path: the entry is written in the background)."""
        if self.audit is not None and self.loop is not None and self.loop.is_running():
            self._spawn(audit(self, "keys.reload", str(details.get("file", "")), outcome, "gateway", details))

    def tenant_of(self, request: Request) -> Tenant:
        """The tenant whose key the request bears; ApiError 401 for no key, an unknown one, or a key of a role
        that does not serve (an admin or operator key is not an API key)."""
        principal = self.keys.lookup(bearer(request))
        if principal is None or not allowed(principal.role, "serve"):
            raise ApiError(401, "missing or invalid API key (Authorization: Bearer <key>)", "invalid_api_key")
        return principal.tenant

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Read every agent's /status, build the cluster mirror, start the health and tick loops.

        ConfigError if a node's memory budget is smaller than every model."""
        c = self.config
        self.loop = asyncio.get_running_loop()
        timeout = httpx.Timeout(c.request_timeout_s, connect=c.connect_timeout_s)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        # trust_env=False: the cluster is reached directly, never through a proxy from the environment
        verify = ssl.create_default_context(cafile=c.agent_ca) if c.agent_ca else True  # https agents
        self._http = httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False, verify=verify)
        self._upstream = Upstream(c.connect_timeout_s, c.request_timeout_s)
        self._agents = AgentClient(self._http, self.agents, self._node_down, c.health_timeout_s)
        statuses = await asyncio.gather(*(self._agents.status(a.name) for a in c.agents))
        self._build_mirror(list(statuses))
        if c.health_interval_s > 0:
            self._loops.append(asyncio.create_task(self._health_loop(c.health_interval_s)))
        if c.tick and self.bundle.tick_s:
            self._loops.append(asyncio.create_task(self._tick_loop(self.bundle.tick_s)))

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run `coro` in the background, keeping a reference until it ends."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

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
        self.tracing.shutdown()
        if self._upstream is not None:
            await self._upstream.aclose()

    async def _tick_loop(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                self.execute(self.bundle.on_tick(self._view()))  # never waits for what the actions start
            except Exception:  # a failing policy must not end the loop
                log.exception("tick actions failed")

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

    # ------------------------------------------------------------------ requests

    async def handle(self, request: Request, path: str) -> Response:
        """Authenticate, validate, place and forward one completion request; every outcome leaves a row."""
        req = RequestInfo(next(self._ids), "", "", 0, 0, self.clock.now)
        t_arrival = time.monotonic()
        deadline = asyncio.get_running_loop().time() + self.config.request_timeout_s
        c = self.config
        try:
            with span("auth"):
                tenant = self.tenant_of(request)
            req.tenant = tenant.name
            req.client_region = request.headers.get(CLIENT_REGION_HEADER, "")  # core/regions.py; "" = none
            raw = await read_body(request, c.max_body_bytes)
            body = parse_body(raw)
            if isinstance(body.get("model"), str):
                req.model = body["model"]
            validate(body, path, tenant, c.models, self._refused)
            context = c.context_tokens.get(req.model)
            if context is not None:
                check_context(body, path, context, c.max_token_bytes)
            if self.limiter.active:
                self._admit(req, tenant, body)  # the last check: a refused request takes nothing from a limit
        except ApiError as e:
            self._finish(req, t_arrival, "rejected", e.code or "rejected")
            response = e.response()
        except ClientDisconnect:  # the body never came whole: no one to answer, but the request leaves its row
            self._finish(req, t_arrival, "failed", "client_disconnected")
            return Response(status_code=400)
        else:
            req.prompt_tokens = prompt_tokens(body)
            if self.prefix_routing:  # hashing the prompt is paid only by a placement that reads the blocks
                req.prefix_blocks = prefix_keys(body)
            req.output_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
            try:
                cached = self._cached(req, tenant, body, path, t_arrival) if self.response_cache else None
                if cached is not None:
                    response = cached
                else:
                    body, raw = pick_variant(self, req, body, raw)  # x -> x@fmt (core.policies.variants)
                    self.execute(self.bundle.on_arrival(req, self._view()))
                    response = await self._serve(req, body, raw, path, t_arrival, deadline)
            except Exception as e:  # a bug must still answer and leave its row
                log.exception("request %d failed", req.id)
                response = self._fail(req, t_arrival, 500, f"internal error: {e!r}", "internal_error")
        response.headers[REQUEST_ID_HEADER] = str(req.id)
        if response.status_code == 200 and not req.cache:
            response.headers[CACHE_HEADER] = "miss" if self.response_cache is not None else "off"
        return response

    def _cached(self, req: RequestInfo, tenant: Tenant, body: dict[str, Any], path: str,
                t_arrival: float) -> Response | None:
        """The response cache's answer (no engine, no policy), or None: then a cacheable request carries its
        slot, so that its completed answer is stored (`live.gateway_cache`)."""
        rc = self.response_cache
        assert rc is not None
        slot = rc.slot(tenant.name, path, body)
        hit = rc.lookup(slot) if slot is not None else None
        if hit is None:
            req.cache_slot = slot
            return None
        response = rc.answer(hit, req, path, body)
        req.ttft_s = time.monotonic() - t_arrival
        self._finish(req, t_arrival, "completed", "")
        return response

    def _admit(self, req: RequestInfo, tenant: Tenant, body: dict[str, Any]) -> None:
        """Take the request's share of its tenant's limits (released by `_finish`); ApiError 429 (or 400 for a
        request larger than the whole token quota) if a limit refuses it.

        The token quota reserves what the request may take: its prompt's lower bound plus its completion limit
        (16 tokens if it sets none, as the policy's estimate); `_finish` settles it against the engine's usage."""
        limit = completion_limit(body)
        tokens = prompt_tokens_lower_bound(body, self.config.max_token_bytes) + (16 if limit is None else limit)
        try:
            permit = self.limiter.admit(tenant.name, tokens)
        except LimitExceeded as e:
            if e.retry_after_s is None:
                raise ApiError(400, e.message, e.code, "max_tokens") from None
            raise ApiError(429, e.message, e.code, headers={"Retry-After": retry_after_header(e.retry_after_s)}
                           ) from None
        if permit is not None:
            self._permits[req.id] = permit

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
        """Prometheus exposition (`live.gateway_metrics`): requests, tokens, cost, cold starts and their phases,
        TTFT / TPOT / queue histograms, instances, queues, agents."""
        return self.metrics.exposition().decode()


COMPLETION_PATHS = ("/v1/completions", "/v1/chat/completions")


async def complete(gateway: Gateway, request: Request, path: str) -> Response:
    """One completion request, traced: what both the fast path and the router's route run."""
    with gateway.tracing.server("POST " + path, request.headers):
        return await gateway.handle(request, path)


class GatewayApp(Starlette):
    """The gateway's Starlette app with the hot path taken straight: a POST to a completion route goes to
    `Gateway.handle` without Starlette's middleware stack and router (~17% of the gateway's CPU per request
    under load, `docs/results/gateway_wire.md`). `Gateway.handle` answers every error itself; the routes stay
    in the router for every other method (405) and for the OpenAPI check."""

    def __init__(self, gateway: Gateway, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gateway = gateway

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path")
        if scope["type"] == "http" and scope["method"] == "POST" and path in COMPLETION_PATHS:
            scope["app"] = self
            response = await complete(self.gateway, Request(scope, receive, send), path)
            await response(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def create_app(gateway: Gateway) -> Starlette:
    """The ASGI app over `gateway`; its lifespan builds the cluster mirror and stops the loops."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.start()
        # What exists once the gateway has started (modules, config, policy, mirror) lives as long as the
        # process: frozen out of the collector's generations, full collections no longer walk it. Those walks
        # were the gateway's tail under load: p99 38 -> 7 ms at 16 connections (docs/results/gateway_wire.md).
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            await gateway.stop()

    def completion(path: str) -> Any:
        async def endpoint(request: Request) -> Response:  # reached only without GatewayApp's fast path
            return await complete(gateway, request, path)
        return endpoint

    async def models(request: Request) -> Response:
        try:
            tenant = gateway.tenant_of(request)
        except ApiError as e:
            return e.response()
        details = gateway.config.model_details
        data = [{**details.get(m, {}), "id": m, "object": "model", "created": 0, "owned_by": "tierlab"}
                for m in tenant.models]
        return JSONResponse({"object": "list", "data": data})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"ok": True, "started": gateway.state is not None})

    async def metrics(request: Request) -> Response:
        return Response(gateway.metrics.exposition(), media_type=METRICS_CONTENT_TYPE)

    routes = [
        HttpRoute("/healthz", healthz),
        HttpRoute("/metrics", metrics),
        *admin_routes(gateway),
        *agent_routes(gateway),  # POST /agents/join, /agents/leave: agents joining on their own
        HttpRoute("/v1/models", models),
        HttpRoute("/v1/completions", completion("/v1/completions"), methods=["POST"]),
        HttpRoute("/v1/chat/completions", completion("/v1/chat/completions"), methods=["POST"]),
        HttpRoute("/openapi.json", openapi_endpoint),
    ]
    return GatewayApp(gateway, routes=routes, lifespan=lifespan)
