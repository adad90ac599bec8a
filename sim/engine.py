"""A simulated engine instance with continuous batching, as a fluid model.

Admitted requests prefill one after another (prefill is compute-bound and serialised on
the instance), then decode together: every decoding sequence advances one token per
iteration, and an iteration takes `decode_iter_s(batch, kv tokens)`. Instead of one
event per iteration, the instance keeps a virtual token clock V (tokens emitted per
sequence since creation) and schedules one event for the next sequence to finish;
joins and leaves re-rate the clock. KV-cache capacity and the engine's sequence limit
bound the batch; further requests wait in the instance's queue. With the engine's
`prefill_stalls_decode` (mixed prefill / decode forward passes), the clock stands still while
the instance prefills: each prefill is a stall window the decoding sequences wait out.

With the engine's `prefix_cache` (off by default: every result as before), the instance keeps the KV of the
prompt blocks it computed (`core.prefix_cache.PrefixCache`, `prefix_cache_frac` of its KV budget, LRU), and a
prefill computes only the tokens past the request's cached prefix. A prefill's blocks are cached when it ends.
The cached blocks are not charged against the KV budget in use: like vLLM's free-block pool they are memory
the running sequences may reclaim, and the cache's capacity is the share of it they are assumed to leave.
Approximation: a prefill of the uncached suffix is timed as a prompt of that many tokens (its attention over
the cached prefix is left out, an under-estimate for long cached prefixes).

With the world's fast steady-state mode (`sim.steady_state`; off by default), a request admitted on arrival
(ready, no queue, room) is not put in the fluid batch: its end is computed once from the batch as it is then,
and it counts in the batch (size, KV context) until that end. Every other admission is as described above.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import simpy

from core.inference import InferenceModel
from core.prefix_cache import PrefixCache
from core.specs import EngineSpec
from core.state import InstanceState
from sim.steady_state import SteadyState, hand_over_fast

if TYPE_CHECKING:
    from sim.request import Request


class SimEngine:
    """The simulator's side of an `InstanceState`: queue, batch and timing."""

    __slots__ = (
        "_check_at",
        "_ctx",
        "_ctx_fast",
        "_fast",
        "_heap",
        "_iter_s",
        "_kv_tok",
        "_n_fast",
        "_seq",
        "_stalls",
        "_t_last",
        "_v",
        "env",
        "forward",
        "inf",
        "kv_int",
        "kv_t",
        "on_drained",
        "on_finish",
        "prefill_free_s",
        "prefix",
        "queue",
        "state",
        "steady",
        "weights_resident_s",
    )

    def __init__(self, env: simpy.Environment, state: InstanceState, inf: InferenceModel,
                 on_finish: Callable[[Request], None], engine: EngineSpec | None = None,
                 steady: SteadyState | None = None) -> None:
        self.env = env
        self.state = state
        self.inf = inf
        self.on_finish = on_finish
        self.queue: deque[Request] = deque()
        self.prefill_free_s = 0.0
        self._heap: list[tuple[float, int, Request]] = []
        self._seq = 0
        self._v = 0.0
        self._t_last = env.now
        self._ctx = 0.0
        self._iter_s = inf.decode_iter_s(0, 0.0)
        self._kv_tok = state.model.kv_bytes_per_token
        self._check_at = float("inf")
        self._stalls: deque[tuple[float, float]] = deque()  # prefill windows [start, end), in order, disjoint
        self.kv_int = 0.0  # integral of KV bytes in use over time, for memory-waste accounting
        self.kv_t = env.now
        self.weights_resident_s = float("nan")
        self.forward: tuple[SimEngine, float, float] | None = None  # (destination, a s/token, b s)
        self.on_drained: Callable[[], None] | None = None
        # the prefix (KV) cache, when the engine keeps one (EngineSpec.prefix_cache)
        self.prefix: PrefixCache | None = None
        if engine is not None and engine.prefix_cache:
            self.prefix = PrefixCache.for_instance(state.kv_budget_bytes, self._kv_tok, engine)
        # the fast steady-state mode (sim.steady_state; None: exact): sequences decoded analytically, which
        # count in the batch (how many, their mean KV tokens) but are not in the fluid heap
        self.steady = steady if steady is not None and steady.eligible(self) else None  # decided once
        self._fast: dict[Request, tuple[float, float, float]] = {}  # -> (first token, s per token, end)
        self._n_fast = 0
        self._ctx_fast = 0.0

    # -- admission ------------------------------------------------------------------------
    def kv_need(self, req: Request) -> float:
        return (req.prompt_tokens + req.output_tokens) * self._kv_tok

    def can_ever_fit(self, req: Request) -> bool:
        return self.kv_need(req) <= self.state.kv_budget_bytes

    def _can_admit(self, need: float) -> bool:
        s = self.state
        if s.kv_pool is not None:  # KV mapped on demand (EngineSpec.kv_elastic): its pages must be mappable now
            return (s.active < s.max_num_seqs and s.kv_used_bytes + need <= s.kv_budget_bytes
                    and s.kv_pool.kv_grow(s, s.kv_used_bytes + need, self.env.now))
        return s.active < s.max_num_seqs and s.kv_used_bytes + need <= s.kv_budget_bytes

    def submit(self, req: Request) -> None:
        """A request routed here: admit it now if the engine is ready and has room, else queue it."""
        s = self.state
        if s.status == "ready" and not self.queue and self._can_admit(
                need := (req.prompt_tokens + req.output_tokens) * self._kv_tok):  # kv_need, inlined (hot path)
            if self.steady is not None and self.forward is None:
                self.steady.admit(self, req, self.env.now, need)  # warm, with room: decoded analytically
            else:
                self._admit(req, self.env.now)
        else:
            self.queue.append(req)
            s.waiting += 1

    def drain_queue(self, first_token_override_s: float | None = None, override_count: int = 0) -> list[Request]:
        """Admit queued requests while there is room; returns those that timed out in line.

        The first `override_count` admitted get `first_token_override_s` as their first-token
        time (a progressive first pass computed by the loader).
        """
        s = self.state
        expired: list[Request] = []
        now = self.env.now
        n = 0
        while self.queue:
            req = self.queue[0]
            if req.deadline_s < now:
                self.queue.popleft()
                s.waiting -= 1
                expired.append(req)
                continue
            if not self._can_admit(self.kv_need(req)):
                break
            self.queue.popleft()
            s.waiting -= 1
            if n < override_count and first_token_override_s is not None:
                self._admit(req, now, first_token_override_s)
            else:
                self._admit(req, now)
            n += 1
        return expired

    def take_queue(self) -> list[Request]:
        """Remove and return every queued request (instance going away)."""
        out = list(self.queue)
        self.queue.clear()
        self.state.waiting = 0
        return out

    def _kv_change(self, delta: float) -> None:
        now = self.env.now
        s = self.state
        self.kv_int += s.kv_used_bytes * (now - self.kv_t)
        self.kv_t = now
        s.kv_used_bytes += delta
        if delta < 0 and s.kv_pool is not None:
            s.kv_pool.kv_shrink(s, now)  # pages no sequence uses go back to the node

    def _admit(self, req: Request, now: float, first_token_s: float | None = None) -> None:
        s = self.state
        s.active += 1
        need = self.kv_need(req)
        self._kv_change(need)
        s.last_used_s = now
        req.admitted_s = now
        prefix = self.prefix
        if first_token_s is None:
            start = self.prefill_free_s if self.prefill_free_s > now else now
            tokens = req.prompt_tokens
            if prefix is not None:
                req.cached_tokens = prefix.lookup(req.prefix_blocks, tokens)
                tokens -= req.cached_tokens
            first_token_s = start + self.inf.prefill_s(tokens)
            req.prefill_start_s = start
        else:
            req.prefill_start_s = now
            if prefix is not None:
                req.cached_tokens = 0  # a progressive first pass on a fresh instance: nothing cached yet
        self.prefill_free_s = max(self.prefill_free_s, first_token_s)
        if prefix is not None and req.prefix_blocks:
            # the prompt's blocks are cached once computed (a request admitted meanwhile cannot use them yet)
            blocks = req.prefix_blocks
            self.env.timeout(first_token_s - now).callbacks.append(
                lambda _e: prefix.insert(blocks) if req.instance is self else None)
        if self.inf.prefill_stalls_decode and first_token_s > req.prefill_start_s:
            self._stall(req.prefill_start_s, first_token_s)
        # the per-request overhead (front end, tokenizer) delays this request only: the prefill slot is free
        first_token_s += self.inf.request_overhead_s
        req.first_token_s = first_token_s
        ev = self.env.timeout(first_token_s - now)
        # `req.instance is self` fails only if the instance was lost meanwhile (`abort`)
        if req.output_tokens <= 1:
            ev.callbacks.append(lambda _e: self._finish(req) if req.instance is self else None)
        else:
            ev.callbacks.append(lambda _e: self._join_decode(req) if req.instance is self else None)

    # -- decoding as a fluid ------------------------------------------------------------
    def _advance(self) -> None:
        now = self.env.now
        if now > self._t_last:
            if self._heap:
                run = now - self._t_last
                if self._stalls:
                    run -= self._stalled(self._t_last, now)
                self._v += run / self._iter_s
            self._t_last = now
        while self._stalls and self._stalls[0][1] <= now:
            self._stalls.popleft()

    def _stalled(self, a: float, b: float) -> float:
        """Seconds of [a, b) inside prefill stall windows."""
        total = 0.0
        for start, end in self._stalls:
            if start >= b:
                break
            total += max(0.0, min(end, b) - max(start, a))
        return total

    def _run_until(self, t: float, run_s: float) -> float:
        """When `run_s` seconds of decoding (outside stall windows) have passed from `t`."""
        for start, end in self._stalls:
            if end <= t:
                continue
            if start > t:
                if start - t >= run_s:
                    break
                run_s -= start - t
            t = end
        return t + run_s

    def _stall(self, start: float, end: float) -> None:
        """Decoding stands still over [start, end) (a prefill in the same forward passes)."""
        self._advance()
        if self._stalls:
            start = max(start, self._stalls[-1][1])  # windows stay disjoint (prefills are serialised anyway)
        if end > start:
            self._stalls.append((start, end))
            self._rerate()

    def _rerate(self) -> None:
        heap = self._heap
        if self._n_fast:  # analytic sequences (sim.steady_state) decode in the same batch
            self._iter_s = it = self.inf.decode_iter_s(len(heap) + self._n_fast, self._ctx + self._ctx_fast)
        else:
            self._iter_s = it = self.inf.decode_iter_s(len(heap), self._ctx)
        if heap:
            lead = heap[0][0] - self._v
            delay = lead * it if lead > 0 else 0.0
            if self._stalls and delay > 0:
                delay = self._run_until(self.env.now, delay) - self.env.now
            when = self.env.now + delay
            if when < self._check_at - 1e-12:
                self._check_at = when
                self.env.timeout(delay).callbacks.append(self._on_check)

    def _join_decode(self, req: Request) -> None:
        if self.forward is not None:
            self._hand_over(req, req.output_tokens - 1)
            return
        self._advance()
        self._seq += 1
        heapq.heappush(self._heap, (self._v + (req.output_tokens - 1), self._seq, req))
        self._ctx += req.prompt_tokens + req.output_tokens * 0.5
        self._rerate()

    def _on_check(self, _ev: object) -> None:
        now = self.env.now
        if now < self._check_at - 1e-12:
            return  # a stale check: a sooner one was scheduled and has already run
        self._check_at = float("inf")
        self._advance()
        heap = self._heap
        done = []
        # a millionth of a token is nothing, and it keeps far above the float resolution of V
        while heap and heap[0][0] <= self._v + 1e-6:
            _, _, req = heapq.heappop(heap)
            self._ctx -= req.prompt_tokens + req.output_tokens * 0.5
            done.append(req)
        if not heap:
            self._ctx = 0.0
            self._v = 0.0  # nothing refers to the old clock: rebase it so it never grows large
        self._rerate()
        for req in done:
            self._finish(req)

    def _finish(self, req: Request) -> None:
        s = self.state
        s.active -= 1
        self._kv_change(-((req.prompt_tokens + req.output_tokens) * self._kv_tok))  # kv_need, inlined
        now = self.env.now
        s.last_used_s = now
        s.served += 1
        req.finish_s = now
        if s.active == 0 and s.waiting == 0:
            s.idle_since_s = now
        self.on_finish(req)

    # -- token-based live migration -------------------------------------------------------
    def migrate_to(self, dest: SimEngine, a_s_per_token: float, b_s: float, on_drained: Callable[[], None]) -> None:
        """Move every decoding sequence to `dest`, which recomputes its KV cache (a * tokens + b
        seconds) and resumes it; sequences still in prefill follow when their prefill ends."""
        self.forward = (dest, a_s_per_token, b_s)
        self.on_drained = on_drained
        self._advance()
        moved = [(req, max(0.0, vf - self._v)) for vf, _, req in self._heap]
        self._heap.clear()
        self._ctx = 0.0
        self._rerate()
        for req, remaining in moved:
            self._hand_over(req, remaining)  # the last one out calls on_drained
        if self._fast:
            hand_over_fast(self)
        if self.state.active == 0 and self.on_drained is not None:
            cb, self.on_drained = self.on_drained, None
            cb()

    def _hand_over(self, req: Request, remaining_tokens: float) -> None:
        assert self.forward is not None
        dest, a, b = self.forward
        s = self.state
        s.active -= 1
        self._kv_change(-self.kv_need(req))
        done_tokens = req.prompt_tokens + (req.output_tokens - 1 - remaining_tokens)
        req.instance = dest
        req.node = dest.state.node
        dest.resume(req, remaining_tokens, a * done_tokens + b)
        if s.active == 0 and self.on_drained is not None and self.forward is not None:
            cb, self.on_drained = self.on_drained, None
            cb()

    def resume(self, req: Request, remaining_tokens: float, delay_s: float) -> None:
        """Take over a migrated sequence: after `delay_s` of KV recompute it decodes its remaining tokens."""
        s = self.state
        s.active += 1
        self._kv_change(self.kv_need(req))
        s.last_used_s = self.env.now

        def go(_e: object) -> None:
            if req.instance is not self:
                return  # lost meanwhile (`abort`)
            if remaining_tokens <= 0:
                self._finish(req)
                return
            self._advance()
            self._seq += 1
            heapq.heappush(self._heap, (self._v + remaining_tokens, self._seq, req))
            self._ctx += req.prompt_tokens + req.output_tokens * 0.5
            self._rerate()

        self.env.timeout(delay_s).callbacks.append(go)

    def close_accounting(self) -> None:
        self._kv_change(0.0)

    def abort(self) -> None:
        """The instance is lost with its node: forget every sequence, queued, prefilling or decoding.

        The caller takes the requests away first (pointing `req.instance` elsewhere), so that the
        events still scheduled for them here do nothing.
        """
        self._advance()
        self.queue.clear()
        self._heap.clear()
        self._ctx = 0.0
        self._fast.clear()
        self._n_fast = 0
        self._ctx_fast = 0.0
        self._kv_change(-self.state.kv_used_bytes)
        self.state.active = 0
        self.state.waiting = 0
        self.forward = None
        self.on_drained = None
        self._rerate()
