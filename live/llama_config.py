"""The fields of a Hugging Face Llama `config.json`: one dataclass for the checkpoint generator and the CPU engine.

    config = LlamaConfig.from_dir("ckpt")               # or LlamaConfig.from_hf_config(json.load(f))
    json.dumps(config.to_hf_config())                    # as transformers' LlamaConfig writes it
    for name, shape in tensor_shapes(config): ...        # HF tensor names in forward (= file) order

Pure and torch-free: the generator and the node agent use it without importing torch.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.specs import ModelSpec
from live.architectures import SUPPORTED, arch_fields

CONFIG_FILE = "config.json"

# one decoder layer's tensors (suffixes of "model.layers.{i}."), in the order the forward pass uses them
LAYER_TENSORS = (
    "input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)  # fmt: skip

_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
_POSITIVE_INTS = (*_REQUIRED, "num_key_value_heads", "max_position_embeddings")
_POSITIVE_FLOATS = ("rms_norm_eps", "rope_theta", "initializer_range")


@dataclass(frozen=True)
class LlamaConfig:
    """A Llama decoder's architecture and the config.json keys an engine needs (HF names and defaults).

    `head_dim` 0 means hidden_size // num_attention_heads and is resolved at construction (so a
    `dataclasses.replace` that changes hidden_size or the heads should pass head_dim=0 again).
    `eos_token_ids` holds config.json's `eos_token_id`, which may be one id or a list.
    """

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False)
    head_dim: int = 0
    torch_dtype: str = "float32"
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    initializer_range: float = 0.02
    # the architecture (`live.architectures`): which transformers model this config is computed as
    model_type: str = "llama"
    qkv_bias: bool = False  # q_proj, k_proj, v_proj have biases (Qwen2; attention_bias elsewhere)
    o_bias: bool = False  # o_proj has a bias (attention_bias in Llama and Qwen3)
    qk_norm: bool = False  # per-head RMSNorm of queries and keys before rope (Qwen3)
    sliding_window: int | None = None  # attention window of the layers in sliding_layers (None: full everywhere)
    sliding_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
        if not _is_int(self.head_dim) or self.head_dim < 0:
            raise ValueError(f"LlamaConfig.head_dim must be an int >= 0 (0: derived), got {self.head_dim!r}")
        if self.head_dim == 0:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"LlamaConfig.hidden_size={self.hidden_size} is not a multiple of "
                                 f"num_attention_heads={self.num_attention_heads} (and no head_dim is given)")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"LlamaConfig.num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim={self.head_dim} must be even (rotary embeddings)")
        for name in _POSITIVE_FLOATS:
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"LlamaConfig.{name} must be a number > 0, got {value!r}")
        if not isinstance(self.tie_word_embeddings, bool) or not isinstance(self.torch_dtype, str):
            raise ValueError(f"LlamaConfig: tie_word_embeddings must be a bool and torch_dtype a string, got "
                             f"{self.tie_word_embeddings!r} and {self.torch_dtype!r}")
        if self.model_type not in SUPPORTED:
            raise ValueError(f"LlamaConfig.model_type {self.model_type!r} is not one of {sorted(SUPPORTED)}")
        for name in ("qkv_bias", "o_bias", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LlamaConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.sliding_window is not None and (not _is_int(self.sliding_window) or self.sliding_window <= 0):
            raise ValueError(f"LlamaConfig.sliding_window must be a positive int or None, got {self.sliding_window!r}")
        if not isinstance(self.sliding_layers, tuple) or not all(
            _is_int(i) and 0 <= i < self.num_hidden_layers for i in self.sliding_layers
        ):
            raise ValueError(f"LlamaConfig.sliding_layers must be a tuple of layer indices, "
                             f"got {self.sliding_layers!r}")
        ids = (() if self.bos_token_id is None else (self.bos_token_id,)) + tuple(self.eos_token_ids)
        if not isinstance(self.eos_token_ids, tuple) or not all(_is_int(i) and i >= 0 for i in ids):
            raise ValueError(f"LlamaConfig.bos_token_id and eos_token_ids must be token ids (ints >= 0), "
                             f"got {self.bos_token_id!r} and {self.eos_token_ids!r}")

    @property
    def n_params(self) -> int:
        """Parameters in the checkpoint's tensors (an untied lm_head counted once)."""
        return sum(math.prod(shape) for _, shape in tensor_shapes(self))

    def window(self, layer: int) -> int | None:
        """The sliding attention window of decoder layer `layer` (None: it attends to every earlier position)."""
        return self.sliding_window if layer in self.sliding_layers else None

    @classmethod
    def from_hf_config(cls, raw: Mapping[str, Any], where: str = CONFIG_FILE) -> LlamaConfig:
        """The config a config.json's contents describe; missing optional keys take transformers' defaults
        for its model_type.

        A missing required key or a bad value raises ValueError naming `where` and the key; an architecture
        or field the engine does not compute exactly raises `UnsupportedArchitecture` (a ValueError).
        """
        if not isinstance(raw, Mapping):
            raise ValueError(f"{where}: must be a JSON object, got {type(raw).__name__}")
        missing = [k for k in _REQUIRED if raw.get(k) is None]
        if missing:
            raise ValueError(f"{where}: missing required key(s) {', '.join(missing)}")
        arch = arch_fields(raw, where)  # refuses what the engine would not compute exactly
        eos = raw.get("eos_token_id")
        optional = {
            **arch,
            "torch_dtype": raw.get("torch_dtype") or raw.get("dtype"),  # newer transformers write "dtype"
            "tie_word_embeddings": raw.get("tie_word_embeddings"),
            "bos_token_id": raw.get("bos_token_id"),
            "eos_token_ids": None if eos is None else tuple(eos) if isinstance(eos, list) else (eos,),
            "initializer_range": raw.get("initializer_range"),
        }
        # JSON may spell a float as an int (rope_theta: 500000); keep the dataclass's types
        optional |= {k: float(optional[k]) for k in _POSITIVE_FLOATS if _is_int(optional[k])}
        try:
            return cls(
                **{k: raw[k] for k in _REQUIRED},
                # HF: num_key_value_heads absent or null means plain multi-head attention
                num_key_value_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"],
                **{k: v for k, v in optional.items() if v is not None},
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from None

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike[str]) -> LlamaConfig:
        """The config of a checkpoint directory's config.json; errors name the file."""
        path = Path(model_dir) / CONFIG_FILE
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from None
        return cls.from_hf_config(raw, str(path))

    def to_hf_config(self) -> dict[str, Any]:
        """config.json contents, keys and fixed values as transformers' LlamaConfig writes them (a plain Llama
        config only: tierlab generates Llama checkpoints, it reads the other architectures)."""
        if (self.model_type, self.qkv_bias, self.o_bias, self.qk_norm, self.sliding_window) != (
            "llama", False, False, False, None
        ):
            raise ValueError(f"to_hf_config writes plain Llama configs only, not model_type {self.model_type!r} "
                             "with biases, q/k norms or a sliding window")
        eos: int | list[int] | None = (
            None if not self.eos_token_ids else self.eos_token_ids[0] if len(self.eos_token_ids) == 1
            else list(self.eos_token_ids)
        )  # fmt: skip
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "hidden_act": "silu",
            "initializer_range": self.initializer_range,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "pretraining_tp": 1,
            "use_cache": True,
            "torch_dtype": self.torch_dtype,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
        }


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def layer_tensor_shapes(c: LlamaConfig, layer: int) -> list[tuple[str, tuple[int, ...]]]:
    """HF names and shapes ([out, in], as nn.Linear stores them) of decoder layer `layer`, forward order.

    With the config's biases (q/k/v: Qwen2, attention_bias; o_proj: attention_bias) and Qwen3's q/k norms.
    """
    h, i = c.hidden_size, c.intermediate_size
    q_out, kv_out = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    shapes = ((h,), (q_out, h), (kv_out, h), (kv_out, h), (h, q_out), (h,), (i, h), (i, h), (h, i))
    out = []
    for t, s in zip(LAYER_TENSORS, shapes, strict=True):
        out.append((f"model.layers.{layer}.{t}.weight", s))
        if (c.qkv_bias and t in _QKV) or (c.o_bias and t == "self_attn.o_proj"):
            out.append((f"model.layers.{layer}.{t}.bias", s[:1]))
        if c.qk_norm and t == "self_attn.k_proj":
            out += [(f"model.layers.{layer}.self_attn.{n}.weight", (c.head_dim,)) for n in ("q_norm", "k_norm")]
    return out


