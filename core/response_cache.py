"""Response caching at the edge: an exact-match cache and a similarity (semantic) cache, per tenant.

Pure: no clock (every call takes `now_s`), no I/O, no random source, no model download. The gateway
(`live.gateway_cache`) and the simulator (`sim.world`) consult the same `ResponseCache`.

- **Which requests are cached.** Only deterministic ones: `cache_key` returns None unless the request sets
  `temperature` 0 (OpenAI's default is 1, so a request that sets none is not cached), asks for one choice, and
  uses no tools, logprobs or seed-free sampling knobs that make answers differ. Errors are never stored (the
  caller stores only completed answers).
- **Exact match.** The key is (tenant, model, endpoint + every other request parameter as canonical JSON,
  the prompt text byte for byte). `stream` / `stream_options` / `user` are not part of it: a streamed and
  a plain request for the same prompt share the answer.
- **Similarity match.** The prompt is embedded by `embed`: hashed character 3-grams and word unigrams of the
  normalised text into a fixed-dimension vector (signed feature hashing, blake2b), L2-normalised. Nothing is
  downloaded and the same text always gives the same vector. A miss on the exact key is answered by the
  most similar live entry with the same (tenant, model, parameters) whose cosine is >= `threshold`. It is a
  lexical similarity, not a learned one: paraphrases that share words hit, paraphrases that share none do
  not, and prompts that differ in one decisive word ("add" / "subtract") may hit wrongly; that is the quality
  risk `Hit.identical` lets callers count.
- **Isolation.** Each tenant has its own partition (own LRU, own capacity); a lookup never reads another
  tenant's partition, so tenant B never receives tenant A's answer, even for an identical prompt.
- **TTL and capacity.** An entry lives `ttl_s` from when it was stored; each partition holds at most
  `capacity` entries and evicts the least recently used.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

KINDS: tuple[str, ...] = ("exact", "semantic")

#: request fields that never change the answer (and so are not part of the key)
_TRANSPORT = frozenset({"stream", "stream_options", "user", "messages", "prompt"})
#: request fields whose presence makes the answer non-reproducible or not a plain text answer
_UNCACHEABLE = frozenset({"tools", "functions", "tool_choice", "logprobs", "top_logprobs", "echo", "best_of",
                          "logit_bias", "suffix", "response_format", "tierlab_resume", "tierlab_id"})
_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class CacheConfig:
    """What is cached and for how long. Off unless `exact` or `semantic` is set."""

    exact: bool = False
    semantic: bool = False
    threshold: float = 0.9  # cosine at or above which a similar prompt is answered from the cache
    ttl_s: float = 3600.0
    capacity: int = 10_000  # entries per tenant
    dim: int = 512  # embedding dimension

    def __post_init__(self) -> None:
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"response cache: threshold must be in [-1, 1], got {self.threshold}")
        if not self.ttl_s > 0:
            raise ValueError(f"response cache: ttl_s must be > 0, got {self.ttl_s}")
        if self.capacity < 1 or self.dim < 8:
            raise ValueError(f"response cache: capacity must be >= 1 and dim >= 8, got {self.capacity}, {self.dim}")

    @property
    def enabled(self) -> bool:
        return self.exact or self.semantic

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any] | None) -> CacheConfig:
        """From a config mapping (`gateway.response_cache`); None or {} is off. Unknown keys are a ValueError."""
        m = dict(m or {})
        known = {"exact", "semantic", "threshold", "ttl_s", "capacity", "dim"}
        if bad := sorted(set(m) - known):
            raise ValueError(f"response cache: unknown keys {bad}; known: {sorted(known)}")
        return cls(**m)


@dataclass(frozen=True)
class Hit:
    """A cached answer: `kind` exact or semantic, the cosine (1.0 for exact), whether the stored prompt is
    byte-identical to the one asked, and the stored value."""

    kind: str
    similarity: float
    identical: bool
    value: Any
    stored_s: float


@dataclass
class _Entry:
    scope: str
    prompt: str
    value: Any
    stored_s: float
    row: int  # its row in the tenant's `_Vectors` (-1: none, the similarity cache is off)


class _Vectors:
    """One tenant's embeddings as the rows of one matrix (a row per entry, reused after it leaves), with each
    row's scope id (-1: free), when it was stored, and its entry's key: a similarity search is one
    matrix-vector product, whatever the number of entries."""

    def __init__(self, dim: int) -> None:
        self.mat = np.zeros((16, dim))
        self.scope = np.full(16, -1, dtype=np.int64)
        self.stored = np.zeros(16)
        self.keys: list[tuple[str, str] | None] = [None] * 16
        self.free = list(range(15, -1, -1))

    def add(self, scope_id: int, vector: np.ndarray, stored_s: float, key: tuple[str, str]) -> int:
        if not self.free:
            n = len(self.scope)
            self.mat = np.vstack([self.mat, np.zeros_like(self.mat)])
            self.scope = np.concatenate([self.scope, np.full(n, -1, dtype=np.int64)])
            self.stored = np.concatenate([self.stored, np.zeros(n)])
            self.keys += [None] * n
            self.free = list(range(2 * n - 1, n - 1, -1))
        row = self.free.pop()
        self.mat[row], self.scope[row], self.stored[row], self.keys[row] = vector, scope_id, stored_s, key
        return row

    def remove(self, row: int) -> None:
        if row >= 0:
            self.scope[row], self.keys[row] = -1, None
            self.free.append(row)

    def best(self, scope_id: int, q: np.ndarray, live_after_s: float) -> tuple[int, float] | None:
        """(row, cosine) of the most similar live row of `scope_id` (stored after `live_after_s`), or None."""
        ok = (self.scope == scope_id) & (self.stored > live_after_s)
        if not ok.any():
            return None
        sims = np.where(ok, self.mat @ q, -np.inf)
        row = int(np.argmax(sims))
        return row, float(sims[row])


@dataclass
class CacheStats:
    """Counts since the cache was built (lookups of cacheable requests only)."""

    lookups: int = 0
    exact: int = 0
    semantic: int = 0
    semantic_not_identical: int = 0
    stored: int = 0
    expired: int = 0
    evicted: int = 0
    by_tenant: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def hits(self) -> int:
        return self.exact + self.semantic

    def as_dict(self) -> dict[str, Any]:
        rate = self.hits / self.lookups if self.lookups else 0.0
        return {"lookups": self.lookups, "hits": self.hits, "exact": self.exact, "semantic": self.semantic,
                "semantic_not_identical": self.semantic_not_identical, "hit_rate": rate, "stored": self.stored,
                "expired": self.expired, "evicted": self.evicted}


def normalize(text: str) -> str:
    """Lower case, whitespace collapsed, stripped: what the embedding sees."""
    return " ".join(text.lower().split())


def _bucket(feature: str, dim: int) -> tuple[int, float]:
    h = int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest(), "little")
    return h % dim, (1.0 if (h >> 63) & 1 else -1.0)


def embed(text: str, dim: int = 512) -> np.ndarray:
    """A deterministic, download-free text embedding: signed hashed features (character 3-grams of the
    normalised text with word boundaries, weight 1; words, weight 2) in `dim` dimensions, L2-normalised.
    The zero vector for an empty text."""
    norm = normalize(text)
    vec = np.zeros(dim, dtype=np.float64)
    padded = f" {norm} "
    for i in range(len(padded) - 2):
        j, s = _bucket("c:" + padded[i:i + 3], dim)
        vec[j] += s
    for word in _WORD.findall(norm):
        j, s = _bucket("w:" + word, dim)
        vec[j] += 2.0 * s
    n = float(np.linalg.norm(vec))
    return vec / n if n > 0 else vec


def prompt_text(path: str, body: Mapping[str, Any]) -> str | None:
    """The prompt as one text: a chat's messages as `role: content` lines, or a completion's prompt string;
    None when it is not plain text (several prompts, token ids, non-text content parts)."""
    if path.endswith("chat/completions"):
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return None
        lines = []
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                return None
            lines.append(f"{m.get('role', '')}: {m['content']}")
        return "\n".join(lines)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    return prompt if isinstance(prompt, str) else None


def semantic_text(path: str, body: Mapping[str, Any]) -> str | None:
    """What the similarity cache embeds: a chat's message contents (without the `role:` prefixes every prompt
    shares, which would make all short prompts look alike), or a completion's prompt; None if not plain text."""
    if path.endswith("chat/completions"):
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                      for m in messages):
            return None
        return "\n".join(m["content"] for m in messages)
    return prompt_text(path, body)


