"""One waiting request stops one engine for GPU pressure, not one per node: the gateway re-asks the policy every
`queue_poll_s`, round robin names the next node each time, and before the fix each ask stopped an engine on the
node it named (the twin saw live stop two engines where the simulator stopped one: docs/fidelity.md). Real
gateway, fake agents over HTTP whose engine stops take a second, null engines."""

from __future__ import annotations

from core.policies.autoscaling import KeepAlive
from core.policies.base import PolicyBundle
from core.policies.caching import NoCaching
from core.policies.placement import RoundRobin
from tests.live_gateway.fake_agent import FakeAgent, ask, fake_cluster, tiny_model

MODELS = {m: tiny_model(m) for m in ("x", "y", "z")}
SIZES = dict.fromkeys(MODELS, 2000)


def test_a_waiting_request_stops_one_engine_not_one_per_node() -> None:
    agents = [FakeAgent(n, SIZES, memory_bytes=3000, unload_delay_s=1.0) for n in ("a0", "a1")]  # one model each
    bundle = PolicyBundle(RoundRobin(), NoCaching(), KeepAlive(keep_alive_s=300), name="mvp")
    with fake_cluster(*agents, bundle=bundle, models=MODELS, tick=False) as gs:
        assert ask(gs, "x").status_code == 200
        assert ask(gs, "y").status_code == 200
        nodes = {i.model.name: i.node for i in gs.gateway.state.instances.values()}
        assert set(nodes.values()) == {"a0", "a1"}  # round robin put x and y on different nodes
        r = ask(gs, "z")  # waits ~1 s for a stop; meanwhile ~10 polls, round robin alternating the nodes
        assert r.status_code == 200, r.text
        unloads = [c for a in agents for c in a.calls if c[0] == "/unload"]
        assert len(unloads) == 1, unloads
        left = {i.model.name for i in gs.gateway.state.instances.values()}
        assert "z" in left and len(left & {"x", "y"}) == 1  # one of x / y is still there
