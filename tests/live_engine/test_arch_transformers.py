"""The CPU engine computes what transformers computes: Llama 2/3.x, Mistral, Qwen2 and Qwen3 checkpoints written by
transformers' own model classes (`save_pretrained`), logits to 1e-4 and greedy tokens equal, in both config
spellings (transformers 4's rope_theta + rope_scaling, transformers 5's rope_parameters)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from live.engines.llama import LlamaModel  # noqa: E402
from live.llama_config import LlamaConfig  # noqa: E402

VOCAB = 96
SIZES = {"vocab_size": VOCAB, "hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 3,
         "num_attention_heads": 6, "num_key_value_heads": 2, "max_position_embeddings": 256,
         "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
PROMPT = [5, 17, 42, 3, 88, 61, 9, 33, 70, 2, 45, 12]
NEW_TOKENS = 16
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}  # short, so the tiny head_dim has all three bands

# name -> (transformers model class, config class, config keywords beyond SIZES)
CASES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama2": ("LlamaForCausalLM", "LlamaConfig", {"num_key_value_heads": 6, "rms_norm_eps": 1e-5}),
    "llama3-rope-scaling-tied": ("LlamaForCausalLM", "LlamaConfig", {
        "tie_word_embeddings": True, "rope_parameters": {"rope_theta": 500000.0, **LLAMA3_ROPE}}),
    "llama-linear-rope-attention-bias": ("LlamaForCausalLM", "LlamaConfig", {
        "attention_bias": True, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}),
    "mistral-sliding-window": ("MistralForCausalLM", "MistralConfig", {"sliding_window": 7}),
    "qwen2-biases-tied": ("Qwen2ForCausalLM", "Qwen2Config", {"tie_word_embeddings": True,
                                                              "rope_parameters": {"rope_theta": 1000000.0}}),
    "qwen2-sliding-layers": ("Qwen2ForCausalLM", "Qwen2Config", {"use_sliding_window": True, "sliding_window": 6,
                                                                 "max_window_layers": 1}),
    "qwen3-qk-norm": ("Qwen3ForCausalLM", "Qwen3Config", {"head_dim": 16}),
}  # fmt: skip


def write_checkpoint(directory: Path, case: str, seed: int = 0) -> Any:
    """A tiny random transformers model of `case`, saved with `save_pretrained` (float32); returns the model.

    Weights are redrawn larger than transformers' init (std 0.02 gives near-uniform logits, where greedy ties
    would decide nothing), biases and norm weights included so that each of them matters.
    """
    model_cls, config_cls, extra = CASES[case]
    config = getattr(transformers, config_cls)(**(SIZES | extra))
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.3 if name.endswith("bias") else 0.15)
    model.save_pretrained(directory)
    return model


def as_transformers_4(directory: Path) -> None:
    """Rewrite config.json in transformers 4's spelling: rope_theta at the top, rope_scaling for a scaled rope."""
    path = directory / "config.json"
    raw = json.loads(path.read_text())
    rope = dict(raw.pop("rope_parameters"))
    raw["rope_theta"] = rope.pop("rope_theta")
    raw["rope_scaling"] = None if rope.get("rope_type") == "default" else rope
    raw["torch_dtype"] = raw.pop("dtype")
    path.write_text(json.dumps(raw, indent=2))


def reference(model: Any, ids: list[int]) -> tuple[torch.Tensor, list[int]]:
    """transformers' logits over `ids` and its greedy continuation of PROMPT."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             do_sample=False, pad_token_id=0)
    return logits, out[0, len(PROMPT):].tolist()


def incremental_logits(engine: LlamaModel, ids: list[int], chunk: int) -> torch.Tensor:
    """Logits over `ids` fed through a KV cache `chunk` tokens at a time (prefill chunks, then decode masks)."""
    cache = engine.new_cache(len(ids))
    parts = [engine.forward(ids[i : i + chunk], cache) for i in range(0, len(ids), chunk)]
    return torch.cat(parts)


@pytest.mark.parametrize("spelling", ["transformers5", "transformers4"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_greedy_tokens_equal_transformers(tmp_path: Path, case: str, spelling: str) -> None:
    model = write_checkpoint(tmp_path, case)
    if spelling == "transformers4":
        as_transformers_4(tmp_path)
        # transformers reads the rewritten config as the same model
        model = getattr(transformers, CASES[case][0]).from_pretrained(tmp_path).eval()
    engine = LlamaModel.from_dir(tmp_path)
    assert engine.config.model_type == json.loads((tmp_path / "config.json").read_text())["model_type"]

    want_logits, want_tokens = reference(model, PROMPT)
    got_tokens = list(engine.generate(PROMPT, max_tokens=NEW_TOKENS, eos_token_ids=()))
    assert got_tokens == want_tokens, case

    ids = PROMPT + want_tokens  # 28 positions: past every sliding window above, on prefill and decode
    want_logits, _ = reference(model, ids)
    diffs = {"prefill": engine.forward(ids), "chunked": incremental_logits(engine, ids, 5),
             "decode": incremental_logits(engine, ids, 1)}
    for how, got in diffs.items():
        diff = float((got - want_logits).abs().max())
        print(f"{case} {spelling} {how}: max |logit diff| {diff:.2e}")
        assert diff < 1e-4, (case, how, diff)


def test_the_configs_read_as_their_architectures(tmp_path: Path) -> None:
    """What each case turns into (so that a test above cannot pass by computing a plainer model)."""
    seen = {}
    for case in CASES:
        write_checkpoint(tmp_path / case, case)
        seen[case] = LlamaConfig.from_dir(tmp_path / case)
    assert seen["llama3-rope-scaling-tied"].rope_scaling == {**LLAMA3_ROPE, "rope_type": "llama3"}
    assert seen["llama3-rope-scaling-tied"].tie_word_embeddings and seen["llama3-rope-scaling-tied"].rope_theta == 5e5
    assert seen["llama-linear-rope-attention-bias"].qkv_bias and seen["llama-linear-rope-attention-bias"].o_bias
    mistral = seen["mistral-sliding-window"]
    assert (mistral.sliding_window, mistral.sliding_layers) == (7, (0, 1, 2))
    assert seen["qwen2-biases-tied"].qkv_bias and not seen["qwen2-biases-tied"].o_bias
    assert seen["qwen2-biases-tied"].sliding_window is None
    assert seen["qwen2-sliding-layers"].sliding_layers == (1, 2)
    assert seen["qwen3-qk-norm"].qk_norm and seen["qwen3-qk-norm"].head_dim == 16  # not 48 // 6
    assert seen["llama2"].rms_norm_eps == 1e-5 and seen["qwen3-qk-norm"].rms_norm_eps == 1e-6
