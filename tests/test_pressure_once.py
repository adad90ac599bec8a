"""One waiting request asks for GPU-pressure stops on one node at a time: while the stop it caused is under way,
a retry that names another node (round robin does, every time) stops nothing there. Found by the twin: live, the
gateway re-asked every 0.1 s and stopped an engine on each node for one waiting request; the simulator now holds
the same rule as the live gateway (`live.gateway_forward`), and both are tested here and in
tests/live_gateway/test_gateway_pressure.py."""

from __future__ import annotations

from core.catalog import architecture
from core.specs import EngineSpec
from core.workload.trace import Workload
from experiments.setup import build_policy
from sim.run import SimResult, simulate
from tests.conftest import config
from tests.test_sim_stopping import one_engine_cluster

BASE = "llama-3.1-8b"
A, B, C = (f"{BASE}/ft-{i}" for i in range(3))


def _run(stop_s: float) -> SimResult:
    # A and B fill the two nodes; C waits for memory at 20 s while A and B are asked again (their finishes and
    # the policy's ticks retry C during the stop, and round robin names the other node each time)
    arrivals = [0.0, 0.0, 20.0, 20.5, 20.5, 21.0, 21.0, 22.0, 22.0]
    models = [A, B, C, A, B, A, B, A, B]
    wl = Workload.from_columns(arrivals, [64] * 9, [16] * 9, model=models)
    specs = [architecture(BASE, m) for m in (A, B, C)]
    bundle = build_policy(config("policy=mvp")["policy"])
    return simulate(one_engine_cluster(nodes=2), specs, EngineSpec(stop_s=stop_s), bundle, wl, request_timeout_s=600,
                    drain_timeout_s=3600)


def test_a_waiting_request_stops_one_engine_not_one_per_node() -> None:
    res = _run(stop_s=5.0)
    assert (res.requests["outcome"] == "completed").all()
    inst = res.instances
    stops = inst[(inst["event"] == "stopped") & (inst["reason"] == "gpu_pressure")]
    first = stops[stops["time_s"] <= 25.0 + 1e-9]
    assert len(first) == 1, stops[["time_s", "model", "node"]]
    c = res.requests.set_index("model").loc[C]
    assert abs(float(c["queue_s"]) - 5.0) < 1e-6  # it waited for that one stop, then loaded where it freed