def cache_key(path: str, body: Mapping[str, Any]) -> tuple[str, str] | None:
    """(parameters key, prompt text) for a deterministic request, else None (see the module docstring).

    The parameters key is the endpoint and every field but the prompt and the transport ones, as canonical
    JSON; the model is part of it."""
    temperature = body.get("temperature")
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or temperature != 0:
        return None
    if body.get("n", 1) != 1 or any(k in body for k in _UNCACHEABLE):
        return None
    prompt = prompt_text(path, body)
    if prompt is None:
        return None
    params = {k: v for k, v in body.items() if k not in _TRANSPORT}
    try:
        key = path + " " + json.dumps(params, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):
        return None
    return key, prompt


class ResponseCache:
    """Exact and similarity caches, one partition per tenant (see the module docstring)."""

    def __init__(self, config: CacheConfig) -> None:
        self.config = config
        self.stats = CacheStats()
        # tenant -> (scope, prompt) -> entry, least recently used first; and the tenant's embeddings
        self._parts: dict[str, OrderedDict[tuple[str, str], _Entry]] = {}
        self._vectors: dict[str, _Vectors] = {}
        self._scope_ids: dict[str, int] = {}
        self._latest: dict[tuple[str, str], float] = {}  # (tenant, scope) -> when its newest entry was stored

    def __len__(self) -> int:
        return sum(len(p) for p in self._parts.values())

    def entries(self, tenant: str) -> int:
        """Live and expired-but-not-yet-dropped entries of `tenant`."""
        return len(self._parts.get(tenant, ()))

    def _count(self, tenant: str, what: str) -> None:
        by = self.stats.by_tenant.setdefault(tenant, {"lookups": 0, "exact": 0, "semantic": 0})
        by[what] += 1

    def _drop(self, tenant: str, key: tuple[str, str]) -> None:
        e = self._parts[tenant].pop(key)
        if e.row >= 0:
            self._vectors[tenant].remove(e.row)

    def lookup(self, tenant: str, scope: str, prompt: str, now_s: float, text: str | None = None) -> Hit | None:
        """The cached answer for `prompt` under `scope` (model + parameters key) in `tenant`'s partition, or
        None. Exact first, then (if on) the most similar live entry at or above the threshold; `text` is what
        is embedded (default: `prompt`; the gateway passes a chat's message contents without their roles).
        Expired entries never answer; they leave when found by an exact lookup or evicted."""
        c = self.config
        if not c.enabled:
            return None
        self.stats.lookups += 1
        self._count(tenant, "lookups")
        part = self._parts.get(tenant)
        if part is None:
            return None
        key = (scope, prompt)
        if c.exact:
            e = part.get(key)
            if e is not None:
                if now_s - e.stored_s < c.ttl_s:
                    part.move_to_end(key)
                    self.stats.exact += 1
                    self._count(tenant, "exact")
                    return Hit("exact", 1.0, True, e.value, e.stored_s)
                self._drop(tenant, key)
                self.stats.expired += 1
        scope_id = self._scope_ids.get(scope)
        if not c.semantic or scope_id is None or tenant not in self._vectors:
            return None
        vectors = self._vectors[tenant]
        found = vectors.best(scope_id, embed(prompt if text is None else text, c.dim), now_s - c.ttl_s)
        if found is None or not math.isfinite(found[1]) or found[1] < c.threshold:
            return None
        k = vectors.keys[found[0]]
        assert k is not None
        e = part[k]
        part.move_to_end(k)
        identical = e.prompt == prompt
        self.stats.semantic += 1
        self.stats.semantic_not_identical += not identical
        self._count(tenant, "semantic")
        return Hit("semantic", min(found[1], 1.0), identical, e.value, e.stored_s)

    def store(self, tenant: str, scope: str, prompt: str, value: Any, now_s: float, text: str | None = None) -> None:
        """Keep `value` (a completed answer, never an error) for `prompt` under `scope` in `tenant`'s partition
        (`text`: what is embedded, as in `lookup`)."""
        c = self.config
        if not c.enabled:
            return
        part = self._parts.setdefault(tenant, OrderedDict())
        key = (scope, prompt)
        if key in part:
            self._drop(tenant, key)
        row = -1
        if c.semantic:
            scope_id = self._scope_ids.setdefault(scope, len(self._scope_ids))
            vectors = self._vectors.setdefault(tenant, _Vectors(c.dim))
            row = vectors.add(scope_id, embed(prompt if text is None else text, c.dim), now_s, key)
        part[key] = _Entry(scope, prompt, value, now_s, row)
        self._latest[(tenant, scope)] = now_s
        self.stats.stored += 1
        while len(part) > c.capacity:
            self._drop(tenant, next(iter(part)))
            self.stats.evicted += 1

    def has_entries(self, tenant: str, scope: str, now_s: float) -> bool:
        """Whether `tenant` stored an entry under `scope` less than `ttl_s` ago (what a modelled semantic hit
        needs; O(1): an entry evicted by capacity since is not noticed)."""
        latest = self._latest.get((tenant, scope))
        return latest is not None and now_s - latest < self.config.ttl_s


def unit_draw(seed: int, request_id: int, salt: str = "") -> float:
    """A deterministic number in [0, 1) for (seed, request, salt): the hit-rate model's draw, without a
    random source of its own (same inputs, same draw, in any order)."""
    h = hashlib.blake2b(f"{seed}:{request_id}:{salt}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0**64
