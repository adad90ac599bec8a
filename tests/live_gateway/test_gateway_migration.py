"""Token-based live migration end to end: `StartupTime(migration=True)` frees node a0 for a request by moving a
busy instance to a1; the client's stream moves with it and sees every token once; if the destination is gone by
the handover, the sequence resumes on the source. Real gateway, fake agents over HTTP, null engine processes
with the detach / resume contract."""

from __future__ import annotations

import json
import threading
from typing import Any

import httpx

from core.decisions import StartInstance
from core.policies.autoscaling import KeepAlive
from core.policies.base import PolicyBundle
from core.policies.caching import NoCaching
from core.policies.placement import StartupTime
from live.engines.null_server import REPLY
from tests.live_gateway.conftest import GatewayServer
from tests.live_gateway.fake_agent import FakeAgent, ask, fake_cluster, on_loop, tiny_model, wait_for

N_TOKENS = 12
FULL = "".join(REPLY[i % len(REPLY)] for i in range(N_TOKENS))
ENGINE = ("--token-delay-s", "0.25", "--reply-tokens", str(N_TOKENS))
MODELS = {"x": tiny_model("x"), "y": tiny_model("y")}
SLOW_CLOUD = {"stream_Bps": 100.0, "streams": 1, "latency_s": 0.0}  # a cold start from the store: ~20 s planned


def _agents(dead_destination: bool = False) -> tuple[FakeAgent, FakeAgent]:
    """a0 holds y in DRAM, a1 holds x there; each has room for one model: the cheapest start for y is on a0,
    after moving a0's x to a1."""
    common: dict[str, Any] = {"model_bytes": {"x": 2000, "y": 2000}, "memory_bytes": 3000, "cloud": SLOW_CLOUD,
                              "engine_args": ENGINE}
    return (FakeAgent("a0", held={"dram": {"y"}}, **common),
            FakeAgent("a1", held={"dram": {"x"}}, dead_engines=dead_destination, **common))


def _stream(gs: GatewayServer, out: dict[str, Any]) -> None:
    raw = b""
    with httpx.stream("POST", gs.url + "/v1/chat/completions", headers={"Authorization": "Bearer sk-alice"},
                      timeout=60, json={"model": "x", "messages": [{"role": "user", "content": "x"}],
                                        "stream": True}) as r:
        for chunk in r.iter_raw():
            raw += chunk
            if raw.count(b'"content"') >= 3:
                out["started"].set()
    out["raw"] = raw
    out["started"].set()


def _events(raw: bytes) -> list[Any]:
    return [b[6:].decode() if b[6:] == b"[DONE]" else json.loads(b[6:])
            for b in raw.split(b"\n\n") if b.startswith(b"data: ")]


def _whole(gs: GatewayServer, out: dict[str, Any]) -> None:
    """A non-streaming request for x: the client sees nothing until the whole answer."""
    out["started"].set()
    out["answer"] = httpx.post(gs.url + "/v1/chat/completions", headers={"Authorization": "Bearer sk-alice"},
                               timeout=60, json={"model": "x", "messages": [{"role": "user", "content": "x"}]})


def _start_victim(gs: GatewayServer) -> str:
    gw = gs.gateway
    on_loop(gw, lambda: gw.execute([StartInstance("x", "a0", "cloud")]))
    assert wait_for(lambda: any(i.ready and i.node == "a0" for i in gw.state.instances.values()), 15)
    (victim,) = gw.state.instances
    return victim


def _run(gs: GatewayServer) -> tuple[list[Any], httpx.Response]:
    """A slow stream for x on a0, then a request for y: the stream's events and y's answer."""
    got: dict[str, Any] = {"started": threading.Event()}
    streamer = threading.Thread(target=_stream, args=(gs, got))
    streamer.start()
    assert got["started"].wait(15)
    answer = ask(gs, "y")
    streamer.join(60)
    assert not streamer.is_alive()
    return _events(got["raw"]), answer


def _bundle() -> PolicyBundle:
    return PolicyBundle(StartupTime(migration=True), NoCaching(), KeepAlive(keep_alive_s=300), name="sllm")


