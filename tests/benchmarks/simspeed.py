"""Simulator speed as a same-run ratio: tierlab's simulated requests per second over a bare SimPy loop's.

The bare loop is the floor any SimPy model pays: per request one process, one resource request and one
timeout. Rounds are chained (bare, sim, bare, sim, ..., bare) so every simulation is timed between two bare
loops and a drift in machine speed cancels; each round's ratio uses the mean of the two. Both clocks are
kept: wall time (what a user waits) and process CPU time (less moved by other jobs on a shared machine).

`slowed` is the test hook that stands for a real regression: it makes one method take `factor` times as
long by busy-waiting after each call. `measure` applies it to the world's event loop (`sim.world.World.run`:
every arrival, placement, load and batch step of a simulation; not the bare loop) when
`TIERLAB_BENCH_SIM_SLOWDOWN=<factor>` is set, so

    TIERLAB_BENCH_SIM_SLOWDOWN=3 python -m pytest -q tests/benchmarks/test_bench_sim.py

shows the regression check failing on a slowed simulator.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import simpy

from experiments.setup import Setup
from sim.run import simulate
from sim.world import World

SLOWDOWN_ENV = "TIERLAB_BENCH_SIM_SLOWDOWN"
SIM_METRIC = "sim.req_per_s_over_bare_simpy.cpu"  # the ratio on process CPU time, judged against baseline.json
# the CI scenario: the first 20 minutes of the embedded ServeGen deepseek-r1 trace (~20k requests, ~1.5 s a run)
QUICK = ("workload=servegen_r1", "workload.window=[0,1200]", "output.plots=false")
QUICK_ROUNDS = 5
# the scenario the 1/3 target was first measured on (~150k requests, ~10 s a run)
TWO_HOURS = ("workload=servegen_r1", "workload.window=[0,7200]", "output.plots=false")


def bare_simpy(arrival_s: np.ndarray, service_s: float = 1.0, capacity: int = 64) -> None:
    """The simplest SimPy model of the same arrivals: one process, one resource request, one timeout each."""
    env = simpy.Environment()
    res = simpy.Resource(env, capacity)

    def job(env: simpy.Environment) -> Iterator[Any]:
        with res.request() as req:
            yield req
            yield env.timeout(service_s)

    def source(env: simpy.Environment) -> Iterator[Any]:
        for t in arrival_s.tolist():
            if t > env.now:
                yield env.timeout(t - env.now)
            env.process(job(env))

    env.process(source(env))
    env.run()


@dataclass(frozen=True)
class Timing:
    wall_s: float
    cpu_s: float


def timed(fn: Callable[[], Any]) -> tuple[Timing, Any]:
    """Wall and process CPU time of `fn()`, from a fresh garbage-collector state, and its result."""
    gc.collect()  # the previous run's garbage is not charged to this one
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return Timing(time.perf_counter() - w0, time.process_time() - c0), out


@dataclass
class PairedRun:
    """`rounds` simulations, each timed between two bare loops (`bares[i]` before `sims[i]`, `bares[i + 1]`
    after), and what each simulation returned."""

    requests: int
    sims: list[Timing] = field(default_factory=list)
    bares: list[Timing] = field(default_factory=list)
    outputs: list[Any] = field(default_factory=list)

    def ratios(self, clock: str) -> list[float]:
        """Per round: tierlab's rate over the bare loop's, i.e. the bare time (mean of before and after)
        over the simulation's, on `clock` ("wall_s" or "cpu_s")."""
        return [(getattr(self.bares[i], clock) + getattr(self.bares[i + 1], clock)) / 2 / getattr(s, clock)
                for i, s in enumerate(self.sims)]

    @property
    def wall_ratio(self) -> float:
        return statistics.median(self.ratios("wall_s"))

    @property
    def cpu_ratio(self) -> float:
        return statistics.median(self.ratios("cpu_s"))

    def sim_req_per_s(self) -> list[float]:
        return [self.requests / s.wall_s for s in self.sims]

    def bare_req_per_s(self) -> list[float]:
        return [self.requests / b.wall_s for b in self.bares]


