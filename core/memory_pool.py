"""GPU memory placement beyond one reservation per GPU (docs/results/memory_waste.md). Pure bookkeeping.

- `pool_plan` (`EngineSpec.gpu_pool`): an instance's weights are sharded over its tensor-parallel GPUs, its KV
  cache may take bytes on any GPU of its node (memory pooled over the node's interconnect).
- `kv_grow` / `kv_shrink` (`EngineSpec.kv_elastic`): KV pages mapped on demand, in `kv_page_bytes` pages, up to the
  instance's static KV budget, and unmapped when no sequence uses them. The instance's reserved bytes
  (`gpu_bytes`) follow, and their integral over time is kept (`InstanceState.reserved_byte_s`).

`core.state.ClusterState` and `NodeState` call these; they change only the state they are given.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from core.state import ClusterState, InstanceState


def pool_plan(free: Sequence[float], n: int, need_bytes: float,
              weights_per_gpu: float) -> tuple[tuple[int, ...], dict[int, float]] | None:
    """`n` GPUs for the weights' shards (`weights_per_gpu` each), the rest of `need_bytes` (KV cache) on those GPUs
    first, then on any GPU of the node, most free first. Returns (the weights' GPUs, bytes taken per GPU) or None
    if `free` (bytes free per GPU) cannot hold it. When `n` GPUs each have room for an even share of everything,
    that per-GPU fit is the plan (KV stays next to its weights, as without pooling)."""
    per_gpu = need_bytes / n
    if sum(1 for f in free if f + 1e-6 >= per_gpu) >= n:
        if n == 1:
            best = min((i for i, f in enumerate(free) if f + 1e-6 >= per_gpu), key=lambda i: (free[i], i))
            ids: tuple[int, ...] = (best,)
        else:
            ids = tuple(sorted((i for i, f in enumerate(free) if f + 1e-6 >= per_gpu), key=lambda i: free[i])[:n])
    else:
        homes = sorted((i for i, f in enumerate(free) if f + 1e-6 >= weights_per_gpu), key=lambda i: (-free[i], i))
        if len(homes) < n:
            return None
        ids = tuple(sorted(homes[:n]))
    shares = spread(free, ids, need_bytes, weights_per_gpu)
    return None if shares is None else (ids, shares)


def spread(free: Sequence[float], ids: Sequence[int], need_bytes: float,
           weights_per_gpu: float) -> dict[int, float] | None:
    """Bytes per GPU for an instance on GPUs `ids`: an even share on each if each has room for it, else the weights'
    shards there and the rest on those GPUs first, then on the node's others, most free first; None if it cannot."""
    per_gpu = need_bytes / len(ids)
    if all(free[g] + 1e-6 >= per_gpu for g in ids):
        return dict.fromkeys(ids, per_gpu)
    if any(free[g] + 1e-6 < weights_per_gpu for g in ids):
        return None
    shares = dict.fromkeys(ids, weights_per_gpu)
    rest = need_bytes - weights_per_gpu * len(ids)
    order = [*sorted(ids, key=lambda i: (-free[i], i)),
             *sorted((i for i in range(len(free)) if i not in shares), key=lambda i: (-free[i], i))]
    for g in order:
        if rest <= 1e-6:
            break
        take = min(max(0.0, free[g] - shares.get(g, 0.0)), rest)
        if take > 0:
            shares[g] = shares.get(g, 0.0) + take
            rest -= take
    return shares if rest <= 1e-6 else None


def kv_target(state: ClusterState, inst: InstanceState, used_bytes: float) -> float:
    """KV bytes `inst` keeps mapped to hold `used_bytes`: whole pages, at least the minimum, at most its budget."""
    eng = state.engine
    page = eng.kv_page_bytes
    floor = inst.kv_budget_bytes * eng.kv_elastic_min_frac
    mapped = -(-used_bytes // page) * page if page > 0 else used_bytes
    return min(inst.kv_budget_bytes, max(floor, mapped))


def _resize(inst: InstanceState, delta: float, now_s: float) -> None:
    inst.res_int += inst.gpu_bytes * (now_s - inst.res_t)
    inst.res_t = now_s
    inst.gpu_bytes += delta
    inst.kv_reserved_bytes += delta


def kv_grow(state: ClusterState, inst: InstanceState, used_bytes: float, now_s: float) -> bool:
    """Map pages so that `used_bytes` of KV fit `inst`: evenly on its own GPUs, else (with `gpu_pool`) anywhere on
    its node, its own GPUs first. False, and nothing mapped, if the node has no room for them now."""
    delta = kv_target(state, inst, used_bytes) - inst.kv_reserved_bytes
    if delta <= 1e-6:
        return True
    free = state.nodes[inst.node].gpu_free_bytes
    each = delta / len(inst.gpu_ids)
    take: dict[int, float] = {}
    if all(free[g] + 1e-6 >= each for g in inst.gpu_ids):
        take = dict.fromkeys(inst.gpu_ids, each)
    elif state.engine.gpu_pool and sum(free) + 1e-6 >= delta:
        rest = delta
        homes = set(inst.gpu_ids)
        for g in sorted(range(len(free)), key=lambda i: (i not in homes, -free[i], i)):
            t = min(max(0.0, free[g]), rest)
            if t > 0:
                take[g] = t
                rest -= t
            if rest <= 1e-6:
                break
        if rest > 1e-6:
            return False
    else:
        return False
    for g, b in take.items():
        free[g] -= b
        inst.kv_shares[g] = inst.kv_shares.get(g, 0.0) + b
    _resize(inst, delta, now_s)
    return True


def kv_shrink(state: ClusterState, inst: InstanceState, now_s: float) -> bool:
    """Unmap the pages `inst` no longer uses (those on other GPUs first). True if any were."""
    delta = min(inst.kv_reserved_bytes - kv_target(state, inst, inst.kv_used_bytes), sum(inst.kv_shares.values()))
    if delta <= 1e-6:
        return False
    free = state.nodes[inst.node].gpu_free_bytes
    homes = set(inst.gpu_ids)
    rest = delta
    for g in sorted(inst.kv_shares, key=lambda i: (i in homes, i)):
        t = min(inst.kv_shares[g], rest)
        inst.kv_shares[g] -= t
        free[g] += t
        rest -= t
        if inst.kv_shares[g] <= 1e-6:
            del inst.kv_shares[g]
        if rest <= 1e-6:
            break
    _resize(inst, -delta, now_s)
    return True
