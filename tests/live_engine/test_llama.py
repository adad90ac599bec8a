"""The Llama forward pass against a plain reference, the KV cache, sampling, and progressive weights."""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from live.engines.base import (
    BackgroundSafetensorsLayerSource,
    EventLayerSource,
    LayerSource,
    SafetensorsLayerSource,
    tensor_group,
)
from live.engines.llama import (
    LlamaConfig,
    LlamaModel,
    position_generator,
    position_seed,
    rope_inv_freq,
    sample_token,
)

PROMPT = [0, 17, 42, 99, 5, 250, 3, 77, 128, 64, 11]


def reference_logits(model_dir: Path, ids: list[int]) -> torch.Tensor:
    """Llama written out the long way in float64: loops over heads, explicit causal softmax, RoPE by angle."""
    cfg = json.loads((model_dir / "config.json").read_text())
    w = {k: v.double() for k, v in load_file(str(model_dir / "model.safetensors")).items()}
    hidden, n_heads, n_kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, eps, n = hidden // n_heads, cfg["rms_norm_eps"], len(ids)

    def norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)

    # the rotation of pair (j, j + hd/2) at position pos by angle pos / theta^(2j/hd) (HF's layout)
    pos = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    angle = pos / cfg["rope_theta"] ** (2 * torch.arange(hd // 2, dtype=torch.float64) / hd)
    cos, sin = angle.cos(), angle.sin()

    def rope(x: torch.Tensor) -> torch.Tensor:  # x: [n, hd]
        a, b = x[:, : hd // 2], x[:, hd // 2 :]
        return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)

    x = w["model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = norm(x, w[p + "input_layernorm.weight"])
        q, k, v = (h @ w[p + f"self_attn.{m}_proj.weight"].T for m in "qkv")
        heads = []
        for head in range(n_heads):
            kv = head // (n_heads // n_kv)
            qh = rope(q[:, head * hd : (head + 1) * hd])
            kh = rope(k[:, kv * hd : (kv + 1) * hd])
            vh = v[:, kv * hd : (kv + 1) * hd]
            scores = qh @ kh.T / math.sqrt(hd)
            scores = scores.masked_fill(torch.ones(n, n).triu(1).bool(), float("-inf"))
            heads.append(torch.softmax(scores, dim=-1) @ vh)
        x = x + torch.cat(heads, dim=-1) @ w[p + "self_attn.o_proj.weight"].T
        h = norm(x, w[p + "post_attention_layernorm.weight"])
        gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
        x = x + (gate * torch.sigmoid(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    lm_head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return norm(x, w["model.norm.weight"]) @ lm_head.T


@pytest.fixture(scope="module")
def model(tiny_llama: Path) -> LlamaModel:
    return LlamaModel.from_dir(tiny_llama)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_llama_bf16_tied"])
def test_forward_matches_reference(fixture: str, request: pytest.FixtureRequest) -> None:
    model_dir: Path = request.getfixturevalue(fixture)
    model = LlamaModel.from_dir(model_dir, dtype=torch.float32)
    logits = model.forward(PROMPT)
    expected = reference_logits(model_dir, PROMPT)
    assert logits.shape == (len(PROMPT), model.config.vocab_size)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits.double(), expected, atol=2e-4, rtol=1e-4)
    # and the logits are not trivially equal across positions (attention and RoPE did something)
    assert not torch.allclose(logits[0], logits[-1])


def test_bfloat16_compute_is_close_to_float32(tiny_llama: Path, model: LlamaModel) -> None:
    bf16 = LlamaModel.from_dir(tiny_llama, dtype=torch.bfloat16)
    logits16, logits32 = bf16.forward(PROMPT), model.forward(PROMPT)
    assert logits16.dtype == torch.float32  # logits are always returned in float32
    assert (logits16 - logits32).abs().max() < 0.1 * logits32.abs().max()


def test_kv_cache_incremental_decode_equals_full_recompute(model: LlamaModel) -> None:
    full = model.forward(PROMPT)
    cache = model.new_cache(len(PROMPT))
    parts = [model.forward(PROMPT[:4], cache)]  # prefill
    parts.append(model.forward(PROMPT[4:7], cache))  # a chunk after cached tokens: the offset causal mask
    parts += [model.forward([t], cache) for t in PROMPT[7:]]  # one token at a time
    assert cache.length == len(PROMPT)
    torch.testing.assert_close(torch.cat(parts), full, atol=1e-5, rtol=1e-5)
    last = model.forward(PROMPT, model.new_cache(len(PROMPT)), last_only=True)
    torch.testing.assert_close(last, full[-1:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="KV cache full"):
        model.forward([1], cache)


def test_greedy_generation_is_argmax_of_full_recompute(model: LlamaModel) -> None:
    generation = model.generate(PROMPT, max_tokens=12, temperature=0.0)
    tokens = list(generation)
    assert generation.finish_reason == "length"
    assert len(tokens) == 12
    seq = list(PROMPT)
    for token in tokens:
        assert token == int(model.forward(seq)[-1].argmax())
        seq.append(token)


def test_generation_stops_at_eos_without_yielding_it(model: LlamaModel) -> None:
    greedy = list(model.generate(PROMPT, max_tokens=10))
    eos = greedy[5]
    generation = model.generate(PROMPT, max_tokens=10, eos_token_ids=[eos])
    assert list(generation) == greedy[: greedy.index(eos)]
    assert generation.finish_reason == "stop"


def test_generation_is_clipped_at_the_context_limit(model: LlamaModel) -> None:
    context = model.config.max_position_embeddings
    prompt = (PROMPT * 100)[: context - 3]
    generation = model.generate(prompt, max_tokens=50)
    assert len(list(generation)) == 3
    assert generation.finish_reason == "length"
    with pytest.raises(ValueError, match="context"):
        model.generate((PROMPT * 100)[:context], max_tokens=1)


def test_sampling_is_deterministic_with_a_seed(model: LlamaModel) -> None:
    def draw(seed: int) -> list[int]:
        return list(model.generate(PROMPT, max_tokens=20, temperature=1.0, top_p=0.95, seed=seed))

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)
    assert draw(7) != list(model.generate(PROMPT, max_tokens=20))  # sampling is not greedy here


def test_sample_token_top_p_and_temperature() -> None:
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0])
    gen = torch.Generator().manual_seed(0)
    assert sample_token(logits, temperature=0.0) == 1
    # top_p small enough keeps only the most likely token, whatever the generator draws
    assert {sample_token(logits, 1.0, top_p=0.3, generator=gen) for _ in range(50)} == {1}
    # the nucleus of mass 0.9 is {1, 2}: never 0 or 3
    assert {sample_token(logits, 1.0, top_p=0.9, generator=gen) for _ in range(200)} == {1, 2}
    # a very low temperature is nearly greedy; without top-p every token is reachable at high temperature
    assert {sample_token(logits, 0.01, generator=gen) for _ in range(50)} == {1}
    assert {sample_token(logits, 2.0, generator=gen) for _ in range(400)} == {0, 1, 2, 3}


def test_llama3_rope_scaling_keeps_high_and_scales_low_frequencies() -> None:
    base = dict(
        hidden_size=1024,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=8,
        max_position_embeddings=131072,
        rope_theta=500000.0,
    )
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    plain = rope_inv_freq(LlamaConfig(**base))
    scaled = rope_inv_freq(LlamaConfig(**base, rope_scaling=scaling))
    wavelen = 2 * math.pi / plain
    high = wavelen < 8192 / 4.0
    low = wavelen > 8192 / 1.0
    assert high.any() and low.any() and (~high & ~low).any()
    torch.testing.assert_close(scaled[high], plain[high])
    torch.testing.assert_close(scaled[low], plain[low] / 8.0)
    middle = ~high & ~low
    assert ((scaled[middle] < plain[middle]) & (scaled[middle] > plain[middle] / 8.0)).all()
    linear = rope_inv_freq(LlamaConfig(**base, rope_scaling={"type": "linear", "factor": 2.0}))
    torch.testing.assert_close(linear, plain / 2.0)


def test_tensor_groups_follow_compute_order() -> None:
    assert tensor_group("model.embed_tokens.weight", 3) == 0
    assert tensor_group("model.layers.0.self_attn.q_proj.weight", 3) == 1
    assert tensor_group("model.layers.2.mlp.down_proj.weight", 3) == 3
    assert tensor_group("model.norm.weight", 3) == 4
    assert tensor_group("lm_head.weight", 3) == 4
    with pytest.raises(ValueError):
        tensor_group("model.layers.3.mlp.up_proj.weight", 3)
    with pytest.raises(ValueError):
        tensor_group("vision_tower.weight", 3)


def test_progressive_forward_overlaps_loading_and_matches(tiny_llama: Path, model: LlamaModel) -> None:
    eager = SafetensorsLayerSource(tiny_llama)
    source = EventLayerSource(eager.n_layers)
    assert isinstance(source, LayerSource)
    delay_s = 0.1

    def release() -> None:
        for group in range(source.n_groups):
            time.sleep(delay_s)
            source.put(group, eager.wait(group))

    producer = threading.Thread(target=release)
    start = time.perf_counter()
    producer.start()
    progressive = LlamaModel.from_dir(tiny_llama, layer_source=source)  # returns before any weight arrived
    assert not progressive.resident
    logits = progressive.forward(PROMPT)
    finished = time.perf_counter()
    producer.join()

    assert torch.equal(logits, model.forward(PROMPT))
    assert progressive.resident
    last = source.n_groups - 1
    for group in range(source.n_groups):
        assert progressive.group_computed_at[group] >= source.released_at[group]
    # the embeddings and layer 0 (groups 0, 1) were computed while the last group was still in flight
    assert progressive.group_computed_at[1] < source.released_at[last]
    assert finished - start >= source.n_groups * delay_s


def test_groups_taken_by_a_loading_thread_while_the_first_forward_runs(tiny_llama: Path, model: LlamaModel) -> None:
    """The progressive engine converts groups in its loading thread as they land; the forward pass shares them."""
    eager = SafetensorsLayerSource(tiny_llama)
    source = EventLayerSource(eager.n_layers)
    progressive = LlamaModel.from_dir(tiny_llama, layer_source=source)
    taker = threading.Thread(target=progressive.materialize)
    taker.start()

    def release() -> None:
        for group in range(source.n_groups):
            time.sleep(0.02)
            source.put(group, eager.wait(group))

    producer = threading.Thread(target=release)
    producer.start()
    logits = progressive.forward(PROMPT)
    producer.join()
    taker.join(5)
    assert not taker.is_alive() and progressive.resident
    assert torch.equal(logits, model.forward(PROMPT))
    for group in range(source.n_groups):  # taken once, before the forward pass computed it
        assert source.released_at[group] <= progressive.group_resident_at[group] <= progressive.group_computed_at[group]


def test_progressive_load_failure_raises_instead_of_hanging(tiny_llama: Path) -> None:
    eager = SafetensorsLayerSource(tiny_llama)
    source = EventLayerSource(eager.n_layers)
    source.put(0, eager.wait(0))
    source.put(1, eager.wait(1))
    progressive = LlamaModel.from_dir(tiny_llama, layer_source=source)
    threading.Timer(0.05, source.fail, args=(OSError("tier went away"),)).start()
    with pytest.raises(RuntimeError, match="tier went away"):
        progressive.forward(PROMPT)
    assert progressive.group_computed_at.keys() == {0, 1}


def test_background_source_loads_everything_in_order(tiny_llama: Path, model: LlamaModel) -> None:
    source = BackgroundSafetensorsLayerSource(tiny_llama, delay_s_per_group=0.01).start()
    progressive = LlamaModel.from_dir(tiny_llama, layer_source=source)
    assert torch.equal(progressive.forward(PROMPT), model.forward(PROMPT))
    assert source.done.wait(5) and source.error is None and source.load_s is not None
    times = [source.released_at[g] for g in range(source.n_groups)]
    assert times == sorted(times)


def test_missing_tensor_and_wrong_shape_are_reported(tmp_path: Path, tiny_llama: Path) -> None:
    config = LlamaConfig.from_dir(tiny_llama)
    eager = SafetensorsLayerSource(tiny_llama)
    source = EventLayerSource(eager.n_layers)
    for group in range(source.n_groups):
        source.put(group, dict(eager.wait(group)))
    del source.wait(1)["model.layers.0.mlp.up_proj.weight"]
    source.wait(2)["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    broken = LlamaModel(config, source)
    with pytest.raises(KeyError, match="up_proj"):
        broken.forward(PROMPT)
    source.wait(1)["model.layers.0.mlp.up_proj.weight"] = eager.wait(1)["model.layers.0.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match="shape"):
        broken.forward(PROMPT)


# --------------------------------------------------------------------------- batched forward


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_llama_bf16_tied"])
def test_batched_step_equals_one_forward_per_sequence(fixture: str, request: pytest.FixtureRequest) -> None:
    """Sequences of different lengths, some prefilling a chunk after cached tokens, some decoding one token."""
    model = LlamaModel.from_dir(request.getfixturevalue(fixture))
    prompts = [PROMPT, PROMPT[:3], [9, 8, 7, 6, 5, 4, 3, 2], [42]]
    cached = [4, 2, 0, 1]  # tokens already in each sequence's cache before the step (0: a fresh prefill)
    solo_caches, batch_caches = [], []
    for prompt, n in zip(prompts, cached, strict=True):
        for caches in (solo_caches, batch_caches):
            cache = model.new_cache(32)
            if n:
                model.forward(prompt[:n], cache)
            caches.append(cache)
    # the step: seq 0 a 7-token chunk, seq 1 a decode token, seq 2 its whole prompt, seq 3 a decode token
    news = [PROMPT[4:], PROMPT[2:3], prompts[2], [17]]
    solo = torch.cat([model.forward(new, cache, last_only=True) for new, cache in zip(news, solo_caches, strict=True)])
    batched = model.forward_batch(list(zip(news, batch_caches, strict=True)))
    assert batched.shape == (4, model.config.vocab_size) and batched.dtype == torch.float32
    torch.testing.assert_close(batched, solo, atol=1e-4, rtol=1e-4)
    for a, b in zip(solo_caches, batch_caches, strict=True):
        assert a.length == b.length
        for layer in range(model.config.num_hidden_layers):
            torch.testing.assert_close(a.keys[layer][:, : a.length], b.keys[layer][:, : b.length], atol=1e-5, rtol=1e-5)
    # and against the float64 reference: each row is the last position of that sequence's full text
    full = [prompts[0], PROMPT[:3], prompts[2], [42, 17]]
    model_dir = request.getfixturevalue(fixture)
    for row, ids in enumerate(full):
        torch.testing.assert_close(batched[row].double(), reference_logits(model_dir, ids)[-1], atol=2e-4, rtol=1e-4)


def test_batched_decode_continues_like_single_sequence_generation(model: LlamaModel) -> None:
    prompts = [PROMPT, PROMPT[:5], PROMPT[3:9]]
    greedy = [list(model.generate(p, max_tokens=6)) for p in prompts]
    caches = [model.new_cache(len(p) + 6) for p in prompts]
    logits = model.forward_batch(list(zip(prompts, caches, strict=True)))
    tokens: list[list[int]] = [[] for _ in prompts]
    for _ in range(6):
        for seq, row in zip(tokens, logits, strict=True):
            seq.append(int(row.argmax()))
        logits = model.forward_batch([([seq[-1]], cache) for seq, cache in zip(tokens, caches, strict=True)])
    assert tokens == greedy


def test_forward_batch_rejects_a_cache_twice_and_an_empty_step(model: LlamaModel) -> None:
    cache = model.new_cache(8)
    with pytest.raises(ValueError, match="twice"):
        model.forward_batch([([1], cache), ([2], cache)])
    with pytest.raises(ValueError, match="at least one"):
        model.forward_batch([])
    assert cache.length == 0


def test_progressive_batched_forward_matches(tiny_llama: Path, model: LlamaModel) -> None:
    eager = SafetensorsLayerSource(tiny_llama)
    source = EventLayerSource(eager.n_layers)
    progressive = LlamaModel.from_dir(tiny_llama, layer_source=source)

    def release() -> None:
        for group in range(source.n_groups):
            time.sleep(0.02)
            source.put(group, eager.wait(group))

    producer = threading.Thread(target=release)
    producer.start()
    segments = [PROMPT, PROMPT[:4]]
    logits = progressive.forward_batch([(ids, progressive.new_cache(16)) for ids in segments])
    producer.join()
    expected = model.forward_batch([(ids, model.new_cache(16)) for ids in segments])
    assert torch.equal(logits, expected)
    assert progressive.group_computed_at[1] < source.released_at[source.n_groups - 1]  # overlapped loading


# --------------------------------------------------------------------------- per-position sampling


def test_position_seeds_depend_on_seed_and_position_only() -> None:
    assert position_seed(7, 3) == position_seed(7, 3)
    seeds = {position_seed(s, k) for s in range(20) for k in range(50)}
    assert len(seeds) == 1000 and all(0 <= x < 2**63 for x in seeds)  # no collisions among neighbours
    assert position_seed(-1, 0) == position_seed(2**64 - 1, 0)  # seeds are taken modulo 2**64
    logits = torch.randn(300, generator=torch.Generator().manual_seed(0))
    draws = [sample_token(logits, 1.0, 1.0, position_generator(5, k)) for k in range(40)]
    assert draws == [sample_token(logits, 1.0, 1.0, position_generator(5, k)) for k in range(40)]
    assert len(set(draws)) > 10  # positions are not correlated into one token


def test_generated_token_k_is_drawn_from_seed_and_k(model: LlamaModel) -> None:
    """Generation's draw for token k equals a fresh sampler at (seed, k) on the full recompute's logits."""
    generation = model.generate(PROMPT, max_tokens=10, temperature=1.0, top_p=0.9, seed=11)
    tokens = list(generation)
    seq = list(PROMPT)
    for k, token in enumerate(tokens):
        assert token == sample_token(model.forward(seq)[-1], 1.0, 0.9, position_generator(11, k))
        seq.append(token)


def test_sample_token_draws_by_the_distribution() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    counts = torch.zeros(3)
    for k in range(3000):
        counts[sample_token(logits, 1.0, 1.0, position_generator(1, k))] += 1
    torch.testing.assert_close(counts / counts.sum(), torch.tensor([0.5, 0.3, 0.2]), atol=0.03, rtol=0)
