"""The gateway's parts that need no process: records and cost, SSE handling, metrics text, config checks,
placement around down nodes, and the admin endpoint's door."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from starlette.testclient import TestClient

from core.decisions import ColdStart
from core.policies.placement import RoundRobin, StartupTime, TierAware
from core.records import REQUEST_SCHEMA
from core.specs import ClusterSpec, NodeSpec, TierSpec
from core.state import CapacityError, ClusterState, ClusterView
from live import gateway_sse as sse
from live.engines.base import free_port
from live.gateway import NOMINAL_GPU, AgentRef, Gateway, GatewayConfig, create_app, nominal_model
from live.gateway_metrics import Histogram
from live.gateway_records import RequestInfo, instance_event, request_frame, request_row, tpot
from tests.live_gateway import prom
from tests.live_gateway.conftest import ADMIN_TOKEN, KEYS, MODEL, static_config


def test_tpot_is_time_after_the_first_token_per_later_token() -> None:
    # from the first token's chunk to the last token's (the argument was e2e_s until TPOT stopped counting the
    # request's tail after its last token)
    assert tpot(last_token_s=1.0, ttft_s=0.2, out_tokens=5) == pytest.approx(0.2)
    for tokens in (0, 1):
        assert math.isnan(tpot(1.0, 0.2, tokens))
    assert math.isnan(tpot(1.0, math.nan, 5))


def _cluster(price: float) -> ClusterSpec:
    tiers = {"sata": TierSpec("sata", 1e12, 1e9, 1e9)}
    return ClusterSpec(tuple(NodeSpec(n, NOMINAL_GPU, 1, 1e9, tiers, od_usd_per_hour=price) for n in ("n0", "n1")))


def test_cost_splits_each_instance_by_tokens_over_its_gpu_share_and_lifetime() -> None:
    spec = _cluster(price=3.6)  # $0.001 a second per whole GPU
    state = ClusterState(spec, [nominal_model(MODEL)], GatewayConfig([AgentRef("n0", "", "")], KEYS).engine)
    ns = state.nodes["n0"]
    _, per_gpu, kv = ns.footprint(state.models[MODEL])
    a = state.add_instance(MODEL, "n0", (0,), per_gpu, kv, "cloud", 10.0)
    b = state.add_instance(MODEL, "n0", (0,), per_gpu, kv, "cloud", 20.0)
    events = [instance_event(10.0, a, "loading"), instance_event(20.0, b, "loading"),
              instance_event(60.0, a, "stopped", "keep_alive")]
    rows = []
    for rid, (inst, tokens, outcome) in enumerate([(a, 30, "completed"), (a, 10, "completed"), (b, 5, "completed"),
                                                   (a, 99, "failed"), (None, 1, "rejected")], 1):
        r = RequestInfo(rid, MODEL, "alice", tokens, 0, 0.0, outcome=outcome,
                        instance=inst.id if inst else "", node=inst.node if inst else "")
        rows.append(request_row(r))
    df = request_frame(rows, events, spec, now_s=120.0)
    share = per_gpu / NOMINAL_GPU.mem_bytes
    a_usd, b_usd = 0.001 * share * 50, 0.001 * share * 100  # a lived 10..60 s, b 20..now (120 s)
    assert np.allclose(df["cost_usd"], [a_usd * 30 / 40, a_usd * 10 / 40, b_usd, 0.0, 0.0])
    assert list(df.columns) == list(REQUEST_SCHEMA)


def test_complete_end_keeps_partial_events_back() -> None:
    assert sse.complete_end(b"data: 1\n\ndata: 2") == len(b"data: 1\n\n")
    assert sse.complete_end(b"data: 1\r\n\r\n") == len(b"data: 1\r\n\r\n")
    assert sse.complete_end(b"data: {") == 0
    msgs = list(sse.data_messages(b'data: {"a": 1}\n\ndata: [DONE]\n\ndata: {bad\n\n: comment\n\n'))
    assert msgs == [{"a": 1}]


def test_error_event_is_openai_shaped() -> None:
    raw = sse.error_event("boom", "engine_stream_error")
    assert raw.startswith(b"data: ") and raw.endswith(b"\n\n")
    assert json.loads(raw[6:]) == {"error": {"message": "boom", "type": "server_error", "param": None,
                                             "code": "engine_stream_error"}}


def test_synthesized_chat_stream() -> None:
    answer = {"id": "c1", "created": 7, "model": "m", "usage": {"prompt_tokens": 2, "completion_tokens": 3},
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "abc"}, "finish_reason": "stop"}]}
    raw = sse.synthesize_stream(answer, chat=True, include_usage=True)
    assert raw.endswith(b"data: [DONE]\n\n") and sse.complete_end(raw) == len(raw)
    msgs = list(sse.data_messages(raw))
    assert [m["object"] for m in msgs] == ["chat.completion.chunk"] * 4
    assert msgs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert msgs[1]["choices"][0]["delta"] == {"content": "abc"}
    assert msgs[2]["choices"][0]["finish_reason"] == "stop" and msgs[3]["choices"] == []
    assert msgs[3]["usage"] == answer["usage"] and {m["id"] for m in msgs} == {"c1"}
    no_usage = list(sse.data_messages(sse.synthesize_stream(answer, chat=True, include_usage=False)))
    assert len(no_usage) == 3


def test_synthesized_completion_stream() -> None:
    answer = {"id": "x", "choices": [{"index": 0, "text": "hi", "finish_reason": "length"}], "usage": None}
    msgs = list(sse.data_messages(sse.synthesize_stream(answer, chat=False, include_usage=True)))
    assert [(m["choices"][0]["text"], m["choices"][0]["finish_reason"]) for m in msgs] == [("hi", None), ("", "length")]


def test_a_chunk_with_a_choice_is_a_token_even_with_empty_text() -> None:
    def chunk(*choices: dict[str, object], **extra: object) -> dict[str, object]:
        return {"id": "c", "choices": list(choices), **extra}

    held_back = {"index": 0, "text": "", "finish_reason": None}  # a token whose text the engine holds back
    assert sse.token_choice(chunk(held_back)) == held_back
    assert sse.token_choice(chunk({"index": 0, "delta": {"content": ""}, "finish_reason": None})) is not None
    assert sse.token_choice(chunk({"index": 0, "delta": {}, "finish_reason": "length"})) is not None
    # not tokens: a chat stream's opening role chunk (sent before any token), the usage chunk, an error
    assert sse.token_choice(chunk({"index": 0, "delta": {"role": "assistant", "content": ""},
                                   "finish_reason": None})) is None
    assert sse.token_choice(chunk(usage={"completion_tokens": 3})) is None
    assert sse.token_choice({"error": {"message": "x"}}) is None
    first = sse.token_choice(chunk({"index": 0, "delta": {"role": "assistant", "content": "hi"},
                                    "finish_reason": None}))
    assert first is not None and sse.choice_text(first) == "hi"  # an engine that sends its role with a token


def test_scan_times_the_first_and_last_token_chunks_and_takes_usage() -> None:
    from live.gateway_forward import ForwardMixin

    req = RequestInfo(1, MODEL, "t", 2, 3, 0.0)
    role = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
    ForwardMixin._scan(sse.event(role), req, t_arrival=0.0)
    assert math.isnan(req.ttft_s) and req.out_tokens == 0
    token = {"choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": None}]}
    ForwardMixin._scan(sse.event(token) * 2, req, t_arrival=0.0)
    first = req.ttft_s
    assert first == req.last_token_s and req.out_tokens == 2  # counted until the usage chunk says
    ForwardMixin._scan(sse.event({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}), req, -1.0)
    assert req.ttft_s == first < req.last_token_s and req.out_tokens == 2  # a bare finish chunk: no token
    ForwardMixin._scan(sse.event({"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 3}}), req, 0.0)
    assert (req.in_tokens, req.out_tokens) == (2, 3)


def test_histogram_counts_per_bucket_and_ignores_nan() -> None:
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.5, 5.0, math.nan):
        h.observe(v)
    assert (h.counts, h.count, h.sum) == ([1, 1, 1], 3, pytest.approx(5.55))
    assert h.cumulative() == [("0.1", 1), ("1.0", 2), ("+Inf", 3)]
    with pytest.raises(ValueError, match="increasing"):
        Histogram((1.0, 0.1))


def test_metrics_are_read_off_the_records_with_bounded_and_escaped_labels() -> None:
    gw = Gateway(static_config(('n"0\\', "n1")))
    with TestClient(create_app(gw)) as tc:
        gw.state.nodes["n1"].up = False
        done = RequestInfo(1, MODEL, "alice", 5, 3, 0.0, ttft_s=0.3, tpot_s=0.02, outcome="completed", out_tokens=3)
        failed = RequestInfo(2, MODEL, "alice", 5, 3, 0.0, outcome="failed")
        stray = RequestInfo(3, "no-such-model", "", 0, 0, 0.0, outcome="rejected")  # not in the catalog: "_unknown"
        gw._rows += [request_row(r) for r in (done, failed, stray)]
        gw.queued = 3
        fams = prom.parse(tc.get("/metrics").text)
        assert prom.value(fams, "tierlab_agent_up", node='n"0\\') == 1  # escaped in the text, read back whole
        assert prom.value(fams, "tierlab_agents", state="down") == 1
        assert prom.value(fams, "tierlab_queue_depth") == 3 and prom.value(fams, "tierlab_loads_in_flight") == 0
        assert prom.value(fams, "tierlab_requests_total", model=MODEL, tenant="alice", outcome="completed") == 1
        assert prom.value(fams, "tierlab_requests_total", model="_unknown", tenant="", outcome="rejected") == 1
        assert prom.value(fams, "tierlab_tokens_total", model=MODEL, tenant="alice", kind="output") == 3
        assert prom.value(fams, "tierlab_tpot_seconds_count", model=MODEL) == 1
        assert prom.value(fams, "tierlab_ttft_seconds_bucket", model=MODEL, le="0.5") == 1
        gw._rows.append(request_row(RequestInfo(4, MODEL, "bob", 1, 1, 0.0, outcome="failed")))
        fams = prom.parse(tc.get("/metrics").text)  # read incrementally: only the new row is added
        assert prom.total(fams, "tierlab_requests_total") == 4
        assert prom.total(fams, "tierlab_requests_total", outcome="failed") == 2


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"agents": []}, "agents"),
    ({"agents": [AgentRef("a", "", ""), AgentRef("a", "", "")]}, "agents"),
    ({"request_timeout_s": 0}, "request_timeout_s"),
    ({"health_interval_s": -1}, "health_interval_s"),
    ({"health_failures": 0}, "health_failures"),
    ({"node_price_per_hour": -1.0}, "node_price_per_hour"),
    ({"node_price_per_hour": {"zz": 1.0}}, "node_price_per_hour"),
])
def test_config_errors_name_the_field(kwargs: dict, field: str) -> None:
    args = {"agents": [AgentRef("a", "", "")], "tenants": KEYS, **kwargs}
    with pytest.raises(ValueError, match=field):
        GatewayConfig(**args)


def test_price_per_node() -> None:
    c = GatewayConfig([AgentRef("a", "", ""), AgentRef("b", "", "")], KEYS, node_price_per_hour={"a": 2.0})
    assert (c.price_per_hour("a"), c.price_per_hour("b")) == (2.0, 0.8048)


@pytest.mark.parametrize("placement", [TierAware(), RoundRobin(), StartupTime()])
def test_cold_starts_skip_down_nodes(placement: object) -> None:
    """Even where the model sits in a faster tier on the down node."""
    spec = _cluster(price=1.0)
    state = ClusterState(spec, [nominal_model(MODEL)], GatewayConfig([AgentRef("a", "", "")], KEYS).engine)
    state.nodes["n0"].tiers["sata"].reserve(MODEL, 1e9)
    state.nodes["n0"].tiers["sata"].commit(MODEL, 0.0)
    view = ClusterView(state, type("C", (), {"now": 0.0})())
    req = RequestInfo(1, MODEL, "alice", 10, 10, 0.0)
    assert placement.place(req, view) == ColdStart("n0", "cloud" if isinstance(placement, RoundRobin) else "sata")
    state.nodes["n0"].up = False
    assert placement.place(req, view) == ColdStart("n1", "cloud")
    state.nodes["n1"].up = False
    assert not isinstance(placement.place(req, view), ColdStart)


def test_admin_records_stay_shut_without_a_configured_token() -> None:
    gw = Gateway(GatewayConfig([AgentRef("s0", "", "")], KEYS))  # admin_token ""
    with TestClient(create_app(gw)) as tc:
        for auth in ("", "Bearer ", "Bearer x"):
            r = tc.get("/admin/records", headers={"Authorization": auth} if auth else {})
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_adopt_instance_checks_its_arguments() -> None:
    gw = Gateway(static_config())
    with TestClient(create_app(gw)) as tc:
        for args, match in [((MODEL, "zz", "http://x:1"), "unknown node"), (("nope", "s0", "http://x:1"),
                            "unknown model"), ((MODEL, "s0", "x:1"), "url")]:
            with pytest.raises(ValueError, match=match):
                gw.adopt_instance(*args)
        first = gw.adopt_instance(MODEL, "s0", "http://127.0.0.1:1/")
        assert gw.live[first].url == "http://127.0.0.1:1" and gw.state.instances[first].ready
        with pytest.raises(CapacityError, match="no GPU room"):
            for _ in range(100):  # the nominal GPU holds 40 nominal models (2 GB of 80 GB each), not 100
                gw.adopt_instance(MODEL, "s0", "http://127.0.0.1:1")
        r = tc.get("/admin/records", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert r.json() == {"columns": list(REQUEST_SCHEMA), "rows": []}
    events = gw.instance_events()
    assert set(events["event"]) == {"loading", "ready"} and (events["source_tier"] == "gpu").all()



def test_an_agent_down_at_start_leaves_its_node_down() -> None:
    dead = AgentRef("d0", f"http://127.0.0.1:{free_port()}", "t")  # nothing listens there
    gw = Gateway(GatewayConfig([dead, AgentRef("s0", "", "")], KEYS, health_interval_s=0))
    with TestClient(create_app(gw)) as tc:
        assert not gw.state.nodes["d0"].up and gw.state.nodes["s0"].up
        fams = prom.parse(tc.get("/metrics").text)
        assert prom.value(fams, "tierlab_agent_up", node="d0") == 0
        assert prom.value(fams, "tierlab_agents", state="up") == 1


def test_a_detached_event_is_cut_out_and_moved_streams_keep_their_id() -> None:
    raw = b'data: {"id":"a","n":1}\n\ndata: {"tierlab_detached": {"token_ids": [1], "emitted_chars": 3}}\n\n'
    kept, payload = sse.split_detached(raw)
    assert kept == b'data: {"id":"a","n":1}\n\n' and payload == {"token_ids": [1], "emitted_chars": 3}
    assert sse.split_detached(b'data: {"id":"a"}\r\n\r\n') == (b'data: {"id":"a"}\r\n\r\n', None)
    moved = sse.with_id(b'data: {"id":"b","n":2}\n\ndata: [DONE]\n\n', "a")
    assert list(sse.data_messages(moved)) == [{"id": "a", "n": 2}] and moved.endswith(b"data: [DONE]\n\n")


def test_the_gateway_freezes_what_it_made_at_start() -> None:
    """Once started, the gateway's long-lived objects are out of the collector's generations (gc.freeze): full
    collections walking them were its p99 under load (docs/results/gateway_wire.md)."""
    import gc

    gc.unfreeze()
    gateway = Gateway(static_config())
    assert gc.get_freeze_count() == 0
    with TestClient(create_app(gateway)):
        assert gc.get_freeze_count() > 0
