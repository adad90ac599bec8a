"""Planning with the real node description: tier pacing, the store, the memory budget and the engine's batch limit
from the agents' /status (with today's placeholders where an agent reports nothing), and a clear error at start
for a budget that fits no model."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from core.errors import ConfigError
from core.specs import EngineSpec
from live.gateway import NOMINAL_GPU, Gateway, GatewayConfig, Tenant, create_app
from live.gateway_config import NOMINAL_TIER_BW_BPS
from live.gateway_nodes import UNPACED_BPS, live_engine, node_report, store_spec
from tests.live_gateway.conftest import MODEL
from tests.live_gateway.fake_agent import FakeAgent, fake_cluster, on_loop, running, tiny_model, wait_for

STATUS = {
    "node": "a0",
    "tiers": {"dram": {"capacity_bytes": 1000, "models": {}, "read_Bps": 5e8, "write_Bps": 2e8, "latency_s": 0.001},
              "sata": {"capacity_bytes": 9000, "models": {}, "read_Bps": None, "write_Bps": None, "latency_s": None},
              "nvme": {"capacity_bytes": 4000, "models": {}}},
    "cloud": {"stream_Bps": 1e6, "streams": 4, "latency_s": 0.05},
    "accelerator": {"memory_bytes": 6000},
    "engine": {"kind": "cpu", "max_num_seqs": 3},
}


def test_node_spec_from_status() -> None:
    r = node_report("a0", STATUS, NOMINAL_GPU, 8, 1.5, paced_store=True)
    dram, sata, nvme = (r.spec.tiers[t] for t in ("dram", "sata", "nvme"))
    assert (dram.capacity_bytes, dram.read_bw_Bps, dram.write_bw_Bps, dram.latency_s) == (1000, 5e8, 2e8, 0.001)
    assert (sata.read_bw_Bps, sata.write_bw_Bps, sata.latency_s) == (UNPACED_BPS, UNPACED_BPS, 0.0)  # unpaced
    assert nvme.read_bw_Bps == NOMINAL_TIER_BW_BPS  # an agent that says nothing: the old placeholder
    assert r.spec.gpu.mem_bytes == 6000 and r.spec.n_gpus == 1 and r.spec.od_usd_per_hour == 1.5
    assert (r.max_num_seqs, r.engine_kind) == (3, "cpu")
    store = store_spec([None, STATUS])
    assert store is not None and (store.per_stream_Bps, store.streams, store.ttfb_s) == (1e6, 4, 0.05)
    assert store_spec([{"tiers": {}}]) is None
    bare = node_report("a1", {"tiers": {}}, NOMINAL_GPU, 8, 1.0, paced_store=False)
    assert bare.spec.gpu == NOMINAL_GPU and bare.max_num_seqs == 8
    e = live_engine(EngineSpec())
    assert (e.gpu_mem_util, e.kv_reserve_frac) == (1.0, 0.0)


@pytest.mark.parametrize(("path", "value", "field"), [
    (("tiers", "dram", "read_Bps"), -1, "tiers.dram.read_Bps"),
    (("accelerator", "memory_bytes"), "lots", "accelerator.memory_bytes"),
    (("engine", "max_num_seqs"), 2.5, "engine.max_num_seqs"),
])
def test_bad_reports_name_the_field(path: tuple[str, ...], value: object, field: str) -> None:
    import copy

    st = copy.deepcopy(STATUS)
    node = st
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        node_report("a0", st, NOMINAL_GPU, 8, 1.0, paced_store=True)


def test_the_mirror_plans_with_each_nodes_description() -> None:
    small = FakeAgent("a0", {MODEL: 2000}, memory_bytes=5000, max_num_seqs=3,
                      cloud={"stream_Bps": 2e6, "streams": 2, "latency_s": 0.01},
                      tier_pacing={"dram": {"read_Bps": 4e8, "write_Bps": 3e8, "latency_s": 0.0}})
    big = FakeAgent("a1", {MODEL: 2000}, memory_bytes=None, max_num_seqs=5)
    with fake_cluster(small, big) as gs:
        st = gs.gateway.state
        a0, a1 = st.nodes["a0"], st.nodes["a1"]
        assert a0.gpu_free_bytes == [5000] and a1.spec.gpu == NOMINAL_GPU
        assert a0.spec.tiers["dram"].read_bw_Bps == 4e8 and a0.spec.tiers["sata"].read_bw_Bps == NOMINAL_TIER_BW_BPS
        assert (st.cluster.store.per_stream_Bps, st.cluster.store.streams) == (2e6, 2)
        # an instance holds exactly its weights: two of the 2000-byte model fit in 5000 bytes, not three
        assert a0.footprint(st.models[MODEL])[1] == 2000
        gw = gs.gateway
        lv = on_loop(gw, lambda: gw.cold_start(MODEL, "a0", "cloud"))
        assert lv is not None and a0.gpu_free_bytes == [3000] and lv.inst.max_num_seqs == 3
        assert wait_for(lambda: lv.inst.ready)
        assert on_loop(gw, lambda: gw.cold_start(MODEL, "a0", "cloud")) is not None
        assert on_loop(gw, lambda: gw.cold_start(MODEL, "a0", "cloud")) is None  # 1000 bytes left


def test_a_budget_smaller_than_every_model_fails_at_start() -> None:
    agent = FakeAgent("a0", {"x": 3000, "y": 2000}, memory_bytes=1500)
    with running(agent):
        config = GatewayConfig(agents=[agent.ref], tenants={"k": Tenant("t", ("x", "y"))},
                               models={"x": tiny_model("x", 3000), "y": tiny_model("y", 2000)})
        with pytest.raises(ConfigError) as err, TestClient(create_app(Gateway(config))):
            pass
    message = str(err.value)
    assert "'a0'" in message and "1500 B" in message and "'y'" in message and "2000 B" in message
