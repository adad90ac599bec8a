"""The structural inference model (core/inference.py): each term by hand on explicit specs (not the shipped
configs, whose fitted numbers may change), and the properties the structure is for: logits for sampled tokens
only, causal attention that grows with the prompt and the context, separate weight and KV read efficiencies,
tensor-parallel all-reduces, and the spec validation that guards them."""

from __future__ import annotations

import dataclasses

import pytest

from core.catalog import architecture
from core.errors import ConfigError
from core.inference import InferenceModel
from core.spec_builders import engine_from_dict, gpu_from_dict, model_from_dict
from core.specs import EngineSpec, GpuSpec

F, B = 1000e12, 4e12  # FLOP/s and HBM bytes/s of the test GPU
GPU = GpuSpec(name="g", mem_bytes=80e9, hbm_Bps=B, flops=F, h2d_Bps=50e9)
NVLINK = dataclasses.replace(GPU, allreduce_bus_Bps=500e9, allreduce_latency_s=20e-6)
ENGINE = EngineSpec(prefill_mfu=0.5, weight_read_eff=0.8, kv_read_eff=0.6)
M8 = architecture("llama-3.1-8b")  # 32 layers, hidden 4096, vocab 128256, untied


def test_specs_split_the_lm_head_from_the_layers() -> None:
    head = 128256 * 4096
    assert M8.head_params == head
    assert M8.layer_params * 32 == pytest.approx(8.03e9 - 2 * head)  # untied: embedding and head both out
    tied = architecture("llama-3.2-1b")
    assert tied.layer_params * 16 == pytest.approx(1.24e9 - 128256 * 2048)  # tied: one matrix
    unknown = dataclasses.replace(M8, vocab_size=0)
    assert unknown.layer_params * 32 == pytest.approx(8.03e9) and unknown.head_params == 0


def test_prefill_by_hand_one_gpu() -> None:
    im = InferenceModel(M8, GPU, 1, ENGINE)
    t = 1000
    dense = max(2 * M8.layer_params * 32 * t / (F * 0.5), M8.layer_params * 32 * 2 / (B * 0.8))
    attention = 2 * 32 * 4096 * t * t / (F * 0.5)  # causal: QK^T and AV over the lower triangle
    logits = max(2 * M8.head_params / (F * 0.5), M8.head_params * 2 / (B * 0.8))  # the last token only
    assert im.prefill_s(t) == pytest.approx(dense + attention + logits)


def test_decode_by_hand_two_gpus_with_overheads() -> None:
    eng = dataclasses.replace(ENGINE, layer_overhead_s=40e-6, elementwise_passes=8.0, step_overhead_s=1e-3)
    im = InferenceModel(M8, NVLINK, 2, eng)
    batch, ctx = 16, 16 * 3000
    dense = max(2 * M8.layer_params * 32 * batch / (2 * F * 0.5), M8.layer_params * 32 * 2 / (2 * B * 0.8))
    dense += 32 * (8.0 * batch * 4096 * 2 / B + 40e-6)  # elementwise traffic on every GPU, kernel floors
    attention = max(4 * 32 * 4096 * ctx / (2 * F * 0.5), ctx * M8.kv_bytes_per_token / (2 * B * 0.6))
    logits = max(2 * M8.head_params * batch / (2 * F * 0.5), M8.head_params * 2 / (2 * B * 0.8))
    allreduce = 2 * 32 * (20e-6 + 2 * (2 - 1) / 2 * batch * 4096 * 2 / 500e9)
    assert im.decode_iter_s(batch, ctx) == pytest.approx(dense + attention + logits + allreduce + 1e-3)


def test_logits_only_for_the_last_prompt_token() -> None:
    # same parameters, vocabulary unknown: every prompt token pays the LM head
    known, unknown = M8, dataclasses.replace(M8, vocab_size=0, tied_embeddings=False)
    unknown = dataclasses.replace(unknown, params_b=(M8.layer_params * 32 + M8.head_params) / 1e9)
    a, b = InferenceModel(known, GPU, 1, ENGINE), InferenceModel(unknown, GPU, 1, ENGINE)
    t = 4000  # compute-bound
    head_once = max(2 * M8.head_params / (F * 0.5), M8.head_params * 2 / (B * 0.8))  # the last token's logits
    assert b.prefill_s(t) - a.prefill_s(t) == pytest.approx(2 * M8.head_params * t / (F * 0.5) - head_once)
    # a decode step samples every sequence: the head costs the same either way once compute-bound
    assert a.decode_iter_s(4096, 0) == pytest.approx(b.decode_iter_s(4096, 0))


