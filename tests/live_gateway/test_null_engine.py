"""The null engine's batch limit and its tierlab detach / resume contract, over real HTTP against real processes."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from live.engines.null_server import REPLY, NullEngineProcess
from tests.live_gateway.conftest import MODEL

StartEngine = Callable[..., NullEngineProcess]
N_TOKENS = 8
FULL = "".join(REPLY[i % len(REPLY)] for i in range(N_TOKENS))


def _events(raw: bytes) -> list[Any]:
    out = []
    for block in raw.split(b"\n\n"):
        if block.startswith(b"data: "):
            payload = block[6:]
            out.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
    return out


def _text(events: list[Any], chat: bool) -> str:
    parts = []
    for e in events:
        if isinstance(e, dict) and e.get("choices"):
            c = e["choices"][0]
            parts.append((c["delta"].get("content") or "") if chat else c["text"])
    return "".join(parts)


def _stream_until(url: str, body: dict[str, Any], tokens: int, out: dict[str, Any]) -> None:
    """Stream `body`, noting the response id and raw bytes; flag when `tokens` text events are in."""
    raw = b""
    with httpx.stream("POST", url, json=body, timeout=30) as r:
        for chunk in r.iter_raw():
            raw += chunk
            evs = [e for e in _events(raw) if isinstance(e, dict)]
            if evs and "id" in evs[0]:
                out["id"] = evs[0]["id"]
            if len([e for e in evs if e.get("choices") and _text([e], "messages" in body)]) >= tokens:
                out["ready"].set()
    out["raw"] = raw
    out["ready"].set()


def test_detach_then_resume_elsewhere_loses_and_repeats_nothing(null_engines: StartEngine) -> None:
    src = null_engines("--token-delay-s", "0.15", "--reply-tokens", str(N_TOKENS))
    dst = null_engines("--token-delay-s", "0.01", "--reply-tokens", str(N_TOKENS))
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True,
            "stream_options": {"include_usage": True}}
    got: dict[str, Any] = {"ready": threading.Event()}
    t = threading.Thread(target=_stream_until, args=(src.url + "/v1/chat/completions", body, 3, got))
    t.start()
    assert got["ready"].wait(10)
    r = httpx.post(src.url + "/v1/tierlab/detach", json={"id": got["id"]}, timeout=10)
    t.join(10)
    assert r.status_code == 200
    state = r.json()
    assert state["id"] == got["id"] and state["prompt_ids"] and 3 <= len(state["token_ids"]) < N_TOKENS
    first = _events(got["raw"])
    assert "[DONE]" not in first and first[-1] == {"tierlab_detached": {k: state[k] for k in
                                                                        ("prompt_ids", "token_ids", "emitted_chars")}}
    seen = _text(first, chat=True)
    assert state["emitted_chars"] == len(seen)
    resumed = httpx.post(dst.url + "/v1/chat/completions", timeout=30,
                         json={**body, "tierlab_resume": first[-1]["tierlab_detached"]})
    rest = _events(resumed.content)
    assert all("role" not in e["choices"][0]["delta"] for e in rest if isinstance(e, dict) and e.get("choices"))
    assert seen + _text(rest, chat=True) == FULL
    assert [e["usage"]["completion_tokens"] for e in rest if isinstance(e, dict) and e.get("usage")] == [N_TOKENS]
    assert rest[-1] == "[DONE]"
    # finished or unknown: 404; a bad resume names its field
    assert httpx.post(src.url + "/v1/tierlab/detach", json={"id": got["id"]}).status_code == 404
    bad = httpx.post(dst.url + "/v1/completions", json={"model": MODEL, "prompt": "x",
                                                         "tierlab_resume": {"prompt_ids": [1], "token_ids": "no",
                                                                            "emitted_chars": 0}})
    assert bad.status_code == 400 and "tierlab_resume.token_ids" in bad.json()["error"]["message"]


def test_queued_and_whole_answers_detach_too(null_engines: StartEngine) -> None:
    """With --max-num-seqs 1 a second request waits in line; detached there it has no tokens yet. A non-streaming
    request detaches into a JSON answer, and its resumed answer carries the whole text."""
    engine = null_engines("--token-delay-s", "0.2", "--reply-tokens", str(N_TOKENS), "--max-num-seqs", "1")
    body = {"model": MODEL, "prompt": "x", "stream": True}
    a: dict[str, Any] = {"ready": threading.Event()}
    ta = threading.Thread(target=_stream_until, args=(engine.url + "/v1/completions", body, 1, a))
    ta.start()
    assert a["ready"].wait(10)
    answers: list[httpx.Response] = []
    tb = threading.Thread(target=lambda: answers.append(
        httpx.post(engine.url + "/v1/completions", json={"model": MODEL, "prompt": "y"}, timeout=30)))
    tb.start()
    time.sleep(0.3)  # b waits behind a (one slot)
    queued = "cmpl-null-2"
    r = httpx.post(engine.url + "/v1/tierlab/detach", json={"id": queued}, timeout=10)
    tb.join(10)
    assert r.status_code == 200 and r.json()["token_ids"] == []
    (whole,) = answers
    assert whole.json() == {"id": queued, "tierlab_detached": {"prompt_ids": [1], "token_ids": [],
                                                               "emitted_chars": 0}}
    ta.join(10)
    assert _text(_events(a["raw"]), chat=False) == FULL  # a ran on undisturbed
    resumed = httpx.post(engine.url + "/v1/completions", timeout=30,
                         json={"model": MODEL, "prompt": "y", "tierlab_resume": {"prompt_ids": [1], "token_ids": [0, 1],
                                                                                 "emitted_chars": 0}})
    assert resumed.json()["choices"][0]["text"] == FULL and resumed.json()["usage"]["completion_tokens"] == N_TOKENS
