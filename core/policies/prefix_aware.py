"""Cache-aware routing: send a request to the warm instance that holds the longest prefix of its prompt.

The router cannot read the engines' caches (neither world exposes them, and a real gateway does not see
inside its engines), so, like SGLang's cache-aware router, it keeps its own approximate copy: for each
instance, a `core.prefix_cache.PrefixCache` of the block ids it routed there, sized as the engine's cache
(`EngineSpec.prefix_cache_frac` of the instance's KV budget, `prefix_block_tokens` per block) and evicted in
the same LRU order.

The wrapped `base` placement decides first: cold starts, scale-ups (its autoscaler's test) and queueing stay
its own. Only when it routes to a warm instance may the request go to another ready instance of the model
that holds a longer prefix of it.
"""

from __future__ import annotations

from collections.abc import Sequence

from core.decisions import Decision, Route
from core.errors import ConfigError
from core.policies.base import Placement, RequestView
from core.policies.placement import TierAware
from core.prefix_cache import PrefixCache
from core.state import ClusterView, InstanceState


class PrefixAware:
    """Where `base` routes to a warm instance, prefer the ready one with the longest cached prefix of the
    request's blocks.

    Load balance: an instance is a candidate only while its load (running + queued requests) is at most
    `balance_slack` above the least loaded ready instance of the model, so a popular prefix cannot pile every
    request onto one instance (SGLang's router has the same absolute threshold). Among candidates: the longest
    cached prefix (in blocks, at least `min_hit_blocks`), then the lightest load, then the instance id.

    `capacity_blocks`: the size of the router's copy of each instance's cache; None: as the engine's
    (`PrefixCache.for_instance`), or `FALLBACK_BLOCKS` where that comes to nothing (an instance that reports no KV
    budget, as an engine the live gateway adopted).
    """

    FALLBACK_BLOCKS = 4096
    #: the live gateway hashes a request's prompt into blocks only for a placement that reads them
    reads_prefix_blocks = True

    def __init__(self, base: Placement | None = None, balance_slack: int = 4, min_hit_blocks: int = 1,
                 capacity_blocks: int | None = None) -> None:
        if balance_slack < 0:
            raise ConfigError(f"balance_slack: must be >= 0, got {balance_slack}")
        if min_hit_blocks < 1:
            raise ConfigError(f"min_hit_blocks: must be >= 1, got {min_hit_blocks}")
        self.base: Placement = base if base is not None else TierAware()
        self.balance_slack = balance_slack
        self.min_hit_blocks = min_hit_blocks
        if capacity_blocks is not None and capacity_blocks < 1:
            raise ConfigError(f"capacity_blocks: must be >= 1 (or null: the engine's), got {capacity_blocks}")
        self.capacity_blocks = capacity_blocks
        self._caches: dict[str, PrefixCache] = {}  # instance id -> what was routed there (the router's copy)

    def bind(self, autoscaler: object) -> None:
        """The bundle hands the autoscaler to the placement (scale-up test): pass it on to `base`."""
        bind = getattr(self.base, "bind", None)
        if bind is not None:
            bind(autoscaler)

    def place(self, req: RequestView, view: ClusterView) -> Decision:
        decision = self.base.place(req, view)
        blocks: Sequence[int] = getattr(req, "prefix_blocks", ()) or ()
        if not blocks:
            return decision
        self._forget_gone(view)
        if isinstance(decision, Route):
            best = self._best_hit(blocks, view.instances_of(req.model))
            if best is not None:
                decision = Route(best.id)
            inst = view.instances.get(decision.instance_id)
            if inst is not None:
                self._cache(inst, view).insert(blocks)  # the engine will hold them once it has prefilled
        return decision

    def cached_blocks(self, instance_id: str, blocks: Sequence[int]) -> int:
        """How many leading `blocks` the router believes `instance_id` holds (0 for an unknown instance)."""
        cache = self._caches.get(instance_id)
        return cache.match(blocks) if cache is not None else 0

    # ------------------------------------------------------------------ internals
    def _best_hit(self, blocks: Sequence[int], insts: Sequence[InstanceState]) -> InstanceState | None:
        ready = [i for i in insts if i.status == "ready"]
        if not ready:
            return None
        floor = min(i.active + i.waiting for i in ready) + self.balance_slack
        best, best_key = None, None
        for inst in ready:
            load = inst.active + inst.waiting
            cache = self._caches.get(inst.id)
            if cache is None or load > floor:
                continue
            hit = cache.match(blocks)
            if hit < self.min_hit_blocks:
                continue
            key = (-hit, load, inst.id)
            if best_key is None or key < best_key:
                best, best_key = inst, key
        return best

    def _cache(self, inst: InstanceState, view: ClusterView) -> PrefixCache:
        cache = self._caches.get(inst.id)
        if cache is None:
            if self.capacity_blocks is not None:
                cache = PrefixCache(self.capacity_blocks, view.engine.prefix_block_tokens)
            else:
                cache = PrefixCache.for_instance(inst.kv_budget_bytes, max(inst.model.kv_bytes_per_token, 1e-9),
                                                 view.engine)
                if cache.capacity_blocks == 0:
                    cache = PrefixCache(self.FALLBACK_BLOCKS, view.engine.prefix_block_tokens)
            self._caches[inst.id] = cache
        return cache

    def _forget_gone(self, view: ClusterView) -> None:
        """Drop the copies of instances that stopped (their engines' caches went with them)."""
        if not self._caches:
            return
        live = view.instances
        for iid in [i for i in self._caches if i not in live or live[i].status in ("stopping", "stopped")]:
            del self._caches[iid]