def test_attention_grows_with_prompt_and_context() -> None:
    im = InferenceModel(M8, GPU, 1, ENGINE)
    coef = 2 * 32 * 4096 / (F * 0.5)
    # beyond the weight-bound knee, the second difference is the causal quadratic term alone
    assert (im.prefill_s(6000) - 2 * im.prefill_s(4000) + im.prefill_s(2000)) == pytest.approx(
        coef * (6000**2 - 2 * 4000**2 + 2000**2))
    by_ctx = [im.decode_iter_s(16, ctx) for ctx in (0, 1e4, 1e5, 1e6)]
    assert by_ctx == sorted(by_ctx) and len(set(by_ctx)) == 4


def test_weight_and_kv_read_efficiencies_are_separate() -> None:
    slow_kv = dataclasses.replace(ENGINE, kv_read_eff=0.3)
    a, b = InferenceModel(M8, GPU, 1, ENGINE), InferenceModel(M8, GPU, 1, slow_kv)
    ctx = 2e6  # KV-read bound
    assert a.decode_iter_s(8, 0) == pytest.approx(b.decode_iter_s(8, 0))  # weights: unchanged
    kv_a = a.decode_iter_s(8, ctx) - a.decode_iter_s(8, 0)
    kv_b = b.decode_iter_s(8, ctx) - b.decode_iter_s(8, 0)
    assert kv_b == pytest.approx(2 * kv_a) and kv_a == pytest.approx(ctx * M8.kv_bytes_per_token / (B * 0.6))
    slow_w = InferenceModel(M8, GPU, 1, dataclasses.replace(ENGINE, weight_read_eff=0.4))
    assert slow_w.decode_iter_s(1, 0) == pytest.approx(2 * a.decode_iter_s(1, 0), rel=0.01)


def test_tensor_parallel_pays_two_allreduces_per_layer() -> None:
    free_one, free_two = InferenceModel(M8, GPU, 1, ENGINE), InferenceModel(M8, GPU, 2, ENGINE)
    # no interconnect cost configured: two GPUs halve every term
    assert free_two.decode_iter_s(4, 1000) == pytest.approx(free_one.decode_iter_s(4, 1000) / 2)
    assert free_two.prefill_s(4000) == pytest.approx(free_one.prefill_s(4000) / 2)
    for n in (2, 4, 8):
        paid, free = InferenceModel(M8, NVLINK, n, ENGINE), InferenceModel(M8, GPU, n, ENGINE)
        t = 512
        ring = 2 * (n - 1) / n * t * 4096 * 2 / 500e9
        assert paid.prefill_s(t) - free.prefill_s(t) == pytest.approx(2 * 32 * (20e-6 + ring))
    assert InferenceModel(M8, NVLINK, 1, ENGINE).prefill_s(512) == InferenceModel(M8, GPU, 1, ENGINE).prefill_s(512)


def test_allreduce_formula() -> None:
    assert NVLINK.allreduce_s(1e6, 1) == 0.0
    assert NVLINK.allreduce_s(1e6, 4) == pytest.approx(20e-6 + 1.5 * 1e6 / 500e9)
    assert GPU.allreduce_s(1e9, 8) == 0.0  # inf bus bandwidth, no latency: free


def test_engine_efficiencies_validated_and_legacy_name_read() -> None:
    e = engine_from_dict({"decode_hbm_eff": 0.6})
    assert (e.weight_read_eff, e.kv_read_eff) == (0.6, 0.6)
    e = engine_from_dict({"decode_hbm_eff": 0.6, "kv_read_eff": 0.4})
    assert (e.weight_read_eff, e.kv_read_eff) == (0.6, 0.4)
    with pytest.raises(ConfigError, match="kv_read_eff must be <= 1"):
        engine_from_dict({"kv_read_eff": 1.5})
    with pytest.raises(ConfigError, match=r"engine.weight_read_eff must be a positive number"):
        engine_from_dict({"weight_read_eff": 0})
    with pytest.raises(ConfigError, match=r"engine.layer_overhead_s must be a non-negative number"):
        engine_from_dict({"layer_overhead_s": -1e-6})


def test_gpu_and_model_specs_validated() -> None:
    base = {"name": "g", "mem_bytes": 1e9, "hbm_Bps": 1e12, "flops": 1e14, "h2d_Bps": 1e10}
    assert gpu_from_dict(base, "gpu").allreduce_bus_Bps == float("inf")
    with pytest.raises(ConfigError, match=r"gpu.allreduce_bus_Bps must be a positive number"):
        gpu_from_dict({**base, "allreduce_bus_Bps": 0}, "gpu")
    with pytest.raises(ConfigError, match=r"gpu.allreduce_latency_s must be a non-negative number"):
        gpu_from_dict({**base, "allreduce_latency_s": -1}, "gpu")
    model = {"name": "m", "params_b": 0.1, "n_layers": 2, "hidden_size": 1024, "n_kv_heads": 2, "head_dim": 64}
    assert model_from_dict({**model, "vocab_size": 32000}, "models.extra[0]").layer_params > 0
    with pytest.raises(ConfigError, match=r"models.extra\[0\]: vocab_size x hidden_size"):
        model_from_dict({**model, "vocab_size": 200000}, "models.extra[0]")