def test_a_busy_instance_moves_away_with_its_stream_and_frees_its_node() -> None:
    with fake_cluster(*_agents(), bundle=_bundle(), models=MODELS, queue_timeout_s=30) as gs:
        gw = gs.gateway
        victim = _start_victim(gs)
        events, answer = _run(gs)
        assert answer.status_code == 200, answer.text
        # the client saw every token once, in order, under one response id, and the stream's normal end
        chunks = [e for e in events if isinstance(e, dict)]
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == FULL
        assert len({c["id"] for c in chunks}) == 1 and events[-1] == "[DONE]"
        assert sum(1 for c in chunks if c["choices"] and "role" in c["choices"][0]["delta"]) == 1
        assert not any("tierlab_detached" in c for c in chunks)
        # x now runs on a1, y on a0 in the room x left
        assert victim not in gw.state.instances
        assert sorted((i.model.name, i.node) for i in gw.state.instances.values()) == [("x", "a1"), ("y", "a0")]
        events_df = gw.instance_events()
        assert list(events_df[events_df["instance"] == victim]["event"]) == ["loading", "ready", "stopped"]
        assert events_df[events_df["instance"] == victim]["reason"].iloc[-1] == "migrated"
        mig = gw.actions()
        mig = mig[mig["kind"] == "migration"].to_dict("records")
        assert len(mig) == 1 and (mig[0]["outcome"], mig[0]["instance"], mig[0]["node"]) == ("done", victim, "a0")
        assert mig[0]["reason"] == "1 sequence(s) moved" and mig[0]["detail"] == "to a1"
        rows = gw.records()
        assert list(rows["outcome"]) == ["completed", "completed"]
        assert rows.iloc[1]["node"] == "a0" and rows.iloc[1]["model"] == "y"
        assert rows.iloc[0]["node"] == "a1" and rows.iloc[0]["instance"] != victim  # it finished on a1
        assert rows.iloc[0]["output_tokens"] == N_TOKENS
        assert all(i.active == 0 and i.waiting == 0 for i in gw.state.instances.values())


def test_a_destination_gone_by_the_handover_leaves_the_stream_on_its_source() -> None:
    with fake_cluster(*_agents(dead_destination=True), bundle=_bundle(), models=MODELS, queue_timeout_s=30) as gs:
        gw = gs.gateway
        victim = _start_victim(gs)
        events, answer = _run(gs)
        chunks = [e for e in events if isinstance(e, dict)]
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == FULL
        assert events[-1] == "[DONE]" and len({c["id"] for c in chunks}) == 1
        mig = gw.actions()
        mig = mig[mig["kind"] == "migration"].to_dict("records")
        assert mig and mig[0]["outcome"] == "failed" and "resumed on the victim" in mig[0]["reason"]
        rows = gw.records().set_index("model")
        assert rows.loc["x", "outcome"] == "completed"
        # every engine a1 starts dies, so y can only be answered cleanly, in OpenAI's shape, never left hanging
        assert answer.status_code in (200, 502, 503) and (answer.status_code == 200 or "error" in answer.json())
        assert victim in gw.state.instances and gw.state.instances[victim].status == "ready"  # it serves on
        assert all(i.node == "a0" for i in gw.state.instances.values())  # the dead destinations left routing


def test_a_non_streaming_request_moves_too_under_the_id_the_gateway_gave_it() -> None:
    """A whole answer shows no engine id until it is complete: with a placement that can migrate, the gateway
    names the sequence (`tierlab_id`) when it forwards it, so the handover can detach it like a stream; the
    client gets one normal answer with every token."""
    with fake_cluster(*_agents(), bundle=_bundle(), models=MODELS, queue_timeout_s=30) as gs:
        gw = gs.gateway
        victim = _start_victim(gs)
        got: dict[str, Any] = {"started": threading.Event()}
        client = threading.Thread(target=_whole, args=(gs, got))
        client.start()
        assert got["started"].wait(15)
        assert wait_for(lambda: gw.state.instances[victim].active == 1, 15)
        answer = ask(gs, "y")
        client.join(60)
        assert not client.is_alive() and answer.status_code == 200, answer.text
        whole = got["answer"]
        assert whole.status_code == 200, whole.text
        body = whole.json()
        assert body["choices"][0]["message"]["content"] == FULL and "tierlab_detached" not in body
        assert body["usage"]["completion_tokens"] == N_TOKENS
        mig = gw.actions()
        mig = mig[mig["kind"] == "migration"].to_dict("records")
        assert len(mig) == 1 and mig[0]["outcome"] == "done" and mig[0]["reason"] == "1 sequence(s) moved"
        rows = gw.records()
        assert rows.iloc[0]["node"] == "a1" and rows.iloc[0]["instance"] != victim  # it finished on a1
        assert victim not in gw.state.instances
