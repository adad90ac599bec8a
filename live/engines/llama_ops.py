"""The decoder forward pass's building blocks (`live.engines.llama`): rotary frequencies, RMSNorm, the decode
step's grouped-query attention and the per-sequence KV cache. Each computes what transformers computes; the
model tests compare the whole forward pass against transformers (tests/live_engine/test_llama.py)."""

from __future__ import annotations

import math

import torch

from live.llama_config import LlamaConfig


def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    """Rotary inverse frequencies (float32, head_dim / 2), with HF's "linear" and "llama3" scaling.

    Computed in float32 the way transformers computes them, so that the angles round alike.
    """
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
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
    """The last dimension's second half negated, then its first half: the rotation rotary embeddings apply."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Attention of ONE new query token ([heads, 1, head_dim]) over all keys and values ([kv_heads, L, head_dim]).

    Grouped-query attention without copying K and V per query head (repeat_interleave would copy the
    whole cache every layer of every decode step): query heads i*g .. i*g+g-1 share kv head i, so the
    g queries of a group are stacked against that head. No mask: the new token sees every position, or with a
    sliding `window` the last `window` ones (itself included: transformers' `kv_idx > q_idx - window`).
    """
    if window is not None:
        k, v = k[:, -window:], v[:, -window:]
    n_heads, _, head_dim = q.shape
    n_kv = k.shape[0]
    grouped = q.reshape(n_kv, n_heads // n_kv, head_dim)
    scores = torch.matmul(grouped, k.transpose(1, 2)) * (1.0 / math.sqrt(head_dim))
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    return torch.matmul(probs, v).reshape(n_heads, 1, head_dim)


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
