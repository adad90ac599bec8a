"""Token-based live migration between two real engines: detach a sequence from A, resume it on B.

Both engines are the real HTTP app over a real `Engine` on the same checkpoint, served by uvicorn on
loopback in this process, their steps padded (`step_delay_s`) so that a detach lands mid-generation on
any machine. The spliced output must equal an undetached run with the same seed: text, token count and
finish reason, greedy and sampled, streaming and not, completions and chat.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.live_engine.conftest import ServedEngine, serve_engine

MODEL = "tiny-llama"
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is a cold start?"}]
TIMEOUT_S = 60
MAX_TOKENS = 48


@pytest.fixture(scope="module")
def engines(tiny_llama: Path) -> Iterator[tuple[ServedEngine, ServedEngine]]:
    with (
        serve_engine(tiny_llama, MODEL, step_delay_s=0.02) as a,
        serve_engine(tiny_llama, MODEL, step_delay_s=0.02) as b,
    ):
        yield a, b


def endpoint(chat: bool) -> str:
    return "/v1/chat/completions" if chat else "/v1/completions"


def request_body(chat: bool, temperature: float, **extra: Any) -> dict[str, Any]:
    prompt = {"messages": MESSAGES} if chat else {"prompt": "hello world, a cold start"}
    return {"model": MODEL, **prompt, "max_tokens": MAX_TOKENS, "temperature": temperature, "top_p": 0.95,
            "seed": 1234, **extra}


def delta_text(event: dict[str, Any], chat: bool) -> str:
    if not event.get("choices"):
        return ""
    choice = event["choices"][0]
    return (choice["delta"].get("content") or "") if chat else choice["text"]


def read_events(response: httpx.Response) -> Iterator[dict[str, Any] | str]:
    """SSE payloads in order: parsed JSON objects, or "[DONE]"."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            yield data if data == "[DONE]" else json.loads(data)


def run_stream(url: str, path: str, body: dict[str, Any]) -> list[dict[str, Any] | str]:
    with httpx.stream("POST", url + path, json={**body, "stream": True,
                                                "stream_options": {"include_usage": True}},
                      timeout=TIMEOUT_S) as response:
        assert response.status_code == 200, response.read()
        return list(read_events(response))


def summary(events: list[dict[str, Any] | str], chat: bool) -> tuple[str, str | None, dict[str, Any] | None]:
    """(text, finish_reason, usage) of a stream's events."""
    text = "".join(delta_text(e, chat) for e in events if isinstance(e, dict))
    finish = [e["choices"][0]["finish_reason"] for e in events if isinstance(e, dict) and e.get("choices")
              and e["choices"][0]["finish_reason"]]
    usage = [e["usage"] for e in events if isinstance(e, dict) and e.get("usage")]
    return text, finish[-1] if finish else None, usage[-1] if usage else None


