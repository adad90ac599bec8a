"""Weight variants (bf16 / fp8 / int8 / int4), KV-cache quantisation and speculative decoding, as deployments.

A variant is a `ModelSpec` of the same architecture whose stored, moved and resident bytes follow its weight
format (embeddings and the LM head stay bf16, as in published FP8 / INT8 / AWQ checkpoints, unless the format says
otherwise), whose prefill and decode times are its base's roofline times scaled by measured multipliers, and whose
KV reserve stays its base's (so a smaller variant holds as many tokens of KV). An fp8 KV cache halves the bytes
per token, so the same reserve holds twice the tokens. Speculative decoding divides the decode step time by the
Leviathan et al. (2023, https://arxiv.org/abs/2211.17192) speed-up and counts the draft model's weights resident.

The numbers (with sources, and which are assumptions) live in conf/variants/cited.yaml; `variants_from_dict`
reads that block and `apply_variants` turns a catalog into the served one. With no `variants` block the catalog
is returned unchanged, so every result without it stays as it was.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from core.errors import ConfigError
from core.specs import ModelSpec

#: separates a deployment's name from its variant's (`llama-3.1-8b/ft-0@fp8`)
VARIANT_SEP = "@"


@dataclass(frozen=True)
class WeightFormat:
    """One weight format: bytes per parameter and the time multipliers measured against bf16 on the same engine."""

    name: str
    bytes_per_param: float
    prefill_time_mult: float = 1.0  # prefill time / bf16 prefill time (< 1: faster)
    decode_time_mult: float = 1.0  # decode step time / bf16 decode step time
    quantize_embeddings: bool = False  # false: embeddings and LM head stay bf16 (2 bytes)
    quality_rank: int = 0  # 0 = bf16; higher = more quantisation error (for a policy's quality floor)


@dataclass(frozen=True)
class Speculative:
    """Speculative decoding: draft length k, acceptance rate alpha, draft cost ratio c, the draft's size."""

    draft_tokens: int
    acceptance: float
    draft_cost: float
    draft_params_b: float = 0.0  # the draft's size (0: draft_params_frac of the target's)
    draft_params_frac: float = 0.0
    draft_dtype_bytes: float = 2.0
    max_batch: int = 0  # vLLM's speculative_disable_by_batch_size: off for batches this large (0: never)

    @property
    def speedup(self) -> float:
        return speculative_speedup(self.acceptance, self.draft_tokens, self.draft_cost)


@dataclass(frozen=True)
class VariantsConfig:
    """The `variants` config block: the format table, what is served, and the engine options."""

    formats: Mapping[str, WeightFormat]
    serve: str = "bf16"  # every deployment is served in this format (names unchanged)
    extra: tuple[str, ...] = ()  # each deployment is also published as `name@fmt` in these (for a variant policy)
    kv_dtype_bytes: float | None = None  # KV-cache element bytes (None: the model's own, bf16)
    speculative: Speculative | None = None
    kv_formats: Mapping[str, float] = field(default_factory=dict)


def expected_tokens_per_step(acceptance: float, draft_tokens: int) -> float:
    """E[tokens] one target step yields with k drafted tokens accepted i.i.d. at rate alpha:
    (1 - alpha^(k+1)) / (1 - alpha) (Leviathan et al. 2023, eq. 1); k + 1 when alpha = 1."""
    a, k = acceptance, draft_tokens
    if not 0.0 <= a <= 1.0 or k < 0:
        raise ConfigError(f"speculative: acceptance must be in [0, 1] and draft_tokens >= 0, got {a}, {k}")
    if a == 1.0:
        return float(k + 1)
    return (1.0 - a ** (k + 1)) / (1.0 - a)


def speculative_speedup(acceptance: float, draft_tokens: int, draft_cost: float) -> float:
    """Wall-time speed-up of decoding: expected tokens per step over the step's cost, 1 + k c target steps
    (Leviathan et al. 2023, Theorem 3.8: (1 - alpha^(k+1)) / ((1 - alpha)(k c + 1)))."""
    if draft_cost < 0:
        raise ConfigError(f"speculative.draft_cost must be >= 0, got {draft_cost}")
    return expected_tokens_per_step(acceptance, draft_tokens) / (1.0 + draft_tokens * draft_cost)


def acceptance_for_speedup(target: float, draft_tokens: int, draft_cost: float) -> float | None:
    """The acceptance rate at which `speculative_speedup` reaches `target` (bisection), None if even alpha = 1
    does not."""
    if speculative_speedup(1.0, draft_tokens, draft_cost) < target:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if speculative_speedup(mid, draft_tokens, draft_cost) < target:
            lo = mid
        else:
            hi = mid
    return hi


def variant_name(deployment: str, fmt: str) -> str:
    return f"{deployment}{VARIANT_SEP}{fmt}"


def base_deployment(name: str) -> str:
    """The deployment a variant name was made from (`x@fp8` -> `x`); a plain name is its own."""
    return name.split(VARIANT_SEP, 1)[0]


