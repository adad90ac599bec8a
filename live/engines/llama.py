"""A compact decoder forward pass in torch for the CPU engine (no transformers dependency).

It computes what transformers computes for the architectures `live.architectures` accepts: Llama 2/3.x,
Mistral, Qwen2 and Qwen3. RMSNorm, rotary embeddings (rope_theta, optional "linear"/"llama3" rope scaling),
grouped-query attention with a preallocated KV cache (optional q/k/v/o biases, Qwen3's per-head q/k norms,
sliding-window layers), SwiGLU MLP, tied or separate lm_head. `forward` runs one
sequence; `forward_batch` runs one step over several (each a prefill chunk or a decode token, with its own
cache), every linear layer once over all their rows.
Weights come from a `LayerSource`, one group at a time (0 = embeddings, 1..N = decoder layers,
N+1 = final norm + lm_head), taken lazily: with a progressive source the first forward pass
computes layer i as soon as layer i is resident, while later layers are still loading. A loading
thread may call `materialize()` meanwhile, so that each group is converted to the compute dtype as
it lands rather than when the forward pass reaches it. The config is `live.llama_config.LlamaConfig`.

A quantised variant (`live.quantize`: int8 / fp8 decoder-layer linear weights plus a float32 scale per output
channel) is held AS STORED: the int8 / float8 tensors stay resident (half the bytes of bf16, a quarter of float32)
and each linear layer computes `(x @ q^T) * scale` at matmul time, converting q to the compute dtype one matrix at a
time (a transient copy, freed after the matmul). Dequantising once at load would be faster per step but would make
the resident bytes the compute dtype's again, and the variant's point is the bytes. `(x @ q^T) * s` equals
`x @ (q * s)^T` up to float rounding, i.e. the model transformers computes with the dequantised weights.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from live.engines.layer_sources import LayerSource, SafetensorsLayerSource
from live.engines.llama_ops import KVCache, decode_attention, rms_norm, rope_inv_freq, rotate_half
from live.engines.sampling import position_generator, position_seed, random_seed, sample_token
from live.llama_config import IGNORED_TENSOR_SUFFIXES, LlamaConfig, layer_tensor_shapes, shape_error, tensor_shapes
from live.quantize import FORMATS, QuantWeight, is_quantised_linear, linear, read_config, scale_name

# re-exported: callers written before sampling had a module of its own import these from here
__all__ = ["DTYPES", "Generation", "KVCache", "LlamaConfig", "LlamaModel", "QuantWeight", "linear",
           "position_generator", "position_seed", "random_seed", "rope_inv_freq", "sample_token"]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass
class LayerWeights:
    """One decoder layer's weights, in the model's dtype (nn.Linear layout: [out, in]); the linear weights of a
    quantised variant are `QuantWeight`s.

    Field names are the last part of the HF names (`llama_config.LAYER_TENSORS`); biases and q/k norms are
    None where the architecture has none.
    """

    input_layernorm: torch.Tensor
    q_proj: torch.Tensor | QuantWeight
    k_proj: torch.Tensor | QuantWeight
    v_proj: torch.Tensor | QuantWeight
    o_proj: torch.Tensor | QuantWeight
    post_attention_layernorm: torch.Tensor
    gate_proj: torch.Tensor | QuantWeight
    up_proj: torch.Tensor | QuantWeight
    down_proj: torch.Tensor | QuantWeight
    q_proj_bias: torch.Tensor | None = None
    k_proj_bias: torch.Tensor | None = None
    v_proj_bias: torch.Tensor | None = None
    o_proj_bias: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None


def _field(name: str) -> str:
    """The `LayerWeights` field of a decoder-layer tensor name ("...self_attn.q_proj.bias" -> "q_proj_bias")."""
    parts = name.split(".")
    return parts[-2] if parts[-1] == "weight" else f"{parts[-2]}_{parts[-1]}"


class LlamaModel:
    """Llama weights plus the forward pass; weights are pulled group by group from a `LayerSource`."""

    def __init__(self, config: LlamaConfig, source: LayerSource, dtype: torch.dtype = torch.float32,
                 weight_format: str | None = None) -> None:
        """`weight_format` ("int8" / "fp8", `live.quantize`): the checkpoint's decoder-layer linear weights are
        quantised with a scale beside each; None: every weight is plain (converted to `dtype`)."""
        if source.n_layers != config.num_hidden_layers:
            raise ValueError(f"layer source has {source.n_layers} layers, config {config.num_hidden_layers}")
        if weight_format is not None and weight_format not in FORMATS:
            raise ValueError(f"weight_format {weight_format!r} is not one of {sorted(FORMATS)}")
        self.config = config
        self.source = source
        self.dtype = dtype
        self.weight_format = weight_format
        self._qdtype = None if weight_format is None else getattr(torch, FORMATS[weight_format][0])
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
        if weight_format is not None:  # each quantised linear weight has its per-output-channel scale beside it
            self._shapes |= {scale_name(n): (s[0], 1) for n, s in list(self._shapes.items()) if is_quantised_linear(n)}
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
        config, weight_format = read_config(model_dir)  # a `live.quantize` variant names its format there
        if layer_source is None:
            model = cls(config, SafetensorsLayerSource(model_dir), dtype, weight_format)
            model.materialize()
            return model
        return cls(config, layer_source, dtype, weight_format)

    # -- weights

    @property
    def resident(self) -> bool:
        """True once every group has been taken from the source."""
        return len(self.group_resident_at) == self.n_groups

    def materialize(self) -> None:
        """Take every group now (blocks until the source has all of them)."""
        for group in range(self.n_groups):
            self._ensure(group)

    def weight_bytes(self) -> int:
        """Bytes of the weights held so far (a tied lm_head counted once): what the model keeps resident."""
        seen: set[int] = set()
        total = 0
        layers = [w for w in self._layers if w is not None]
        tensors = [self._embed, self._norm, self._lm_head, *(v for w in layers for v in vars(w).values())]
        for t in tensors:
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                total += t.nbytes
        return total

    def _take(self, tensors: dict[str, torch.Tensor], name: str,
              dtype: torch.dtype | None = None) -> torch.Tensor | QuantWeight:
        """Tensor `name` checked against the config and converted to `dtype` (default: the compute dtype); a
        quantised linear weight comes with its scale, as stored."""
        if name not in tensors:
            raise KeyError(f"checkpoint lacks tensor {name!r}")
        tensor = tensors[name]
        shape = self._shapes[name]
        if tuple(tensor.shape) != shape:
            raise ValueError(shape_error(self.config, name, shape, tuple(tensor.shape), "config.json"))
        if self.weight_format is not None and is_quantised_linear(name):
            if tensor.dtype != self._qdtype:
                raise ValueError(f"tensor {name!r} has dtype {tensor.dtype}, but config.json's quantization_config "
                                 f"says {self.weight_format} ({self._qdtype})")
            scale = self._take(tensors, scale_name(name), torch.float32)
            assert isinstance(scale, torch.Tensor)
            # kept as stored: the resident bytes are the quantised ones (module docstring)
            return QuantWeight(tensor.contiguous(), scale)
        if tensor.dtype not in DTYPES.values():
            raise ValueError(f"tensor {name!r} has dtype {tensor.dtype}; without a tierlab quantization_config in "
                             f"config.json only {sorted(DTYPES)} weights are computed with")
        return tensor.to(self.dtype if dtype is None else dtype).contiguous()

    def _take_plain(self, tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        t = self._take(tensors, name)
        assert isinstance(t, torch.Tensor)
        return t

    def _check_unused(self, tensors: dict[str, torch.Tensor], group: int) -> None:
        """A tensor the forward pass would not read (a bias the config does not announce, another model's
        weights) means the config does not describe these weights: refuse rather than compute another model."""
        unused = sorted(n for n in tensors if n not in self._shapes and not n.endswith(IGNORED_TENSOR_SUFFIXES))
        if unused:
            raise ValueError(f"config.json (model_type {self.config.model_type!r}) does not use tensor(s) "
                             f"{', '.join(map(repr, unused[:5]))} of group {group}; refusing rather than compute "
                             "another model")

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
            self._check_unused(tensors, group)
            if group == 0:
                self._embed = self._take_plain(tensors, "model.embed_tokens.weight")
            elif group <= c.num_hidden_layers:
                self._layers[group - 1] = LayerWeights(**{
                    _field(name): self._take(tensors, name) for name, _ in layer_tensor_shapes(c, group - 1)
                })  # fmt: skip
            else:
                self._norm = self._take_plain(tensors, "model.norm.weight")
                if "lm_head.weight" in tensors:
                    self._lm_head = self._take_plain(tensors, "lm_head.weight")
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

    def _rope(self, spans: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin ([sum length, head_dim]) of the positions start..start+length-1 of each (start, length)."""
        positions = torch.cat([torch.arange(start, start + length, dtype=torch.float32) for start, length in spans])
        freqs = torch.outer(positions, self._inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # HF's rotate_half layout
        return emb.cos(), emb.sin()

    def _mark_computed(self, group: int) -> None:
        if group not in self.group_computed_at:
            self.group_computed_at[group] = time.perf_counter()

    def _segment(self, token_ids: torch.Tensor | Sequence[int], cache: KVCache | None) -> tuple[torch.Tensor, int]:
        """One sequence's new tokens as a 1-d long tensor, validated, and its cached length."""
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
        return ids, past

    def _hidden(
        self, segments: Sequence[tuple[torch.Tensor | Sequence[int], KVCache | None]]
    ) -> tuple[torch.Tensor, list[int]]:
        """Hidden states after the last decoder layer ([sum T_i, hidden], segment after segment), and the row
        of each segment's last token.

        The rows of every segment are concatenated, so each linear layer (and the embedding lookup) runs
        once per call over the whole batch: the weights are read once per step, whatever the batch size.
        Attention alone runs per segment, against that segment's own cache, with its own rotary positions.
        """
        c = self.config
        checked = [self._segment(ids, cache) for ids, cache in segments]
        caches = [cache for _, cache in segments if cache is not None]
        if len({id(cache) for cache in caches}) != len(caches):
            raise ValueError("a KV cache appears twice in one batch")
        lengths = [ids.numel() for ids, _ in checked]
        n_rows = sum(lengths)
        ids_all = checked[0][0] if len(checked) == 1 else torch.cat([ids for ids, _ in checked])

        self._ensure(0)
        assert self._embed is not None
        x = self._embed[ids_all]  # [N, hidden]
        self._mark_computed(0)

        # per row: its segment's absolute position (cached length + offset)
        cos, sin = self._rope([(past, n) for (_, past), n in zip(checked, lengths, strict=True)])
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [N, 1, head_dim]: broadcast over heads
        n_heads, n_kv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        window = c.sliding_window
        plan = []  # per segment: (first row, rows, cache, mask, causal, window mask)
        start = 0
        for (_, past), n_new, (_, cache) in zip(checked, lengths, segments, strict=True):
            total = past + n_new
            # new token t (absolute position past + t) sees every cached position and new ones up to itself
            visible = torch.arange(total).unsqueeze(0) <= (past + torch.arange(n_new)).unsqueeze(1)
            if past == 0 or n_new == 1:  # one new token sees every position: no mask
                mask, causal = None, n_new > 1
            else:
                mask, causal = visible, False
            # sliding-window layers: only when some query has keys older than the window (else the masks agree)
            window_mask = None
            if window is not None and n_new > 1 and total > window:
                window_mask = visible & (
                    torch.arange(total).unsqueeze(0) > (past + torch.arange(n_new)).unsqueeze(1) - window
                )
            plan.append((start, n_new, cache, mask, causal, window_mask))
            start += n_new

        for i in range(c.num_hidden_layers):
            self._ensure(i + 1)
            w = self._layers[i]
            assert w is not None
            h = rms_norm(x, w.input_layernorm, c.rms_norm_eps)
            q = linear(h, w.q_proj, w.q_proj_bias).view(n_rows, n_heads, hd)
            k = linear(h, w.k_proj, w.k_proj_bias).view(n_rows, n_kv, hd)
            v = linear(h, w.v_proj, w.v_proj_bias).view(n_rows, n_kv, hd)
            if w.q_norm is not None and w.k_norm is not None:  # Qwen3: RMSNorm over each head, before rope
                q, k = rms_norm(q, w.q_norm, c.rms_norm_eps), rms_norm(k, w.k_norm, c.rms_norm_eps)
            q = (q.float() * cos + rotate_half(q.float()) * sin).to(self.dtype)
            k = (k.float() * cos + rotate_half(k.float()) * sin).to(self.dtype)
            layer_window = c.window(i)
            outs = []
            for first, n_new, cache, mask, causal, window_mask in plan:
                qs = q[first : first + n_new].transpose(0, 1)  # [heads, T, head_dim]
                ks = k[first : first + n_new].transpose(0, 1)
                vs = v[first : first + n_new].transpose(0, 1)
                if cache is not None:
                    ks, vs = cache.write(i, ks, vs)
                if n_new == 1:
                    outs.append(decode_attention(qs, ks, vs, layer_window).transpose(0, 1))
                    continue
                if layer_window is not None and window_mask is not None:
                    mask, causal = window_mask, False
                if n_kv != n_heads:  # grouped-query attention: each kv head serves n_heads / n_kv query heads
                    ks = ks.repeat_interleave(n_heads // n_kv, dim=0)
                    vs = vs.repeat_interleave(n_heads // n_kv, dim=0)
                attn = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=causal)
                outs.append(attn.transpose(0, 1))  # [T, heads, head_dim]
            attn_all = outs[0] if len(outs) == 1 else torch.cat(outs)
            x = x + linear(attn_all.reshape(n_rows, n_heads * hd), w.o_proj, w.o_proj_bias)
            h = rms_norm(x, w.post_attention_layernorm, c.rms_norm_eps)
            x = x + linear(F.silu(linear(h, w.gate_proj)) * linear(h, w.up_proj), w.down_proj)
            self._mark_computed(i + 1)

        for _, n_new, cache, *_ in plan:
            if cache is not None:
                cache.length += n_new
        return x, [first + n_new - 1 for first, n_new, *_ in plan]

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and lm_head over the rows of `x` (float32 logits)."""
        c = self.config
        self._ensure(c.num_hidden_layers + 1)
        assert self._norm is not None and self._lm_head is not None
        logits = F.linear(rms_norm(x, self._norm, c.rms_norm_eps), self._lm_head).float()
        self._mark_computed(c.num_hidden_layers + 1)
        return logits

    @torch.inference_mode()
    def forward(
        self, token_ids: torch.Tensor | Sequence[int], cache: KVCache | None = None, last_only: bool = False
    ) -> torch.Tensor:
        """Logits (float32, [T, vocab] or [1, vocab] with last_only) for T new tokens after the cached ones."""
        x, _ = self._hidden([(token_ids, cache)])
        return self._logits(x[-1:] if last_only else x)

    @torch.inference_mode()
    def forward_batch(
        self, segments: Sequence[tuple[torch.Tensor | Sequence[int], KVCache | None]]
    ) -> torch.Tensor:
        """One step over several sequences: logits (float32, [len(segments), vocab]) of each one's last new token.

        `segments` holds (new token ids, that sequence's cache) pairs: a prefill chunk or one decode token
        each, of any lengths; each cache must appear once. The result equals one `forward(ids, cache,
        last_only=True)` per segment (up to float rounding), at the cost of one pass over the weights.
        """
        if not segments:
            raise ValueError("forward_batch needs at least one segment")
        x, last_rows = self._hidden(segments)
        return self._logits(x[last_rows])

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
    tokens or at the context limit (finish_reason "length"). Generated token k is drawn with
    `position_generator(seed, k)` (a random seed when `seed` is None), so equal seeds give equal tokens,
    the same ones the batching engine draws.
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
        self.seed = random_seed() if seed is None else int(seed)
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
        generator = None if self.temperature <= 0.0 else position_generator(self.seed, len(self.tokens))
        token = sample_token(logits[-1], self.temperature, self.top_p, generator)
        if token in self.eos_token_ids:
            self.finish_reason = "stop"
            raise StopIteration
        self.tokens.append(token)
        if len(self.tokens) >= self.budget_tokens:
            self.finish_reason = "length"
        return token
