"""Per-store health for a registry's object stores: which store to try first, given which ones failed lately.

A store that fails to answer (connection refused, connect or read timeout: `is_unreachable`) is marked down
for a back-off period (`BackoffPolicy`: 5 s, doubling per consecutive failure, at most 60 s). While down it is
tried last, not first, so a load goes straight to the next store instead of paying a timeout per load. Once the
back-off has passed, one caller (a claim, so concurrent loads do not all pay the probe) tries it again in its
priority place: if it answers it is healthy and preferred again (switch back); if not, the back-off grows. A
store that answers with "no such key" or a bad checksum is reachable, hence healthy: that is a content problem,
which the registry handles per model, not an outage.

The policy is pure (`plan`, `after_failure`, `after_success` over immutable `StoreState`s and a time `now`),
unit-tested with a fake clock; `StoreHealth` wraps it with a lock (agents fetch from several threads) and a
monotonic clock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace

__all__ = ["BackoffPolicy", "Plan", "StoreHealth", "StoreState", "after_failure", "after_success", "is_unreachable",
           "plan"]


@dataclass(frozen=True)
class BackoffPolicy:
    """How long a store that failed is tried last before it is probed again."""

    base_s: float = 5.0  # after the first failure: short, so a store that blipped is preferred again soon
    max_s: float = 60.0  # cap: a store dead for long costs one probe (<= one timeout) per minute
    probe_grace_s: float = 30.0  # a probe claim never reported (its caller died) is given up after this

    def backoff_s(self, failures: int) -> float:
        """The back-off after `failures` consecutive failures (>= 1)."""
        return min(self.max_s, self.base_s * 2.0 ** max(0, failures - 1))


@dataclass(frozen=True)
class StoreState:
    """One store's health: consecutive failures, until when it is tried last, and a probe in flight."""

    failures: int = 0
    down_until: float = 0.0  # clock time; meaningful only while failures > 0
    probing_since: float | None = None  # a caller claimed the probe at this time and has not reported yet

    @property
    def healthy(self) -> bool:
        return self.failures == 0


@dataclass(frozen=True)
class Plan:
    """The order to try stores in (indices into the priority list), and the stores this caller probes."""

    order: tuple[int, ...]
    probes: frozenset[int]


def _probe_due(state: StoreState, now: float, policy: BackoffPolicy) -> bool:
    """A down store whose back-off has passed and that no other caller is probing (or whose probe went stale)."""
    if state.healthy or now < state.down_until:
        return False
    return state.probing_since is None or now - state.probing_since >= policy.probe_grace_s


def plan(states: Sequence[StoreState], now: float, policy: BackoffPolicy = BackoffPolicy()) -> Plan:
    """Healthy stores and stores due for a probe first, in priority order; the stores in back-off (or being
    probed by another caller) after them, in priority order too: never skipped, so that with every store down a
    load still tries each once."""
    due = frozenset(i for i, s in enumerate(states) if _probe_due(s, now, policy))
    first = [i for i, s in enumerate(states) if s.healthy or i in due]
    last = [i for i in range(len(states)) if i not in first]
    return Plan(tuple(first + last), due)


def claim(states: Sequence[StoreState], probes: Collection[int], now: float) -> list[StoreState]:
    """`states` with a probe of each store in `probes` marked in flight from `now`."""
    return [replace(s, probing_since=now) if i in probes else s for i, s in enumerate(states)]


def after_failure(state: StoreState, now: float, policy: BackoffPolicy = BackoffPolicy()) -> StoreState:
    """The state after the store failed to answer at `now`: down, with a back-off one step longer."""
    failures = state.failures + 1
    return StoreState(failures, now + policy.backoff_s(failures), None)


def after_success(_state: StoreState) -> StoreState:
    """The state after the store answered: healthy (preferred again in its priority place)."""
    return StoreState()


# Exception class names (matched along the MRO and the cause chain, so no backend needs importing) that mean
# "the store did not answer", as opposed to "it answered: no such key / access denied / bad data".
_UNREACHABLE_NAMES = frozenset({
    "ConnectionError", "TimeoutError",  # builtins: refused, reset, socket timeouts (asyncio.TimeoutError too)
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",  # botocore
    "ClientConnectorError", "ServerDisconnectedError", "ServerTimeoutError", "ClientOSError",  # aiohttp
    "FSTimeoutError",  # fsspec's sync() timeout
    "ServiceRequestError", "ServiceResponseError",  # azure-core: could not send / no response
})


def is_unreachable(exc: BaseException) -> bool:
    """True when `exc` (or anything in its cause / context chain) says the store did not answer at all."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if any(cls.__name__ in _UNREACHABLE_NAMES for cls in type(cur).__mro__):
            return True
        # `raise X from None` hides its context: an error replaced on purpose (e.g. "not in this store") is not one
        cur = cur.__cause__ if cur.__cause__ is not None else (None if cur.__suppress_context__ else cur.__context__)
    return False


class StoreHealth:
    """Thread-safe health of `n` stores (by index in priority order), on an injectable clock."""

    def __init__(self, n: int, policy: BackoffPolicy = BackoffPolicy(),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self._lock = threading.Lock()
        self._states = [StoreState() for _ in range(n)]

    def plan(self) -> Plan:
        """The order to try the stores in now; the probes it includes are claimed for this caller, who must
        report each (`succeeded` / `failed`) or `release` it."""
        with self._lock:
            now = self._clock()
            p = plan(self._states, now, self.policy)
            self._states = claim(self._states, p.probes, now)
            return p

    def succeeded(self, i: int) -> None:
        with self._lock:
            self._states[i] = after_success(self._states[i])

    def failed(self, i: int) -> None:
        with self._lock:
            self._states[i] = after_failure(self._states[i], self._clock(), self.policy)

    def release(self, probes: Collection[int]) -> None:
        """Give up claims on probes this caller did not try (an earlier store served it): another may probe."""
        with self._lock:
            self._states = [replace(s, probing_since=None) if i in probes else s for i, s in enumerate(self._states)]

    def report(self, i: int, exc: BaseException | None) -> None:
        """Record how store `i` did: unreachable errors mark it down; an answer, even an error one, marks it up."""
        if exc is not None and is_unreachable(exc):
            self.failed(i)
        else:
            self.succeeded(i)

    def states(self) -> list[StoreState]:
        """A snapshot, for logs and tests."""
        with self._lock:
            return list(self._states)

    def is_down(self, i: int) -> bool:
        with self._lock:
            return not self._states[i].healthy
