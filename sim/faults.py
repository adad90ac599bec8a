"""Faults in the simulated world: when spot nodes are preempted, nodes fail and object stores go out,
and which store serves cloud fetches (failover).

Every fault process draws from a random stream of its own, derived from the run seed and the
fault's kind and target, so that turning faults on changes no other draw (the workload's, another
node's). What a lost node means for instances and requests is the world's business (`sim/world.py`).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Generator, Sequence
from typing import Any

import numpy as np
import simpy

from core.specs import ClusterSpec, ObjectStoreSpec
from core.units import HOUR_S

#: The sim-only event table: faults, failovers, and which store each cloud transfer used.
EVENT_SCHEMA: dict[str, str] = {
    "time_s": "float64",
    # preemption_notice, preempted, replaced, node_failed, repaired, store_out, store_back,
    # failover, failback, store_recovered, cloud_fetch
    "kind": "string",
    "node": "string",
    "store": "string",
    "instance": "string",
    "requests": "int64",  # requests re-queued by a lost node
    "duration_s": "float64",  # the notice, the time until back, a recovery, or a fetch's wait for a store
    "detail": "string",
}

# spawn-key namespace of the fault streams; the workload's streams are SeedSequence(seed).spawn(n): (0,), (1,), ...
_FAULT_STREAMS = 0xFA17

Record = Callable[..., None]


def fault_rng(seed: int, kind: str, target: str) -> np.random.Generator:
    """The random stream of one fault process (`kind` on `target`), derived from the run seed."""
    key = zlib.crc32(f"{kind}/{target}".encode())  # stable across runs, unlike hash()
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(_FAULT_STREAMS, key))))


def poisson_process(env: simpy.Environment, rng: np.random.Generator, rate_per_hour: float,
                    fire: Callable[[], None]) -> Generator[simpy.Event, Any, None]:
    """Call `fire` at the events of a Poisson process. Whoever fires decides to ignore an event
    (e.g. the node is already down): the process is memoryless, so this is the same as pausing it."""
    mean_s = HOUR_S / rate_per_hour
    while True:
        yield env.timeout(float(rng.exponential(mean_s)))
        fire()


class StorePath:
    """Which object store serves cloud fetches, with failover.

    Stores are ranked in their configured order (primary first). When the serving store goes out,
    no store serves until `failover_s` (detection + switch) later, when the first store that is up
    takes over; if none is, the first to come back does, at once. If the store that went out comes
    back within `failover_s`, it serves again at once (retries reach it). A store ranked above the
    serving one takes over at once when it comes back (failback).
    """

    def __init__(self, env: simpy.Environment, stores: Sequence[ObjectStoreSpec], failover_s: float,
                 record: Record) -> None:
        self.env = env
        self.stores = tuple(stores)
        self.failover_s = failover_s
        self.record = record
        self.out = [False] * len(self.stores)
        self.serving: int | None = 0
        self._lost: tuple[int, float] | None = None  # (store that went out, when) while none serves
        self._switch_gen = 0
        self._wake = env.event()
        self.gaps: list[tuple[float, float]] = []  # intervals with no store serving, closed ones
        self.recoveries_s: list[float] = []

    @property
    def current(self) -> ObjectStoreSpec | None:
        """The store serving cloud fetches now, or None during a failover or when every store is out."""
        return None if self.serving is None else self.stores[self.serving]

    def wait(self) -> Generator[simpy.Event, Any, ObjectStoreSpec]:
        """Wait until a store serves (no wait at all when one does now); returns it."""
        while self.serving is None:
            yield self._wake
        return self.stores[self.serving]

    def outage(self, i: int, duration_s: float) -> None:
        """Store `i` goes out for `duration_s` (ignored if it is out already)."""
        if self.out[i]:
            return
        now = self.env.now
        self.out[i] = True
        self.record("store_out", store=self.stores[i].name, duration_s=duration_s)
        self.env.timeout(duration_s).callbacks.append(lambda _e: self._back(i))
        if self.serving == i:
            self.serving = None
            self._lost = (i, now)
            self._switch_gen += 1
            gen = self._switch_gen
            self.env.timeout(self.failover_s).callbacks.append(lambda _e: self._failover(gen))

    def close(self, end_s: float) -> None:
        """The run ended: a loss still open counts as a gap up to `end_s` (not as a recovery)."""
        if self._lost is not None:
            self.gaps.append((self._lost[1], end_s))
            self._lost = None

    def _first_up(self) -> int | None:
        return next((i for i, out in enumerate(self.out) if not out), None)

    def _failover(self, gen: int) -> None:
        if gen != self._switch_gen or self.serving is not None:
            return  # the lost store came back, or a store took over already
        up = self._first_up()
        if up is not None:
            self._serve(up, "failover")

    def _back(self, i: int) -> None:
        self.out[i] = False
        self.record("store_back", store=self.stores[i].name)
        if self.serving is None:
            assert self._lost is not None
            lost_i, lost_s = self._lost
            if i == lost_i:
                self._serve(i, "store_recovered")
            elif self.env.now >= lost_s + self.failover_s:
                self._serve(self._first_up(), "failover")  # every store was out: the first back takes over
        elif i < self.serving:
            self._serve(i, "failback")

    def _serve(self, i: int | None, kind: str) -> None:
        assert i is not None
        now = self.env.now
        old = self.serving
        self.serving = i
        recovery = None
        if self._lost is not None:
            old = self._lost[0]
            recovery = now - self._lost[1]
            self.gaps.append((self._lost[1], now))
            self.recoveries_s.append(recovery)
            self._lost = None
        self.record(kind, store=self.stores[i].name, duration_s=recovery,
                    detail="" if old is None or old == i else f"from {self.stores[old].name}")
        wake, self._wake = self._wake, self.env.event()
        wake.succeed()


class FaultInjector:
    """Starts the configured fault processes; `schedule` adds scripted faults (scenarios, tests)."""

    def __init__(self, env: simpy.Environment, cluster: ClusterSpec, seed: int, *,
                 preempt: Callable[[str], None], fail: Callable[[str], None], stores: StorePath) -> None:
        self.env = env
        self.cluster = cluster
        self.seed = seed
        self.preempt = preempt
        self.fail = fail
        self.stores = stores

    def start(self) -> None:
        """One Poisson process per spot node (preemptions), per node (failures), per store (outages)."""
        env = self.env
        for node in self.cluster.nodes:
            if node.spot and node.preemption_rate_per_hour > 0:
                rng = fault_rng(self.seed, "preemption", node.name)
                env.process(poisson_process(env, rng, node.preemption_rate_per_hour,
                                            lambda n=node.name: self.preempt(n)))
            if node.failure_rate_per_hour > 0:
                rng = fault_rng(self.seed, "failure", node.name)
                env.process(poisson_process(env, rng, node.failure_rate_per_hour, lambda n=node.name: self.fail(n)))
        for i, store in enumerate(self.cluster.stores):
            if store.outage_rate_per_hour > 0:
                rng = fault_rng(self.seed, "outage", store.name)
                env.process(poisson_process(env, rng, store.outage_rate_per_hour,
                                            lambda i=i, d=store.outage_duration_s: self.stores.outage(i, d)))

    def schedule(self, at_s: float, kind: str, target: str, duration_s: float | None = None) -> None:
        """A scripted fault at `at_s`: "preemption" or "failure" of node `target`, or "store_outage" of the
        store named `target` for `duration_s` (default: the store's `outage_duration_s`)."""
        if kind in ("preemption", "failure"):
            if target not in {n.name for n in self.cluster.nodes}:
                raise ValueError(f"schedule: unknown node {target!r}")
            fire = (lambda: self.preempt(target)) if kind == "preemption" else (lambda: self.fail(target))
        elif kind == "store_outage":
            names = [s.name for s in self.cluster.stores]
            if target not in names:
                raise ValueError(f"schedule: unknown store {target!r}; stores: {names}")
            i = names.index(target)
            d = self.cluster.stores[i].outage_duration_s if duration_s is None else duration_s
            if d <= 0:
                raise ValueError(f"schedule: store outage of {target!r} needs duration_s > 0")

            def fire() -> None:
                self.stores.outage(i, d)
        else:
            raise ValueError(f"schedule: unknown fault kind {kind!r}; kinds: preemption, failure, store_outage")
        if at_s < self.env.now:
            raise ValueError(f"schedule: at_s {at_s} is in the past (now {self.env.now})")
        self.env.timeout(at_s - self.env.now).callbacks.append(lambda _e: fire())
