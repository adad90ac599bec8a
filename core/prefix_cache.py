"""A per-instance prefix (KV) cache of fixed-size token blocks, with LRU eviction.

Pure bookkeeping: no clock, no I/O. A request's prompt is a sequence of block ids (Mooncake's ``hash_ids``:
512 tokens per block, each id standing for the whole prefix up to and including its block, as vLLM's and
SGLang's chained block hashes do). A cached prefix is the longest run of the request's leading blocks that are
all in the cache; a block past a missing one is useless (its KV depends on everything before it).

Eviction is least-recently-used by block, with the blocks of one request touched last-to-first, so that a
prefix's first blocks are the most recent: shared roots (system prompts, earlier turns) outlive the private
tails that hang off them, as in vLLM's free-block queue, which frees a sequence's blocks in reverse order.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Hashable, Sequence

from core.errors import ConfigError
from core.specs import EngineSpec

#: Mooncake's block size (tokens per ``hash_ids`` entry; FAST'25 trace README)
MOONCAKE_BLOCK_TOKENS = 512


def text_block_keys(text: str, block_chars: int = 64) -> tuple[int, ...]:
    """Chained block ids of a text, for routing by prefix where no tokenizer is at hand (the live gateway):
    block i's id hashes the text up to the end of its ``block_chars``-character block, so two prompts share
    ids exactly as far as they share whole blocks. Only whole blocks count. A stable hash (blake2b, 8 bytes),
    not Python's per-process salted one: the same text has the same ids in every process."""
    ids = []
    h = hashlib.blake2b(digest_size=8)
    for i in range(len(text) // block_chars):
        h.update(text[i * block_chars : (i + 1) * block_chars].encode())
        ids.append(int.from_bytes(h.copy().digest(), "big"))
    return tuple(ids)


class PrefixCache:
    """Block ids held by one instance, at most ``capacity_blocks`` of them, least recently used evicted first."""

    __slots__ = ("_blocks", "block_tokens", "capacity_blocks", "hit_tokens", "lookup_tokens")

    def __init__(self, capacity_blocks: int, block_tokens: int = MOONCAKE_BLOCK_TOKENS) -> None:
        if isinstance(capacity_blocks, bool) or not isinstance(capacity_blocks, int) or capacity_blocks < 0:
            raise ConfigError(f"prefix cache: capacity_blocks must be an integer >= 0, got {capacity_blocks!r}")
        if isinstance(block_tokens, bool) or not isinstance(block_tokens, int) or block_tokens < 1:
            raise ConfigError(f"prefix cache: block_tokens must be an integer >= 1, got {block_tokens!r}")
        self.capacity_blocks = capacity_blocks
        self.block_tokens = block_tokens
        self._blocks: OrderedDict[Hashable, None] = OrderedDict()  # least recently used first
        self.lookup_tokens = 0  # prompt tokens looked up (`lookup`), for a token-weighted hit rate
        self.hit_tokens = 0  # of which found cached

    @classmethod
    def from_kv_bytes(cls, kv_budget_bytes: float, kv_bytes_per_token: float, frac: float,
                      block_tokens: int = MOONCAKE_BLOCK_TOKENS) -> PrefixCache:
        """A cache holding ``frac`` of an instance's KV memory (``kv_budget_bytes``) in whole blocks."""
        if not 0.0 <= frac <= 1.0:
            raise ConfigError(f"prefix cache: frac must be in [0, 1], got {frac}")
        if kv_bytes_per_token <= 0:
            raise ConfigError(f"prefix cache: kv_bytes_per_token must be > 0, got {kv_bytes_per_token}")
        tokens = frac * kv_budget_bytes / kv_bytes_per_token
        return cls(int(tokens // block_tokens), block_tokens)

    @classmethod
    def for_instance(cls, kv_budget_bytes: float, kv_bytes_per_token: float, engine: EngineSpec) -> PrefixCache:
        """The cache an instance of the engine keeps: ``prefix_cache_blocks`` if set, else
        ``prefix_cache_frac`` of its KV budget (`from_kv_bytes`)."""
        if engine.prefix_cache_blocks > 0:
            return cls(int(engine.prefix_cache_blocks), int(engine.prefix_block_tokens))
        return cls.from_kv_bytes(kv_budget_bytes, kv_bytes_per_token, engine.prefix_cache_frac,
                                 int(engine.prefix_block_tokens))

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block: Hashable) -> bool:
        return block in self._blocks

    @property
    def capacity_tokens(self) -> int:
        return self.capacity_blocks * self.block_tokens

    @property
    def hit_rate(self) -> float:
        """Token-weighted: cached prompt tokens over prompt tokens looked up (0 before any lookup)."""
        return self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0

    def match(self, blocks: Sequence[Hashable]) -> int:
        """How many of ``blocks``' leading blocks are cached (no side effect: a router's what-if)."""
        n = 0
        held = self._blocks
        for b in blocks:
            if b not in held:
                break
            n += 1
        return n

    def cached_tokens(self, blocks: Sequence[Hashable], prompt_tokens: int) -> int:
        """Prompt tokens a request could skip: its cached prefix in tokens, at most ``prompt_tokens - 1``
        (the last prompt token is always computed: its logits give the first output token)."""
        return max(0, min(self.match(blocks) * self.block_tokens, prompt_tokens - 1))

    def lookup(self, blocks: Sequence[Hashable], prompt_tokens: int) -> int:
        """`cached_tokens`, counted in the hit rate; the hit blocks become the most recently used."""
        hit = self.cached_tokens(blocks, prompt_tokens)
        self.lookup_tokens += prompt_tokens
        self.hit_tokens += hit
        if hit:
            self._touch(blocks[: -(-hit // self.block_tokens)])
        return hit

    def insert(self, blocks: Sequence[Hashable]) -> list[Hashable]:
        """The request's blocks are computed: hold them (most recent), evicting the least recently used.
        Returns the evicted blocks (an engine frees their KV)."""
        if self.capacity_blocks == 0 or not blocks:
            return []
        # beyond capacity only the leading blocks can stay (a tail without its head is useless)
        self._touch(blocks[: self.capacity_blocks])
        held = self._blocks
        evicted = []
        while len(held) > self.capacity_blocks:
            evicted.append(held.popitem(last=False)[0])
        return evicted

    def _touch(self, blocks: Sequence[Hashable]) -> None:
        held = self._blocks
        for b in reversed(blocks):  # last to first: the first block ends up the most recently used
            if b in held:
                held.move_to_end(b)
            else:
                held[b] = None

    def clear(self) -> None:
        self._blocks.clear()
