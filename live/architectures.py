"""Which Hugging Face decoder architectures the CPU engine computes exactly, and the refusal of everything else.

    check_supported(json.load(f), "ckpt/config.json")    # raises UnsupportedArchitecture naming the field or type
    arch_fields(raw, where)                              # the architecture part of a `LlamaConfig`, normalized

Supported: `llama` (Llama 2 and 3.x, `llama3`/`linear` rope scaling, tied embeddings, `attention_bias`),
`mistral` (sliding-window attention), `qwen2` (q/k/v biases, optional sliding window) and `qwen3` (per-head
q/k RMSNorm, explicit `head_dim`). Both config spellings are read: transformers 4 (`rope_theta` +
`rope_scaling`) and transformers 5 (`rope_parameters` holding `rope_theta`). A missing key takes the
default of the transformers config class of that `model_type`, so the engine computes what
`AutoModelForCausalLM` computes for the same config.json.

Anything else is refused, never approximated: another `model_type`, a mixture of experts, quantized
weights, remote code, an unknown rope type, `mlp_bias`, an activation other than SiLU, and any config field
this module does not know (an unknown field may change the maths; refusing is the only safe reading).
Pure and torch-free: the catalog checks a checkpoint at registration without importing torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# model_type -> the transformers class whose forward pass the engine reproduces
SUPPORTED: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

# transformers' defaults for keys a config.json may leave out (its config classes' field defaults)
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "head_dim": 0},
    "mistral": {"max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-6, "head_dim": 0, "sliding_window": 4096},
    "qwen2": {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "head_dim": 0, "sliding_window": 4096,
              "max_window_layers": 28},
    "qwen3": {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "head_dim": 128, "sliding_window": 4096,
              "max_window_layers": 28},
}  # fmt: skip
_DEFAULT_THETA = 10000.0

# keys every supported type reads (the sizes, rope, dtype, special tokens) ...
_CORE_KEYS = frozenset({
    "architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling",
    "rope_parameters", "head_dim", "torch_dtype", "dtype", "tie_word_embeddings", "bos_token_id", "eos_token_id",
    "pad_token_id", "initializer_range", "hidden_act",
})  # fmt: skip
# ... keys that cannot change a forward pass at inference (training, generation defaults, bookkeeping) ...
_HARMLESS_KEYS = frozenset({
    "transformers_version", "_name_or_path", "use_cache", "attention_dropout", "pretraining_tp",
    "output_attentions", "output_hidden_states", "return_dict", "torchscript", "use_bfloat16", "tf_legacy_loss",
    "is_encoder_decoder", "is_decoder", "add_cross_attention", "tie_encoder_decoder", "chunk_size_feed_forward",
    "id2label", "label2id", "problem_type", "finetuning_task", "tokenizer_class", "prefix", "sep_token_id",
    "decoder_start_token_id", "task_specific_params", "cross_attention_hidden_size", "max_length", "min_length",
    "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k",
    "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "_attn_implementation_autoset",
})  # fmt: skip
# ... and each type's own keys (pretraining_tp: transformers 5 ignores it; 4 computed the same sums in slices)
_TYPE_KEYS: dict[str, frozenset[str]] = {
    "llama": frozenset({"attention_bias", "mlp_bias"}),
    "mistral": frozenset({"sliding_window"}),
    "qwen2": frozenset({"use_sliding_window", "sliding_window", "max_window_layers", "layer_types"}),
    "qwen3": frozenset({"attention_bias", "use_sliding_window", "sliding_window", "max_window_layers",
                        "layer_types"}),
}
# fields that name a mixture of experts (a model_type of its own is refused anyway; these catch a relabelled one)
_MOE_KEYS = ("num_local_experts", "num_experts", "num_experts_per_tok", "moe_intermediate_size", "n_routed_experts",
             "n_shared_experts", "shared_expert_intermediate_size", "decoder_sparse_step", "moe_layer_freq")
# rope types and the keys of their parameter dict (transformers' `_compute_*_parameters`)
_ROPE_KEYS: dict[str, frozenset[str]] = {
    "default": frozenset(),
    "linear": frozenset({"factor"}),
    "llama3": frozenset({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}),
}
_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})
_DTYPES = frozenset({"float32", "float16", "bfloat16"})


class UnsupportedArchitecture(ValueError):
    """A config.json the CPU engine would not compute exactly as transformers does (the message names why)."""


def check_supported(config: Mapping[str, Any], where: str) -> None:
    """Raise `UnsupportedArchitecture` (message: `where`, then the field or type) unless the engine computes
    this config exactly; `where` names the file, e.g. "ckpt/config.json"."""
    arch_fields(config, where)


def _refuse(where: str, message: str) -> UnsupportedArchitecture:
    return UnsupportedArchitecture(f"{where}: {message}")


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def arch_fields(config: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The architecture-dependent `LlamaConfig` fields of a config.json, after `check_supported`'s checks.

    Returns model_type, rope_theta, rope_scaling (None for plain rope, else a dict with `rope_type`),
    qkv_bias, o_bias, qk_norm, sliding_window, sliding_layers, and transformers' defaults for missing
    max_position_embeddings, rms_norm_eps and head_dim.
    """
    if not isinstance(config, Mapping):
        raise ValueError(f"{where}: must be a JSON object, got {type(config).__name__}")
    # a config without model_type: tierlab's own generator wrote Llama configs before it wrote the type
    model_type = config.get("model_type", "llama")
    if model_type not in SUPPORTED:
        raise _refuse(where, f"model_type {model_type!r} is not supported by the CPU engine "
                             f"(supported: {', '.join(sorted(SUPPORTED))})")
    for key in _MOE_KEYS:
        if config.get(key):
            raise _refuse(where, f"field {key!r}={config[key]!r} makes this a mixture-of-experts model; "
                                 "MoE is not supported by the CPU engine")
    if config.get("quantization_config") is not None:
        raise _refuse(where, "field 'quantization_config': quantized weights are not supported by the CPU engine")
    if config.get("auto_map") is not None:
        raise _refuse(where, "field 'auto_map': a model with its own modelling code is not supported")
    known = _CORE_KEYS | _HARMLESS_KEYS | _TYPE_KEYS[model_type]
    unknown = sorted(k for k in config if k not in known)
    if unknown:
        raise _refuse(where, f"field(s) {', '.join(map(repr, unknown))} not implemented by the CPU engine for "
                             f"model_type {model_type!r}; refusing rather than risk computing a different model")
    expected = SUPPORTED[model_type]
    architectures = config.get("architectures")
    if architectures is not None and list(architectures) != [expected]:
        raise _refuse(where, f"architectures {architectures!r}: the CPU engine computes {expected!r} only")
    activation = config.get("hidden_act", "silu")
    if activation not in ("silu", "swish"):  # transformers maps both names to SiLU
        raise _refuse(where, f"hidden_act {activation!r} is not supported (the CPU engine computes silu)")
    if config.get("mlp_bias"):
        raise _refuse(where, "field 'mlp_bias': MLP biases are not supported by the CPU engine")
    for key in ("torch_dtype", "dtype"):
        if config.get(key) is not None and config[key] not in _DTYPES:
            raise _refuse(where, f"{key} {config[key]!r} is not one of {sorted(_DTYPES)}")

    defaults = _DEFAULTS[model_type]
    attention_bias = config.get("attention_bias", False)
    if not isinstance(attention_bias, bool):
        raise _refuse(where, f"attention_bias must be true or false, got {attention_bias!r}")
    head_dim = config.get("head_dim")
    fields: dict[str, Any] = {
        "model_type": model_type,
        # Qwen2 always has q/k/v biases and no o_proj bias; Llama's and Qwen3's attention_bias covers all four
        "qkv_bias": model_type == "qwen2" or attention_bias,
        "o_bias": model_type != "qwen2" and attention_bias,
        "qk_norm": model_type == "qwen3",
        "head_dim": defaults["head_dim"] if head_dim is None else head_dim,
        **_rope(config, where),
        **_sliding(config, model_type, where),
    }
    for key in ("max_position_embeddings", "rms_norm_eps"):
        fields[key] = config.get(key, defaults[key])
    return fields