def detach(url: str, request_id: str) -> httpx.Response:
    return httpx.post(url + "/v1/tierlab/detach", json={"id": request_id}, timeout=TIMEOUT_S)


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
@pytest.mark.parametrize("temperature", [0.0, 0.9], ids=["greedy", "sampled"])
def test_streaming_sequence_detached_from_a_and_resumed_on_b_equals_an_undetached_run(
    engines: tuple[ServedEngine, ServedEngine], chat: bool, temperature: float
) -> None:
    a, b = engines
    body = request_body(chat, temperature)
    reference, ref_finish, ref_usage = summary(run_stream(a.url, endpoint(chat), body), chat)
    assert ref_usage is not None and len(reference) > 20

    source_events: list[dict[str, Any] | str] = []
    with httpx.stream("POST", a.url + endpoint(chat), json={**body, "stream": True}, timeout=TIMEOUT_S) as response:
        events = read_events(response)
        for event in events:  # read until the sequence has sent some text, then migrate it
            source_events.append(event)
            if sum(len(delta_text(e, chat)) for e in source_events if isinstance(e, dict)) >= 5:
                break
        first = source_events[0]
        assert isinstance(first, dict)
        moved = detach(a.url, first["id"])
        assert moved.status_code == 200, moved.text
        source_events += list(events)  # the rest of A's stream, up to its end
    state = moved.json()
    assert state["id"] == first["id"] and set(state) == {"id", "prompt_ids", "token_ids", "emitted_chars", "seed"}
    assert state["seed"] == body["seed"]
    assert 0 < len(state["token_ids"]) < MAX_TOKENS
    # A's stream ended with the one detached event, no [DONE], and it had sent exactly emitted_chars characters
    last = source_events[-1]
    assert "[DONE]" not in source_events and isinstance(last, dict)
    assert last == {"tierlab_detached": {k: state[k] for k in ("prompt_ids", "token_ids", "emitted_chars", "seed")}}
    sent_text, sent_finish, _ = summary(source_events[:-1], chat)
    assert len(sent_text) == state["emitted_chars"] and sent_finish is None
    if chat:
        assert source_events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert detach(a.url, first["id"]).status_code == 404  # gone from A

    resume = {k: state[k] for k in ("prompt_ids", "token_ids", "emitted_chars")}
    resumed_events = run_stream(b.url, endpoint(chat), {**body, "tierlab_resume": resume})
    rest, finish, usage = summary(resumed_events, chat)
    assert resumed_events[-1] == "[DONE]"
    if chat:  # no second role chunk: a gateway splicing A then B gives one normal stream
        assert all("role" not in e["choices"][0]["delta"] for e in resumed_events if isinstance(e, dict)
                   and e.get("choices"))
    assert sent_text + rest == reference
    assert (finish, usage) == (ref_finish, ref_usage)
    assert b.engine.scheduler.last_request["resumed"]


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_non_streaming_sequence_detached_and_resumed(engines: tuple[ServedEngine, ServedEngine], chat: bool) -> None:
    a, b = engines
    body = request_body(chat, 0.9, seed=77)
    reference = httpx.post(a.url + endpoint(chat), json=body, timeout=TIMEOUT_S).json()

    answer: list[httpx.Response] = []
    named = f"tl-test-{int(chat)}"  # a non-streaming client learns its id only at the end: the caller names it
    thread = threading.Thread(target=lambda: answer.append(
        httpx.post(a.url + endpoint(chat), json={**body, "tierlab_id": named}, timeout=TIMEOUT_S)))
    thread.start()
    deadline = time.perf_counter() + 20
    while True:
        assert time.perf_counter() < deadline
        running = [s for s in httpx.get(a.url + "/stats").json()["sequences"]
                   if s["id"] == named and s["completion_tokens"] >= 3]
        if running:
            break
        time.sleep(0.01)
    moved = detach(a.url, named)
    thread.join(TIMEOUT_S)
    assert moved.status_code == 200 and answer and answer[0].status_code == 200
    state = moved.json()
    assert state["emitted_chars"] == 0  # nothing reached the client
    assert answer[0].json() == {"id": named, "tierlab_detached": {
        k: state[k] for k in ("prompt_ids", "token_ids", "emitted_chars", "seed")}}

    resume = {k: state[k] for k in ("prompt_ids", "token_ids", "emitted_chars")}
    resumed = httpx.post(b.url + endpoint(chat), json={**body, "tierlab_resume": resume}, timeout=TIMEOUT_S).json()
    assert resumed["choices"][0] == reference["choices"][0]
    assert resumed["usage"] == reference["usage"]


def test_stop_string_after_the_migration_point_is_honoured(engines: tuple[ServedEngine, ServedEngine]) -> None:
    a, b = engines
    body = request_body(False, 0.0)
    full = httpx.post(a.url + "/v1/completions", json=body, timeout=TIMEOUT_S).json()["choices"][0]["text"]
    stop = full[30:33]
    body["stop"] = [stop]
    reference = httpx.post(a.url + "/v1/completions", json=body, timeout=TIMEOUT_S).json()
    assert reference["choices"][0]["finish_reason"] == "stop"
    with httpx.stream("POST", a.url + "/v1/completions", json={**body, "stream": True}, timeout=TIMEOUT_S) as r:
        events = read_events(r)
        sent = ""
        for event in events:
            assert isinstance(event, dict) and "choices" in event
            sent += delta_text(event, False)
            if len(sent) >= 3:
                state = detach(a.url, event["id"]).json()
                break
        tail = list(events)
    sent += "".join(delta_text(e, False) for e in tail[:-1] if isinstance(e, dict))
    assert len(sent) == state["emitted_chars"] < len(reference["choices"][0]["text"])
    resume = {k: state[k] for k in ("prompt_ids", "token_ids", "emitted_chars")}
    rest = httpx.post(b.url + "/v1/completions", json={**body, "tierlab_resume": resume}, timeout=TIMEOUT_S).json()
    # non-streaming after a streamed part: the text continues after the emitted characters
    assert sent + rest["choices"][0]["text"] == reference["choices"][0]["text"]
    assert rest["choices"][0]["finish_reason"] == "stop" and rest["usage"] == reference["usage"]


