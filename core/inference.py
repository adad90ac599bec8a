"""Inference-time model: prefill and decode times from a structural GPU roofline, or from a measured table.

A forward pass over T tokens (a prefill's prompt, or one token of each sequence in a decode step) on an instance
of n GPUs (tensor parallel) is a sequence of kernels, each bound by compute or by HBM traffic, plus communication:

- dense layers, per layer: max(2 x layer_params x T / (n x flops x prefill_mfu), layer_params x dtype /
  (n x hbm x weight_read_eff)), plus the elementwise kernels' activation traffic (elementwise_passes x T x hidden
  x dtype / hbm) and a fixed floor (layer_overhead_s);
- attention: in a prefill, causal, 2 x layers x hidden x T^2 FLOPs (QK^T and AV over the lower triangle); in a
  decode step, for the batch's ctx tokens of KV in all, max(4 x layers x hidden x ctx FLOPs, ctx x
  kv_bytes_per_token / (n x hbm x kv_read_eff)): it grows with context;
- logits for the sampled tokens only (the last token of a prefill, each sequence of a decode step): max(2 x vocab
  x hidden FLOPs each, reading the LM head);
- tensor parallelism: two all-reduces per layer (after attention, after the MLP) of T x hidden x dtype bytes,
  `GpuSpec.allreduce_s` (ring algorithm over the interconnect's bus bandwidth, plus a launch latency);
- `step_overhead_s` once per pass (scheduling, sampling, launch).

Fitted to published GPU profiles by `python -m experiments.inference_fit` (docs/fidelity/inference.md). A
`MeasuredTable` for an (engine, model, GPU) triple overrides all of it, so live measurements can calibrate it.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from core.errors import ConfigError
from core.specs import EngineSpec, GpuSpec, ModelSpec
from core.variants import speculative_speedup

#: the shortest decode step a measured table may hold: a GPU kernel launch alone takes a few microseconds
MIN_STEP_S = 1e-6


@dataclass(frozen=True)
class MeasuredTable:
    """Measured performance of one engine serving one model on one GPU type.

    `prefill_tokens_per_s` is the prefill throughput; `decode_batch` / `decode_iter_s` give
    the decode iteration time at several batch sizes (linearly interpolated; below the first
    size clamped, above the last extrapolated along the last segment, never downwards: a noisy
    table whose last step is faster than the one before stays flat instead of reaching 0).
    """

    engine: str
    model: str
    gpu: str
    prefill_tokens_per_s: float
    decode_batch: tuple[int, ...]
    decode_iter_s: tuple[float, ...]

    def iter_s(self, batch: int) -> float:
        xs, ys = self.decode_batch, self.decode_iter_s
        if batch <= xs[0]:
            return ys[0]
        if batch >= xs[-1]:
            # beyond the table, extrapolate along the last segment (decode grows ~linearly with batch)
            if len(xs) == 1:
                return ys[0]
            slope = max(0.0, (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]))
            return ys[-1] + slope * (batch - xs[-1])
        i = bisect.bisect_left(xs, batch)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return y0 + (y1 - y0) * (batch - x0) / (x1 - x0)


def measured_from_dict(data: Mapping[str, Any], where: str) -> MeasuredTable:
    try:
        batch = tuple(int(b) for b in data["decode_batch"])
        iters = tuple(float(t) for t in data["decode_iter_s"])
        table = MeasuredTable(
            engine=str(data["engine"]), model=str(data["model"]), gpu=str(data["gpu"]),
            prefill_tokens_per_s=float(data["prefill_tokens_per_s"]), decode_batch=batch, decode_iter_s=iters,
        )
    except KeyError as exc:
        raise ConfigError(f"{where}: missing field {exc.args[0]!r}") from exc
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: prefill_tokens_per_s must be a number and decode_batch / decode_iter_s"
                          f" lists of numbers ({exc})") from exc
    if not batch or len(batch) != len(iters) or list(batch) != sorted(set(batch)):
        raise ConfigError(f"{where}: decode_batch must be strictly increasing and as long as decode_iter_s")
    if table.prefill_tokens_per_s <= 0 or min(iters) <= 0:
        raise ConfigError(f"{where}: prefill_tokens_per_s and decode_iter_s must be positive")
    if min(iters) < MIN_STEP_S:
        raise ConfigError(f"{where}.decode_iter_s: {min(iters):.3g} s is below {MIN_STEP_S:g} s, faster than any "
                          "engine steps: a failed measurement (recalibrate), not a table to simulate")
    return table


class InferenceModel:
    """Prefill and decode timing for one model on `n_gpus` GPUs of one type (tensor parallel) under one engine."""

    __slots__ = ("_allreduce_fixed_s", "_allreduce_tok_s", "_attn_decode_tok_s", "_attn_prefill_coef",
                 "_dense_flop_tok_s", "_dense_traffic_tok_s", "_head_flop_tok_s", "_head_read_s", "_kv_read_tok_s",
                 "_layers_fixed_s", "_measured", "_plain", "_step_s", "_weights_s", "decode_mult", "n_layers",
                 "prefill_mult", "prefill_stalls_decode", "request_overhead_s", "spec_max_batch", "spec_speedup")

    def __init__(
        self, model: ModelSpec, gpu: GpuSpec, n_gpus: int, engine: EngineSpec,
        measured: Sequence[MeasuredTable] = (),
    ) -> None:
        self._measured = None
        for t in measured:
            if t.engine == engine.name and t.gpu == gpu.name and t.model in (model.name, model.base):
                self._measured = t
                break
        # a weight variant is timed at its base's dtype, then scaled by its measured multipliers (core/variants.py)
        dt = model.dtype_bytes if model.roofline_dtype_bytes is None else model.roofline_dtype_bytes
        n, layers, hidden = n_gpus, model.n_layers, model.hidden_size
        flops = gpu.flops * n * engine.prefill_mfu  # the instance's reachable matmul FLOP/s
        weight_Bps = gpu.hbm_Bps * n * engine.weight_read_eff
        # dense layers: FLOPs per token, the weights read once per pass, the elementwise kernels' traffic (norms
        # and residual adds run on every GPU of a tensor-parallel group: not divided by n) and their floor
        self._dense_flop_tok_s = 2.0 * model.layer_params * layers / flops
        self._weights_s = model.layer_params * layers * dt / weight_Bps
        self._dense_traffic_tok_s = layers * engine.elementwise_passes * hidden * dt / gpu.hbm_Bps
        self._layers_fixed_s = layers * engine.layer_overhead_s
        # LM head, for sampled tokens only (with vocab_size unknown, layer_params holds it: every token pays it)
        self._head_flop_tok_s = 2.0 * model.head_params / flops
        self._head_read_s = model.head_params * dt / weight_Bps
        # attention: causal prefill FLOPs grow with the square of the prompt; a decode step reads the KV cache
        self._attn_prefill_coef = 2.0 * layers * hidden / flops
        self._attn_decode_tok_s = 4.0 * layers * hidden / flops
        self._kv_read_tok_s = model.kv_bytes_per_token / (gpu.hbm_Bps * n * engine.kv_read_eff)
        # tensor parallelism: 2 all-reduces per layer of (tokens x hidden x dtype) bytes each
        self._allreduce_fixed_s = 2 * layers * gpu.allreduce_s(0.0, n)
        self._allreduce_tok_s = 2 * layers * (gpu.allreduce_s(hidden * dt, n) - gpu.allreduce_s(0.0, n))
        self.n_layers = layers
        # fixed costs on top of the roofline / table: x + 0.0 == x, so the defaults change no result
        self._step_s = float(engine.step_overhead_s)
        self.request_overhead_s = float(engine.request_overhead_s)
        self.prefill_stalls_decode = bool(engine.prefill_stalls_decode)
        # variants: time multipliers and the speculative-decoding speed-up (1.0: x * 1.0 == x, results unchanged)
        self.prefill_mult = float(model.prefill_time_mult)
        self.decode_mult = float(model.decode_time_mult)
        self.spec_speedup = (speculative_speedup(model.spec_acceptance, model.spec_draft_tokens, model.spec_draft_cost)
                             if model.spec_draft_tokens > 0 else 1.0)
        self.spec_max_batch = int(model.spec_max_batch)
        self._plain = self.decode_mult == 1.0 and self.spec_speedup == 1.0

    def dense_s(self, tokens: float) -> float:
        """All dense layers (projections, MLP, elementwise kernels) for `tokens` tokens, no attention or comms."""
        flop_s = tokens * self._dense_flop_tok_s
        bound = flop_s if flop_s > self._weights_s else self._weights_s
        return bound + tokens * self._dense_traffic_tok_s + self._layers_fixed_s

    def logits_s(self, sampled: float) -> float:
        """The LM head for `sampled` tokens (0 when the model's vocab_size is unknown: it is in `dense_s`)."""
        flop_s = sampled * self._head_flop_tok_s
        return flop_s if flop_s > self._head_read_s else self._head_read_s

    def allreduce_s(self, tokens: float) -> float:
        """Tensor-parallel communication of one pass over `tokens` tokens (0 on one GPU)."""
        return self._allreduce_fixed_s + tokens * self._allreduce_tok_s

    def prefill_s(self, tokens: int) -> float:
        """Time to prefill a prompt of `tokens` tokens: one forward pass, so one `step_overhead_s`."""
        if self._measured is not None:
            t = tokens / self._measured.prefill_tokens_per_s + self._step_s
        else:
            attention = tokens * tokens * self._attn_prefill_coef
            t = self.dense_s(tokens) + attention + self.logits_s(1) + self.allreduce_s(tokens) + self._step_s
        return t * self.prefill_mult if self.prefill_mult != 1.0 else t

    def decode_iter_s(self, batch: int, ctx_tokens_total: float) -> float:
        """One decode iteration for `batch` sequences holding `ctx_tokens_total` tokens of KV in all.

        Includes `step_overhead_s` once per iteration (not per sequence): the fluid model's token clock
        advances one token per iteration, so the overhead slows every sequence in the batch.
        """
        if batch <= 0:
            t = self._weights_s + self._step_s
        elif self._measured is not None:
            t = self._measured.iter_s(batch) + self._step_s
        else:
            # dense_s + attention + logits_s + allreduce_s, inlined: the simulator calls this once per decode step
            flop_s = batch * self._dense_flop_tok_s
            dense = (flop_s if flop_s > self._weights_s else self._weights_s) + batch * self._dense_traffic_tok_s
            kv_read = ctx_tokens_total * self._kv_read_tok_s
            attn_flop = ctx_tokens_total * self._attn_decode_tok_s
            head = batch * self._head_flop_tok_s
            t = (dense + self._layers_fixed_s + (kv_read if kv_read > attn_flop else attn_flop)
                 + (head if head > self._head_read_s else self._head_read_s)
                 + self._allreduce_fixed_s + batch * self._allreduce_tok_s + self._step_s)
        if self._plain:
            return t
        # a variant: x its decode multiplier; speculation yields `spec_speedup` x the tokens per unit of time
        # (off for batches of `spec_max_batch` and more)
        t *= self.decode_mult
        if self.spec_speedup != 1.0 and (self.spec_max_batch <= 0 or batch < self.spec_max_batch):
            t /= self.spec_speedup
        return t
