"""How requests enter the simulated world: the arrival loop (the clock brought to each arrival), and what one
arrival does (rejected, answered by the response cache, or handed to the policy and placed). A mixin of
`sim.world.World`; `sim.record_sink.StreamingWorld` feeds the same `_arrive` chunk by chunk."""

from __future__ import annotations

from typing import TYPE_CHECKING

import simpy

from sim.request import Request

if TYPE_CHECKING:
    from sim.world import World


class Arrivals:
    """`World`'s arrivals: `_arrivals` (the SimPy process over a workload), `_clock_to`, `_arrive`, `_cache_hit`."""

    def _arrivals(self: World, arr: list[float], models: list[str], tenants: list[str], prompts: list[int],
                  outs: list[int], progress_every: int, blocks: list[tuple[int, ...]] | None = None):
        env = self.env
        timeout = self.request_timeout_s
        requests, regions, arrive, on_progress = self.requests, self.client_regions, self._arrive, self.on_progress
        for i, t in enumerate(arr):
            if t > env.now and (wait := self._clock_to(t)) is not None:
                yield wait
            req = Request(i, models[i], tenants[i], prompts[i], outs[i], t, t + timeout)
            if blocks is not None:
                req.prefix_blocks = blocks[i]
            if regions is not None:
                req.client_region = regions[i]
            requests[i] = req
            arrive(req)
            if on_progress is not None and i % progress_every == 0:
                on_progress(env.now, i)
        self.arrivals_done = True
        self._check_finished()

    def _clock_to(self: World, t: float) -> simpy.Timeout | None:
        """Bring the clock to arrival time `t` (> now): a timeout to yield, or None when nothing is due before `t`
        and the clock was moved there without an event. The order of everything stays as the timeout would give
        it (ties take the timeout), so the records are identical; it saves an event per arrival on a quiet run."""
        env = self.env
        if t < env.peek():
            env._now = t  # SimPy's clock (simpy 4: Environment._now); no event can fall in between
            return None
        return env.timeout(t - env.now)

    def _arrive(self: World, req: Request) -> None:
        """One arrival, now: counted, then rejected (unknown model), answered from the response cache, or given to
        the policy (its variant, its actions) and placed."""
        self.outstanding += 1
        if req.model not in self.state.models:
            self._resolve(req, "rejected", "unknown_model")
            return
        if self.response_cache is not None and self._cache_hit(req):
            return
        policy, view = self.policy, self.view
        if self._picks_variant:
            picked = policy.pick_variant(req, view)
            req.model = picked if picked in self.state.models else req.model
        acts = policy.on_arrival(req, view)
        if acts:
            self._execute(acts)
        self._place(req)

    def _cache_hit(self: World, req: Request) -> bool:
        """Answer `req` from the response cache if it hits: completed after the gateway's latency, no engine."""
        rc = self.response_cache
        assert rc is not None
        key = self.prompt_keys[req.id] if self.prompt_keys is not None else None
        kind = rc.on_arrival(req.id, req.tenant, req.model, key, req.arrival_s)
        if not kind:
            return False
        req.cache = kind
        req.prefill_start_s = req.arrival_s
        req.first_token_s = req.finish_s = req.arrival_s + rc.latency_s
        self._resolve(req, "completed", "")
        return True
