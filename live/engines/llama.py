"""A compact Llama forward pass in torch for the CPU engine (no transformers dependency).

Batch size 1: RMSNorm, rotary embeddings (rope_theta, optional "linear"/"llama3" rope scaling),
grouped-query attention with a preallocated KV cache, SwiGLU MLP, tied or separate lm_head.
Weights come from a `LayerSource`, one group at a time (0 = embeddings, 1..N = decoder layers,
N+1 = final norm + lm_head), taken lazily: with a progressive source the first forward pass
computes layer i as soon as layer i is resident, while later layers are still loading. A loading
thread may call `materialize()` meanwhile, so that each group is converted to the compute dtype as
it lands rather than when the forward pass reaches it. The config is `live.llama_config.LlamaConfig`.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from live.engines.base import LayerSource, SafetensorsLayerSource
from live.llama_config import LlamaConfig, layer_tensor_shapes, tensor_shapes

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    """Rotary inverse frequencies (float32, head_dim / 2), with HF's "linear" and "llama3" scaling."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif rope_type == "llama3":
        # Llama 3.1+: long wavelengths are divided by `factor`, short ones kept, the band between interpolated
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif rope_type != "default":
        raise NotImplementedError(f"rope scaling {rope_type!r} is not supported")
    return inv_freq.to(torch.float32)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32 (as HF does) and cast back before the weight multiply."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class LayerWeights:
    """One decoder layer's weights, in the model's dtype (nn.Linear layout: [out, in]).

    Field names are the last part of the HF names (`llama_config.LAYER_TENSORS`).
    """

    input_layernorm: torch.Tensor
    q_proj: torch.Tensor
    k_proj: torch.Tensor
    v_proj: torch.Tensor
    o_proj: torch.Tensor
    post_attention_layernorm: torch.Tensor
    gate_proj: torch.Tensor
    up_proj: torch.Tensor
    down_proj: torch.Tensor


class KVCache:
    """Keys and values of one sequence, preallocated to `capacity_tokens` positions per layer."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, capacity_tokens: int, dtype: torch.dtype) -> None:
        self.capacity_tokens = capacity_tokens
        self.keys = [torch.empty(n_kv_heads, capacity_tokens, head_dim, dtype=dtype) for _ in range(n_layers)]
        self.values = [torch.empty(n_kv_heads, capacity_tokens, head_dim, dtype=dtype) for _ in range(n_layers)]
        self.length = 0  # positions filled (advanced once per forward, after every layer wrote)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v ([kv_heads, T, head_dim]) after the cached positions; return all keys and values so far."""
        end = self.length + k.shape[1]
        if end > self.capacity_tokens:
            raise ValueError(f"KV cache full: {end} positions > capacity {self.capacity_tokens}")
        self.keys[layer][:, self.length : end] = k
        self.values[layer][:, self.length : end] = v
        return self.keys[layer][:, :end], self.values[layer][:, :end]


def sample_token(
    logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None
) -> int:
    """Greedy when temperature <= 0; else temperature + nucleus (top-p) sampling drawn from `generator`."""
    if temperature <= 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        keep = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) < top_p
        sorted_probs = sorted_probs * keep
        pick = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
        return int(order[pick])
    return int(torch.multinomial(probs, 1, generator=generator))


