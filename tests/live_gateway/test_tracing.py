"""OpenTelemetry traces through a real gateway, a real agent and a real CPU engine on loopback, exported to the
SDK's `InMemorySpanExporter`: the span tree of a cold and of a warm request, one trace across gateway and agent
(W3C traceparent on the gateway's /load call), and the no-op path when tracing is off."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("opentelemetry.sdk")
import uvicorn
from opentelemetry.sdk.trace import ReadableSpan

from live import tracing
from live.agent import AgentConfig, NodeAgent, TierConfig
from live.agent import create_app as agent_app
from live.engines.base import free_port
from live.gateway import AgentRef, Gateway, GatewayConfig
from live.tracing import TracingConfig
from tests.live_gateway.conftest import (
    AGENT_TOKEN,
    KEYS,
    MODEL,
    GatewayServer,
    publish_tiny,
    serving,
    wait_healthy,
)

ALICE = {"Authorization": "Bearer sk-alice"}
ROOT = "POST /v1/chat/completions"


@contextlib.contextmanager
def agent_in_thread(tmp: Path, store_url: str) -> Iterator[tuple[str, Any]]:
    """A real agent (uvicorn in a thread, its engines real processes) tracing into memory: (url, exporter)."""
    port = free_port()
    config = AgentConfig(node="n0", port=port, token=AGENT_TOKEN, stores=[store_url], host_dir=tmp / "host",
                         tiers={"dram": TierConfig("dram", tmp / "dram", 1 << 30)}, tracing=TracingConfig("memory"))
    app = agent_app(NodeAgent(config))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url)
        yield url, app.state.tracing.exporter
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayServer, Any, Any]]:
    """(gateway server, the gateway's span exporter, the agent's span exporter)."""
    tmp = tmp_path_factory.mktemp("traced")
    with agent_in_thread(tmp, publish_tiny(tmp)) as (url, agent_spans):
        gw = Gateway(GatewayConfig(agents=[AgentRef("n0", url, AGENT_TOKEN)], tenants=KEYS,
                                   tracing={"exporter": "memory"}))
        with serving(gw) as gs:
            yield gs, gw.tracing.exporter, agent_spans


def _chat(gs: GatewayServer) -> httpx.Response:
    r = httpx.post(gs.url + "/v1/chat/completions", headers=ALICE, timeout=120,
                   json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 200, r.text
    return r


def _tree(spans: list[ReadableSpan], trace_id: int) -> dict[int | None, list[ReadableSpan]]:
    """Children by parent span id (None: the roots) of the spans of one trace."""
    out: dict[int | None, list[ReadableSpan]] = {}
    for s in spans:
        if s.context.trace_id == trace_id:
            out.setdefault(s.parent.span_id if s.parent else None, []).append(s)
    return out


def _names(tree: dict[int | None, list[ReadableSpan]], parent: ReadableSpan) -> list[str]:
    return sorted(s.name for s in tree.get(parent.context.span_id, []))


def test_a_cold_request_is_one_trace_across_gateway_and_agent(traced: tuple[GatewayServer, Any, Any]) -> None:
    gs, gw_spans, agent_spans = traced
    _chat(gs)
    roots = [s for s in gw_spans.get_finished_spans() if s.name == ROOT]
    assert len(roots) == 1 and roots[0].parent is None
    root = roots[0]
    spans = [*gw_spans.get_finished_spans(), *agent_spans.get_finished_spans()]
    tree = _tree(spans, root.context.trace_id)
    assert _names(tree, root) == ["auth", "engine", "placement"]
    (placement,) = [s for s in tree[root.context.span_id] if s.name == "placement"]
    assert placement.attributes["tierlab.cold_start"] is True and placement.attributes["tierlab.model"] == MODEL
    assert _names(tree, placement) == ["agent POST /load", "cold_start", "queue"]
    (cold,) = [s for s in tree[placement.context.span_id] if s.name == "cold_start"]
    assert {"fetch", "engine_init"} <= set(_names(tree, cold)) and cold.attributes["source_tier"] == "cloud"
    # the agent continued the trace: its /load span is the child of the gateway's client span
    (client,) = [s for s in tree[placement.context.span_id] if s.name == "agent POST /load"]
    (load,) = tree[client.context.span_id]
    assert load.name == "POST /load" and load.resource.attributes["service.name"] == "tierlab-agent"
    assert load.context.trace_id == root.context.trace_id
    assert _names(tree, load) == ["engine_init", "fetch"]
    (hop,) = [s for s in tree[load.context.span_id] if s.name == "fetch"]
    assert (hop.attributes["from_tier"], hop.attributes["to_tier"]) == ("cloud", "host")
    (init,) = [s for s in tree[load.context.span_id] if s.name == "engine_init"]
    assert _names(tree, init) == ["engine_start"]
    # nesting in time: the agent's load lies within the gateway's call, the call within the placement
    assert placement.start_time <= client.start_time <= load.start_time <= load.end_time <= client.end_time
    assert client.end_time <= placement.end_time <= root.end_time


def test_a_warm_request_has_its_own_trace_without_a_cold_start(traced: tuple[GatewayServer, Any, Any]) -> None:
    gs, gw_spans, agent_spans = traced
    _chat(gs)  # cold the first time this module runs it alone; warm after
    gw_spans.clear()
    agent_spans.clear()
    _chat(gs)
    spans = gw_spans.get_finished_spans()
    (root,) = [s for s in spans if s.name == ROOT]
    tree = _tree(list(spans), root.context.trace_id)
    (placement,) = [s for s in tree[root.context.span_id] if s.name == "placement"]
    assert _names(tree, placement) == ["queue"] and placement.attributes["tierlab.cold_start"] is False
    assert all(s.context.trace_id != root.context.trace_id for s in agent_spans.get_finished_spans())


def test_a_client_traceparent_is_continued(traced: tuple[GatewayServer, Any, Any]) -> None:
    gs, gw_spans, _ = traced
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    r = httpx.post(gs.url + "/v1/chat/completions", timeout=60,
                   headers={**ALICE, "traceparent": f"00-{trace_id}-{parent}-01"},
                   json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 200
    (root,) = [s for s in gw_spans.get_finished_spans() if s.context.trace_id == int(trace_id, 16)
               and s.name == ROOT]
    assert root.parent is not None and root.parent.span_id == int(parent, 16)


def test_tracing_off_creates_no_spans() -> None:
    off = tracing.Tracing(None, "x")
    assert not off.enabled and off.exporter is None
    assert off.server("r") is tracing.span("s") is tracing.span("t", client=True)  # the one shared no-op
    assert tracing.inject({"a": "b"}) == {"a": "b"} and not tracing.active()
    with pytest.raises(ValueError, match="exporter"):
        TracingConfig("jaeger")
    with pytest.raises(ValueError, match="unknown key"):
        TracingConfig.of({"exporter": "console", "sampler": 1})