def paired_run(run_sim: Callable[[], Any], arrival_s: np.ndarray, rounds: int,
               prepare: Callable[[], None] | None = None) -> PairedRun:
    """Chain bare loops and simulations: bare, (prepare, sim, bare) x `rounds`. `prepare` runs untimed."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    run = PairedRun(requests=len(arrival_s))
    run.bares.append(timed(lambda: bare_simpy(arrival_s))[0])
    for _ in range(rounds):
        if prepare is not None:
            prepare()
        t, out = timed(run_sim)
        run.sims.append(t)
        run.outputs.append(out)
        run.bares.append(timed(lambda: bare_simpy(arrival_s))[0])
    return run


@contextlib.contextmanager
def slowed(owner: type, attr: str, factor: float) -> Iterator[None]:
    """Within the block, `owner.attr` costs `factor` times as much: after each call it spins until the process
    has used (factor - 1) times the call's own CPU time again. CPU work, like a real regression's (a sleep would
    not show in CPU time), and counted in CPU time so that being descheduled does not change how much."""
    if not (math.isfinite(factor) and factor >= 1):
        raise ValueError(f"slowdown factor must be a finite number >= 1, got {factor!r}")
    had_own = attr in vars(owner)
    original = getattr(owner, attr)

    @functools.wraps(original)
    def slow(*args: Any, **kwargs: Any) -> Any:
        t0 = time.process_time()
        try:
            return original(*args, **kwargs)
        finally:
            now = time.process_time()
            until = now + (now - t0) * (factor - 1)
            while time.process_time() < until:
                pass

    setattr(owner, attr, slow)
    try:
        yield
    finally:
        if had_own:
            setattr(owner, attr, original)
        else:
            delattr(owner, attr)


def slowdown_from_env() -> float:
    """The factor `TIERLAB_BENCH_SIM_SLOWDOWN` asks for (1: none)."""
    raw = os.environ.get(SLOWDOWN_ENV, "").strip()
    if not raw:
        return 1.0
    try:
        factor = float(raw)
    except ValueError:
        raise ValueError(f"{SLOWDOWN_ENV} must be a number >= 1, got {raw!r}") from None
    if not (math.isfinite(factor) and factor >= 1):
        raise ValueError(f"{SLOWDOWN_ENV} must be a number >= 1, got {raw!r}")
    return factor


def measure(s: Setup, rounds: int, slowdown: float | None = None) -> PairedRun:
    """Paired rounds of `simulate` on the built scenario `s`; each run's output is its summary.

    Policies keep per-run state, so every round gets a fresh deep copy of the scenario's untouched policy,
    made outside the timed region. `slowdown` (default: from TIERLAB_BENCH_SIM_SLOWDOWN) makes the world's
    event loop take that factor times as long.
    """
    factor = slowdown_from_env() if slowdown is None else slowdown
    pristine = copy.deepcopy(s.policy)
    policy = [pristine]

    def prepare() -> None:
        policy[0] = copy.deepcopy(pristine)

    def run() -> dict[str, Any]:
        return simulate(s.cluster, s.models, s.engine, policy[0], s.workload).summary

    hook = slowed(World, "run", factor) if factor != 1 else contextlib.nullcontext()
    with hook:
        return paired_run(run, s.workload.arrival_s, rounds, prepare)


@dataclass
class QuickSim:
    """The CI scenario (QUICK), built once, and its paired run, measured at most once per session (the
    benchmark reports it, the slowed-run test compares it with a slowed one)."""

    setup: Setup
    rounds: int
    _run: PairedRun | None = None

    def run(self) -> PairedRun:
        if self._run is None:
            self._run = measure(self.setup, self.rounds)
        return self._run