def test_detach_and_resume_errors(engines: tuple[ServedEngine, ServedEngine]) -> None:
    a, _ = engines
    url = a.url
    for payload, status, param in (({"id": "chatcmpl-nope"}, 404, "id"), ({"id": 3}, 400, "id"), ({}, 400, "id")):
        response = httpx.post(url + "/v1/tierlab/detach", json=payload, timeout=TIMEOUT_S)
        error = response.json()["error"]
        assert response.status_code == status and error["param"] == param
        assert set(error) == {"message", "type", "param", "code"}
    done = httpx.post(url + "/v1/completions", json=request_body(False, 0.0, max_tokens=2), timeout=TIMEOUT_S).json()
    assert detach(url, done["id"]).status_code == 404  # finished: nothing to detach

    good = {"prompt_ids": [0, 5, 6], "token_ids": [7, 8], "emitted_chars": 0}
    cases = [
        ({**good, "token_ids": [7, 10_000]}, "tierlab_resume.token_ids"),
        ({**good, "prompt_ids": []}, "tierlab_resume.prompt_ids"),
        ({**good, "emitted_chars": 999}, "tierlab_resume.emitted_chars"),
        ({**good, "token_ids": [7] * 300}, "tierlab_resume.token_ids"),  # beyond the context of 256
    ]
    for resume, param in cases:
        response = httpx.post(url + "/v1/completions", json={**request_body(False, 0.0), "tierlab_resume": resume},
                              timeout=TIMEOUT_S)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    # the original max_tokens is already used up by the carried tokens
    spent = {**good, "token_ids": [7] * MAX_TOKENS}
    response = httpx.post(url + "/v1/completions", json={**request_body(False, 0.0), "tierlab_resume": spent},
                          timeout=TIMEOUT_S)
    assert response.status_code == 400 and response.json()["error"]["param"] == "tierlab_resume.token_ids"
    # a resumed request needs no prompt: prompt_ids are authoritative
    ok = httpx.post(url + "/v1/completions", json={"model": MODEL, "max_tokens": 4, "temperature": 0,
                                                   "tierlab_resume": good}, timeout=TIMEOUT_S)
    assert ok.status_code == 200 and ok.json()["usage"] == {"prompt_tokens": 3, "completion_tokens": 4,
                                                            "total_tokens": 7}


def test_a_waiting_request_detaches_with_no_tokens(
    tiny_llama: Path, engines: tuple[ServedEngine, ServedEngine]
) -> None:
    _, b = engines
    with serve_engine(tiny_llama, MODEL, max_num_seqs=1, step_delay_s=0.02) as single:
        blocker = threading.Thread(target=httpx.post, args=(single.url + "/v1/completions",),
                                   kwargs={"json": request_body(False, 0.0), "timeout": TIMEOUT_S})
        blocker.start()
        deadline = time.perf_counter() + 20
        while httpx.get(single.url + "/stats").json()["running"] != 1:  # the blocker holds the only slot
            assert time.perf_counter() < deadline
            time.sleep(0.01)
        body = request_body(True, 0.9)
        with httpx.stream("POST", single.url + "/v1/chat/completions", json={**body, "stream": True},
                          timeout=TIMEOUT_S) as response:
            events = read_events(response)
            role = next(events)  # the role chunk goes out at once, before the request gets a slot
            assert isinstance(role, dict)
            sequences = httpx.get(single.url + "/stats").json()["sequences"]
            assert [(s["id"] == role["id"], s["phase"]) for s in sequences] == [(False, "decode"), (True, "waiting")]
            state = detach(single.url, role["id"]).json()
            tail = list(events)
        blocker.join(TIMEOUT_S)
    assert state["token_ids"] == [] and state["emitted_chars"] == 0 and len(state["prompt_ids"]) > 5
    assert tail == [{"tierlab_detached": {k: state[k] for k in ("prompt_ids", "token_ids", "emitted_chars", "seed")}}]
    resume = {k: state[k] for k in ("prompt_ids", "token_ids", "emitted_chars")}
    resumed = httpx.post(b.url + "/v1/chat/completions", json={**body, "tierlab_resume": resume}, timeout=TIMEOUT_S)
    plain = httpx.post(b.url + "/v1/chat/completions", json=body, timeout=TIMEOUT_S)
    assert resumed.json()["choices"] == plain.json()["choices"] and resumed.json()["usage"] == plain.json()["usage"]


