"""The response cache (core.response_cache, core.response_cache_model) and the simulator's use of it."""

from __future__ import annotations

import numpy as np
import pytest

from core.response_cache import (
    CacheConfig,
    ResponseCache,
    cache_key,
    embed,
    normalize,
    semantic_text,
    unit_draw,
)
from core.response_cache_model import SimCacheConfig, SimResponseCache, cache_summary, prompt_keys

SCOPE = "m /v1/completions {}"


def _cache(**kw: object) -> ResponseCache:
    return ResponseCache(CacheConfig(**{"exact": True, "semantic": True, "threshold": 0.8, "ttl_s": 10.0,
                                        "capacity": 4, **kw}))  # type: ignore[arg-type]


def test_embedding_is_deterministic_normalised_and_similar_for_paraphrases() -> None:
    a = embed("What is the capital of France?")
    assert np.allclose(a, embed("What is the capital of France?")) and np.isclose(np.linalg.norm(a), 1.0)
    assert float(a @ embed("what is the  capital of france")) > 0.9  # case, spaces, punctuation
    assert float(a @ embed("Explain how a bicycle gear works")) < 0.4
    assert not embed("").any() and normalize("  A  b ") == "a b"


def test_exact_hit_then_ttl_expiry() -> None:
    c = _cache(semantic=False)
    assert c.lookup("t", SCOPE, "hello world", 0.0) is None
    c.store("t", SCOPE, "hello world", "ANSWER", 1.0)
    hit = c.lookup("t", SCOPE, "hello world", 5.0)
    assert hit is not None and hit.kind == "exact" and hit.identical and hit.value == "ANSWER"
    assert c.lookup("t", SCOPE, "hello world!", 5.0) is None  # exact means byte for byte
    assert c.lookup("t", SCOPE, "hello world", 11.0) is None  # stored at 1, ttl 10
    assert c.stats.expired == 1 and c.stats.exact == 1


def test_semantic_hit_respects_threshold_and_scope() -> None:
    c = _cache(exact=False)
    c.store("t", SCOPE, "What is the capital of France?", "Paris", 0.0)
    hit = c.lookup("t", SCOPE, "what is the capital of france", 1.0)
    assert hit is not None and hit.kind == "semantic" and not hit.identical and hit.value == "Paris"
    assert c.lookup("t", SCOPE, "How do I bake sourdough bread?", 1.0) is None  # below the threshold
    assert c.lookup("t", "other-model", "What is the capital of France?", 1.0) is None  # other model / params
    strict = _cache(exact=False, threshold=0.999)
    strict.store("t", SCOPE, "What is the capital of France?", "Paris", 0.0)
    assert strict.lookup("t", SCOPE, "what is the capital of france", 1.0) is None
    assert c.stats.semantic == 1 and c.stats.semantic_not_identical == 1


def test_capacity_evicts_least_recently_used() -> None:
    c = _cache(semantic=False, capacity=2)
    c.store("t", SCOPE, "a", 1, 0.0)
    c.store("t", SCOPE, "b", 2, 0.0)
    assert c.lookup("t", SCOPE, "a", 1.0) is not None  # a is now the most recent
    c.store("t", SCOPE, "c", 3, 2.0)  # evicts b
    assert c.lookup("t", SCOPE, "b", 3.0) is None and c.lookup("t", SCOPE, "a", 3.0) is not None
    assert c.entries("t") == 2 and c.stats.evicted == 1


def test_tenants_never_share_answers_even_for_identical_prompts() -> None:
    c = _cache()
    c.store("tenant-a", SCOPE, "the secret plan", "A's answer", 0.0)
    assert c.lookup("tenant-b", SCOPE, "the secret plan", 1.0) is None  # exact: no
    assert c.lookup("tenant-b", SCOPE, "The secret plan.", 1.0) is None  # similar: no
    assert c.lookup("tenant-a", SCOPE, "the secret plan", 1.0) is not None
    # and one tenant filling its partition never evicts another's entries
    for i in range(10):
        c.store("tenant-b", SCOPE, f"p{i}", i, 2.0)
    assert c.lookup("tenant-a", SCOPE, "the secret plan", 3.0) is not None


def test_only_deterministic_plain_text_requests_are_cacheable() -> None:
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 8}
    key = cache_key("/v1/chat/completions", chat)
    assert key is not None and key[1] == "user: hi"
    assert cache_key("/v1/chat/completions", {**chat, "stream": True}) == key  # transport is not in the key
    assert cache_key("/v1/chat/completions", {**chat, "max_tokens": 9})[0] != key[0]  # type: ignore[index]
    assert cache_key("/v1/chat/completions", {**chat, "temperature": 0.7}) is None
    assert cache_key("/v1/chat/completions", {k: v for k, v in chat.items() if k != "temperature"}) is None
    assert cache_key("/v1/chat/completions", {**chat, "n": 2}) is None
    assert cache_key("/v1/chat/completions", {**chat, "logprobs": True}) is None
    assert cache_key("/v1/completions", {"model": "m", "prompt": [1, 2], "temperature": 0}) is None
    assert cache_key("/v1/completions", {"model": "m", "prompt": "x", "temperature": 0}) is not None


