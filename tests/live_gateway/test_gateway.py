"""The gateway end to end: real agents, real CPU engines, the real `openai` client."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import numpy as np
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
from tests.live_gateway import prom
from tests.live_gateway.conftest import ADMIN_TOKEN, KEYS, MODEL, OTHER, GatewayServer


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
    # phases: CPU engines have no GPU copy; a stream with two tokens or more has a TPOT, a whole answer none
    assert df["to_gpu_s"].isna().all() and df["prefill_s"].isna().all()
    assert df["tpot_s"].iloc[:2].isna().all()
    streams = df.iloc[2:]
    measurable = streams["output_tokens"] >= 2
    # (>= 0, not > 0: on a loaded machine the tiny model's tokens can reach the gateway in one read)
    assert (streams["tpot_s"][measurable] >= 0).all() and streams["tpot_s"][~measurable].isna().all()
    # TPOT runs from the first to the last token's chunk (not to the end of the request, which the finish and
    # usage chunks and [DONE] close later), so it is at most (e2e - ttft) / (tokens - 1)
    upper = (streams["e2e_s"] - streams["ttft_s"]) / (streams["output_tokens"] - 1)
    assert (streams["tpot_s"][measurable] <= upper[measurable] + 1e-9).all()
    assert list(df["outcome"]) == ["completed"] * 4
    assert list(df["source_tier"]) == ["cloud", "gpu", "gpu", "gpu"]
    assert list(df["cold_start"]) == [True, False, False, False]
    cold = df.iloc[0]
    assert cold["fetch_s"] > 0 and cold["engine_init_s"] > 0 and cold["cold_start_s"] > 0
    assert (df["ttft_s"] > 0).all() and (df["e2e_s"] >= df["ttft_s"]).all()
    assert (df["output_tokens"] >= 1).all()
    assert df["instance"].nunique() == 1 and df["node"].iloc[0] in ("n0", "n1")
    assert (df["tenant"] == "alice").all()

    # cost: the instance's GPU-equivalents x node $/h x its lifetime so far, split by tokens (all 4 rows are its)
    gw = gs.gateway
    inst = gw.state.instances[cold["instance"]]
    share = inst.gpu_bytes / gw.config.nominal_gpu.mem_bytes
    before = gw.clock.now
    costs = gw.records()["cost_usd"]
    after = gw.clock.now
    per_s = gw.config.price_per_hour(inst.node) * share / 3600
    assert (costs > 0).all()
    low, high = per_s * (before - inst.started_s), per_s * (after - inst.started_s)
    assert low * (1 - 1e-9) <= costs.sum() <= high * (1 + 1e-9)
    tokens = df["prompt_tokens"] + df["output_tokens"]
    assert np.allclose(costs / costs.sum(), tokens / tokens.sum())

    # the mirror holds what the node's tiers hold (a cloud load lands in host memory, or in the slowest tier
    # with agents that stage it there)
    node = gs.gateway.state.nodes[cold["node"]]
    agent = gs.gateway.agents[cold["node"]]
    status = httpx.get(agent.url + "/status", headers={"Authorization": f"Bearer {agent.token}"}).json()
    for tier, t in status["tiers"].items():
        assert set(node.tiers[tier].entries) == set(t["models"])

    fams = prom.parse(httpx.get(gs.url + "/metrics").text)
    assert prom.value(fams, "tierlab_requests_total", model=MODEL, tenant="alice", outcome="completed") == 4
    assert prom.value(fams, "tierlab_cold_starts_total", model=MODEL, source_tier="cloud") == 1
    assert prom.value(fams, "tierlab_ttft_seconds_count", model=MODEL) == 4
    assert prom.value(fams, "tierlab_instances", status="ready") == 1


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
    # from the local copy if the first load left one in a tier, else from the cloud again
    local = gw.state.nodes[inst.node].local_source(MODEL)
    assert row["source_tier"] == local and row["node"] == inst.node and row["instance"] != inst.id
    assert inst.id not in gw.state.instances
    expected = 1 if local != "cloud" else 2
    fams = prom.parse(httpx.get(gateway_server.url + "/metrics").text)
    assert prom.value(fams, "tierlab_cold_starts_total", model=MODEL, source_tier=local) == expected


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
    assert prom.total(prom.parse(gw.metrics_text()), "tierlab_requests_total", outcome="rejected") == 1


def test_rejects_are_recorded_with_their_request_id(gateway_server: GatewayServer) -> None:
    gw, url = gateway_server.gateway, gateway_server.url
    alice = {"Authorization": "Bearer sk-alice"}
    cases = [  # (headers, body, status, reason, tenant, model)
        ({}, {"model": MODEL, "prompt": "x"}, 401, "invalid_api_key", "", ""),
        ({"Authorization": "Bearer sk-nope"}, {"model": MODEL, "prompt": "x"}, 401, "invalid_api_key", "", ""),
        (alice, b"{oops", 400, "invalid_json", "alice", ""),
        (alice, {"model": MODEL, "prompt": "x", "max_tokens": -3}, 400, "invalid_value", "alice", MODEL),
        (alice, {"model": "../etc", "prompt": "x"}, 400, "invalid_model_name", "alice", "../etc"),
        (alice, {"model": "nope", "prompt": "x"}, 404, "model_not_found", "alice", "nope"),
        ({"Authorization": "Bearer sk-bob"}, {"model": MODEL, "prompt": "x"}, 403, "model_not_allowed", "bob", MODEL),
    ]
    ids = []
    for headers, body, status, reason, _, _ in cases:
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = httpx.post(url + "/v1/completions", headers=headers, **kw)
        assert r.status_code == status and r.json()["error"]["code"] == reason
        ids.append(int(r.headers["x-tierlab-request-id"]))
    assert len(set(ids)) == len(ids)
    df = gw.records().set_index("request_id")
    for rid, (_, _, _, reason, tenant, model) in zip(ids, cases, strict=True):
        row = df.loc[rid]
        assert (row["outcome"], row["reason"], row["tenant"], row["model"]) == ("rejected", reason, tenant, model)
        assert row["cost_usd"] == 0 and row["node"] == "" and not row["cold_start"]


def test_completion_header_joins_the_record(gateway_server: GatewayServer) -> None:
    raw = _client(gateway_server).completions.with_raw_response.create(model=MODEL, prompt="join", max_tokens=2)
    rid = int(raw.headers["x-tierlab-request-id"])
    out = raw.parse()
    row = _records(gateway_server.gateway, rid).set_index("request_id").loc[rid]
    assert row["outcome"] == "completed" and row["output_tokens"] == out.usage.completion_tokens
    with httpx.stream("POST", gateway_server.url + "/v1/chat/completions", headers={"Authorization": "Bearer sk-alice"},
                      json={"model": MODEL, "messages": [{"role": "user", "content": "s"}], "max_tokens": 2,
                            "stream": True}) as r:
        rid = int(r.headers["x-tierlab-request-id"])
        body = r.read()
    assert body.rstrip().endswith(b"data: [DONE]")
    deadline = time.monotonic() + 5
    while rid not in set(gateway_server.gateway.records()["request_id"]) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert gateway_server.gateway.records().set_index("request_id").loc[rid, "outcome"] == "completed"


def test_admin_records_needs_the_admin_token(gateway_server: GatewayServer) -> None:
    url = gateway_server.url + "/admin/records"
    for headers in ({}, {"Authorization": "Bearer sk-alice"}, {"Authorization": "Bearer admin-secre"}):
        r = httpx.get(url, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_admin_token"
    r = httpx.get(url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert r.status_code == 200
    data = r.json()
    df = gateway_server.gateway.records()
    assert data["columns"] == list(REQUEST_SCHEMA)
    assert len(data["rows"]) >= 1 and all(len(row) == len(REQUEST_SCHEMA) for row in data["rows"])
    got = pd.DataFrame(data["rows"], columns=data["columns"])
    same = df.iloc[: len(got)]
    assert list(got["request_id"]) == list(same["request_id"])
    assert list(got["outcome"]) == list(same["outcome"]) and list(got["reason"]) == list(same["reason"])
    # NaN travels as null (JSON has no NaN); numbers as numbers
    assert got["to_gpu_s"].isna().all()
    assert np.allclose(got["e2e_s"].astype(float), same["e2e_s"])


def test_metrics_parse_as_prometheus_text(gateway_server: GatewayServer) -> None:
    text = httpx.get(gateway_server.url + "/metrics").text
    fams = prom.parse(text)
    assert {"tierlab_ttft_seconds", "tierlab_tpot_seconds"} <= {n for n, f in fams.items() if f.type == "histogram"}
    assert fams["tierlab_requests"].type == "counter"
    for gauge in ("tierlab_queue_depth", "tierlab_loads_in_flight", "tierlab_agents", "tierlab_agent_up",
                  "tierlab_instances"):
        assert fams[gauge].type == "gauge"
    df = gateway_server.gateway.records()
    for outcome in ("completed", "rejected", "failed"):
        assert prom.total(fams, "tierlab_requests_total", outcome=outcome) == (df["outcome"] == outcome).sum()
    assert prom.value(fams, "tierlab_agents", state="up") == 2 and prom.value(fams, "tierlab_agents", state="down") == 0
    assert prom.value(fams, "tierlab_agent_up", node="n0") == 1
    assert prom.value(fams, "tierlab_queue_depth") == 0 and prom.value(fams, "tierlab_loads_in_flight") == 0
    assert prom.total(fams, "tierlab_tpot_seconds_count") == df["tpot_s"].notna().sum() >= 1


def test_write_records(gateway_server: GatewayServer, tmp_path: Path) -> None:
    gw = gateway_server.gateway
    path = gw.write_records(tmp_path / "run")
    assert path == tmp_path / "run" / "records.parquet"
    back = pd.read_parquet(path)
    now = gw.records()
    assert list(back.columns) == list(REQUEST_SCHEMA) and len(back) <= len(now)
    assert list(back["request_id"]) == list(now["request_id"].iloc[: len(back)])
    assert [p.name for p in path.parent.iterdir()] == ["records.parquet"]  # no temp file left behind
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(NotADirectoryError, match=str(blocker)):
        gw.write_records(blocker)
