"""The response cache as the simulator models it from a trace (pure; `core.response_cache` does the caching).

A trace carries no prompt text, so the simulator cannot embed prompts. What it does, stated as such:

- **Exact hits from prompt identity, where the trace has it.** A per-request prompt key (e.g. Mooncake's
  `hash_ids`, the hashes of the prompt's 512-token blocks: two requests with the same list and the same length
  have the same prompt) is looked up in the same `ResponseCache` the gateway uses, per tenant and model, with
  its TTL and LRU capacity; a completed request stores its key when it finishes.
- **A hit-rate model where it has not.** Requests without a key are exact hits with probability
  `exact_hit_rate` (a MODEL, not a measurement); a miss is a semantic hit with probability `semantic_hit_rate`
  when the tenant holds a live entry for the model (a MODEL: the trace cannot say which prompts are
  paraphrases). Every modelled semantic hit counts as not identical (the quality risk, as an upper bound).
  Draws are `core.response_cache.unit_draw(seed, request id)`: deterministic, no random source of its own.
- **What a hit costs.** `gateway_latency_s` (TTFT = e2e), no GPU, no engine, no policy call.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from core.response_cache import CacheConfig, ResponseCache, unit_draw


@dataclass(frozen=True)
class SimCacheConfig:
    """The simulator's response cache: the cache itself plus the hit-rate model for what the trace lacks."""

    cache: CacheConfig
    exact_hit_rate: float = 0.0  # MODEL: P(exact hit) for a request without a prompt key
    semantic_hit_rate: float = 0.0  # MODEL: P(semantic hit | exact miss, a live entry for tenant and model)
    gateway_latency_s: float = 0.002  # what a hit takes (TTFT = e2e)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("exact_hit_rate", "semantic_hit_rate"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"response cache: {name} must be in [0, 1], got {v}")
        if not self.gateway_latency_s >= 0:
            raise ValueError(f"response cache: gateway_latency_s must be >= 0, got {self.gateway_latency_s}")

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> SimCacheConfig:
        """From `{exact, semantic, threshold, ttl_s, capacity, exact_hit_rate, semantic_hit_rate,
        gateway_latency_s, seed}`."""
        m = dict(m)
        own = {k: m.pop(k) for k in ("exact_hit_rate", "semantic_hit_rate", "gateway_latency_s", "seed") if k in m}
        return cls(CacheConfig.from_mapping(m), **own)


class SimResponseCache:
    """Decides, at each arrival, whether the gateway's cache answers it (see the module docstring)."""

    def __init__(self, config: SimCacheConfig) -> None:
        self.config = config
        # keys are stored and matched exactly; "semantic" here is the model, not an embedding (no text)
        self.cache = ResponseCache(dataclasses.replace(config.cache, exact=True, semantic=False))
        self.modelled = {"exact": 0, "semantic": 0}

    @property
    def latency_s(self) -> float:
        return self.config.gateway_latency_s

    def on_arrival(self, request_id: int, tenant: str, model: str, prompt_key: str | None, now_s: float) -> str:
        """"" (a miss: serve it), "exact" or "semantic"."""
        c = self.config
        if not c.cache.enabled:
            return ""
        if prompt_key is not None:
            hit = self.cache.lookup(tenant, model, prompt_key, now_s)
            if hit is not None:
                # the same prompt: an exact hit, or (exact matching off) a similarity hit with cosine 1
                return "exact" if c.cache.exact else "semantic"
        elif c.cache.exact and c.exact_hit_rate > 0 and unit_draw(c.seed, request_id, "exact") < c.exact_hit_rate:
            self.modelled["exact"] += 1
            return "exact"
        if (c.cache.semantic and c.semantic_hit_rate > 0 and self.cache.has_entries(tenant, model, now_s)
                and unit_draw(c.seed, request_id, "semantic") < c.semantic_hit_rate):
            self.modelled["semantic"] += 1
            return "semantic"
        return ""

    def on_completed(self, tenant: str, model: str, prompt_key: str | None, now_s: float) -> None:
        """A served request's answer enters the cache (requests without a key only mark the scope live)."""
        if self.config.cache.enabled:
            self.cache.store(tenant, model, prompt_key if prompt_key is not None else "", True, now_s)


def cache_summary(requests: pd.DataFrame, modelled: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Hit rate by kind, the latency of hits and misses, and the GPU tokens hits did not need, from a
    request table with the `cache` column ("" for a miss)."""
    n = len(requests)
    kind = requests["cache"].astype(str) if "cache" in requests else pd.Series([""] * n)
    hit = kind != ""
    done = requests["outcome"] == "completed"

    def mean(sel: pd.Series) -> float | None:
        v = requests.loc[sel, "e2e_s"].astype(float)
        v = v[v.notna()]
        return float(v.mean()) if len(v) else None

    exact = int((kind == "exact").sum())
    semantic = int((kind == "semantic").sum())
    tokens = (requests["prompt_tokens"] + requests["output_tokens"]).astype(float)
    out: dict[str, Any] = {
        "requests": int(n),
        "hits": exact + semantic,
        "exact": exact,
        "semantic": semantic,
        "hit_rate": (exact + semantic) / n if n else 0.0,
        "exact_hit_rate": exact / n if n else 0.0,
        "semantic_hit_rate": semantic / n if n else 0.0,
        "hit_e2e_mean_s": mean(hit & done),
        "miss_e2e_mean_s": mean(~hit & done),
        "gpu_tokens_saved": float(tokens[hit].sum()),
    }
    if modelled is not None:
        out["modelled"] = dict(modelled)
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}


def prompt_keys(prompt_tokens: Sequence[int] | np.ndarray,
                prefix_blocks: Sequence[tuple[int, ...]] | np.ndarray | None) -> list[str | None] | None:
    """Each request's prompt identity from the trace: its prompt length and block-hash list (Mooncake's
    `hash_ids`: the same list and length is the same prompt); None for a request without blocks, and None
    for the whole trace when it has no blocks (then only the hit-rate model applies)."""
    if prefix_blocks is None:
        return None
    out: list[str | None] = []
    for n, blocks in zip(np.asarray(prompt_tokens).tolist(), prefix_blocks, strict=True):
        out.append(f"{n}:{','.join(map(str, blocks))}" if len(blocks) else None)
    return out
