"""The one Llama config class: HF config.json in and out, validation naming the key, tensor shapes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from live.llama_config import LlamaConfig, layer_tensor_shapes, tensor_shapes

# meta-llama/Llama-3.2-1B's config.json (the keys that matter here, as published)
LLAMA_32_1B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "torch_dtype": "bfloat16", "tie_word_embeddings": True,
    "bos_token_id": 128000, "eos_token_id": 128001, "initializer_range": 0.02,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}  # fmt: skip
SMALL = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
         "vocab_size": 300}


def test_reads_a_published_config_and_counts_its_parameters():
    c = LlamaConfig.from_hf_config(LLAMA_32_1B)
    assert (c.head_dim, c.num_key_value_heads, c.tie_word_embeddings) == (64, 8, True)
    assert (c.bos_token_id, c.eos_token_ids, c.torch_dtype) == (128000, (128001,), "bfloat16")
    assert c.rope_scaling is not None and c.rope_scaling["rope_type"] == "llama3"
    assert c.n_params == 1_235_814_400  # the model card's 1.23B: tied lm_head not counted twice
    assert "lm_head.weight" not in dict(tensor_shapes(c))


def test_round_trip_through_config_json():
    c = LlamaConfig.from_hf_config(LLAMA_32_1B | {"eos_token_id": [128001, 128008]})
    written = c.to_hf_config()
    assert written["eos_token_id"] == [128001, 128008] and written["head_dim"] == 64
    assert LlamaConfig.from_hf_config(json.loads(json.dumps(written))) == c
    for key, value in LLAMA_32_1B.items():
        if key != "eos_token_id":
            assert written[key] == value, key


def test_hf_defaults_fill_missing_optional_keys():
    c = LlamaConfig.from_hf_config(SMALL | {"num_key_value_heads": None, "rope_theta": 500000})
    assert c.num_key_value_heads == 4  # null: plain multi-head attention, as transformers reads it
    # rms_norm_eps: transformers' LlamaConfig default (1e-6)
    assert c.head_dim == 16 and c.max_position_embeddings == 2048 and c.rms_norm_eps == 1e-6
    assert isinstance(c.rope_theta, float) and c.rope_theta == 500000.0
    assert (c.bos_token_id, c.eos_token_ids, c.tie_word_embeddings) == (None, (), False)
    assert c.to_hf_config()["eos_token_id"] is None


@pytest.mark.parametrize(("change", "names"), [
    ({"hidden_size": None}, "hidden_size"),  # explicitly null: still missing
    ({"vocab_size": "300"}, "vocab_size"),
    ({"num_hidden_layers": 0}, "num_hidden_layers"),
    ({"head_dim": 15}, "head_dim"),
    ({"rms_norm_eps": 0}, "rms_norm_eps"),
    ({"eos_token_id": [1, "2"]}, "eos_token_ids"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
])  # fmt: skip
def test_bad_values_name_the_file_and_the_key(change: dict, names: str):
    raw = {k: v for k, v in (SMALL | change).items() if v is not None}
    with pytest.raises(ValueError, match=rf"^ck/config\.json: .*{names}"):
        LlamaConfig.from_hf_config(raw, "ck/config.json")


def test_missing_keys_and_broken_files_are_named(tmp_path: Path):
    with pytest.raises(ValueError, match=r"missing required key.*intermediate_size, vocab_size"):
        LlamaConfig.from_hf_config({k: v for k, v in SMALL.items() if k not in ("intermediate_size", "vocab_size")})
    with pytest.raises(ValueError, match="must be a JSON object"):
        LlamaConfig.from_hf_config([SMALL])  # type: ignore[arg-type]
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path}/config.json: not valid JSON")):
        LlamaConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(SMALL | {"num_key_value_heads": 3}))
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path}/config.json: ") + ".*num_key_value_heads=3"):
        LlamaConfig.from_dir(tmp_path)


def test_explicit_head_dim_sets_projection_shapes():
    c = LlamaConfig.from_hf_config(SMALL | {"hidden_size": 60, "head_dim": 8, "num_key_value_heads": 2})
    shapes = dict(layer_tensor_shapes(c, 1))
    assert shapes["model.layers.1.self_attn.q_proj.weight"] == (32, 60)  # 4 heads x 8, not hidden x hidden
    assert shapes["model.layers.1.self_attn.k_proj.weight"] == (16, 60)
    assert shapes["model.layers.1.self_attn.o_proj.weight"] == (60, 32)
    names = [name for name, _ in tensor_shapes(c)]
    assert names[0] == "model.embed_tokens.weight" and names[-2:] == ["model.norm.weight", "lm_head.weight"]
    assert len(names) == 3 + 9 * c.num_hidden_layers
