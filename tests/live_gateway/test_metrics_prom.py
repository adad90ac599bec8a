"""/metrics of a real gateway and of its real agents after real requests, parsed with Prometheus' own parser
(`prometheus_client.parser`): the gateway's counts equal its records, the agents' occupancy their /status."""

from __future__ import annotations

import math

import httpx
import pytest

from tests.live_gateway import prom
from tests.live_gateway.conftest import AGENT_TOKEN, MODEL, OTHER, GatewayServer

ALICE = {"Authorization": "Bearer sk-alice"}


def _traffic(gs: GatewayServer) -> None:
    for stream in (False, True, False):
        r = httpx.post(gs.url + "/v1/chat/completions", headers=ALICE, timeout=120,
                       json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                             "stream": stream})
        assert r.status_code == 200
    for model in (OTHER, "not-in-the-catalog"):  # another tenant's model; one outside the catalog ("_unknown")
        assert httpx.post(gs.url + "/v1/completions", headers=ALICE, json={"model": model, "prompt": "x"}
                          ).status_code in (403, 404)
    assert httpx.post(gs.url + "/v1/completions", headers={"Authorization": "Bearer no"},
                      json={"model": MODEL, "prompt": "x"}).status_code == 401


def test_gateway_metrics_equal_its_records(gateway_server: GatewayServer) -> None:
    gs = gateway_server
    _traffic(gs)
    r = httpx.get(gs.url + "/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    fams = prom.parse(r.text)
    df = gs.gateway.records()
    for (model, tenant, outcome), n in df.groupby(["model", "tenant", "outcome"]).size().items():
        model = model if model in (MODEL, OTHER) else "_unknown"
        assert prom.value(fams, "tierlab_requests_total", model=model, tenant=tenant, outcome=outcome) == n
    assert prom.total(fams, "tierlab_requests_total") == len(df)
    done = df[(df["outcome"] == "completed") & (df["model"] == MODEL)]
    assert prom.value(fams, "tierlab_tokens_total", model=MODEL, tenant="alice", kind="output") == \
        done["output_tokens"].sum()
    assert prom.value(fams, "tierlab_ttft_seconds_count", model=MODEL) == df["ttft_s"].notna().sum()
    assert prom.value(fams, "tierlab_ttft_seconds_sum", model=MODEL) == pytest.approx(df["ttft_s"].sum())
    cold = df[df["cold_start"]]
    assert len(cold) >= 1
    for tier, rows in cold.groupby("source_tier"):
        assert prom.value(fams, "tierlab_cold_start_requests_total", model=MODEL, source_tier=tier) == len(rows)
        for phase, col in (("fetch", "fetch_s"), ("engine_init", "engine_init_s"), ("wait", "cold_start_s")):
            assert prom.value(fams, "tierlab_cold_start_phase_seconds_count", source_tier=tier,
                              phase=phase) == rows[col].notna().sum()
    events = gs.gateway.instance_events()
    started = events[(events["event"] == "loading") & (events["source_tier"] != "gpu")]
    assert prom.total(fams, "tierlab_cold_starts_total") == len(started) >= 1
    # cost: the records' rule, summed per model and tenant (instances keep running: a little more by now)
    usd = done["cost_usd"].sum()
    assert usd > 0 and prom.value(fams, "tierlab_cost_usd", model=MODEL, tenant="alice") == pytest.approx(usd, rel=0.05)
    tokens = (done["prompt_tokens"] + done["output_tokens"]).sum()
    assert prom.value(fams, "tierlab_cost_per_1k_tokens_usd", model=MODEL, tenant="alice") == pytest.approx(
        usd / tokens * 1000, rel=0.05)
    assert prom.value(fams, "tierlab_model_instances", model=MODEL, status="ready") == 1
    assert prom.total(fams, "tierlab_model_queue_depth") == 0 == prom.value(fams, "tierlab_queue_depth")


def test_agent_metrics_equal_its_status(gateway_server: GatewayServer) -> None:
    gs = gateway_server
    _traffic(gs)
    auth = {"Authorization": f"Bearer {AGENT_TOKEN}"}
    df = gs.gateway.records()
    node = df.loc[df["outcome"] == "completed", "node"].iloc[-1]  # the node that served
    url = gs.gateway.agents[node].url
    assert httpx.get(url + "/metrics").status_code == 401  # the control API's token, as every endpoint but /healthz
    fams = prom.parse(httpx.get(url + "/metrics", headers=auth).text)
    status = httpx.get(url + "/status", headers=auth).json()
    for tier, t in status["tiers"].items():
        assert prom.value(fams, "tierlab_agent_tier_capacity_bytes", node=node, tier=tier) == t["capacity_bytes"]
        assert prom.value(fams, "tierlab_agent_tier_models", node=node, tier=tier) == len(t["models"])
        assert prom.value(fams, "tierlab_agent_tier_used_bytes", node=node, tier=tier) >= 0
    assert prom.value(fams, "tierlab_agent_host_used_bytes", node=node) == pytest.approx(
        status["host"]["used_bytes"], rel=0.01)
    ready = sum(1 for i in status["instances"] if i["status"] == "ready")
    assert prom.value(fams, "tierlab_agent_instances", node=node, model=MODEL, status="ready") == ready >= 1
    loads = prom.total(fams, "tierlab_agent_loads_total", node=node)
    assert loads >= ready and prom.total(fams, "tierlab_agent_load_phase_seconds_count", phase="ready") == loads
    assert prom.total(fams, "tierlab_agent_load_phase_seconds_count", phase="fetch") >= 1
    assert prom.value(fams, "tierlab_agent_transfers_in_flight", node=node) == 0
    assert not math.isnan(prom.total(fams, "tierlab_agent_link_bandwidth_in_use_bytes_per_second"))
