"""A run's warm-up (`metrics.warmup_s`): the world's counters at that instant, so that the summary counts only
what came after.

Requests that arrive before the warm-up ends are simulated like any other (they fill the tiers and start the
instances the measured part inherits) but left out of the request table and of every summary metric; GPU,
storage, egress and fleet costs, GPU-hours, loads, moves, faults and memory waste count from the warm-up's end.
The tier-movement, instance and event tables keep the whole run: they are the state's history.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pandas as pd

from core.warmup import clip_intervals, clip_lifetimes, measured_requests

if TYPE_CHECKING:
    from sim.world import World, WorldStats


@dataclass
class _Counters:
    """The world's cumulative counters at the warm-up's end (live instances' shares included)."""

    cloud_bytes: float = 0.0
    reserved_byte_s: float = 0.0
    weights_byte_s: float = 0.0
    kv_byte_s: float = 0.0
    loads_by_tier: dict[str, int] = field(default_factory=dict)
    cloud_bytes_by_route: dict[tuple[str, str], float] = field(default_factory=dict)
    requeued_by_cause: dict[str, int] = field(default_factory=dict)
    node_down_s: dict[str, float] = field(default_factory=dict)
    recoveries: int = 0


@dataclass
class Measured:
    """What `sim.run.collect` summarises once the warm-up is cut: the measured requests, instance lifetimes
    clipped to start at the warm-up's end, the counters since then, and the tables' rows since then (for
    counts)."""

    start_s: float
    requests: pd.DataFrame
    lifetimes: pd.DataFrame
    stats: WorldStats
    no_path_intervals: list[tuple[float, float]]
    recoveries_s: list[float]
    moves: pd.DataFrame
    instances: pd.DataFrame
    events: pd.DataFrame
    warmup_requests: int


class WarmupMark:
    """Takes the world's counters when simulated time reaches `warmup_s` (> 0)."""

    def __init__(self, world: World, warmup_s: float) -> None:
        self.warmup_s = float(warmup_s)
        self._at: _Counters | None = None
        world.env.timeout(self.warmup_s).callbacks.append(lambda _e: self._take(world))

    def _take(self, world: World) -> None:
        st, now = world.stats, world.env.now
        c = _Counters(cloud_bytes=st.cloud_bytes, reserved_byte_s=st.reserved_byte_s,
                      weights_byte_s=st.weights_byte_s, kv_byte_s=st.kv_byte_s,
                      loads_by_tier=dict(st.loads_by_tier), cloud_bytes_by_route=dict(st.cloud_bytes_by_route),
                      requeued_by_cause=dict(st.requeued_by_cause), node_down_s=dict(st.node_down_s),
                      recoveries=len(world.stores.recoveries_s))
        # instances alive now have paid nothing into the byte-second counters yet (they do when they end):
        # count their part so far, which the end's totals will include
        for eng in world.engines.values():
            inst = eng.state
            life = now - inst.started_s
            c.reserved_byte_s += inst.reserved_byte_s(now)
            c.weights_byte_s += inst.model.weights_bytes * life
            c.kv_byte_s += eng.kv_int + inst.kv_used_bytes * (now - eng.kv_t)
        for node, since in world._down_since.items():
            c.node_down_s[node] = c.node_down_s.get(node, 0.0) + now - since
        self._at = c

    def measured(self, world: World, requests: pd.DataFrame, lifetimes: pd.DataFrame, moves: pd.DataFrame,
                 instances: pd.DataFrame, events: pd.DataFrame) -> Measured:
        """The part of the run after the warm-up."""
        from sim.world import WorldStats

        w = self.warmup_s
        if self._at is None:  # the run ended before the warm-up did (setup refuses that): nothing measured
            self._take(world)
        at = self._at
        assert at is not None
        st = world.stats
        kept = measured_requests(requests, w)
        first = int(kept["request_id"].min()) if len(kept) else len(world.requests)
        after = WorldStats(
            cloud_bytes=st.cloud_bytes - at.cloud_bytes,
            reserved_byte_s=st.reserved_byte_s - at.reserved_byte_s,
            weights_byte_s=st.weights_byte_s - at.weights_byte_s,
            kv_byte_s=st.kv_byte_s - at.kv_byte_s,
            loads_by_tier=_minus(st.loads_by_tier, at.loads_by_tier),
            cloud_bytes_by_route=_minus(st.cloud_bytes_by_route, at.cloud_bytes_by_route),
            requeued_by_cause=_minus(st.requeued_by_cause, at.requeued_by_cause),
            # requests are numbered in arrival order: the measured ones are those from `first` on
            requeued_ids={i for i in st.requeued_ids if i >= first},
            node_down_s=_minus(st.node_down_s, at.node_down_s),
            no_node_intervals=clip_intervals(st.no_node_intervals, w),
        )
        return Measured(
            start_s=w, requests=kept, lifetimes=clip_lifetimes(lifetimes, w), stats=after,
            no_path_intervals=clip_intervals([*world.stores.gaps, *st.no_node_intervals], w),
            recoveries_s=list(world.stores.recoveries_s[at.recoveries:]),
            moves=moves[moves["time_s"] >= w], instances=instances[instances["time_s"] >= w],
            events=events[events["time_s"] >= w], warmup_requests=len(requests) - len(kept),
        )


def _minus(end: Mapping, start: Mapping) -> dict:
    """end - start per key; keys whose difference is 0 are dropped (as if counted only from the warm-up on)."""
    out = {}
    for k, v in end.items():
        d = v - start.get(k, 0)
        if d:
            out[k] = d
    return out
