"""Every policy action carried out live, none silently dropped, and the tick loop never waiting for a load: GPU
pressure stops and demotes (copy, then unload), pre-warms in the background (a failed one leaves nothing
loading), copies that reserve their tier space (no duplicates), evictions, keep-alive scale to zero, and the
record of it all (`Gateway.actions()`, GET /admin/actions). Real gateway, fake agents over HTTP, null engines."""

from __future__ import annotations

import time
from collections.abc import Sequence

import httpx

from core.decisions import Action, Copy, Evict, StartInstance, StopInstance
from core.policies.autoscaling import KeepAlive
from core.policies.base import Hooks, PolicyBundle
from core.policies.caching import NoCaching, SeedTiered
from core.policies.placement import TierAware
from core.state import ClusterView
from live.gateway import ACTION_COLUMNS
from tests.live_gateway.conftest import ADMIN_TOKEN
from tests.live_gateway.fake_agent import FakeAgent, ask, fake_cluster, on_loop, tiny_model, wait_for

MODELS = {"x": tiny_model("x"), "y": tiny_model("y")}
SIZES = {"x": 2000, "y": 2000}


def _rows(gs: object, **match: str) -> list[dict]:
    df = gs.gateway.actions()  # type: ignore[attr-defined]
    for k, v in match.items():
        df = df[df[k] == v]
    return df.to_dict("records")


def test_gpu_pressure_demotes_then_unloads_and_the_request_gets_the_room() -> None:
    agent = FakeAgent("a0", SIZES, tiers={"dram": 10_000, "sata": 10_000}, held={"sata": {"x", "y"}},
                      memory_bytes=3000, copy_delay_s=0.3)  # room for one model at a time
    bundle = PolicyBundle(TierAware(), SeedTiered(demote_tier="dram"), KeepAlive(keep_alive_s=300), name="seed")
    with fake_cluster(agent, bundle=bundle, models=MODELS, tick=False) as gs:
        gw = gs.gateway
        assert ask(gs, "x").status_code == 200
        (x,) = gw.state.instances.values()
        gw_agent_instance = gw.live[x.id].agent_instance
        r = ask(gs, "y")
        assert r.status_code == 200, r.text
        (y,) = gw.state.instances.values()
        assert y.model.name == "y" and x.id not in gw.state.instances
        # copy, then unload, then the new model's load
        calls = [c for c in agent.calls if c[0] != "/status"]
        assert calls[-3:] == [("/tiers/copy", "x"), ("/unload", gw_agent_instance), ("/load", "y")]
        assert gw.state.nodes["a0"].tiers["dram"].holds("x") and "x" in agent.contents["dram"]
        (copy,) = _rows(gs, kind="copy")
        assert (copy["detail"], copy["model"], copy["tier"], copy["outcome"]) == ("demote", "x", "dram", "done")
        assert copy["duration_s"] >= 0.3
        (stop,) = _rows(gs, kind="stop_instance")
        assert (stop["detail"], stop["instance"], stop["outcome"]) == ("gpu_pressure", x.id, "done")
        events = gw.instance_events()
        assert list(events[events["event"] == "stopped"]["reason"]) == ["gpu_pressure"]
        assert len(agent.engines) == 1  # x's engine is gone


class _Prewarm(Hooks):
    """Starts `model` on `node` at the first tick; notes the time of every tick."""

    def __init__(self, model: str, node: str) -> None:
        self.tick_s = 0.1
        self.model, self.node = model, node
        self.ticks: list[float] = []

    def on_tick(self, view: ClusterView) -> Sequence[Action]:
        self.ticks.append(time.monotonic())
        if len(self.ticks) == 1:
            return [StartInstance(self.model, self.node, "cloud", reason="prewarm")]
        return ()


