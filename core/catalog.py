"""Model catalog: real architectures (sizes from their published configs) and deployments of them.

A serverless platform serves many deployments (fine-tunes, tenants' copies) of a few base
architectures; each deployment is a distinct set of weights that must be loaded on its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from core.errors import ConfigError
from core.specs import ModelSpec

# params (billions), layers, hidden size, KV heads, head dim, vocabulary, tied input/output embeddings
# -- from each model's config.json
ARCHITECTURES: dict[str, tuple[float, int, int, int, int, int, bool]] = {
    "llama-3.2-1b": (1.24, 16, 2048, 8, 64, 128256, True),
    "llama-3.2-3b": (3.21, 28, 3072, 8, 128, 128256, True),
    "llama-3.1-8b": (8.03, 32, 4096, 8, 128, 128256, False),
    "qwen2.5-14b": (14.7, 48, 5120, 8, 128, 152064, False),
    "qwen2.5-32b": (32.8, 64, 5120, 8, 128, 152064, False),
    "qwen3-32b": (32.8, 64, 5120, 8, 128, 151936, False),
    "llama-3.1-70b": (70.6, 80, 8192, 8, 128, 128256, False),
    "llama-2-70b": (69.0, 80, 8192, 8, 128, 32000, False),
    "opt-6.7b": (6.7, 32, 4096, 32, 128, 50272, True),
    "opt-30b": (30.0, 48, 7168, 56, 128, 50272, True),
    "opt-66b": (66.0, 64, 9216, 72, 128, 50272, True),
    "falcon-40b": (41.8, 60, 8192, 8, 64, 65024, True),
}


def architecture(name: str, deployment: str | None = None, dtype_bytes: int = 2) -> ModelSpec:
    """The spec of base architecture `name`, deployed as `deployment` (defaults to the base name)."""
    try:
        params, layers, hidden, kv_heads, head_dim, vocab, tied = ARCHITECTURES[name]
    except KeyError:
        raise ConfigError(f"models.bases: unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}") from None
    return ModelSpec(name=deployment or name, params_b=params, n_layers=layers, hidden_size=hidden,
                     n_kv_heads=kv_heads, head_dim=head_dim, dtype_bytes=dtype_bytes, base=name,
                     vocab_size=vocab, tied_embeddings=tied)


def variants(bases: Sequence[str], per_base: int, seed: int) -> list[ModelSpec]:
    """`per_base` deployments of each base, in a seeded order (the order is the popularity rank)."""
    if per_base < 1:
        raise ConfigError(f"models.variants_per_base must be >= 1, got {per_base}")
    specs = [architecture(b, f"{b}/ft-{i}") for b in bases for i in range(per_base)]
    order = np.random.default_rng(seed).permutation(len(specs))
    return [specs[i] for i in order]


def deployments_for(ids: Sequence[str], bases: Sequence[str], weights: Sequence[float] | None,
                    seed: int) -> list[ModelSpec]:
    """Specs for workload-given model ids (e.g. one per ServeGen client), each a seeded draw of a base."""
    if not bases:
        raise ConfigError("models.bases: at least one base architecture is required")
    p = None
    if weights is not None:
        if len(weights) != len(bases) or min(weights) < 0 or sum(weights) <= 0:
            raise ConfigError("models.base_weights: one non-negative weight per base, not all zero")
        p = np.asarray(weights, dtype=float) / float(sum(weights))
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(bases), size=len(ids), p=p)
    return [architecture(bases[k], name) for name, k in zip(ids, picks, strict=True)]


def catalog_from_dict(cfg: Mapping[str, object], seed: int) -> list[ModelSpec]:
    """`{bases: [...], variants_per_base: N}` -> the deployment list (explicit `extra` specs appended)."""
    bases = list(cfg.get("bases") or [])  # type: ignore[call-overload]
    per = int(cfg.get("variants_per_base", 1))  # type: ignore[arg-type]
    for b in bases:
        architecture(b)  # validate names early
    return variants(bases, per, seed) if per > 1 else [architecture(b) for b in bases]
