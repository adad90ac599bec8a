"""The CPU engine's prefix (KV) cache: keys and values of prompt blocks it computed, reused by later prompts.

A prompt is cut into blocks of `block_tokens` token ids; block i's key is the whole prompt prefix up to the
end of block i (a tuple of ids), so a hit means exactly the same tokens at exactly the same positions, and its
KV (which depends on every token before it) is what a fresh prefill would compute. Which blocks stay is the
simulator's own bookkeeping, `core.prefix_cache.PrefixCache` (LRU, shared roots outlive private tails); this
module holds the tensors beside it. Importing it does not import torch (the KV slices are copied with the
tensors' own methods).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from core.prefix_cache import PrefixCache


class KVPrefixStore:
    """Per-block KV slices ([kv_heads, block_tokens, head_dim] per layer) of prompts this engine prefilled."""

    def __init__(self, capacity_blocks: int, block_tokens: int = 16) -> None:
        self.index = PrefixCache(capacity_blocks, block_tokens)
        self.block_tokens = block_tokens
        self._kv: dict[tuple[int, ...], tuple[list[Any], list[Any]]] = {}

    def keys(self, prompt_ids: Sequence[int]) -> list[tuple[int, ...]]:
        """The block keys of a prompt's whole blocks."""
        b = self.block_tokens
        return [tuple(prompt_ids[: (i + 1) * b]) for i in range(len(prompt_ids) // b)]

    def reuse(self, prompt_ids: Sequence[int], cache: Any) -> int:
        """Copy the longest cached prefix of `prompt_ids` into the empty KV `cache` (a `llama.KVCache`) and mark
        it filled; returns the prompt tokens reused (whole blocks, never the last prompt token)."""
        keys = self.keys(prompt_ids)
        n = self.index.lookup(keys, len(prompt_ids))
        blocks = n // self.block_tokens
        if blocks == 0:
            return 0
        b = self.block_tokens
        for i, key in enumerate(keys[:blocks]):
            ks, vs = self._kv[key]
            for layer, (k, v) in enumerate(zip(ks, vs, strict=True)):
                cache.keys[layer][:, i * b : (i + 1) * b] = k
                cache.values[layer][:, i * b : (i + 1) * b] = v
        cache.length = blocks * b
        return blocks * b

    def store(self, prompt_ids: Sequence[int], cache: Any) -> None:
        """The prompt is prefilled into `cache`: keep its whole blocks (copies), evicting the least recent ones."""
        keys = self.keys(prompt_ids)
        if not keys:
            return
        b = self.block_tokens
        for i, key in enumerate(keys[: self.index.capacity_blocks]):
            if key not in self._kv:
                self._kv[key] = ([k[:, i * b : (i + 1) * b].clone() for k in cache.keys],
                                 [v[:, i * b : (i + 1) * b].clone() for v in cache.values])
        for gone in self.index.insert(keys):
            self._kv.pop(gone, None)

    def stats(self) -> dict[str, Any]:
        return {"blocks": len(self._kv), "capacity_blocks": self.index.capacity_blocks,
                "block_tokens": self.block_tokens, "lookup_tokens": self.index.lookup_tokens,
                "hit_tokens": self.index.hit_tokens, "hit_rate": self.index.hit_rate}