class LlamaModel:
    """Llama weights plus the forward pass; weights are pulled group by group from a `LayerSource`."""

    def __init__(self, config: LlamaConfig, source: LayerSource, dtype: torch.dtype = torch.float32) -> None:
        if source.n_layers != config.num_hidden_layers:
            raise ValueError(f"layer source has {source.n_layers} layers, config {config.num_hidden_layers}")
        self.config = config
        self.source = source
        self.dtype = dtype
        self.n_groups = config.num_hidden_layers + 2
        self._embed: torch.Tensor | None = None
        self._layers: list[LayerWeights | None] = [None] * config.num_hidden_layers
        self._norm: torch.Tensor | None = None
        self._lm_head: torch.Tensor | None = None
        self._lock = threading.Lock()
        self._inv_freq = rope_inv_freq(config)
        self._shapes = dict(tensor_shapes(config))
        # a tied checkpoint may still store lm_head (then it is used, and has the embedding's shape)
        self._shapes.setdefault("lm_head.weight", self._shapes["model.embed_tokens.weight"])
        # perf_counter() when each group became usable here, and when the first forward pass finished it:
        # the evidence that compute overlapped loading
        self.group_resident_at: dict[int, float] = {}
        self.group_computed_at: dict[int, float] = {}

    @classmethod
    def from_dir(
        cls,
        model_dir: str | os.PathLike[str],
        dtype: torch.dtype = torch.float32,
        layer_source: LayerSource | None = None,
    ) -> LlamaModel:
        """A model for a HF Llama checkpoint directory.

        Without `layer_source` every weight is read now; with one, weights are taken lazily from it
        (the first forward pass blocks per group until that group is resident).
        """
        config = LlamaConfig.from_dir(model_dir)
        if layer_source is None:
            model = cls(config, SafetensorsLayerSource(model_dir), dtype)
            model.materialize()
            return model
        return cls(config, layer_source, dtype)

    # -- weights

    @property
    def resident(self) -> bool:
        """True once every group has been taken from the source."""
        return len(self.group_resident_at) == self.n_groups

    def materialize(self) -> None:
        """Take every group now (blocks until the source has all of them)."""
        for group in range(self.n_groups):
            self._ensure(group)

    def _take(self, tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        if name not in tensors:
            raise KeyError(f"checkpoint lacks tensor {name!r}")
        tensor = tensors[name]
        shape = self._shapes[name]
        if tuple(tensor.shape) != shape:
            raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {shape}")
        return tensor.to(self.dtype).contiguous()

    def _ensure(self, group: int) -> None:
        if group in self.group_resident_at:
            return
        # wait for the source outside the lock: a thread blocked on a later group (the loader converting
        # groups in order) must not keep the forward pass from taking a group that is already resident
        tensors = self.source.wait(group)
        with self._lock:
            if group in self.group_resident_at:
                return
            c = self.config
            if group == 0:
                self._embed = self._take(tensors, "model.embed_tokens.weight")
            elif group <= c.num_hidden_layers:
                self._layers[group - 1] = LayerWeights(**{
                    name.removesuffix(".weight").rsplit(".", 1)[-1]: self._take(tensors, name)
                    for name, _ in layer_tensor_shapes(c, group - 1)
                })  # fmt: skip
            else:
                self._norm = self._take(tensors, "model.norm.weight")
                if "lm_head.weight" in tensors:
                    self._lm_head = self._take(tensors, "lm_head.weight")
                elif c.tie_word_embeddings:
                    self._ensure_tied()
                else:
                    raise KeyError("checkpoint lacks lm_head.weight and does not tie word embeddings")
            self.group_resident_at[group] = time.perf_counter()

    def _ensure_tied(self) -> None:
        # group 0 precedes the last group in every forward pass, so the embedding is already here
        if self._embed is None:
            raise RuntimeError("tied lm_head needs the embedding group first")
        self._lm_head = self._embed

    # -- forward

    def new_cache(self, capacity_tokens: int) -> KVCache:
        c = self.config
        return KVCache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, capacity_tokens, self.dtype)

    def _rope(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(start, start + length, dtype=torch.float32)
        freqs = torch.outer(positions, self._inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # HF's rotate_half layout
        return emb.cos(), emb.sin()

    def _mark_computed(self, group: int) -> None:
        if group not in self.group_computed_at:
            self.group_computed_at[group] = time.perf_counter()

    @torch.inference_mode()
    def forward(
        self, token_ids: torch.Tensor | Sequence[int], cache: KVCache | None = None, last_only: bool = False
    ) -> torch.Tensor:
        """Logits (float32, [T, vocab] or [1, vocab] with last_only) for T new tokens after the cached ones."""
        c = self.config
        ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
        n_new = ids.numel()
        if n_new == 0:
            raise ValueError("forward needs at least one token")
        past = cache.length if cache is not None else 0
        if past + n_new > c.max_position_embeddings:
            raise ValueError(f"{past + n_new} positions exceed max_position_embeddings {c.max_position_embeddings}")
        if int(ids.min()) < 0 or int(ids.max()) >= c.vocab_size:
            raise ValueError(f"token id out of range 0..{c.vocab_size - 1}")

        self._ensure(0)
        assert self._embed is not None
        x = self._embed[ids]  # [T, hidden]
        self._mark_computed(0)

        cos, sin = self._rope(past, n_new)
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)  # broadcast over heads
        n_heads, n_kv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        if past == 0:
            mask, causal = None, n_new > 1
        else:
            # new token t (absolute position past + t) sees every cached position and new ones up to itself
            total = past + n_new
            mask = torch.arange(total).unsqueeze(0) <= (past + torch.arange(n_new)).unsqueeze(1)
            causal = False

        for i in range(c.num_hidden_layers):
            self._ensure(i + 1)
            w = self._layers[i]
            assert w is not None
            h = rms_norm(x, w.input_layernorm, c.rms_norm_eps)
            q = F.linear(h, w.q_proj).view(n_new, n_heads, hd).transpose(0, 1)
            k = F.linear(h, w.k_proj).view(n_new, n_kv, hd).transpose(0, 1)
            v = F.linear(h, w.v_proj).view(n_new, n_kv, hd).transpose(0, 1)
            q = (q.float() * cos + rotate_half(q.float()) * sin).to(self.dtype)
            k = (k.float() * cos + rotate_half(k.float()) * sin).to(self.dtype)
            if cache is not None:
                k, v = cache.write(i, k, v)
            if n_kv != n_heads:  # grouped-query attention: each kv head serves n_heads / n_kv query heads
                k = k.repeat_interleave(n_heads // n_kv, dim=0)
                v = v.repeat_interleave(n_heads // n_kv, dim=0)
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
            x = x + F.linear(attn.transpose(0, 1).reshape(n_new, n_heads * hd), w.o_proj)
            h = rms_norm(x, w.post_attention_layernorm, c.rms_norm_eps)
            x = x + F.linear(F.silu(F.linear(h, w.gate_proj)) * F.linear(h, w.up_proj), w.down_proj)
            self._mark_computed(i + 1)

        if cache is not None:
            cache.length += n_new
        self._ensure(c.num_hidden_layers + 1)
        assert self._norm is not None and self._lm_head is not None
        if last_only:
            x = x[-1:]
        logits = F.linear(rms_norm(x, self._norm, c.rms_norm_eps), self._lm_head).float()
        self._mark_computed(c.num_hidden_layers + 1)
        return logits

    def generate(
        self,
        prompt_ids: Sequence[int],
        max_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        eos_token_ids: Sequence[int] | None = None,
    ) -> Generation:
        """An iterator of generated token ids (eos is not yielded); see `Generation`."""
        eos = self.config.eos_token_ids if eos_token_ids is None else tuple(eos_token_ids)
        return Generation(self, prompt_ids, max_tokens, temperature, top_p, seed, eos)


class Generation(Iterator[int]):
    """Token-by-token decoding of one prompt; iterate for the ids.

    Stops at an eos token (finish_reason "stop", the eos id is not yielded) or after `max_tokens`
    tokens or at the context limit (finish_reason "length"). Sampling draws only from its own
    `torch.Generator` seeded with `seed`, so equal seeds give equal tokens.
    """

    def __init__(
        self,
        model: LlamaModel,
        prompt_ids: Sequence[int],
        max_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        eos_token_ids: Sequence[int] = (),
    ) -> None:
        context = model.config.max_position_embeddings
        self.prompt_ids = [int(t) for t in prompt_ids]
        if not self.prompt_ids:
            raise ValueError("prompt must have at least one token")
        if len(self.prompt_ids) >= context:
            raise ValueError(f"prompt has {len(self.prompt_ids)} tokens; the context holds {context}")
        if max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if not 0.0 < top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        self.model = model
        self.budget_tokens = min(max_tokens, context - len(self.prompt_ids))
        self.temperature = temperature
        self.top_p = top_p
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self._cache: KVCache | None = None

    def __iter__(self) -> Generation:
        return self

    def __next__(self) -> int:
        if self.finish_reason is not None:
            raise StopIteration
        if self._cache is None:
            # the last sampled token is never fed back, so prompt + budget - 1 positions suffice
            self._cache = self.model.new_cache(len(self.prompt_ids) + self.budget_tokens)
            logits = self.model.forward(self.prompt_ids, self._cache, last_only=True)
        else:
            logits = self.model.forward([self.tokens[-1]], self._cache, last_only=True)
        token = sample_token(logits[-1], self.temperature, self.top_p, self.generator)
        if token in self.eos_token_ids:
            self.finish_reason = "stop"
            raise StopIteration
        self.tokens.append(token)
        if len(self.tokens) >= self.budget_tokens:
            self.finish_reason = "length"
        return token