def _rope(config: Mapping[str, Any], where: str) -> dict[str, Any]:
    """rope_theta and the normalized rope_scaling, from either spelling (transformers 5 prefers rope_scaling
    when both are present, and takes rope_theta from the dict, else the top-level key, else 10000)."""
    field = "rope_scaling" if config.get("rope_scaling") else "rope_parameters"
    params = config.get(field) or {}
    if not isinstance(params, Mapping):
        raise _refuse(where, f"{field} must be an object, got {params!r}")
    if params and all(isinstance(v, Mapping) for v in params.values()):
        raise _refuse(where, f"{field}: per-layer-type rope parameters are not supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _ROPE_KEYS:
        raise _refuse(where, f"{field}.rope_type {rope_type!r} is not supported by the CPU engine "
                             f"(supported: {', '.join(sorted(_ROPE_KEYS))})")
    partial = params.get("partial_rotary_factor", 1.0)
    if partial != 1.0:
        raise _refuse(where, f"{field}.partial_rotary_factor {partial!r}: partial rotary embeddings are not "
                             "supported")
    allowed = _ROPE_KEYS[rope_type] | {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
    unknown = sorted(k for k in params if k not in allowed)
    if unknown:
        raise _refuse(where, f"{field}: key(s) {', '.join(map(repr, unknown))} not implemented for rope_type "
                             f"{rope_type!r}")
    theta = params.get("rope_theta", config.get("rope_theta", _DEFAULT_THETA))
    if rope_type == "default":
        return {"rope_theta": theta, "rope_scaling": None}
    scaling: dict[str, Any] = {"rope_type": rope_type}
    if rope_type == "llama3":  # transformers fills the pre-training context from max_position_embeddings
        scaling["original_max_position_embeddings"] = config.get("max_position_embeddings")
    scaling |= {k: params[k] for k in _ROPE_KEYS[rope_type] if k in params}
    for key in _ROPE_KEYS[rope_type]:
        if not _number(scaling.get(key)) or not scaling[key] > 0:
            raise _refuse(where, f"{field}.{key} must be a number > 0 for rope_type {rope_type!r}, "
                                 f"got {scaling.get(key)!r}")
    if rope_type == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise _refuse(where, f"{field}: high_freq_factor must exceed low_freq_factor")
    return {"rope_theta": theta, "rope_scaling": scaling}


def _sliding(config: Mapping[str, Any], model_type: str, where: str) -> dict[str, Any]:
    """sliding_window (None: full attention everywhere) and the layers that attend within it.

    Mistral: every layer, when sliding_window is set (transformers' default 4096 when the key is absent).
    Qwen2/3: only with use_sliding_window, on the layers `layer_types` marks (default: from max_window_layers on).
    """
    if model_type == "llama":
        return {"sliding_window": None, "sliding_layers": ()}
    n_layers = config.get("num_hidden_layers")
    window = config.get("sliding_window", _DEFAULTS[model_type]["sliding_window"])
    if model_type != "mistral" and not config.get("use_sliding_window", False):
        window = None
    layer_types = config.get("layer_types")
    if model_type == "mistral":
        layers = range(n_layers) if isinstance(n_layers, int) else range(0)
    elif layer_types is not None:
        if (not isinstance(layer_types, list) or len(layer_types) != n_layers
                or any(t not in _LAYER_TYPES for t in layer_types)):
            raise _refuse(where, f"layer_types must list {n_layers} of {sorted(_LAYER_TYPES)}, got {layer_types!r}")
        layers = [i for i, t in enumerate(layer_types) if t == "sliding_attention"]
        if layers and window is None:
            raise _refuse(where, "layer_types names sliding_attention layers but no sliding window is enabled "
                                 "(use_sliding_window / sliding_window)")
    else:
        first = config.get("max_window_layers", _DEFAULTS[model_type]["max_window_layers"])
        if not isinstance(first, int):
            raise _refuse(where, f"max_window_layers must be an int, got {first!r}")
        layers = range(first, n_layers) if isinstance(n_layers, int) else range(0)
    if window is None:
        return {"sliding_window": None, "sliding_layers": ()}
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        raise _refuse(where, f"sliding_window must be a positive int or null, got {window!r}")
    return {"sliding_window": window, "sliding_layers": tuple(layers)}
