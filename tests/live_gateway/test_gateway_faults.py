"""Faults on the request path, with real null-engine processes adopted by a gateway (no agents): an engine
killed mid-stream, one gone before its first byte, one gone silent, and an engine that cannot stream."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import httpx
import openai
import pandas as pd
import pytest

from live.engines.null_server import REPLY, NullEngineProcess
from live.gateway import Gateway
from tests.live_gateway import prom
from tests.live_gateway.conftest import MODEL, GatewayServer, kill_engine, serving, static_config

StartEngine = Callable[..., NullEngineProcess]


def _client(gs: GatewayServer, timeout_s: float = 30) -> openai.OpenAI:
    return openai.OpenAI(base_url=gs.url + "/v1", api_key="sk-alice", max_retries=0, timeout=timeout_s)


def _row(gw: Gateway, n: int) -> pd.Series:
    """The n-th record (1-based), once it is in: a stream's row lands just after its last byte."""
    deadline = time.monotonic() + 5
    while len(gw.records()) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    return gw.records().iloc[n - 1]




def test_engine_killed_mid_stream_ends_the_stream_with_an_error_event(null_engines: StartEngine) -> None:
    engine = null_engines("--token-delay-s", "0.3")
    gw = Gateway(static_config())
    with serving(gw) as gs:
        iid = gw.adopt_instance(MODEL, "s0", engine.url)
        stream = _client(gs).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                     stream=True)
        texts = []
        with pytest.raises(openai.APIError) as err:
            for chunk in stream:
                texts.append(chunk.choices[0].delta.content if chunk.choices else None)
                if any(texts):  # the first token is out: kill the engine mid-stream
                    killed_at = time.monotonic()
                    kill_engine(engine)
        assert time.monotonic() - killed_at < 5  # the client is told, it does not hang
        assert "engine failed mid-stream" in str(err.value.message)
        assert texts[-1] == REPLY[0]
        row = _row(gw, 1)
        assert (row["outcome"], row["reason"], row["instance"]) == ("failed", "engine_stream_error", iid)
        assert row["ttft_s"] > 0 and row["output_tokens"] == 1
        deadline = time.monotonic() + 5
        while iid in gw.state.instances and time.monotonic() < deadline:
            time.sleep(0.02)
        assert iid not in gw.state.instances  # retired
        assert prom.total(prom.parse(httpx.get(gs.url + "/metrics").text), "tierlab_requests_total",
                          outcome="failed") == 1


def test_engine_gone_before_first_byte_gets_the_retrys_answer(null_engines: StartEngine) -> None:
    dead, alive = null_engines(), null_engines()
    gw = Gateway(static_config(("s0", "s1"), queue_timeout_s=0.5))
    with serving(gw) as gs:
        first = gw.adopt_instance(MODEL, "s0", dead.url)  # routed first: both idle, first adopted wins the tie
        second = gw.adopt_instance(MODEL, "s1", alive.url)
        kill_engine(dead)
        out = _client(gs).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
        assert out.choices[0].message.content == "".join(REPLY)
        row = _row(gw, 1)
        assert (row["outcome"], row["instance"], row["node"]) == ("completed", second, "s1")
        assert first not in gw.state.instances and second in gw.state.instances
        # with no instance left to retry on (and no agent to start one), the client gets a 503 in OpenAI's shape
        kill_engine(alive)
        r = httpx.post(gs.url + "/v1/completions", json={"model": MODEL, "prompt": "x"},
                       headers={"Authorization": "Bearer sk-alice"}, timeout=30)
        assert r.status_code == 503 and set(r.json()["error"]) == {"message", "type", "param", "code"}
        row = _row(gw, 2)
        assert (row["outcome"], row["reason"]) == ("rejected", "no_gpu_capacity")
        assert prom.total(prom.parse(gw.metrics_text()), "tierlab_cold_starts_total") == 0


