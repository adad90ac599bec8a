"""Inference-time model: prefill and decode times from a GPU roofline, or from a measured table.

Prefill is compute-bound (2 x params FLOPs per token plus attention), decode is bound by
HBM traffic (weights plus the batch's KV cache read every iteration) or compute,
whichever is slower, each scaled by an efficiency factor. A `MeasuredTable` for an
(engine, model, GPU) triple overrides the roofline, so live measurements can calibrate it.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from core.errors import ConfigError
from core.specs import EngineSpec, GpuSpec, ModelSpec


@dataclass(frozen=True)
class MeasuredTable:
    """Measured performance of one engine serving one model on one GPU type.

    `prefill_tokens_per_s` is the prefill throughput; `decode_batch` / `decode_iter_s` give
    the decode iteration time at several batch sizes (linearly interpolated; below the first
    size clamped, above the last extrapolated along the last segment).
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
            slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
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
    return table


class InferenceModel:
    """Prefill and decode timing for one model on `n_gpus` GPUs of one type under one engine."""

    __slots__ = ("_attn_coef", "_compute_tok_s", "_kv_tok_bytes_s", "_measured", "_step_s", "_weights_s", "n_layers",
                 "request_overhead_s")

    def __init__(
        self, model: ModelSpec, gpu: GpuSpec, n_gpus: int, engine: EngineSpec,
        measured: Sequence[MeasuredTable] = (),
    ) -> None:
        self._measured = None
        for t in measured:
            if t.engine == engine.name and t.gpu == gpu.name and t.model in (model.name, model.base):
                self._measured = t
                break
        flops = gpu.flops * n_gpus
        hbm = gpu.hbm_Bps * n_gpus
        self._compute_tok_s = model.flops_per_token / (flops * engine.prefill_mfu)
        # attention score/value FLOPs grow with the square of the prompt: 4 * layers * d_model per token pair
        self._attn_coef = 4.0 * model.n_layers * model.hidden_size / (flops * engine.prefill_mfu)
        self._weights_s = model.weights_bytes / (hbm * engine.decode_hbm_eff)
        self._kv_tok_bytes_s = model.kv_bytes_per_token / (hbm * engine.decode_hbm_eff)
        self.n_layers = model.n_layers
        # fixed costs on top of the roofline / table: x + 0.0 == x, so the defaults change no result
        self._step_s = float(engine.step_overhead_s)
        self.request_overhead_s = float(engine.request_overhead_s)

    def prefill_s(self, tokens: int) -> float:
        """Time to prefill a prompt of `tokens` tokens: one forward pass, so one `step_overhead_s`."""
        if self._measured is not None:
            return tokens / self._measured.prefill_tokens_per_s + self._step_s
        compute = tokens * self._compute_tok_s + tokens * tokens * self._attn_coef
        return max(compute, self._weights_s) + self._step_s

    def decode_iter_s(self, batch: int, ctx_tokens_total: float) -> float:
        """One decode iteration for `batch` sequences holding `ctx_tokens_total` tokens of KV in all.

        Includes `step_overhead_s` once per iteration (not per sequence): the fluid model's token clock
        advances one token per iteration, so the overhead slows every sequence in the batch.
        """
        if batch <= 0:
            return self._weights_s + self._step_s
        if self._measured is not None:
            return self._measured.iter_s(batch) + self._step_s
        memory = self._weights_s + ctx_tokens_total * self._kv_tok_bytes_s
        compute = batch * self._compute_tok_s
        return (memory if memory > compute else compute) + self._step_s
