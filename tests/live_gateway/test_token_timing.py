"""TTFT and TPOT time token generation, not text arrival, from the CPU engine through the gateway to the replay
client, when the engine's detokenizer holds text back.

The tiny random-weight checkpoint's byte-level vocabulary has a token per byte, and its greedy output for these
prompts is mostly bytes that end in the middle of a UTF-8 character: `TextStream` holds every such token's text
back, and for "hello world" all the text comes out only when the sequence ends. The engine must still stream one
chunk per generated token (text "" while held back), so that the gateway's records and the replay client see the
first token when it is generated and a TPOT of one decode step. Before this, both waited for text: TTFT came at
the end and TPOT was ~0.1 ms against a 30+ ms step. Everything here is real: a `cpu_server` process on loopback,
the gateway (uvicorn in a thread) over it, and the replay client's own sending code.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import itertools
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from experiments.replay import ClientRow, ReplayOptions, Target, merge_records, prompt_text, send_all
from live.checkpoint import generate_checkpoint
from live.engines.base import CpuEngineProcess, free_port
from live.gateway import Gateway
from live.gateway_records import tpot
from tests.live_gateway.conftest import MODEL, START_TIMEOUT_S, serving, static_config
from tests.live_gateway.fake_agent import wait_for

STEP_DELAY_S = 0.03  # padding per batch step: a decode step lasts >= 30 ms on any machine
TOKENS = 16
PROMPT = "hello world"  # greedy on this checkpoint: every token's text is held back until the end
REPLAY_SEED = 3  # prompt_text(8, 3): the same, for the replay client's prompt
Event = tuple[float, dict[str, Any]]  # (arrival time, SSE payload)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_checkpoint(tmp_path_factory.mktemp("ckpt") / MODEL, "tiny", 0).path


@pytest.fixture(scope="module")
def engine(ckpt: Path) -> Iterator[CpuEngineProcess]:
    proc = CpuEngineProcess(ckpt, free_port(), model_name=MODEL, max_num_seqs=4, threads=1,
                            extra_args=["--step-delay-s", str(STEP_DELAY_S)])
    try:
        proc.start()
        proc.wait_ready(START_TIMEOUT_S * 2)
        yield proc
    finally:
        proc.close()


def body(chat: bool, **extra: Any) -> dict[str, Any]:
    ask: dict[str, Any] = ({"messages": [{"role": "user", "content": PROMPT}]} if chat else {"prompt": PROMPT})
    return {"model": MODEL, **ask, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True, **extra}


def stream(url: str, payload: dict[str, Any], headers: dict[str, str] | None = None) -> list[Event]:
    """POST a streaming request; every `data:` payload with its arrival time (from the send)."""
    events: list[Event] = []
    t0 = time.monotonic()
    with httpx.stream("POST", url, json={**payload, "stream": True}, headers=headers, timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append((time.monotonic() - t0, json.loads(line[6:])))
    return events


def text_of(choice: dict[str, Any]) -> str:
    return choice["text"] if "text" in choice else (choice["delta"].get("content") or "")


def split(events: list[Event]) -> tuple[list[Event], Event]:
    """(the token chunks, the finish chunk): a chat stream's role chunk and the usage chunk are neither."""
    choices = [(t, e["choices"][0]) for t, e in events if e.get("choices")]
    choices = [(t, c) for t, c in choices if not ("delta" in c and "role" in c["delta"])]
    assert choices[-1][1]["finish_reason"] == "length"
    assert all(c["finish_reason"] is None for _, c in choices[:-1])
    return choices[:-1], choices[-1]


def engine_timing(url: str) -> tuple[float, float]:
    """(first token, TPOT) of the engine's last request, as its scheduler timed them (from its arrival)."""
    last = httpx.get(url + "/stats", timeout=10).json()["last_request"]
    n = last["completion_tokens"]
    return last["first_token_s"], (last["e2e_s"] - last["first_token_s"]) / (n - 1)


