"""Autoscaling: keep-alive / scale-to-zero and the queue-threshold scale-up rule."""

from __future__ import annotations

from collections.abc import Sequence

from core.decisions import Action, StopInstance
from core.policies.base import NO_ACTIONS, Hooks, queue_excess
from core.state import ClusterView, InstanceState


class KeepAlive(Hooks):
    """Unload an instance after `keep_alive_s` idle; scale up when the queue passes a threshold.

    `scale_up_queue` is the excess queue per live instance (requests beyond what the
    instances can batch) above which a new instance is started (the seed uses 3-5).
    Instances still loading count as coming capacity unless `count_loading=False`, which
    reproduces the over-scaling of simulators that ignore them.
    """

    def __init__(
        self, keep_alive_s: float = 300.0, scale_up_queue: float = 4.0, tick_s: float = 5.0,
        count_loading: bool = True, min_instances: int = 0,
    ) -> None:
        if keep_alive_s < 0 or scale_up_queue < 0 or tick_s <= 0 or min_instances < 0:
            raise ValueError("keep_alive_s, scale_up_queue, min_instances must be >= 0 and tick_s > 0")
        self.keep_alive_s = keep_alive_s
        self.scale_up_queue = scale_up_queue
        self.tick_s = tick_s
        self.count_loading = count_loading
        self.min_instances = min_instances

    def wants_new_instance(self, model: str, view: ClusterView) -> bool:
        insts = view.instances_of(model)
        if not insts:
            return True
        if self.count_loading:
            excess, n = queue_excess(insts)
        else:
            ready = [i for i in insts if i.status == "ready"]
            excess = sum(i.waiting for i in insts)
            n = len(ready)
        if n == 0:
            return excess > 0
        return excess / n > self.scale_up_queue

    def on_tick(self, view: ClusterView) -> Sequence[Action]:
        now = view.now_s
        out: list[Action] = []
        live: dict[str, int] = {}
        for inst in view.instances.values():
            if inst.status in ("ready", "loading"):
                live[inst.model.name] = live.get(inst.model.name, 0) + 1
        for inst in sorted(view.instances.values(), key=lambda i: (i.idle_since_s, i.id)):
            if inst.idle and now - inst.idle_since_s >= self.keep_alive_s:
                m = inst.model.name
                if live.get(m, 0) > self.min_instances:
                    live[m] -= 1
                    out.append(StopInstance(inst.id, reason="keep_alive"))
        return out or NO_ACTIONS

    def on_idle(self, inst: InstanceState, view: ClusterView) -> Sequence[Action]:
        if self.keep_alive_s == 0:
            return [StopInstance(inst.id, reason="keep_alive")]
        return NO_ACTIONS