def test_migration_between_two_engine_processes(tiny_llama: Path) -> None:
    """The same contract across two real `python -m live.engines.cpu_server` processes (the CLI's flags)."""
    from live.engines.base import CpuEngineProcess, free_port

    procs = [CpuEngineProcess(tiny_llama, free_port(), model_name=MODEL, threads=1, max_num_seqs=2,
                              extra_args=["--step-delay-s", "0.02", "--prefill-chunk-tokens", "8"])
             for _ in range(2)]
    try:
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.wait_ready(timeout_s=60)
        a, b = (proc.url for proc in procs)
        body = request_body(False, 0.7, seed=99)
        reference, ref_finish, ref_usage = summary(run_stream(a, "/v1/completions", body), False)
        with httpx.stream("POST", a + "/v1/completions", json={**body, "stream": True}, timeout=TIMEOUT_S) as r:
            events = read_events(r)
            first = next(events)
            assert isinstance(first, dict)
            sent = delta_text(first, False)
            state = detach(a, first["id"]).json()
            tail = list(events)
        sent += "".join(delta_text(e, False) for e in tail[:-1] if isinstance(e, dict))
        detached = {k: state[k] for k in ("prompt_ids", "token_ids", "emitted_chars", "seed")}
        assert tail[-1] == {"tierlab_detached": detached}
        resume = {k: state[k] for k in ("prompt_ids", "token_ids", "emitted_chars")}
        rest, finish, usage = summary(run_stream(b, "/v1/completions", {**body, "tierlab_resume": resume}), False)
        assert sent + rest == reference and (finish, usage) == (ref_finish, ref_usage)
        stats_b = httpx.get(b + "/stats").json()
        assert (stats_b["max_num_seqs"], stats_b["prefill_chunk_tokens"]) == (2, 8)
        assert stats_b["last_request"]["resumed"] and stats_b["prefill_tokens"] >= len(state["prompt_ids"])
        assert httpx.get(a + "/stats").json()["requests_detached"] == 1
    finally:
        for proc in procs:
            proc.close()


def test_an_unseeded_sampled_sequence_keeps_its_draws_when_it_moves(
    engines: tuple[ServedEngine, ServedEngine],
) -> None:
    """No seed in the request: the engine picks one, the detach hands it over, and the resumed sequence draws
    what the source would have drawn (the same text as a run that names that seed)."""
    a, b = engines
    body = {k: v for k, v in request_body(False, 0.9).items() if k != "seed"}
    with httpx.stream("POST", a.url + endpoint(False), json={**body, "stream": True}, timeout=TIMEOUT_S) as response:
        events: list[dict[str, Any] | str] = []
        stream = read_events(response)
        for event in stream:
            events.append(event)
            if sum(len(delta_text(e, False)) for e in events if isinstance(e, dict)) >= 5:
                break
        first = events[0]
        assert isinstance(first, dict)
        moved = detach(a.url, first["id"])
        assert moved.status_code == 200, moved.text
        events += list(stream)
    state = moved.json()
    assert isinstance(state.get("seed"), int)
    sent, _, _ = summary(events[:-1], False)
    resume = {k: state[k] for k in ("prompt_ids", "token_ids", "emitted_chars", "seed")}
    rest, _, _ = summary(run_stream(b.url, endpoint(False), {**body, "tierlab_resume": resume}), False)
    reference, _, _ = summary(run_stream(a.url, endpoint(False), {**body, "seed": state["seed"]}), False)
    assert sent + rest == reference
