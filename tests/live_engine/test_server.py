"""The CPU engine as a real uvicorn subprocess on a loopback port, driven by the real `openai` client."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from tokenizers import Tokenizer

from live.engines.base import CpuEngineProcess, free_port
from live.engines.llama import LlamaModel

MODEL = "tiny-llama"
PROMPT = "hello world, a cold start"
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is a cold start?"}]


@pytest.fixture(scope="module")
def engine(tiny_llama: Path) -> Iterator[CpuEngineProcess]:
    proc = CpuEngineProcess(tiny_llama, free_port(), model_name=MODEL, threads=1)
    proc.start()
    try:
        proc.wait_ready(timeout_s=60)
        yield proc
    finally:
        proc.close()


@pytest.fixture(scope="module")
def client(engine: CpuEngineProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=engine.url + "/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def http(engine: CpuEngineProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=engine.url, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def local(tiny_llama: Path) -> tuple[LlamaModel, Tokenizer]:
    """The same checkpoint in this process: what the server should answer."""
    return LlamaModel.from_dir(tiny_llama), Tokenizer.from_file(str(tiny_llama / "tokenizer.json"))


def expected(local: tuple[LlamaModel, Tokenizer], text: str, max_tokens: int) -> tuple[list[int], str]:
    """(prompt ids with BOS, greedy completion text)."""
    model, tokenizer = local
    ids = [model.config.bos_token_id, *tokenizer.encode(text).ids]
    tokens = list(model.generate(ids, max_tokens=max_tokens))
    return ids, tokenizer.decode(tokens, skip_special_tokens=True)


def chat_text(messages: list[dict[str, str]]) -> str:
    return "".join(f"<|{m['role']}|>: {m['content']}\n" for m in messages) + "<|assistant|>:"


def test_probes_and_models(engine: CpuEngineProcess, client: openai.OpenAI, http: httpx.Client) -> None:
    assert http.get("/ping").status_code == 200
    assert http.get("/health").status_code == 200
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion(client: openai.OpenAI, local: tuple[LlamaModel, Tokenizer]) -> None:
    ids, text = expected(local, PROMPT, 12)
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    assert out.object == "text_completion" and out.id.startswith("cmpl-") and out.model == MODEL
    assert abs(out.created - time.time()) < 60
    assert out.choices[0].text == text
    assert out.choices[0].finish_reason == "length"
    usage = out.usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (len(ids), 12, len(ids) + 12)


def test_completion_streaming_matches_non_streaming(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0)
    stream = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)  # the client stops at data: [DONE]; a missing [DONE] would hang or raise here
    assert len(chunks) >= 3
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_chat(client: openai.OpenAI, local: tuple[LlamaModel, Tokenizer]) -> None:
    ids, text = expected(local, chat_text(MESSAGES), 10)
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == text
    assert out.choices[0].finish_reason == "length"
    assert out.usage is not None and (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), 10)


def test_chat_streaming(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=15, temperature=0)
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=15, temperature=0, stream=True)
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage is None  # usage chunk only on request


def test_raw_sse_framing(http: httpx.Client) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events[:-1])
    payloads = [json.loads(e[len("data: ") :]) for e in events[:-2]]
    assert {p["id"] for p in payloads} == {payloads[0]["id"]}


def test_sampling_with_a_seed_is_reproducible(client: openai.OpenAI) -> None:
    def draw(seed: int) -> str:
        out = client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=16, temperature=1.0, top_p=0.9, seed=seed
        )
        return out.choices[0].text

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


def test_stop_sequence(client: openai.OpenAI) -> None:
    text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0).choices[0].text
    stop = text[4:6]
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0, stop=[stop])
    assert out.choices[0].text == text[: text.index(stop)]
    assert out.choices[0].finish_reason == "stop"
    assert out.usage is not None and out.usage.completion_tokens < 20
    streamed = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == out.choices[0].text


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def test_request_errors_have_the_openai_shape(http: httpx.Client) -> None:
    chat = "/v1/chat/completions"
    headers = {"content-type": "application/json"}
    assert_openai_error(http.post(chat, content=b'{"model": "tiny-', headers=headers), 400)
    assert_openai_error(http.post(chat, content=b"[1, 2]", headers=headers), 400)
    assert_openai_error(http.post(chat, json={"messages": MESSAGES}), 400, "model")
    assert_openai_error(http.post(chat, json={"model": MODEL}), 400, "messages")
    assert_openai_error(http.post("/v1/completions", json={"model": MODEL}), 400, "prompt")
    negative = {"model": MODEL, "messages": MESSAGES, "max_tokens": -1}
    assert_openai_error(http.post(chat, json=negative), 400, "max_tokens")
    assert_openai_error(http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 0}), 400)
    assert_openai_error(http.post(chat, json={"model": MODEL, "messages": "hi"}), 400, "messages")
    error = assert_openai_error(http.post(chat, json={"model": "gpt-4", "messages": MESSAGES}), 404, "model")
    assert error["code"] == "model_not_found"
    too_long = {"model": MODEL, "prompt": "x", "max_tokens": 10_000}
    assert assert_openai_error(http.post("/v1/completions", json=too_long), 400)["code"] == "context_length_exceeded"
    assert_openai_error(http.get("/v1/nothing-here"), 404)
    assert_openai_error(http.get("/v1/completions"), 405)


def test_errors_through_the_openai_client(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=-5)
    assert bad.value.param == "max_tokens"


def test_token_id_prompt(client: openai.OpenAI, local: tuple[LlamaModel, Tokenizer]) -> None:
    ids, text = expected(local, PROMPT, 6)
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert out.choices[0].text == text and out.usage.prompt_tokens == len(ids)


def test_requests_queue_while_probes_stay_responsive(engine: CpuEngineProcess, client: openai.OpenAI) -> None:
    results: list[int] = []

    def long_request() -> None:
        out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=200, temperature=0.7, seed=1)
        results.append(out.usage.completion_tokens)

    threads = [threading.Thread(target=long_request) for _ in range(3)]
    for t in threads:
        t.start()
    probe_s = []
    while any(t.is_alive() for t in threads):
        start = time.perf_counter()
        assert engine.probe("/ping") == 200
        probe_s.append(time.perf_counter() - start)
        time.sleep(0.02)
    for t in threads:
        t.join()
    assert sorted(results) == [200, 200, 200]
    assert len(probe_s) >= 3 and max(probe_s) < 0.5  # the event loop never waited for inference


def test_client_disconnect_frees_the_worker(
    engine: CpuEngineProcess, client: openai.OpenAI, http: httpx.Client
) -> None:
    body = {"model": MODEL, "prompt": "x", "max_tokens": 250, "temperature": 1.0, "seed": 0, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")  # generation started; now hang up
    deadline = time.perf_counter() + 10
    while (last := http.get("/stats").json()["last_request"]) is None or not last["cancelled"]:
        assert time.perf_counter() < deadline, last
        time.sleep(0.02)
    assert last["completion_tokens"] < 250
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=3).usage.completion_tokens == 3


def test_stats_report_startup_and_first_token(http: httpx.Client, client: openai.OpenAI) -> None:
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0)
    stats = http.get("/stats").json()
    assert stats["state"] == "ready" and stats["model"] == MODEL and not stats["progressive"]
    assert stats["weights_resident"]
    assert 0 < stats["process_started_at_s"] <= stats["imports_done_at_s"] <= stats["ready_at_s"]
    assert stats["weights_resident_at_s"] <= stats["ready_at_s"] < stats["first_token_at_s"]
    assert stats["load_s"] > 0
    assert stats["requests"] >= 1 and stats["requests_failed"] == 0
    assert 0 < stats["first_token_s"] < 5
    assert stats["last_request"]["completion_tokens"] == 2
    # the batching counters, with the limits CpuEngineProcess passed (--max-num-seqs 8) and the defaults
    assert (stats["max_num_seqs"], stats["prefill_chunk_tokens"]) == (8, 256)
    assert stats["running"] == 0 and stats["waiting"] == 0 and stats["requests_queued"] == 0
    assert stats["steps"] > 0 and stats["decode_tokens"] > 0 and 1 <= stats["mean_batch_size"] <= 8


@pytest.mark.parametrize(
    ("flag", "value"), [("--max-num-seqs", "0"), ("--prefill-chunk-tokens", "0"), ("--step-delay-s", "-1")]
)
def test_invalid_batching_flags_are_refused_at_start(tiny_llama: Path, flag: str, value: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "live.engines.cpu_server", "--model-dir", str(tiny_llama), flag, value],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2 and flag in proc.stderr
