"""Defragmentation of GPU memory (docs/results/memory_waste.md): in quiet periods, consolidate idle instances.

`memory_waste_parts` shows where reserved GPU memory goes on `serverless`: most of it is held by idle instances
waiting for their keep-alive to expire, very little is stranded in holes. So the consolidation this policy does is
to give back the memory of idle instances that keep-alive would hold on to, when that is cheap to undo:

- a node is *quiet* when no instance on it is loading and its busy instances (a request in flight) hold less than
  `quiet_busy_frac` of the GPU memory its instances hold;
- on a quiet node, an idle instance is stopped once it has been idle `idle_min_s` if its model's mean gap between
  requests (an exponentially weighted mean of the arrivals this policy has seen; unknown after one request) is at
  least `long_gap_s` (its next request would most likely find keep-alive expired anyway); with `gap_mult` set, an
  instance of a busier model is also stopped once idle `gap_mult` times its gap (off by default: on `smoke` that
  stopped warm instances of busy models and cost 4.7 points of SLO attainment);
- but only if its reload is cheap: the weights are in a local tier (DRAM or NVMe) of its node, or go to DRAM on the
  way out (`demote_to`, when DRAM has room), and the reload from there is estimated at most `max_reload_s`.

The cost is charged by the world's own mechanisms: the demote copy's bytes and time, and the reload (a cold start
from the local tier) when the model is asked for again. Packing by migration is not done: the stranded part it
could win is a fraction of a percent of capacity on `serverless` (docs/results/memory_waste.md).
"""

from __future__ import annotations

from collections.abc import Sequence

from core.decisions import Action, StopInstance
from core.loadtime import estimate_load_s
from core.policies.autoscaling import KeepAlive
from core.policies.base import NO_ACTIONS, RequestView
from core.state import ClusterView, InstanceState, NodeState


class DefragKeepAlive(KeepAlive):
    """KeepAlive plus the quiet-period consolidation of idle instances described in the module docstring."""

    def __init__(
        self, keep_alive_s: float = 300.0, scale_up_queue: float = 4.0, tick_s: float = 5.0,
        count_loading: bool = True, min_instances: int = 0, *, idle_min_s: float = 30.0,
        gap_mult: float | None = None,
        quiet_busy_frac: float = 0.5, max_reload_s: float = 7.0, demote_to: str | None = "dram",
        progressive: bool = True, gap_alpha: float = 0.3, long_gap_s: float = 300.0,
    ) -> None:
        super().__init__(keep_alive_s, scale_up_queue, tick_s, count_loading, min_instances)
        if (idle_min_s < 0 or (gap_mult is not None and gap_mult < 0) or not 0 <= quiet_busy_frac <= 1
                or max_reload_s < 0 or not 0 < gap_alpha <= 1):
            raise ValueError("idle_min_s, gap_mult, max_reload_s >= 0; quiet_busy_frac in [0, 1]; gap_alpha in (0, 1]")
        self.idle_min_s = idle_min_s
        self.gap_mult = gap_mult
        self.quiet_busy_frac = quiet_busy_frac
        self.max_reload_s = max_reload_s
        self.demote_to = demote_to
        self.progressive = progressive
        self.gap_alpha = gap_alpha
        self.long_gap_s = long_gap_s
        self._last: dict[str, float] = {}  # model -> last arrival (s)
        self._gap: dict[str, float] = {}  # model -> EWMA of its gaps between arrivals (s)
        self.stops = 0  # consolidation stops decided (for reports)

    def on_arrival(self, req: RequestView, view: ClusterView) -> Sequence[Action]:
        m, t = req.model, req.arrival_s
        last = self._last.get(m)
        if last is not None:
            g = t - last
            prev = self._gap.get(m)
            self._gap[m] = g if prev is None else prev + self.gap_alpha * (g - prev)
        self._last[m] = t
        return NO_ACTIONS

    def quiet(self, node: NodeState) -> bool:
        """No instance loading and busy instances hold less than `quiet_busy_frac` of the instances' memory."""
        held = busy = 0.0
        for inst in node.instances.values():
            if inst.status == "loading":
                return False
            held += inst.gpu_bytes
            if inst.load > 0:
                busy += inst.gpu_bytes
        return held > 0 and busy < self.quiet_busy_frac * held

    def _reload(self, inst: InstanceState, node: NodeState, view: ClusterView) -> tuple[float, str | None] | None:
        """(estimated reload time, tier to demote to or None) if the reload would come from a local tier."""
        model = inst.model
        src = node.local_source(model.name)
        demote = None
        if src == "cloud":
            t = node.tiers.get(self.demote_to) if self.demote_to else None
            if t is None or t.incoming(model.name) or t.free_bytes < model.weights_bytes:
                return None
            src, demote = self.demote_to, self.demote_to
        n, _, kv = node.footprint(model)
        est = estimate_load_s(src, model, node.spec, view.cluster.store, view.engine, n, kv, self.progressive)
        return est, demote

    def on_tick(self, view: ClusterView) -> Sequence[Action]:
        out = list(super().on_tick(view))
        stopped = {a.instance_id for a in out if isinstance(a, StopInstance)}
        now = view.now_s
        live: dict[str, int] = {}
        for inst in view.instances.values():
            if inst.status in ("ready", "loading") and inst.id not in stopped:
                live[inst.model.name] = live.get(inst.model.name, 0) + 1
        for node in view.nodes.values():
            if not node.up or not self.quiet(node):
                continue
            for inst in sorted(node.instances.values(), key=lambda i: (i.idle_since_s, i.id)):
                if not inst.idle or inst.id in stopped or live.get(inst.model.name, 0) <= self.min_instances:
                    continue
                idle_for = now - inst.idle_since_s
                gap = self._gap.get(inst.model.name)
                if gap is None or gap >= self.long_gap_s:
                    need = self.idle_min_s
                elif self.gap_mult is not None:
                    need = max(self.idle_min_s, self.gap_mult * gap)
                else:
                    continue  # a busy model: keep-alive decides
                if idle_for < need:
                    continue
                r = self._reload(inst, node, view)
                if r is None or r[0] > self.max_reload_s:
                    continue
                out.append(StopInstance(inst.id, reason="defrag", demote_to=r[1]))
                stopped.add(inst.id)
                live[inst.model.name] -= 1
                self.stops += 1
        return out or NO_ACTIONS
