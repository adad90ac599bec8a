"""The gateway's side of a token-based migration against the real CPU engine: a client's stream through the gateway
is detached from one engine process mid-generation and resumed on another (`Gateway._handover`, the step a
migration runs once its destination is ready); the client must see exactly what an undisturbed run of the same
request (same seed) produces, under one response id, and the source engine is let go."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from live.checkpoint import generate_checkpoint
from live.engines.base import CpuEngineProcess, free_port
from live.gateway import Gateway
from tests.live_gateway.conftest import MODEL, START_TIMEOUT_S, serving, static_config

BODY = {"model": MODEL, "messages": [{"role": "user", "content": "what is a cold start?"}], "max_tokens": 40,
        "temperature": 0.8, "seed": 7, "stream": True, "stream_options": {"include_usage": True}}


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[CpuEngineProcess, CpuEngineProcess]]:
    ckpt = generate_checkpoint(tmp_path_factory.mktemp("ckpt") / MODEL, "tiny", 0).path
    started = []
    try:
        for _ in range(2):  # steps padded so that the handover lands mid-generation on any machine
            engine = CpuEngineProcess(ckpt, free_port(), model_name=MODEL, max_num_seqs=4,
                                      extra_args=["--step-delay-s", "0.05"])
            started.append(engine)
            engine.start()
        for engine in started:
            engine.wait_ready(START_TIMEOUT_S * 2)
        yield started[0], started[1]
    finally:
        for engine in started:
            engine.close()


def _events(raw: bytes) -> list[Any]:
    return [b[6:].decode() if b[6:] == b"[DONE]" else json.loads(b[6:])
            for b in raw.split(b"\n\n") if b.startswith(b"data: ")]


def _text(events: list[Any]) -> str:
    return "".join((e["choices"][0]["delta"].get("content") or "") for e in events
                   if isinstance(e, dict) and e.get("choices"))


def test_a_stream_moved_between_real_engines_is_the_undisturbed_stream(
        engines: tuple[CpuEngineProcess, CpuEngineProcess]) -> None:
    a, b = engines
    reference = _events(httpx.post(b.url + "/v1/chat/completions", json=BODY, timeout=120).content)
    assert reference[-1] == "[DONE]" and len(_text(reference)) > 0
    gw = Gateway(static_config(("s0", "s1")))
    with serving(gw) as gs:
        src = gw.adopt_instance(MODEL, "s0", a.url)  # both idle: the first adopted gets the request
        dst = gw.adopt_instance(MODEL, "s1", b.url)
        got: dict[str, Any] = {"started": threading.Event()}

        def stream() -> None:
            raw = b""
            with httpx.stream("POST", gs.url + "/v1/chat/completions", json=BODY, timeout=120,
                              headers={"Authorization": "Bearer sk-alice"}) as r:
                for chunk in r.iter_raw():
                    raw += chunk
                    if raw.count(b'"content"') >= 4:
                        got["started"].set()
            got["raw"] = raw
            got["started"].set()

        t = threading.Thread(target=stream)
        t.start()
        assert got["started"].wait(60)
        assert gw.loop is not None
        handover = asyncio.run_coroutine_threadsafe(gw._handover(gw.live[src], gw.live[dst]), gw.loop)
        outcome = handover.result(timeout=60)
        t.join(60)
        assert outcome == ("done", "1 sequence(s) moved")
        events = _events(got["raw"])
        assert _text(events) == _text(reference)
        assert events[-1] == "[DONE]" and not any("tierlab_detached" in e for e in events if isinstance(e, dict))
        assert len({e["id"] for e in events if isinstance(e, dict)}) == 1
        usage = [e["usage"] for e in events if isinstance(e, dict) and e.get("usage")]
        assert usage and usage[-1]["completion_tokens"] == [e["usage"] for e in reference
                                                            if isinstance(e, dict) and e.get("usage")][-1][
            "completion_tokens"]
        assert src not in gw.state.instances and dst in gw.state.instances
        row = gw.records().iloc[-1]
        assert row["outcome"] == "completed" and row["output_tokens"] == usage[-1]["completion_tokens"]
        assert httpx.get(a.url + "/stats").json()["requests_detached"] == 1  # the source really handed it over