def test_a_prewarm_loads_in_the_background_and_a_failed_one_leaves_nothing_loading() -> None:
    agent = FakeAgent("a0", SIZES, load_delay_s=1.5, fail_loads={"y"})
    hooks = _Prewarm("x", "a0")
    bundle = PolicyBundle(TierAware(), hooks, KeepAlive(keep_alive_s=300, tick_s=10))
    with fake_cluster(agent, bundle=bundle, models=MODELS) as gs:
        gw = gs.gateway
        assert wait_for(lambda: any(i.loading for i in gw.state.instances.values()), 5)
        started = time.monotonic()
        assert wait_for(lambda: any(i.ready for i in gw.state.instances.values()), 10)
        during = [t for t in hooks.ticks if started < t < time.monotonic()]
        assert len(during) >= 5  # the tick loop kept ticking through the 1.5 s load
        assert wait_for(lambda: _rows(gs, kind="start_instance"))
        (row,) = _rows(gs, kind="start_instance")
        assert (row["detail"], row["model"], row["node"], row["outcome"]) == ("prewarm", "x", "a0", "done")
        assert row["duration_s"] >= 1.5

        # a pre-warm whose load fails: recorded, and no instance stays "loading"
        on_loop(gw, lambda: gw.execute([StartInstance("y", "a0", "cloud", reason="prewarm")]))
        assert wait_for(lambda: len(_rows(gs, kind="start_instance")) == 2, 10)
        failed = _rows(gs, kind="start_instance", model="y")[0]
        assert failed["outcome"] == "failed" and "cannot start" in failed["reason"]
        assert [i.model.name for i in gw.state.instances.values()] == ["x"]
        events = gw.instance_events()
        assert list(events[events["model"] == "y"]["event"]) == ["loading", "stopped"]


def test_copies_reserve_their_room_and_every_action_is_recorded() -> None:
    agent = FakeAgent("a0", SIZES, tiers={"dram": 3000, "sata": 10_000}, held={"sata": {"x", "y"}},
                      copy_delay_s=0.5)
    bundle = PolicyBundle(TierAware(), NoCaching(), KeepAlive(keep_alive_s=300))
    with fake_cluster(agent, bundle=bundle, models=MODELS, tick=False) as gs:
        gw = gs.gateway
        dram = gw.state.nodes["a0"].tiers["dram"]
        t0 = time.monotonic()
        on_loop(gw, lambda: gw.execute([Copy("x", "a0", "dram", "prefetch"), Copy("x", "a0", "dram", "prefetch"),
                                        Copy("y", "a0", "dram", "prefetch"), Copy("x", "a0", "tape", "prefetch"),
                                        StopInstance("i99"), Evict("y", "a0", "dram")]))
        assert time.monotonic() - t0 < 0.4  # execute() does not wait for the copy
        assert dram.incoming("x") and not dram.holds("x")
        skipped = {(r["kind"], r["model"], r["tier"] or r["instance"]): r["reason"]
                   for r in _rows(gs, outcome="skipped")}
        assert skipped[("copy", "x", "dram")] == "already_incoming"
        assert skipped[("copy", "y", "dram")].startswith("no_room")  # x's reservation holds the space
        assert "unknown tier 'tape'" in skipped[("copy", "x", "tape")]
        assert skipped[("stop_instance", "", "i99")] == "unknown_instance"
        assert skipped[("evict", "y", "dram")] == "not_held"
        assert wait_for(lambda: _rows(gs, kind="copy", outcome="done"), 5)
        assert dram.holds("x") and not dram.incoming("x") and "x" in agent.contents["dram"]

        # the eviction frees the mirror at once, so the copy behind it is planned into that room
        on_loop(gw, lambda: gw.execute([Evict("x", "a0", "dram"), Copy("y", "a0", "dram", "promote")]))
        assert wait_for(lambda: len(_rows(gs, kind="copy", outcome="done")) == 2, 5)
        assert set(agent.contents["dram"]) == {"y"} and dram.holds("y") and not dram.holds("x")
        assert _rows(gs, kind="evict", outcome="done")[0]["model"] == "x"

        # the same table over HTTP, behind the admin token
        assert httpx.get(gs.url + "/admin/actions").status_code == 401
        data = httpx.get(gs.url + "/admin/actions", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()
        assert data["columns"] == list(ACTION_COLUMNS) and len(data["rows"]) == len(gw.actions()) == 8


def test_keep_alive_scales_to_zero() -> None:
    agent = FakeAgent("a0", SIZES)
    bundle = PolicyBundle(TierAware(), NoCaching(), KeepAlive(keep_alive_s=0.3, tick_s=0.1))
    with fake_cluster(agent, bundle=bundle, models=MODELS) as gs:
        gw = gs.gateway
        assert ask(gs, "x").status_code == 200
        assert wait_for(lambda: not gw.state.instances and not agent.engines, 5)
        (row,) = _rows(gs, kind="stop_instance")
        assert (row["detail"], row["model"], row["outcome"]) == ("keep_alive", "x", "done")
        assert ask(gs, "x").status_code == 200  # and back from zero
