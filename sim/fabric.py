"""Links with shared bandwidth: concurrent transfers on a node split its links max-min fairly.

A flow crosses one or more links of one node (e.g. NVMe read, or NIC + SATA write) and
may have its own cap (a cloud fetch is bounded by streams x per-stream bandwidth). On
every start or finish the node's rates are recomputed by progressive filling, and one
SimPy event is scheduled for the next completion. Links that serve a bounded number of
streams make further flows wait in line.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import simpy

_EPS_BYTES = 1e-3


class Flow:
    """One transfer in progress (or waiting for a stream)."""

    __slots__ = ("cap", "done", "links", "nbytes", "on_done", "rate", "remaining", "started_s", "trace")

    def __init__(self, links: tuple[str, ...], nbytes: float, cap: float, on_done: Callable[[Flow], Any],
                 track: bool) -> None:
        self.links = links
        self.nbytes = nbytes
        self.remaining = nbytes
        self.cap = cap
        self.rate = 0.0
        self.on_done = on_done
        self.started_s = float("nan")
        self.done = False
        # (time, bytes done) at every rate change, to place layer arrivals for progressive loading
        self.trace: list[tuple[float, float]] | None = [] if track else None

    def time_at_bytes(self, target: float) -> float:
        """When the flow had moved `target` bytes (exact: rates are piecewise constant)."""
        assert self.trace is not None
        pts = self.trace
        for (t0, b0), (t1, b1) in itertools.pairwise(pts):
            if b1 >= target - _EPS_BYTES:
                if b1 <= b0:
                    return t1
                return t0 + (t1 - t0) * (target - b0) / (b1 - b0)
        return pts[-1][0]


class NodeLinks:
    """The links of one node and the flows crossing them."""

    def __init__(self, env: simpy.Environment, caps: dict[str, float], streams: dict[str, int],
                 in_flight: dict[str, float]) -> None:
        self.env = env
        self.caps = caps
        self.streams = streams
        self.active: list[Flow] = []
        self.waiting: list[Flow] = []
        self.t_last = env.now
        self.generation = 0
        self.in_flight = in_flight  # shared with NodeState.loads_in_flight for policies to read

    def start(self, flow: Flow) -> None:
        self._advance()
        self.waiting.append(flow)
        self._admit()
        self._reschedule()

    # -- internals --------------------------------------------------------------------
    def _admit(self) -> None:
        if not self.waiting:
            return
        counts: dict[str, int] = {}
        for f in self.active:
            for link in f.links:
                counts[link] = counts.get(link, 0) + 1
        still = []
        for f in self.waiting:
            if all(counts.get(link, 0) < self.streams.get(link, 1 << 30) for link in f.links):
                for link in f.links:
                    counts[link] = counts.get(link, 0) + 1
                f.started_s = self.env.now
                if f.trace is not None:
                    f.trace.append((self.env.now, 0.0))
                self.active.append(f)
            else:
                still.append(f)
        self.waiting = still

    def _advance(self) -> None:
        now = self.env.now
        dt = now - self.t_last
        if dt > 0:
            for f in self.active:
                f.remaining -= f.rate * dt
                if f.trace is not None:
                    f.trace.append((now, f.nbytes - max(f.remaining, 0.0)))
        self.t_last = now

    def _rates(self) -> None:
        """Max-min fair rates by progressive filling over links and per-flow caps."""
        unfixed = list(self.active)
        left = dict(self.caps)
        for f in unfixed:
            f.rate = 0.0
        while unfixed:
            users: dict[str, int] = {}
            for f in unfixed:
                for link in f.links:
                    users[link] = users.get(link, 0) + 1
            share = min(left[link] / n for link, n in users.items())
            cap_min = min(f.cap for f in unfixed)
            level = min(share, cap_min)
            fixed = []
            for f in unfixed:
                if f.cap <= level or any(left[link] / users[link] <= level * (1 + 1e-12) for link in f.links):
                    fixed.append(f)
            for f in fixed:
                f.rate = level
                for link in f.links:
                    left[link] = max(0.0, left[link] - level)
            unfixed = [f for f in unfixed if f not in fixed]
        in_flight = self.in_flight
        in_flight.clear()
        for f in self.active:
            for link in f.links:
                in_flight[link] = in_flight.get(link, 0.0) + max(f.remaining, 0.0)
        for f in self.waiting:
            for link in f.links:
                in_flight[link] = in_flight.get(link, 0.0) + f.remaining

    def _reschedule(self) -> None:
        self._rates()
        self.generation += 1
        if not self.active:
            return
        dt = min(f.remaining / f.rate if f.rate > 0 else float("inf") for f in self.active)
        gen = self.generation
        ev = self.env.timeout(max(dt, 0.0))
        ev.callbacks.append(lambda _e: self._on_timer(gen))

    def _on_timer(self, gen: int) -> None:
        if gen != self.generation:
            return  # superseded by a later start or finish
        self._advance()
        # what is left after the timer is float rounding: at large times the clock's step can exceed 1 ns
        slack_s = max(1e-9, 4 * math.ulp(self.env.now))
        finished = [f for f in self.active if f.remaining <= _EPS_BYTES or f.remaining <= f.rate * slack_s]
        if finished:
            self.active = [f for f in self.active if f not in finished]
            self._admit()
        self._reschedule()
        for f in finished:
            f.done = True
            f.remaining = 0.0
            if f.trace is not None and f.trace[-1][1] < f.nbytes:
                f.trace.append((self.env.now, f.nbytes))
            f.on_done(f)


class Fabric:
    """All nodes' links."""

    def __init__(self, env: simpy.Environment) -> None:
        self.env = env
        self.nodes: dict[str, NodeLinks] = {}

    def add_node(self, name: str, caps: dict[str, float], streams: dict[str, int], in_flight: dict[str, float]) -> None:
        self.nodes[name] = NodeLinks(self.env, caps, streams, in_flight)

    def transfer(self, node: str, links: tuple[str, ...], nbytes: float, cap: float, latency_s: float,
                 on_done: Callable[[Flow], Any], track: bool = False) -> Flow:
        """Move `nbytes` over `links` of `node` after `latency_s`; call `on_done(flow)` when finished."""
        flow = Flow(links, nbytes, cap, on_done, track)
        nl = self.nodes[node]
        if latency_s > 0:
            ev = self.env.timeout(latency_s)
            ev.callbacks.append(lambda _e: nl.start(flow))
        else:
            nl.start(flow)
        return flow