def test_similarity_embeds_contents_not_roles() -> None:
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]}
    assert semantic_text("/v1/chat/completions", chat) == "Be brief.\nhi"
    assert cache_key("/v1/chat/completions", {**chat, "temperature": 0})[1] == "system: Be brief.\nuser: hi"  # type: ignore[index]
    c = _cache(exact=False)
    c.store("t", SCOPE, "user: What is the capital of France?", "Paris", 0.0, "What is the capital of France?")
    hit = c.lookup("t", SCOPE, "user: what's the capital of France", 1.0, "what's the capital of France")
    assert hit is not None and hit.kind == "semantic"


def test_off_by_default_and_config_checks() -> None:
    assert not CacheConfig().enabled and CacheConfig.from_mapping(None) == CacheConfig()
    off = ResponseCache(CacheConfig())
    off.store("t", SCOPE, "a", 1, 0.0)
    assert off.lookup("t", SCOPE, "a", 0.0) is None and len(off) == 0
    with pytest.raises(ValueError, match="unknown keys"):
        CacheConfig.from_mapping({"exact": True, "ttl": 3})
    with pytest.raises(ValueError, match="ttl_s"):
        CacheConfig(ttl_s=0)


def test_sim_model_uses_prompt_identity_and_the_stated_hit_rate_model() -> None:
    cfg = SimCacheConfig(CacheConfig(exact=True, semantic=True, ttl_s=100.0), semantic_hit_rate=0.5, seed=3)
    sim = SimResponseCache(cfg)
    assert sim.on_arrival(0, "t", "m", "k1", 0.0) == ""  # nothing stored yet: not even a modelled hit
    sim.on_completed("t", "m", "k1", 1.0)
    assert sim.on_arrival(1, "t", "m", "k1", 2.0) == "exact"
    assert sim.on_arrival(2, "u", "m", "k1", 2.0) == ""  # another tenant
    kinds = [sim.on_arrival(i, "t", "m", f"new{i}", 3.0) for i in range(10, 1010)]
    share = kinds.count("semantic") / len(kinds)
    assert 0.45 < share < 0.55 and set(kinds) == {"", "semantic"}
    assert unit_draw(3, 10, "semantic") == unit_draw(3, 10, "semantic")
    keys = prompt_keys(np.array([5, 5, 7]), [(1, 2), (1, 2), ()])
    assert keys == ["5:1,2", "5:1,2", None] and prompt_keys([1], None) is None


def test_cache_summary_counts_kinds() -> None:
    import pandas as pd

    df = pd.DataFrame({"cache": ["", "exact", "semantic", ""], "outcome": ["completed"] * 4,
                       "e2e_s": [1.0, 0.01, 0.01, 3.0], "prompt_tokens": [1, 2, 3, 4], "output_tokens": [1] * 4})
    s = cache_summary(df)
    assert s["hit_rate"] == 0.5 and s["exact"] == 1 and s["semantic"] == 1 and s["gpu_tokens_saved"] == 7.0
    assert s["hit_e2e_mean_s"] == pytest.approx(0.01) and s["miss_e2e_mean_s"] == pytest.approx(2.0)


def test_report_sweep_counts_wrong_answers_and_falls_with_the_threshold() -> None:
    from experiments.response_cache import prompt_set, sweep, unique_set

    rows = sweep(unique_set())
    assert rows[0]["threshold"] == "exact only" and rows[0]["hit_rate"] == 0.0  # no repeats: no exact hit
    rates = [r["hit_rate"] for r in rows[1:]]
    wrong = [r["wrong"] for r in rows[1:]]
    assert rates == sorted(rates, reverse=True) and wrong == sorted(wrong, reverse=True) and wrong[0] > 0
    assert sweep(prompt_set(60))[0]["exact"] > 0


def test_semantic_entries_expire_and_leave_with_eviction_and_the_matrix_grows() -> None:
    c = _cache(exact=False, capacity=40, ttl_s=10.0)
    c.store("t", SCOPE, "What is the capital of France?", "Paris", 0.0)
    assert c.lookup("t", SCOPE, "what is the capital of france", 10.0) is None  # expired: never answers
    for i in range(45):  # more rows than the matrix starts with; evicts the oldest
        c.store("t", SCOPE, f"unrelated prompt number {i} about topic {i * 7}", i, 11.0)
    assert c.entries("t") == 40 and c.stats.evicted == 6
    hit = c.lookup("t", SCOPE, "unrelated prompt number 44 about topic 308", 12.0)
    assert hit is not None and hit.value == 44 and hit.identical
    evicted = c.lookup("t", SCOPE, "unrelated prompt number 0 about topic 0", 12.0)
    assert evicted is None or evicted.value != 0  # its row left with it
