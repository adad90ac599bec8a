"""How the simulated world loses nodes and instances: spot preemption (notice, then loss), node failure and
repair, and the requests that go back to be placed again. A mixin of `sim.world.World`."""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING

from core.loadtime import link_capacities, link_streams
from core.state import InstanceState
from sim.engine import SimEngine
from sim.request import Request

if TYPE_CHECKING:
    from sim.world import World


class NodeLosses:
    """`World`'s fault handling: `preempt` and `fail` (called by `sim.faults.FaultInjector`) and what follows."""

    def preempt(self: World, node: str) -> None:
        """A spot interruption of `node`. At the notice the node takes nothing new: loads in progress are
        dropped, requests waiting on its instances are placed again elsewhere, idle instances stop and
        busy ones finish what they run; `preemption_notice_s` later the node is gone with whatever still
        runs there, and an empty replacement is up `replacement_delay_s` after that."""
        ns = self.state.nodes[node]
        if not ns.up:
            return  # down or already under notice: nothing more to take away
        spec = ns.spec
        if spec.preemption_notice_s <= 0:
            self._event("preemption_notice", node=node, duration_s=0.0)
            self._lose_node(node, "preempted", "preempted", keep=(), back_after_s=spec.replacement_delay_s)
            return
        ns.up = False
        self._fleet_changed()
        moved = self._evacuate(node)
        self._event("preemption_notice", node=node, requests=moved, duration_s=spec.preemption_notice_s)
        epoch = self._epoch[node]

        def terminate(_e: object) -> None:
            if self._epoch[node] == epoch:
                self._lose_node(node, "preempted", "preempted", keep=(), back_after_s=spec.replacement_delay_s)

        self.env.timeout(spec.preemption_notice_s).callbacks.append(terminate)

    def fail(self: World, node: str) -> None:
        """`node` fails: at once it loses its instances (their requests are placed again elsewhere), its
        host memory and every transfer in flight; it is back `repair_s` later with its disk tiers."""
        ns = self.state.nodes[node]
        if not ns.up:
            return
        disks = tuple(t for t in ns.tiers if t != "dram")
        self._lose_node(node, "node_failed", "failed", keep=disks, back_after_s=ns.spec.repair_s)

    def _evacuate(self: World, node: str) -> int:
        """The notice: returns how many requests were taken off the node to be placed again."""
        moved = 0
        for inst in list(self.state.nodes[node].instances.values()):
            if inst.status == "loading":
                moved += self._lose_instance(inst, "preempted", "preempted")
                continue
            for req in self.engines[inst.id].take_queue():
                self._requeue(req, "preempted")
                moved += 1
            if inst.status == "draining":
                continue  # a migration is moving its sequences out; it goes when they have left
            if inst.active == 0:
                self._remove_instance(inst, "preemption_notice")
            else:
                inst.status = "evacuating"  # no new requests; removed when its last one finishes
        self._schedule_retry()
        return moved

    def _lose_node(self: World, node: str, cause: str, event: str, keep: tuple[str, ...], back_after_s: float) -> None:
        """`node` is gone: its instances (instance-table `event`), requests re-queued (counted under `cause`),
        transfers in flight, and the contents of its tiers except `keep`; back after `back_after_s`."""
        ns = self.state.nodes[node]
        now = self.env.now
        ns.up = False
        self._fleet_changed()
        requeued = sum(self._lose_instance(inst, event, cause) for inst in list(ns.instances.values()))
        self._epoch[node] += 1
        for key in [k for k in self._reading if k[0] == node]:
            del self._reading[key]
        for tier, model, nbytes in ns.lose_contents(keep=keep):
            self.moves.append((now, now, model, node, tier, "", "lost", nbytes, 0.0))
        self.starts.node_lost(node, cause, keep)
        # fresh links: flows still running on the old ones finish into the void (their callbacks see the epoch)
        ns.loads_in_flight = {}
        self.fabric.add_node(node, link_capacities(ns.spec), link_streams(ns.spec), ns.loads_in_flight)
        self._down_since[node] = now
        self._event(cause, node=node, requests=requeued, duration_s=back_after_s)
        epoch = self._epoch[node]
        self.env.timeout(back_after_s).callbacks.append(lambda _e: self._node_back(node, epoch, cause))
        self._schedule_retry()

    def _node_back(self: World, node: str, epoch: int, cause: str) -> None:
        if self._epoch[node] != epoch:
            return
        ns = self.state.nodes[node]
        ns.up = True
        self.stats.node_down_s[node] += self.env.now - self._down_since.pop(node)
        self._fleet_changed()
        self._event("replaced" if cause == "preempted" else "repaired", node=node)
        self.starts.node_back(node)
        self._schedule_retry()

    def _lose_instance(self: World, inst: InstanceState, event: str, cause: str) -> int:
        """Remove `inst` at once; every request on it, queued or running, is placed again. Returns their count."""
        eng = self.engines[inst.id]
        reqs = self._requests_on(eng)
        eng.abort()
        for req in reqs:
            self._requeue(req, cause)
        self._on_ready.pop(inst.id, None)
        self._remove_instance(inst, cause, event=event)
        n = len(reqs)
        victim = self.state.instances.get(self._migrations.pop(inst.id, ""))
        if victim is not None:  # `inst` was a migration's destination
            if victim.status == "migrating":
                victim.status = "ready"  # the handover will never come: it serves on
            elif victim.status == "draining" and victim.id in self.engines:
                n += self._lose_instance(victim, "stopped", "migration_lost")  # its sequences were leaving to `inst`
        return n

    def _requests_on(self: World, eng: SimEngine) -> list[Request]:
        """Unresolved requests routed to `eng`, oldest first (a scan from the oldest unresolved request)."""
        reqs = self.requests
        lo = self._open_from
        while lo < len(reqs) and reqs[lo] is not None and reqs[lo].outcome:
            lo += 1
        self._open_from = lo
        out = []
        for req in itertools.islice(reqs, lo, None):
            if req is None:
                break  # not arrived yet, nor any after it
            if req.instance is eng and not req.outcome:
                out.append(req)
        return out

    def _requeue(self: World, req: Request, cause: str) -> None:
        """Place `req` again from scratch (what it had computed is lost), with a fresh queueing deadline."""
        req.instance = None
        req.node = ""
        req.cold = False
        req.placed_s = req.admitted_s = req.prefill_start_s = req.first_token_s = req.finish_s = math.nan
        req.deadline_s = self.env.now + self.request_timeout_s
        self.stats.requeued_by_cause[cause] += 1
        self.stats.requeued_ids.add(req.id)
        self.pending.append(req)
        self._schedule_retry()
