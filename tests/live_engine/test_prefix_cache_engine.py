"""The CPU engine's prefix (KV) cache: a prompt sharing whole blocks with an earlier one reuses their KV, and
its output is exactly what the engine gives without the cache (random-weight Llama written by the test)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from live.engines.batching import Scheduler, SeqRequest
from live.engines.llama import LlamaModel
from live.engines.prefix_store import KVPrefixStore
from tests.live_engine.conftest import make_checkpoint, serve_engine

BLOCK = 8


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> LlamaModel:
    return LlamaModel.from_dir(make_checkpoint(tmp_path_factory.mktemp("prefix_llama"), seed=3))


def _prompts(vocab: int) -> list[list[int]]:
    """Three prompts: two share a 40-token prefix (5 blocks) with the first, one shares nothing."""
    g = torch.Generator().manual_seed(7)
    shared = torch.randint(2, vocab, (40,), generator=g).tolist()
    tails = [torch.randint(2, vocab, (n,), generator=g).tolist() for n in (5, 11, 3)]
    other = torch.randint(2, vocab, (30,), generator=g).tolist()
    return [shared + tails[0], shared + tails[1], other, shared[:24] + tails[2]]


def _generate(model: LlamaModel, prompts: list[list[int]], prefix_blocks: int,
              chunk: int = 16) -> tuple[list[list[int]], list[dict[str, Any]], Scheduler]:
    """Each prompt alone, one after the other (greedy, 6 tokens): the token ids and the usage of each."""
    sched = Scheduler(max_num_seqs=2, prefill_chunk_tokens=chunk, prefix_cache_blocks=prefix_blocks,
                      prefix_block_tokens=BLOCK)
    sched.start()
    sched.serve(model, lambda ids: " ".join(map(str, ids)) + " ")
    outs, usages = [], []
    try:
        for i, prompt in enumerate(prompts):
            done = threading.Event()
            box: dict[str, Any] = {"text": ""}

            def emit(kind: str, payload: Any, box: dict[str, Any] = box, done: threading.Event = done) -> None:
                if kind == "token":
                    box["text"] += payload
                elif kind in ("done", "error"):
                    box[kind] = payload
                    done.set()

            sched.submit(SeqRequest(f"r{i}", prompt, 6, 0.0, 1.0, 0, [], True, False, emit))
            assert done.wait(60), "no answer"
            assert "done" in box, box
            outs.append([int(t) for t in (box["text"] + box["done"]["text"]).split()])
            usages.append(box["done"]["usage"])
    finally:
        sched.close()
    return outs, usages, sched


def test_outputs_are_identical_with_the_prefix_cache_on_and_off(model: LlamaModel) -> None:
    prompts = _prompts(model.config.vocab_size)
    off, off_usage, _ = _generate(model, prompts, prefix_blocks=0)
    on, on_usage, sched = _generate(model, prompts, prefix_blocks=64)
    assert on == off and all(len(o) == 6 for o in on)
    # off: no cache, no field; on: the later prompts took their shared whole blocks from the cache
    assert all("prompt_tokens_details" not in u for u in off_usage)
    cached = [u["prompt_tokens_details"]["cached_tokens"] for u in on_usage]
    assert cached == [0, 40, 0, 24]
    stats = sched.stats()["prefix_cache"]
    assert stats["hit_tokens"] == 64 and stats["blocks"] > 0


def test_reused_kv_gives_the_logits_of_a_full_prefill(model: LlamaModel) -> None:
    prompt = _prompts(model.config.vocab_size)[1]
    full = model.forward(prompt, model.new_cache(len(prompt)), last_only=True)
    store = KVPrefixStore(capacity_blocks=16, block_tokens=BLOCK)
    first = model.new_cache(len(prompt))
    model.forward(prompt, first)
    store.store(prompt, first)
    again = model.new_cache(len(prompt))
    n = store.reuse(prompt, again)
    assert n == (len(prompt) // BLOCK) * BLOCK and n < len(prompt)
    reused = model.forward(prompt[n:], again, last_only=True)
    torch.testing.assert_close(reused, full, rtol=1e-4, atol=1e-4)


def test_the_store_evicts_least_recent_blocks_and_their_tensors(model: LlamaModel) -> None:
    prompts = _prompts(model.config.vocab_size)
    store = KVPrefixStore(capacity_blocks=4, block_tokens=BLOCK)
    for p in prompts[:3]:
        cache = model.new_cache(len(p))
        model.forward(p, cache)
        store.store(p, cache)
    assert store.stats()["blocks"] == 4 == len(store.index)  # tensors follow the index's evictions


def test_the_served_engine_reports_cached_tokens_in_usage(tiny_llama: Path) -> None:
    """Over HTTP: the second prompt with the same long start is answered as without the cache, and its usage says
    how many prompt tokens came from the cache (OpenAI's `prompt_tokens_details.cached_tokens`, which the gateway
    records as `cached_tokens`)."""
    import httpx

    from live.gateway_records import cached_prompt_tokens

    shared = "Serverless inference loads a model when the first request arrives. " * 3

    def ask(url: str, tail: str) -> dict[str, Any]:
        body = {"model": "tiny-llama", "prompt": shared + tail, "max_tokens": 5, "temperature": 0, "ignore_eos": True}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()

    with serve_engine(tiny_llama, prefix_cache_blocks=64, prefix_block_tokens=BLOCK) as on:
        first, second = ask(on.url, "hello world"), ask(on.url, "a cold start")
    with serve_engine(tiny_llama) as off:
        plain = ask(off.url, "a cold start")
    assert cached_prompt_tokens(first["usage"]) == 0
    cached = cached_prompt_tokens(second["usage"])
    assert cached >= BLOCK and cached % BLOCK == 0
    assert second["choices"][0]["text"] == plain["choices"][0]["text"]
    assert "prompt_tokens_details" not in plain["usage"]