def test_engine_killed_during_a_whole_answer_gets_the_retrys_answer(null_engines: StartEngine) -> None:
    slow, fast = null_engines("--token-delay-s", "1"), null_engines()
    gw = Gateway(static_config(("s0", "s1")))
    with serving(gw) as gs:
        doomed = gw.adopt_instance(MODEL, "s0", slow.url)  # routed first
        spare = gw.adopt_instance(MODEL, "s1", fast.url)
        killer = threading.Timer(0.5, kill_engine, args=(slow,))  # the engine dies with the request in hand
        killer.start()
        try:
            out = _client(gs).completions.create(model=MODEL, prompt="x")
        finally:
            killer.join()
        assert out.choices[0].text == "".join(REPLY)
        row = _row(gw, 1)
        assert (row["outcome"], row["instance"]) == ("completed", spare)
        assert doomed not in gw.state.instances


def test_client_leaving_mid_stream_is_recorded_and_frees_the_instance(null_engines: StartEngine) -> None:
    engine = null_engines("--token-delay-s", "0.2")
    gw = Gateway(static_config())
    with serving(gw) as gs:
        iid = gw.adopt_instance(MODEL, "s0", engine.url)
        with httpx.stream("POST", gs.url + "/v1/completions", headers={"Authorization": "Bearer sk-alice"},
                          json={"model": MODEL, "prompt": "x", "stream": True}) as r:
            next(r.iter_bytes())  # the first token, then hang up
        row = _row(gw, 1)
        assert (row["outcome"], row["reason"]) == ("failed", "client_disconnected")
        inst = gw.state.instances[iid]  # not the engine's fault: it stays
        deadline = time.monotonic() + 5
        while inst.active and time.monotonic() < deadline:
            time.sleep(0.02)
        assert inst.active == 0


def test_a_silent_engine_cannot_hang_a_request(null_engines: StartEngine) -> None:
    slow = null_engines("--token-delay-s", "30")
    gw = Gateway(static_config(stream_idle_timeout_s=0.5, request_timeout_s=20))
    with serving(gw) as gs:
        gw.adopt_instance(MODEL, "s0", slow.url)
        t0 = time.monotonic()
        r = httpx.post(gs.url + "/v1/chat/completions", headers={"Authorization": "Bearer sk-alice"}, timeout=30,
                       json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True})
        assert time.monotonic() - t0 < 5
        assert r.status_code == 200 and r.text.rstrip().endswith('"code":"timeout"}}')
        row = _row(gw, 1)
        assert (row["outcome"], row["reason"]) == ("failed", "timeout")


@pytest.mark.parametrize("usage", [False, True])
def test_an_engine_that_cannot_stream_gets_a_synthesized_stream(null_engines: StartEngine, usage: bool) -> None:
    engine = null_engines("--no-stream")
    direct = httpx.post(engine.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "stream": True})
    assert direct.status_code == 400  # so the gateway must not pass stream=true on
    gw = Gateway(static_config())
    with serving(gw) as gs:
        gw.adopt_instance(MODEL, "s0", engine.url, streaming=engine.streaming)  # False: --no-stream
        client = _client(gs)
        opts = {"stream_options": {"include_usage": True}} if usage else {}
        chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                     max_tokens=3, stream=True, **opts))
        body = [c for c in chunks if c.choices]
        assert body[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in body) == "".join(REPLY[:3])
        assert body[-1].choices[0].finish_reason == "length"
        assert [c.usage.completion_tokens for c in chunks if c.usage] == ([3] if usage else [])
        legacy = list(client.completions.create(model=MODEL, prompt="x", stream=True, **opts))
        assert "".join(c.choices[0].text for c in legacy if c.choices) == "".join(REPLY)
        assert [c.choices[0].finish_reason for c in legacy if c.choices][-1] == "stop"
        whole = client.completions.create(model=MODEL, prompt="x")  # non-stream requests pass through
        assert whole.choices[0].text == "".join(REPLY)
        df = gw.records()
        assert list(df["outcome"]) == ["completed"] * 3
        assert list(df["output_tokens"]) == [3, 5, 5]
        assert df["tpot_s"].isna().all()  # tokens came all at once: no TPOT to measure
