"""The fast steady-state mode: warm requests decoded analytically instead of in the fluid batch.

`World(steady_state="fast")` (default "exact": every result as before). A request that arrives at a *ready*
instance with no queue and room in its batch (sequence limit and KV budget) is admitted as always (its
prefill slot, its first-token time and its KV are exact: prefills are serialised on the instance and do not
depend on decoding), but its decode is not simulated in the instance's fluid batch (`sim.engine`: a virtual
token clock re-rated at every join and leave, one event for the next sequence to end). Instead its end time
is computed once, at admission, from the inference model and the batch as it is then:

    end = first_token + (output_tokens - 1) x decode_iter_s(batch + 1, ctx + its own ctx)

and one event ends it there. Cold starts, loads, evictions, queueing (requests that wait for an instance or
for room), scale decisions, faults and migrations run exactly as in the exact mode; the requests that waited
are decoded in the fluid batch as before. The analytic sequences still count in the batch: the fluid
sequences' iteration time and every admission test see them (active, KV in use).

What is approximated, exactly:
- an analytic sequence's decode rate is frozen at its admission: later joins and leaves of the batch neither
  slow nor speed it (in steady state a request sees the time-average batch on arrival, so the error averages
  out; a request admitted into a batch that then grows finishes early, and late when it then shrinks);
- it counts in the batch (size and KV context read per step) from its admission, not from its first token
  (its prefill time, tens of milliseconds, is charged to the decode rate of the others);
- whatever follows its end inherits the error: when the instance goes idle (keep-alive expiry, hence later
  cold starts), the least-busy choice among instances of a model, when queued requests find room, the KV
  integral of memory-waste accounting and the instance's cost.
Not taken (exact path) where the error would not average out: an engine with a prefix cache (hits depend on
timing), one whose prefill stalls decoding (`prefill_stalls_decode`: later prefills would delay the analytic
sequence), and an instance whose sequences are migrating away. An analytic sequence still decoding when its
instance is migrated is handed over with the tokens its frozen rate leaves (one in prefill follows at its
first token, as in the exact mode).

Judging its error: where instances churn under GPU-memory pressure the exact simulation is itself chaotic (a
50 ms jitter of the arrivals moves its cold-start count and TTFT p99 by tens of percent), so compare the fast
mode with the spread of exact runs under such a jitter, not with one exact run (tests/test_steady_state.py,
tests/benchmarks/test_bench_steady.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import simpy

from core.errors import ConfigError

if TYPE_CHECKING:
    from sim.engine import SimEngine
    from sim.request import Request

#: the values of the switch
MODES = ("exact", "fast")


def check_mode(mode: object) -> str:
    """`mode` if it is one of `MODES`, else a ConfigError naming the key."""
    if mode not in MODES:
        raise ConfigError(f"sim.steady_state must be one of {', '.join(MODES)}, got {mode!r}")
    return str(mode)


class SteadyState:
    """The fast mode, shared by a world's engines: which admissions go analytic, and how many did."""

    __slots__ = ("_on_end", "aggregated")

    def __init__(self) -> None:
        self.aggregated = 0  # requests decoded analytically (the fast path taken)
        self._on_end = self._end  # one bound method for every end event (no closure per request)

    @staticmethod
    def eligible(eng: SimEngine) -> bool:
        """Whether `eng`'s warm admissions may go analytic (see the module docstring for the exclusions)."""
        return eng.prefix is None and eng.forward is None and not eng.inf.prefill_stalls_decode

    def admit(self, eng: SimEngine, req: Request, now: float, need: float) -> None:
        """Admit `req` (`need` bytes of KV) on `eng` now (ready, no queue, room checked by the caller) and end
        it analytically."""
        self.aggregated += 1
        s = eng.state
        s.active += 1
        eng._kv_change(need)
        s.last_used_s = now
        req.admitted_s = now
        inf = eng.inf
        start = eng.prefill_free_s if eng.prefill_free_s > now else now
        first = start + inf.prefill_s(req.prompt_tokens)
        req.prefill_start_s = start
        eng.prefill_free_s = first
        first += inf.request_overhead_s  # delays this request only, as in SimEngine._admit
        req.first_token_s = first
        out = req.output_tokens
        if out <= 1:
            end = first
            ctx = 0.0
        else:
            ctx = req.prompt_tokens + out * 0.5  # the mean KV it holds while decoding, as the fluid batch counts
            eng._n_fast += 1
            eng._ctx_fast += ctx
            iter_s = inf.decode_iter_s(len(eng._heap) + eng._n_fast, eng._ctx + eng._ctx_fast)
            end = first + (out - 1) * iter_s
            eng._fast[req] = (first, iter_s, end)
            if eng._heap:  # the fluid sequences decode in a bigger batch from now on
                eng._advance()
                eng._rerate()
        eng.env.timeout(end - now, (eng, req, ctx)).callbacks.append(self._on_end)

    @staticmethod
    def _end(ev: simpy.Timeout) -> None:
        eng, req, ctx = ev.value
        if req.instance is not eng:
            return  # lost with its instance meanwhile (`SimEngine.abort`)
        if ctx:
            if eng._fast.pop(req, None) is None:
                return  # handed over to a migration's destination (`hand_over_fast`)
            leave(eng, ctx)
        eng._finish(req)


def leave(eng: SimEngine, ctx: float) -> None:
    """An analytic sequence of `ctx` mean KV tokens leaves `eng`'s batch: the fluid sequences speed up."""
    eng._n_fast -= 1
    eng._ctx_fast = eng._ctx_fast - ctx if eng._n_fast else 0.0  # rebased when empty: no float drift
    if eng._heap:
        eng._advance()
        eng._rerate()


def hand_over_fast(eng: SimEngine) -> None:
    """`eng` migrates away: its analytic sequences follow the fluid ones (`SimEngine.migrate_to`).

    One still decoding goes now with the tokens its frozen rate leaves it; one still in prefill goes at its
    first token with all its output but the first token (as `SimEngine._join_decode` hands it over)."""
    now = eng.env.now
    for req, (first, iter_s, end) in list(eng._fast.items()):
        del eng._fast[req]
        leave(eng, req.prompt_tokens + req.output_tokens * 0.5)
        if now >= first:
            eng._hand_over(req, max(0.0, (end - now) / iter_s))
        else:
            def later(_e: object, req: Request = req) -> None:
                if req.instance is eng:
                    eng._hand_over(req, req.output_tokens - 1)

            eng.env.timeout(first - now).callbacks.append(later)
