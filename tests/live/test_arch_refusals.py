"""Anything the CPU engine would not compute exactly is refused, at registration and at load, naming the field,
the type or the tensor: another model_type, MoE, an unknown rope type, mlp_bias, another activation, an unknown
field, and weights that do not match config.json (a hidden size, an unannounced bias)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from core.errors import ConfigError
from experiments.serve_catalog import build_catalog
from live.architectures import UnsupportedArchitecture, check_supported
from live.checkpoint_check import check_checkpoint
from live.llama_config import LlamaConfig

transformers = pytest.importorskip("transformers")

BASE = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64,
        "hidden_act": "silu", "rope_theta": 10000.0}


@pytest.mark.parametrize(("change", "message"), [
    ({"model_type": "gemma"}, "model_type 'gemma' is not supported by the CPU engine (supported: llama, mistral, "
                              "qwen2, qwen3)"),
    ({"model_type": "mixtral", "num_local_experts": 8}, "model_type 'mixtral' is not supported"),
    ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "num_experts": 4},
     "field 'num_experts'=4 makes this a mixture-of-experts model; MoE is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type 'yarn' is not supported"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
     "rope_parameters.rope_type 'dynamic' is not supported"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0, "mscale": 1.0}}, "rope_scaling: key(s) 'mscale'"),
    ({"rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "rope_parameters.partial_rotary_factor 0.5: partial rotary"),
    ({"mlp_bias": True}, "field 'mlp_bias': MLP biases are not supported"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"logit_softcapping": 30.0}, "field(s) 'logit_softcapping' not implemented by the CPU engine for model_type "
                                  "'llama'"),
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"], "attention_bias": True},
     "field(s) 'attention_bias' not implemented"),
    ({"architectures": ["LlamaForSequenceClassification"]},
     "architectures ['LlamaForSequenceClassification']: the CPU engine computes 'LlamaForCausalLM' only"),
    ({"quantization_config": {"quant_method": "gptq"}}, "field 'quantization_config': quantized weights"),
    ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "layer_types": ["full_attention", "chunked"]},
     "layer_types must list 2 of"),
])  # fmt: skip
def test_unsupported_configs_are_refused_naming_the_field(change: dict[str, Any], message: str) -> None:
    with pytest.raises(UnsupportedArchitecture, match="^ck/config.json: " + re.escape(message)):
        check_supported(BASE | change, "ck/config.json")
    with pytest.raises(ValueError, match=re.escape(message)):  # every reader of the config refuses it too
        LlamaConfig.from_hf_config(BASE | change, "ck/config.json")


def test_supported_configs_pass() -> None:
    check_supported(BASE, "ck/config.json")
    check_supported(BASE | {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                            "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False,
                            "pretraining_tp": 1, "transformers_version": "4.45.0", "torch_dtype": "bfloat16"},
                    "ck/config.json")


def _save(directory: Path, model_cls: str, config_cls: str, **extra: Any) -> Path:
    sizes = {k: v for k, v in BASE.items() if k not in ("model_type", "architectures", "hidden_act", "rope_theta")}
    getattr(transformers, model_cls)(getattr(transformers, config_cls)(**sizes, **extra)).save_pretrained(directory)
    return directory


def _edit(directory: Path, **changes: Any) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def test_a_hidden_size_that_does_not_match_the_weights_is_refused_at_registration_and_load(tmp_path: Path) -> None:
    ckpt = _save(tmp_path / "m", "LlamaForCausalLM", "LlamaConfig")
    check_checkpoint(ckpt)  # as written: fine
    _edit(ckpt, hidden_size=40)  # head_dim stays 8 (explicit), so only the weights can tell
    want = (f"{ckpt}/config.json does not match the weights: tensor 'model.embed_tokens.weight' has shape (64, 32), "
            "but config.json's (vocab_size, hidden_size) = (64, 40)")
    with pytest.raises(ConfigError, match="^catalog.m: " + re.escape(want)):
        build_catalog({"m": {"local_dir": str(ckpt)}}, tmp_path / "cache", progress=False)
    from live.engines.llama import LlamaModel

    with pytest.raises(ValueError, match=re.escape("tensor 'model.embed_tokens.weight' has shape (64, 32), but "
                                                   "config.json's (vocab_size, hidden_size) = (64, 40)")):
        LlamaModel.from_dir(ckpt)


def test_heads_and_intermediate_size_mismatches_name_the_field(tmp_path: Path) -> None:
    ckpt = _save(tmp_path / "m", "LlamaForCausalLM", "LlamaConfig")
    _edit(ckpt, intermediate_size=50)
    with pytest.raises(ValueError, match=re.escape("'model.layers.0.mlp.gate_proj.weight' has shape (48, 32), but "
                                                   "config.json's (intermediate_size, hidden_size) = (50, 32)")):
        check_checkpoint(ckpt)
    _edit(ckpt, intermediate_size=48, num_key_value_heads=4)
    with pytest.raises(ValueError, match=re.escape("'model.layers.0.self_attn.k_proj.weight' has shape (16, 32), "
                                                   "but config.json's (num_key_value_heads*head_dim, hidden_size)")):
        check_checkpoint(ckpt)


def test_weights_the_config_does_not_explain_are_refused(tmp_path: Path) -> None:
    """A Qwen2 checkpoint relabelled as Llama: its q/k/v biases would be silently dropped; refused instead."""
    ckpt = _save(tmp_path / "q", "Qwen2ForCausalLM", "Qwen2Config")
    raw = json.loads((ckpt / "config.json").read_text())
    for key in ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types"):
        raw.pop(key)
    (ckpt / "config.json").write_text(json.dumps(raw | {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ValueError, match=re.escape("weights hold tensor(s) 'model.layers.0.self_attn.k_proj.bias'")):
        check_checkpoint(ckpt)
    from live.engines.llama import LlamaModel

    with pytest.raises(ValueError, match=r"does not use tensor\(s\) 'model.layers.0.self_attn.k_proj.bias'"):
        LlamaModel.from_dir(ckpt)


def test_an_unsupported_architecture_stops_the_catalog_before_publishing(tmp_path: Path) -> None:
    ckpt = _save(tmp_path / "g", "LlamaForCausalLM", "LlamaConfig")
    _edit(ckpt, model_type="gemma", architectures=["GemmaForCausalLM"])
    with pytest.raises(ConfigError, match=re.escape(f"catalog.g: {ckpt}/config.json: model_type 'gemma' is not "
                                                    "supported by the CPU engine")):
        build_catalog({"g": {"local_dir": str(ckpt)}}, tmp_path / "cache", progress=False)
