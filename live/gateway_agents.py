"""How the gateway talks to node agents: /status, /healthz and control POSTs, with connection failures told
apart from slow answers (a connection failure reports the node as unreachable at once); and how agents join and
leave it on their own (`Membership`, `agent_routes`).

Membership. The gateway drives the agents of `GatewayConfig.agents` (name, URL, token), and agents started on
their own (`python -m live.agent ... --gateway URL --token T`, `live.agent.GatewayLink`) join it:

    POST /agents/join  {node, url, boot_id}   Authorization: Bearer <agent token>
        -> {"node", "url", "state": "up" | "down", "joined": "new" | "restarted" | "moved" | "heartbeat"}
    POST /agents/leave {node, boot_id}        -> {"node", "state": "down"}

- A listed node must bear the token it is listed with; a node the gateway does not know may join bearing the
  token of a listed one (the cluster's agent token) and becomes a node of the mirror from its /status (as
  those read at start, `live.gateway_nodes`). 401 for a wrong token, 400 for a bad field or description, 502 if
  the gateway cannot read the joining agent's /status at the URL it gave.
- The agent re-joins every few seconds (its heartbeat). A join with another `boot_id` (the agent restarted: its
  engines died with it) or another URL marks the node down first (its instances dropped, requests waiting on
  them placed again), then the gateway checks it at once, which marks it up again (`check_agent`).
- A leave (the agent stops) marks the node down at once; one bearing an older boot_id than the last join is
  refused (409), so that a late leave of a previous run cannot take down its successor.
- An agent that dies without a leave is found by the health loop (`GatewayConfig.health_interval_s`,
  `health_timeout_s`, `health_failures`): marked down after that many missed checks, up again when it answers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from core.state import NodeState
from live import tracing
from live.gateway_api import ApiError, bearer, parse_body, read_body
from live.gateway_config import AgentRef
from live.gateway_nodes import check_budgets, node_report

if TYPE_CHECKING:
    from live.gateway import Gateway

log = logging.getLogger(__name__)


class AgentUnreachable(RuntimeError):
    """A node's agent could not be reached (or the node has none)."""


