"""The gateway end to end: real agents, real CPU engines, the real `openai` client."""

from __future__ import annotations

import os
import signal
import time

import httpx
import openai
import pandas as pd
import pytest
from starlette.testclient import TestClient

from core.decisions import Decision, Queue, Reject
from core.policies.autoscaling import KeepAlive
from core.policies.base import PolicyBundle
from core.policies.caching import NoCaching
from core.records import REQUEST_SCHEMA
from live.gateway import Gateway, GatewayConfig, create_app
from tests.live_gateway.conftest import KEYS, MODEL, OTHER, GatewayServer


def _client(gs: GatewayServer, key: str = "sk-alice") -> openai.OpenAI:
    return openai.OpenAI(base_url=gs.url + "/v1", api_key=key, max_retries=0, timeout=120)


def _records(gw: Gateway, n: int) -> pd.DataFrame:
    """The records once `n` rows are in (a stream's row lands just after the client read its last byte)."""
    deadline = time.monotonic() + 5
    while len(gw.records()) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    return gw.records()


def test_cold_then_warm_then_stream(gateway_server: GatewayServer) -> None:
    gs = gateway_server
    client = _client(gs)
    first = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert first.choices[0].message.role == "assistant"
    assert first.usage is not None and first.usage.completion_tokens >= 1
    second = client.completions.create(model=MODEL, prompt="hello", max_tokens=4)
    assert second.choices[0].text is not None

    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "go"}],
                                                 max_tokens=5, stream=True))
    assert chunks and chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert isinstance(text, str)
    legacy = list(client.completions.create(model=MODEL, prompt="a", max_tokens=3, stream=True))
    assert legacy[-1].choices[0].finish_reason in ("length", "stop")

    df = _records(gs.gateway, 4)
    assert list(df.columns) == list(REQUEST_SCHEMA)
    assert len(df) == 4
    assert list(df["outcome"]) == ["completed"] * 4
    assert list(df["source_tier"]) == ["cloud", "gpu", "gpu", "gpu"]
    assert list(df["cold_start"]) == [True, False, False, False]
    cold = df.iloc[0]
    assert cold["fetch_s"] > 0 and cold["engine_init_s"] > 0 and cold["cold_start_s"] > 0
    assert (df["ttft_s"] > 0).all() and (df["e2e_s"] >= df["ttft_s"]).all()
    assert (df["output_tokens"] >= 1).all()
    assert df["instance"].nunique() == 1 and df["node"].iloc[0] in ("n0", "n1")
    assert (df["tenant"] == "alice").all()

    # the mirror saw the cloud fetch land in the node's slowest tier
    node = gs.gateway.state.nodes[cold["node"]]
    assert node.tiers["sata"].holds(MODEL)

    metrics = httpx.get(gs.url + "/metrics").text
    assert 'tierlab_requests_total{outcome="completed"} 4' in metrics
    assert 'tierlab_cold_starts_total{source_tier="cloud"} 1' in metrics
    assert "tierlab_ttft_seconds_count 4" in metrics
    assert 'tierlab_instances{status="ready"} 1' in metrics


def test_models_filtered_by_tenant(gateway_server: GatewayServer) -> None:
    assert [m.id for m in _client(gateway_server).models.list()] == [MODEL]
    assert [m.id for m in _client(gateway_server, "sk-bob").models.list()] == [OTHER]


def test_auth_errors(gateway_server: GatewayServer) -> None:
    with pytest.raises(openai.AuthenticationError) as e:
        _client(gateway_server, "sk-wrong").completions.create(model=MODEL, prompt="x", max_tokens=1)
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    r = httpx.post(gateway_server.url + "/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.get(gateway_server.url + "/v1/models")
    assert r.status_code == 401
    with pytest.raises(openai.PermissionDeniedError) as e:
        _client(gateway_server, "sk-bob").completions.create(model=MODEL, prompt="x", max_tokens=1)
    assert e.value.status_code == 403 and e.value.code == "model_not_allowed"
    with pytest.raises(openai.NotFoundError) as e:
        _client(gateway_server).completions.create(model="nope", prompt="x", max_tokens=1)
    assert e.value.status_code == 404 and e.value.code == "model_not_found"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", "invalid_json"),
        (b"[1]", "invalid_json"),
        (b'{"prompt": "x"}', "missing_required_parameter"),
        (b'{"model": "tiny"}', "missing_required_parameter"),
        (b'{"model": "tiny", "prompt": "x", "max_tokens": -1}', "invalid_value"),
        (b'{"model": "../tiny", "prompt": "x"}', "invalid_model_name"),
        (b'{"model": "org/tiny", "prompt": "x"}', "invalid_model_name"),
    ],
)
def test_bad_requests(gateway_server: GatewayServer, body: bytes, code: str) -> None:
    r = httpx.post(gateway_server.url + "/v1/completions", content=body,
                   headers={"Authorization": "Bearer sk-alice", "Content-Type": "application/json"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == code and err["type"] == "invalid_request_error"
    assert set(err) == {"message", "type", "param", "code"}


def test_healthz(gateway_server: GatewayServer) -> None:
    assert httpx.get(gateway_server.url + "/healthz").json() == {"ok": True, "started": True}


def test_engine_death_retries_on_a_new_instance(gateway_server: GatewayServer) -> None:
    """An engine that is gone before the first byte: the gateway retires it and cold-starts from the local copy."""
    gw = gateway_server.gateway
    before = len(gw.records())
    (inst,) = [i for i in gw.state.instances.values() if i.ready]
    agent = gw.agents[inst.node]
    status = httpx.get(agent.url + "/status", headers={"Authorization": f"Bearer {agent.token}"}).json()
    (engine,) = [i for i in status["instances"] if i["id"] == gw.live[inst.id].agent_instance]
    os.kill(engine["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # wait until the port refuses connections
        try:
            httpx.get(engine["url"] + "/ping", timeout=0.5)
        except httpx.TransportError:
            break
        time.sleep(0.05)

    out = _client(gateway_server).completions.create(model=MODEL, prompt="again", max_tokens=2)
    assert out.choices[0].text is not None
    row = _records(gw, before + 1).iloc[before]
    assert row["outcome"] == "completed" and row["cold_start"]
    assert row["source_tier"] == "sata" and row["node"] == inst.node and row["instance"] != inst.id
    assert inst.id not in gw.state.instances
    assert 'tierlab_cold_starts_total{source_tier="sata"} 1' in httpx.get(gateway_server.url + "/metrics").text


class _Fixed:
    """A placement that always answers the same decision."""

    def __init__(self, decision: Decision) -> None:
        self.decision = decision

    def place(self, req: object, view: object) -> Decision:
        return self.decision


@pytest.mark.parametrize(("decision", "code"), [(Reject("test_full"), "test_full"), (Queue("test_wait"), "test_wait")])
def test_reject_and_queue_timeout(gateway_server: GatewayServer, decision: Decision, code: str) -> None:
    config = GatewayConfig(agents=gateway_server.gateway.config.agents, tenants=KEYS, queue_timeout_s=0.3)
    gw = Gateway(config, PolicyBundle(_Fixed(decision), NoCaching(), KeepAlive()))
    with TestClient(create_app(gw)) as tc:
        r = tc.post("/v1/completions", json={"model": MODEL, "prompt": "x"},
                    headers={"Authorization": "Bearer sk-alice"})
    assert r.status_code == 503 and r.json()["error"]["code"] == code
    df = gw.records()
    assert list(df["outcome"]) == ["rejected"] and list(df["reason"]) == [code]
    assert 'tierlab_requests_total{outcome="rejected"} 1' in gw.metrics_text()