def variant_of(model: ModelSpec, fmt: WeightFormat, kv_dtype_bytes: float | None = None,
               spec: Speculative | None = None, name: str | None = None) -> ModelSpec:
    """`model` served in weight format `fmt`, with an optional KV-cache dtype and speculative decoding."""
    base_dtype = model.dtype_bytes
    prefill_mult, decode_mult = fmt.prefill_time_mult, fmt.decode_time_mult
    draft_bytes, k, alpha, c, max_batch = 0.0, 0, 0.0, 0.0, 0
    if spec is not None and spec.draft_tokens > 0:
        k, alpha, c, max_batch = spec.draft_tokens, spec.acceptance, spec.draft_cost, spec.max_batch
        draft_b = spec.draft_params_b if spec.draft_params_b > 0 else spec.draft_params_frac * model.params_b
        draft_bytes = draft_b * 1e9 * spec.draft_dtype_bytes
        prefill_mult *= 1.0 + c  # the draft prefills the prompt too (ASSUMPTION: at its decode cost ratio)
    return replace(
        model, name=name or model.name, variant=fmt.name, dtype_bytes=fmt.bytes_per_param,
        embed_dtype_bytes=fmt.bytes_per_param if fmt.quantize_embeddings else base_dtype,
        kv_dtype_bytes=base_dtype if kv_dtype_bytes is None else kv_dtype_bytes,
        kv_reserve_basis_bytes=model.resident_bytes, roofline_dtype_bytes=base_dtype,
        prefill_time_mult=prefill_mult, decode_time_mult=decode_mult, draft_resident_bytes=draft_bytes,
        spec_draft_tokens=k, spec_acceptance=alpha, spec_draft_cost=c, spec_max_batch=max_batch)


def _num(data: Mapping[str, Any], key: str, where: str, default: float | None = None, *,
         positive: bool = True) -> float:
    v = data.get(key, default)
    if not isinstance(v, int | float) or isinstance(v, bool) or v < 0 or (positive and v == 0):
        raise ConfigError(f"{where}.{key} must be a {'positive' if positive else 'non-negative'} number, got {v!r}")
    return float(v)


def variants_from_dict(data: Mapping[str, Any] | None, where: str = "variants") -> VariantsConfig | None:
    """The `variants` block (conf/variants/*.yaml); None when absent (no variants: the catalog as it is)."""
    if not data:
        return None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping")
    formats: dict[str, WeightFormat] = {}
    for name, f in (data.get("weights") or {}).items():
        fw = f"{where}.weights.{name}"
        if not isinstance(f, Mapping):
            raise ConfigError(f"{fw}: expected a mapping")
        formats[str(name)] = WeightFormat(
            name=str(name), bytes_per_param=_num(f, "bytes_per_param", fw),
            prefill_time_mult=_num(f, "prefill_time_mult", fw, 1.0),
            decode_time_mult=_num(f, "decode_time_mult", fw, 1.0),
            quantize_embeddings=bool(f.get("quantize_embeddings", False)),
            quality_rank=int(f.get("quality_rank", 0)))
    serve = str(data.get("serve") or "bf16")
    extra = tuple(str(x) for x in (data.get("extra") or ()))
    for fmt in (serve, *extra):
        if fmt not in formats:
            raise ConfigError(f"{where}: unknown weight format {fmt!r}; known: {sorted(formats)}")
    kv_formats = {str(k): _num(data.get("kv_formats") or {}, k, f"{where}.kv_formats")
                  for k in (data.get("kv_formats") or {})}
    kv = data.get("kv_cache")
    kv_bytes = None
    if kv is not None:
        if str(kv) not in kv_formats:
            raise ConfigError(f"{where}.kv_cache: unknown {kv!r}; known: {sorted(kv_formats)}")
        kv_bytes = kv_formats[str(kv)]
    spec = None
    sd = data.get("speculative")
    if sd:
        sw = f"{where}.speculative"
        k = sd.get("draft_tokens", 0)
        if not isinstance(k, int) or k < 0:
            raise ConfigError(f"{sw}.draft_tokens must be a non-negative integer, got {k!r}")
        alpha = _num(sd, "acceptance", sw, positive=False)
        if alpha > 1:
            raise ConfigError(f"{sw}.acceptance must be <= 1, got {alpha}")
        spec = Speculative(draft_tokens=k, acceptance=alpha, draft_cost=_num(sd, "draft_cost", sw, positive=False),
                           draft_params_b=_num(sd, "draft_params_b", sw, 0.0, positive=False),
                           draft_params_frac=_num(sd, "draft_params_frac", sw, 0.0, positive=False),
                           draft_dtype_bytes=_num(sd, "draft_dtype_bytes", sw, 2.0),
                           max_batch=int(sd.get("max_batch", 0) or 0))
    return VariantsConfig(formats=formats, serve=serve, extra=extra, kv_dtype_bytes=kv_bytes, speculative=spec,
                          kv_formats=kv_formats)


def apply_variants(models: Sequence[ModelSpec], cfg: VariantsConfig | Mapping[str, Any] | None) -> list[ModelSpec]:
    """The served catalog: each deployment in `cfg.serve` (name kept), then its `cfg.extra` variants appended as
    `name@fmt`. Without a config, or with bf16 served, no extras, no KV dtype and no speculation: unchanged."""
    vc = cfg if isinstance(cfg, VariantsConfig) or cfg is None else variants_from_dict(cfg)
    if vc is None:
        return list(models)
    fmt = vc.formats[vc.serve]
    plain = (fmt.bytes_per_param == 2 and fmt.prefill_time_mult == 1 and fmt.decode_time_mult == 1
             and vc.kv_dtype_bytes is None and vc.speculative is None)
    if plain:  # named as served only when there are variants to tell it from (records' `variant` column)
        served = [replace(m, variant=fmt.name) for m in models] if vc.extra else list(models)
    else:
        served = [variant_of(m, fmt, vc.kv_dtype_bytes, vc.speculative) for m in models]
    extras = [variant_of(m, vc.formats[x], vc.kv_dtype_bytes, vc.speculative, name=variant_name(m.name, x))
              for x in vc.extra for m in models]
    return [*served, *extras]