class AgentRefused(RuntimeError):
    """A node's agent answered with an error: its HTTP `status` and error `code` (e.g. insufficient_storage)."""

    def __init__(self, message: str, status: int, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def connection_error(e: BaseException) -> bool:
    """A failure to reach or keep a connection (refused, reset, closed early), as opposed to a slow peer."""
    slow = (httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout)
    return isinstance(e, httpx.TransportError) and not isinstance(e, slow)


class AgentClient:
    """Calls to the agents over one HTTP client; `on_unreachable(node, why)` hears of every connection failure."""

    def __init__(self, http: httpx.AsyncClient, agents: Mapping[str, AgentRef],
                 on_unreachable: Callable[[str, str], None], health_timeout_s: float) -> None:
        self.http = http
        self.agents = agents
        self.on_unreachable = on_unreachable
        self.health_timeout_s = health_timeout_s

    def _headers(self, agent: AgentRef) -> dict[str, str]:
        return {"Authorization": f"Bearer {agent.token}"}

    async def status(self, node: str, report_unreachable: bool = True) -> dict[str, Any] | None:
        """The agent's /status, or None (None at once for a node without an agent). `report_unreachable=False`:
        a connection failure is not reported (a joining node is not in the mirror yet)."""
        agent = self.agents[node]
        if not agent.url:
            return None
        try:
            r = await self.http.get(agent.url + "/status", headers=self._headers(agent), timeout=10)
            r.raise_for_status()
            return r.json()
        except (httpx.HTTPError, ValueError) as e:
            log.warning("agent %s /status failed: %r", node, e)
            if connection_error(e) and report_unreachable:
                self.on_unreachable(node, f"/status: {e!r}")
            return None

    async def post(self, node: str, path: str, body: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """POST to a node's agent; its JSON answer. AgentUnreachable if it cannot be reached, AgentRefused if it
        answers with an error."""
        agent = self.agents[node]
        if not agent.url:
            raise AgentUnreachable(f"node {node} has no agent")
        with tracing.span(f"agent POST {path}", client=True, **{"tierlab.node": node}):
            try:  # the agent continues the request's trace (W3C traceparent) when one is current
                r = await self.http.post(agent.url + path, json=body, headers=tracing.inject(self._headers(agent)),
                                         timeout=timeout_s)
            except httpx.TransportError as e:
                if connection_error(e):
                    self.on_unreachable(node, f"{path}: {e!r}")
                    raise AgentUnreachable(f"agent {node} unreachable on {path}: {e!r}") from None
                raise
        if r.status_code != 200:
            try:
                code = str(r.json()["error"]["code"])
            except (ValueError, KeyError, TypeError):
                code = ""
            raise AgentRefused(f"agent {node} {path} -> {r.status_code}: {r.text[:300]}", r.status_code, code)
        return r.json()

    async def healthy(self, node: str) -> bool:
        """True if the agent answers /healthz with 200 within the health timeout."""
        agent = self.agents[node]
        if not agent.url:
            return False
        try:
            r = await self.http.get(agent.url + "/healthz", timeout=self.health_timeout_s)
            return r.status_code == 200
        except httpx.HTTPError:
            return False


# --------------------------------------------------------------------------- membership

NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
MAX_JOIN_BODY_BYTES = 16 << 10  # a join is a few hundred bytes


def _same(given: str, token: str) -> bool:
    return bool(given) and hmac.compare_digest(given.encode(), token.encode())


def _field(body: Mapping[str, Any], name: str, required: bool = True) -> str:
    value = body.get(name, "" if not required else None)
    if not isinstance(value, str) or (required and not value):
        raise ApiError(400, f"'{name}' must be a non-empty string, got {value!r}", "invalid_field", name)
    return value


def _agent_url(url: str) -> str:
    """`url` if it is an agent's base URL (http(s)://host:port, no path), trailing slash removed; ApiError 400."""
    try:
        u = httpx.URL(url)
        ok = u.scheme in ("http", "https") and bool(u.host) and u.port is not None and u.path in ("", "/") \
            and not u.query
    except (httpx.InvalidURL, TypeError):
        ok = False
    if not ok:
        raise ApiError(400, f"'url' must be the agent's base URL http(s)://host:port, got {url!r}", "invalid_url",
                       "url")
    return url.rstrip("/")


class Membership:
    """Agents joining, heartbeating and leaving the gateway on their own (see the module's docstring). Runs on the
    gateway's event loop; one join or leave at a time."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.boots: dict[str, str] = {}  # node -> boot_id of its agent's last join
        self._lock = asyncio.Lock()

    def _authorize(self, node: str, token: str) -> AgentRef | None:
        """The node's listed agent if `token` is its token; None for an unknown node bearing a listed token."""
        ref = self.gateway.agents.get(node)
        if ref is not None:
            if _same(token, ref.token):
                return ref
        elif any(_same(token, a.token) for a in self.gateway.agents.values()):
            return None
        raise ApiError(401, f"missing or wrong agent token for node {node!r}", "invalid_agent_token")

    def _set_url(self, node: str, url: str) -> None:
        gw = self.gateway
        ref = dataclasses.replace(gw.agents[node], url=url)
        gw.agents[node] = ref  # the AgentClient reads this mapping
        gw.config.agents = [ref if a.name == node else a for a in gw.config.agents]  # the health loop reads this

    async def join(self, node: str, url: str, boot_id: str, token: str) -> dict[str, Any]:
        """Admit (or refresh) `node`'s agent at `url`; see the module's docstring."""
        gw = self.gateway
        if gw.state is None:
            raise ApiError(503, "the gateway has not started", "not_started")
        async with self._lock:
            ref = self._authorize(node, token)
            if ref is None:
                await self._add(node, url, token)
                how = "new"
            else:
                ns = gw.state.nodes[node]
                moved = ref.url != url
                restarted = node in self.boots and self.boots[node] != boot_id
                how = "moved" if moved else "restarted" if restarted else "heartbeat" if node in self.boots else "new"
                if (moved or restarted) and ns.up:
                    # the old agent's engines are gone (or unreachable at the old address): drop its instances
                    gw._node_down(node, f"its agent {how} ({url})")
                if moved:
                    self._set_url(node, url)
                if not ns.up:
                    await gw.check_agent(node)  # up now, not at the next health check
            self.boots[node] = boot_id
            up = gw.state.nodes[node].up
            if how != "heartbeat":
                log.warning("node %s joined (%s) at %s: %s", node, how, url, "up" if up else "down")
            return {"node": node, "url": url, "state": "up" if up else "down", "joined": how}

    async def _add(self, node: str, url: str, token: str) -> None:
        """A node the gateway did not know: read its agent's /status, add it to the mirror and the health loop."""
        gw = self.gateway
        state = gw._state()
        c = gw.config
        gw.agents[node] = AgentRef(node, url, token)  # the AgentClient reads this mapping
        try:
            st = await gw._agents.status(node, report_unreachable=False)
            if st is None:
                raise ApiError(502, f"the gateway cannot read /status of agent {node!r} at {url}",
                               "agent_unreachable")
            if st.get("node") != node:
                raise ApiError(400, f"the agent at {url} is node {st.get('node')!r}, not {node!r}", "node_mismatch",
                               "node")
            report = node_report(node, st, c.nominal_gpu, c.engine.max_num_seqs, c.price_per_hour(node),
                                 gw._paced_store)
            check_budgets({node: report}, list(c.models.values()))
        except ValueError as e:  # a malformed description, or a budget no model fits (ConfigError)
            gw.agents.pop(node, None)
            raise ApiError(400, f"node {node!r} cannot join: {e}", "invalid_node") from None
        except BaseException:
            gw.agents.pop(node, None)
            raise
        state.nodes[node] = ns = NodeState(report.spec, state.engine)
        state.cluster = dataclasses.replace(state.cluster, nodes=(*state.cluster.nodes, report.spec))
        gw._health_misses[node] = 0
        gw._max_num_seqs[node] = report.max_num_seqs
        gw.engine_kinds[node] = report.engine_kind
        gw.config.agents = [*gw.config.agents, gw.agents[node]]
        gw._sync_tiers(ns, st)
        for inst in st.get("instances", []):  # engines the gateway never started: orphans of an earlier gateway
            if isinstance(inst, dict) and isinstance(inst.get("id"), str):
                gw._spawn(gw._quiet_unload(node, inst["id"]))

    async def leave(self, node: str, boot_id: str, token: str) -> dict[str, Any]:
        """Mark `node` down now: its agent is stopping (see the module's docstring)."""
        gw = self.gateway
        if gw.state is None:
            raise ApiError(503, "the gateway has not started", "not_started")
        async with self._lock:
            if self._authorize(node, token) is None:  # checked first: a wrong token learns nothing of the nodes
                raise ApiError(404, f"no node {node!r}", "unknown_node", "node")
            last = self.boots.get(node)
            if last is not None and last != boot_id:
                raise ApiError(409, f"node {node!r} re-joined since (boot {last}); this leave is stale", "stale_leave")
            gw._node_down(node, "its agent left")
            return {"node": node, "state": "down"}


def agent_routes(gateway: Gateway) -> list[Route]:
    """POST /agents/join and /agents/leave (authenticated by the agent token, not by an API key)."""
    members = Membership(gateway)

    async def parsed(request: Request) -> dict[str, Any]:
        return parse_body(await read_body(request, MAX_JOIN_BODY_BYTES))

    def node_of(body: Mapping[str, Any]) -> str:
        node = _field(body, "node")
        if not NODE_NAME.fullmatch(node):
            raise ApiError(400, f"'node' must match {NODE_NAME.pattern}, got {node!r}", "invalid_field", "node")
        return node

    async def join(request: Request) -> Response:
        try:
            body = await parsed(request)
            out = await members.join(node_of(body), _agent_url(_field(body, "url")), _field(body, "boot_id"),
                                     bearer(request))
            return JSONResponse(out)
        except ApiError as e:
            return e.response()

    async def leave(request: Request) -> Response:
        try:
            body = await parsed(request)
            return JSONResponse(await members.leave(node_of(body), _field(body, "boot_id", required=False),
                                                    bearer(request)))
        except ApiError as e:
            return e.response()

    return [Route("/agents/join", join, methods=["POST"]), Route("/agents/leave", leave, methods=["POST"])]


# --------------------------------------------------------------------------- OpenAPI (merged by live.gateway_openapi)

AGENT_TOKEN_SCHEME = "agentToken"
OPENAPI_SECURITY = {AGENT_TOKEN_SCHEME: {
    "type": "http", "scheme": "bearer",
    "description": "The agent token: the one the gateway drives the node with (a node it does not list: a listed "
                   "node's)."}}
_ERROR_TEXT = {
    400: "A bad field (`invalid_field`, `invalid_url`, `invalid_json`; `param` names it), or a node whose /status "
         "the gateway cannot plan with (`invalid_node`, `node_mismatch`).",
    401: "Missing or wrong agent token (`invalid_agent_token`).",
    404: "No such node (`unknown_node`).",
    409: "A leave of an earlier run of the agent (`stale_leave`).",
    413: "The body is over 16 KiB.",
    500: "Internal error.",
    502: "The gateway cannot read the joining agent's /status at its URL (`agent_unreachable`).",
    503: "The gateway has not started (`not_started`).",
}


def openapi_paths() -> dict[str, Any]:
    """The OpenAPI 3.1 paths of POST /agents/join and /agents/leave."""
    def errors(*statuses: int) -> dict[str, Any]:
        return {str(s): {"description": _ERROR_TEXT[s], "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/Error"}}}} for s in statuses}

    def body(*required: str) -> dict[str, Any]:
        props = {"node": {"type": "string", "pattern": f"^{NODE_NAME.pattern}$"},
                 "url": {"type": "string", "description": "The agent's base URL, http(s)://host:port, as the "
                                                          "gateway reaches it (its --advertise-host)."},
                 "boot_id": {"type": "string", "description": "This run of the agent."}}
        return {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": list(required), "properties": {k: props[k] for k in props
                                                                          if k in required or k == "boot_id"}}}}}

    def answer(what: str, props: dict[str, Any]) -> dict[str, Any]:
        return {"description": what, "content": {"application/json": {"schema": {
            "type": "object", "required": list(props), "properties": props}}}}

    state = {"enum": ["up", "down"]}
    security = [{AGENT_TOKEN_SCHEME: []}]
    return {
        "/agents/join": {"post": {
            "operationId": "agentJoin", "summary": "A node agent joins (or heartbeats); `live.gateway_agents`",
            "security": security, "requestBody": body("node", "url", "boot_id"),
            "responses": {"200": answer("Joined.", {"node": {"type": "string"}, "url": {"type": "string"},
                                                    "state": state,
                                                    "joined": {"enum": ["new", "restarted", "moved", "heartbeat"]}}),
                          **errors(400, 401, 413, 500, 502, 503)}}},
        "/agents/leave": {"post": {
            "operationId": "agentLeave", "summary": "A node agent leaves: its node is marked down at once",
            "security": security, "requestBody": body("node"),
            "responses": {"200": answer("Marked down.", {"node": {"type": "string"}, "state": state}),
                          **errors(400, 401, 404, 409, 413, 500, 503)}}},
    }