def tensor_shapes(c: LlamaConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the checkpoint in forward order: embeddings, layers 0..N-1, final norm, lm_head.

    lm_head is left out when the config ties it to the embeddings (HF checkpoints then do not store it).
    """
    out = [("model.embed_tokens.weight", (c.vocab_size, c.hidden_size))]
    for layer in range(c.num_hidden_layers):
        out += layer_tensor_shapes(c, layer)
    out.append(("model.norm.weight", (c.hidden_size,)))
    if not c.tie_word_embeddings:
        out.append(("lm_head.weight", (c.vocab_size, c.hidden_size)))
    return out


_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
# the config.json fields that give each kind of tensor its shape (for errors that name them)
_SHAPE_FIELDS = {
    "embed_tokens.weight": "(vocab_size, hidden_size)", "lm_head.weight": "(vocab_size, hidden_size)",
    "q_proj.weight": "(num_attention_heads*head_dim, hidden_size)", "q_proj.bias": "(num_attention_heads*head_dim,)",
    "k_proj.weight": "(num_key_value_heads*head_dim, hidden_size)", "k_proj.bias": "(num_key_value_heads*head_dim,)",
    "v_proj.weight": "(num_key_value_heads*head_dim, hidden_size)", "v_proj.bias": "(num_key_value_heads*head_dim,)",
    "o_proj.weight": "(hidden_size, num_attention_heads*head_dim)", "o_proj.bias": "(hidden_size,)",
    "q_norm.weight": "(head_dim,)", "k_norm.weight": "(head_dim,)",
    "gate_proj.weight": "(intermediate_size, hidden_size)", "up_proj.weight": "(intermediate_size, hidden_size)",
    "down_proj.weight": "(hidden_size, intermediate_size)", "layernorm.weight": "(hidden_size,)",
    "norm.weight": "(hidden_size,)",
}  # fmt: skip
# tensors an HF checkpoint may carry that no forward pass reads (old Llama 2 exports stored rope's buffer)
IGNORED_TENSOR_SUFFIXES = ("rotary_emb.inv_freq",)


def shape_error(c: LlamaConfig, name: str, expected: tuple[int, ...], actual: tuple[int, ...], where: str) -> str:
    """The message for a tensor whose shape is not the config's: names the tensor and the config fields."""
    fields = next((f for suffix, f in _SHAPE_FIELDS.items() if name.endswith(suffix)), "the config")
    return (f"{where} does not match the weights: tensor {name!r} has shape {tuple(actual)}, but config.json's "
            f"{fields} = {tuple(expected)} (hidden_size={c.hidden_size}, intermediate_size={c.intermediate_size}, "
            f"num_attention_heads={c.num_attention_heads}, num_key_value_heads={c.num_key_value_heads}, "
            f"head_dim={c.head_dim}, vocab_size={c.vocab_size})")


def check_weight_shapes(c: LlamaConfig, shapes: Mapping[str, Sequence[int]], where: str = CONFIG_FILE) -> None:
    """Raise ValueError unless the checkpoint's tensors (name -> shape, e.g. from the safetensors headers) are
    exactly the ones `c` computes with, each of the config's shape: a missing tensor, a tensor the engine would
    not use (e.g. a bias the config does not announce) and a size that differs from config.json are named."""
    expected = dict(tensor_shapes(c))
    if c.tie_word_embeddings and "lm_head.weight" in shapes:  # a tied checkpoint may still store lm_head
        expected["lm_head.weight"] = expected["model.embed_tokens.weight"]
    missing = [n for n in expected if n not in shapes]
    if missing:
        raise ValueError(f"{where}: the weights lack tensor(s) {', '.join(map(repr, missing[:5]))} that config.json "
                         f"(model_type {c.model_type!r}) needs")
    extra = sorted(n for n in shapes if n not in expected and not n.endswith(IGNORED_TENSOR_SUFFIXES))
    if extra:
        raise ValueError(f"{where}: the weights hold tensor(s) {', '.join(map(repr, extra[:5]))} that config.json "
                         f"(model_type {c.model_type!r}) does not use; refusing rather than compute another model")
    for name, shape in expected.items():
        if tuple(shapes[name]) != shape:
            raise ValueError(shape_error(c, name, shape, tuple(shapes[name]), where))


CHECKPOINT_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def model_spec(name: str, config: LlamaConfig, resident_dtype_bytes: int) -> ModelSpec:
    """The `core.specs.ModelSpec` a policy plans with for a checkpoint of this architecture.

    Its `weights_bytes` is the checkpoint's size (`config.torch_dtype`): what a tier holds and a load moves.
    `resident_dtype_bytes` is the dtype the ENGINE holds the weights in (a CPU engine computing in float32 holds
    a bfloat16 checkpoint as 4 bytes per parameter): `resident_bytes`, what an instance takes of its node's
    memory. The parameter count is the tensors' (`tensor_shapes`).
    """
    if not _is_int(resident_dtype_bytes) or resident_dtype_bytes <= 0:
        raise ValueError(f"resident_dtype_bytes must be a positive int, got {resident_dtype_bytes!r}")
    stored = CHECKPOINT_DTYPE_BYTES.get(config.torch_dtype)
    if stored is None:
        raise ValueError(f"config.json torch_dtype {config.torch_dtype!r} is not one of "
                         f"{sorted(CHECKPOINT_DTYPE_BYTES)}")
    return ModelSpec(name=name, params_b=config.n_params / 1e9, n_layers=config.num_hidden_layers,
                     hidden_size=config.hidden_size, n_kv_heads=config.num_key_value_heads,
                     head_dim=config.head_dim, dtype_bytes=stored, resident_dtype_bytes=resident_dtype_bytes,
                     vocab_size=config.vocab_size, tied_embeddings=config.tie_word_embeddings)