def whole_text(answer: dict[str, Any]) -> str:
    choice = answer["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


@pytest.mark.parametrize("chat", [False, True])
def test_the_engine_streams_one_chunk_per_token_even_while_text_is_held_back(
        engine: CpuEngineProcess, chat: bool) -> None:
    path = "/v1/chat/completions" if chat else "/v1/completions"
    whole = httpx.post(engine.url + path, json=body(chat), timeout=60).json()
    events = stream(engine.url + path, body(chat, stream_options={"include_usage": True}))
    tokens, (_, finish) = split(events)
    texts = [text_of(c) for _, c in tokens]
    # the case under test: the first token's text held back (it ends mid-character); for the plain prompt, most
    assert texts[0] == "" and (chat or texts.count("") >= TOKENS - 2), texts
    # one chunk per generated token, "" while held back; the text the same as the non-streamed answer's
    assert len(tokens) == TOKENS == events[-1][1]["usage"]["completion_tokens"] == whole["usage"]["completion_tokens"]
    assert "".join(texts) + text_of(finish) == whole_text(whole) != ""
    # the chunks come as the tokens are generated, a decode step apart: not all at the end with the text
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(tokens)]
    assert sorted(gaps)[len(gaps) // 2] >= 0.8 * STEP_DELAY_S, gaps
    if chat:
        role = events[0][1]["choices"][0]["delta"]
        assert role == {"role": "assistant", "content": ""}  # sent at once, as before: no token


def test_a_detached_stream_resumes_with_one_chunk_per_token(engine: CpuEngineProcess) -> None:
    whole = whole_text(httpx.post(engine.url + "/v1/completions", json=body(False), timeout=60).json())
    payload = body(False, stream=True, stream_options={"include_usage": True}, tierlab_id="held-back-1")
    before: list[str] = []
    state: dict[str, Any] | None = None
    with httpx.stream("POST", engine.url + "/v1/completions", json=payload, timeout=60) as r:
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if "tierlab_detached" in event:
                state = event["tierlab_detached"]
                break
            before.append(text_of(event["choices"][0]))
            if len(before) == 5:  # mid-generation
                got = httpx.post(engine.url + "/v1/tierlab/detach", json={"id": "held-back-1"}, timeout=30)
                assert got.status_code == 200, got.text
    assert state is not None, "the stream ended without its detached event"
    # every token generated before the detach had its chunk; the characters sent are those of their chunks
    assert len(state["token_ids"]) == len(before) >= 5 and state["emitted_chars"] == len("".join(before))
    after = stream(engine.url + "/v1/completions", {**payload, "tierlab_resume": state})
    tokens, (_, finish) = split(after)
    assert len(before) + len(tokens) == TOKENS == after[-1][1]["usage"]["completion_tokens"]
    assert "".join(before) + "".join(text_of(c) for _, c in tokens) + text_of(finish) == whole


@pytest.mark.parametrize("chat", [False, True])
def test_gateway_records_time_tokens_not_text(engine: CpuEngineProcess, chat: bool) -> None:
    path = "/v1/chat/completions" if chat else "/v1/completions"
    gw = Gateway(static_config())
    with serving(gw) as gs:
        gw.adopt_instance(MODEL, "s0", engine.url)
        events = stream(gs.url + path, body(chat), headers={"Authorization": "Bearer sk-alice"})
        assert wait_for(lambda: len(gw.records()) == 1, 10)
        row = gw.records().iloc[0]
    first_s, engine_tpot_s = engine_timing(engine.url)
    tokens, _ = split(events)
    assert len(tokens) == TOKENS and not any(e.get("usage") for _, e in events)  # the usage the gateway added: gone
    assert (row["outcome"], row["output_tokens"]) == ("completed", TOKENS)
    # TTFT: the first (empty) chunk, right after the engine generated the first token, not the text at the end
    assert first_s <= row["ttft_s"] < first_s + 2 * engine_tpot_s, (row["ttft_s"], first_s, engine_tpot_s)
    assert row["ttft_s"] < tokens[-1][0] - (TOKENS - 3) * STEP_DELAY_S
    # TPOT: one decode step (was ~0.1 ms: the text came all at once)
    assert row["tpot_s"] >= 0.8 * STEP_DELAY_S
    assert row["tpot_s"] == pytest.approx(engine_tpot_s, rel=0.25), (row["tpot_s"], engine_tpot_s)


def test_the_replay_client_times_the_first_token_chunk(engine: CpuEngineProcess) -> None:
    row = ClientRow(0, MODEL, arrival_s=0.0, prompt_tokens=8, output_tokens=TOKENS, stream=True)
    prompt = prompt_text(row.prompt_tokens, REPLAY_SEED + row.index)  # what send_all sends for this row
    direct = stream(engine.url + "/v1/completions", {**body(False), "prompt": prompt})
    assert text_of(split(direct)[0][0][1]) == ""  # the case under test: its first token's text is held back
    gw = Gateway(static_config())
    with serving(gw) as gs:
        gw.adopt_instance(MODEL, "s0", engine.url)
        asyncio.run(send_all(Target(gs.url, "sk-alice"), [row], ReplayOptions(max_in_flight=1), REPLAY_SEED,
                             progress=False))
        assert wait_for(lambda: len(gw.records()) == 1, 10)
        records = gw.records()
    first_s, engine_tpot_s = engine_timing(engine.url)
    assert (row.outcome, row.out_tokens) == ("completed", TOKENS)
    assert first_s <= row.ttft_s < first_s + 2 * engine_tpot_s, (row.ttft_s, first_s, engine_tpot_s)
    client_tpot_s = tpot(row.last_token_s, row.ttft_s, row.out_tokens)
    assert client_tpot_s == pytest.approx(engine_tpot_s, rel=0.25), (client_tpot_s, engine_tpot_s)
    merged = merge_records([row], records).iloc[0]
    assert math.isclose(merged["tpot_s"], records.iloc[0]["tpot_s"])  # the gateway's, itself ~ the step
    assert merged["tpot_s"] == pytest.approx(engine_tpot_s, rel=0.25)


def test_engine_counts_its_decode_steps_by_batch_size(engine: CpuEngineProcess) -> None:
    """`/stats` decode_steps: the calibration probe's decode step at batch B is the engine's own loop period over
    its pure decode steps at B (each at least the step delay, and not much more on a 30 ms step)."""
    stats_url = f"{engine.url}/stats"

    def counters() -> dict[str, dict[str, float]]:
        return httpx.get(stats_url, timeout=10).json()["decode_steps"]

    before = counters()
    payload = {**body(False), "stream": False}
    with httpx.Client(timeout=60) as c, cf.ThreadPoolExecutor(2) as pool:
        for f in [pool.submit(c.post, f"{engine.url}/v1/completions", json=payload) for _ in range(2)]:
            assert f.result().status_code == 200
    after = counters()
    steps = sum(int(after[k]["steps"]) - int(before.get(k, {"steps": 0})["steps"]) for k in after)
    assert TOKENS - 3 <= steps <= 2 * TOKENS  # every decode step of the two requests, at batch 1 or 2
    two = after.get("2")
    assert two is not None and two["steps"] - before.get("2", {"steps": 0})["steps"] >= TOKENS // 2
    gained = two["seconds"] - before.get("2", {"seconds": 0.0})["seconds"]
    mean = gained / (two["steps"] - before.get("2", {"steps": 0})["steps"])
    assert STEP_DELAY_S <= mean < STEP_DELAY_S + 0.05
