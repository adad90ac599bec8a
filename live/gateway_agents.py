"""How the gateway talks to node agents: /status, /healthz and control POSTs, with connection failures told
apart from slow answers (a connection failure reports the node as unreachable at once)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from live import tracing
from live.gateway_config import AgentRef

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

    async def status(self, node: str) -> dict[str, Any] | None:
        """The agent's /status, or None (None at once for a node without an agent)."""
        agent = self.agents[node]
        if not agent.url:
            return None
        try:
            r = await self.http.get(agent.url + "/status", headers=self._headers(agent), timeout=10)
            r.raise_for_status()
            return r.json()
        except (httpx.HTTPError, ValueError) as e:
            log.warning("agent %s /status failed: %r", node, e)
            if connection_error(e):
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
