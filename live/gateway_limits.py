"""Per-tenant limits of the gateway: a request rate (token bucket with a burst), a token quota per window, and a
cap on concurrent requests. Each refusal is a 429 with `Retry-After` (whole seconds, as HTTP wants it).

Pure bookkeeping: no I/O, no sleeping, and time comes from the clock it is given (the gateway's monotonic
`WallClock`; tests inject a fake one), so every decision is reproducible.

- `requests_per_s` (+ `burst`, default `ceil(requests_per_s)`): a token bucket of requests;
- `tokens_per_window` over `window_s`: a token bucket holding at most one window's tokens, refilled at
  `tokens_per_window / window_s`. A request reserves its prompt's lower bound plus its completion limit up front
  (the gateway has no tokenizer) and is settled when it ends against the usage the engine reported: the unused
  part comes back, an overrun is charged (the bucket may go below zero, later requests then wait longer);
- `max_concurrent`: requests of the tenant in flight at once; one more is refused at once (429) rather than
  queued, so that a tenant cannot hold the gateway's connections and queue slots while it waits.

Only admitted requests count against the limits (a refused one takes nothing).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

#: the `limits` key whose entry applies to every tenant that has none of its own
EVERY_TENANT = "*"


@dataclass(frozen=True)
class TenantLimits:
    """One tenant's limits; None is no limit."""

    requests_per_s: float | None = None
    burst: int | None = None  # requests allowed at once above the rate (default: ceil(requests_per_s), >= 1)
    tokens_per_window: int | None = None  # prompt + completion tokens per `window_s`
    window_s: float = 60.0
    max_concurrent: int | None = None

    def __post_init__(self) -> None:
        def positive(name: str, integer: bool) -> None:
            v = getattr(self, name)
            ok = isinstance(v, int) if integer else isinstance(v, int | float) and math.isfinite(v)
            if v is not None and (isinstance(v, bool) or not ok or v <= 0):
                kind = "an integer >= 1" if integer else "a positive number"
                raise ValueError(f"{name} must be {kind} or null, got {v!r}")

        positive("requests_per_s", False)
        positive("burst", True)
        positive("tokens_per_window", True)
        positive("max_concurrent", True)
        if self.window_s is None:
            raise ValueError("window_s must be a positive number of seconds, got None")
        positive("window_s", False)
        if self.burst is not None and self.requests_per_s is None:
            raise ValueError("burst needs requests_per_s")

    @classmethod
    def of(cls, value: TenantLimits | Mapping[str, Any], where: str) -> TenantLimits:
        """Limits from a config mapping; errors name `where` and the key."""
        if isinstance(value, TenantLimits):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: a mapping of limits is needed, got {type(value).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; known: {known}")
        try:
            return cls(**value)
        except ValueError as e:
            raise ValueError(f"{where}.{e}") from None

    @property
    def limited(self) -> bool:
        return any(v is not None for v in (self.requests_per_s, self.tokens_per_window, self.max_concurrent))


class TokenBucket:
    """`capacity` units, refilled at `rate` units per second; the level may go below zero (an overrun)."""

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate, self.capacity = rate, capacity
        self.level, self.t = capacity, now

    def _refill(self, now: float) -> None:
        if now > self.t:
            self.level = min(self.capacity, self.level + (now - self.t) * self.rate)
            self.t = now

    def wait_s(self, amount: float, now: float) -> float:
        """Seconds until `amount` can be taken (0: now; inf: never, it is more than the capacity)."""
        self._refill(now)
        if amount > self.capacity:
            return math.inf
        return max(0.0, (amount - self.level) / self.rate)

    def take(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level -= amount

    def give(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level = min(self.capacity, self.level + amount)


class LimitExceeded(Exception):
    """A refusal: `code` (OpenAI's), a message, and the seconds after which a retry may pass (None: never, the
    request alone is more than the tenant's whole quota: the gateway answers that one 400, not 429)."""

    def __init__(self, code: str, message: str, retry_after_s: float | None) -> None:
        super().__init__(message)
        self.code, self.message, self.retry_after_s = code, message, retry_after_s


@dataclass
class Permit:
    """An admitted request: its tenant and the tokens it reserved."""

    tenant: str
    reserved: int


class _TenantState:
    def __init__(self, limits: TenantLimits, now: float) -> None:
        self.limits = limits
        rps = limits.requests_per_s
        self.requests = (TokenBucket(rps, limits.burst or max(1, math.ceil(rps)), now)
                         if rps is not None else None)
        quota = limits.tokens_per_window
        self.tokens = TokenBucket(quota / limits.window_s, quota, now) if quota is not None else None
        self.in_flight = 0


def retry_after_header(seconds: float) -> str:
    """`Retry-After` in whole seconds, rounded up (a client retrying then will pass), at least 1."""
    return str(max(1, math.ceil(seconds - 1e-9)))


class Limiter:
    """The limits of every tenant (`limits` by tenant name; `EVERY_TENANT` for the rest), on `clock`."""

    def __init__(self, limits: Mapping[str, TenantLimits], clock: Callable[[], float]) -> None:
        self.clock = clock
        self.limits = {name: lim for name, lim in limits.items() if lim.limited}
        self._states: dict[str, _TenantState] = {}

    @property
    def active(self) -> bool:
        """Some tenant has a limit (otherwise the gateway skips the limiter altogether)."""
        return bool(self.limits)

    def _state(self, tenant: str, now: float) -> _TenantState | None:
        st = self._states.get(tenant)
        if st is None:
            lim = self.limits.get(tenant) or self.limits.get(EVERY_TENANT)
            if lim is None:
                return None
            st = self._states[tenant] = _TenantState(lim, now)
        return st

    def admit(self, tenant: str, tokens: int) -> Permit | None:
        """Admit one request reserving `tokens`; its Permit (None if the tenant has no limits).

        LimitExceeded if a limit refuses it; a refused request takes nothing from any limit."""
        now = self.clock()
        st = self._state(tenant, now)
        if st is None:
            return None
        lim = st.limits
        if lim.max_concurrent is not None and st.in_flight >= lim.max_concurrent:
            # when one ends is unknown: a second is a reasonable first retry
            raise LimitExceeded("rate_limit_exceeded", f"tenant '{tenant}' has {st.in_flight} requests in flight, "
                                f"its limit (max_concurrent {lim.max_concurrent})", 1.0)
        if st.requests is not None:
            wait = st.requests.wait_s(1, now)
            if wait > 0:
                raise LimitExceeded("rate_limit_exceeded", f"tenant '{tenant}' is over its request rate "
                                    f"({lim.requests_per_s:g}/s, burst {st.requests.capacity:g})", wait)
        if st.tokens is not None:
            wait = st.tokens.wait_s(tokens, now)
            if math.isinf(wait):
                raise LimitExceeded("exceeds_token_quota", f"the request may take {tokens} tokens, more than tenant "
                                    f"'{tenant}''s whole quota ({lim.tokens_per_window} per {lim.window_s:g} s)",
                                    None)
            if wait > 0:
                raise LimitExceeded("insufficient_quota", f"tenant '{tenant}' is over its token quota "
                                    f"({lim.tokens_per_window} per {lim.window_s:g} s)", wait)
            st.tokens.take(tokens, now)
        if st.requests is not None:
            st.requests.take(1, now)
        st.in_flight += 1
        return Permit(tenant, tokens if st.tokens is not None else 0)

    def release(self, permit: Permit, used_tokens: int) -> None:
        """The request ended having used `used_tokens` (the engine's usage): settle its reservation."""
        st = self._states[permit.tenant]
        st.in_flight -= 1
        if st.tokens is not None:
            now = self.clock()
            delta = permit.reserved - max(0, used_tokens)
            if delta >= 0:
                st.tokens.give(delta, now)
            else:
                st.tokens.take(-delta, now)


def limiter_of(limits: Mapping[str, TenantLimits | Mapping[str, Any]], clock: Callable[[], float]) -> Limiter:
    """A Limiter from `GatewayConfig.limits`-shaped values (already checked by the config)."""
    return Limiter({k: TenantLimits.of(v, f"limits[{k!r}]") for k, v in limits.items()}, clock)
