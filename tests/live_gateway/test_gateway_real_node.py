"""The gateway over a real agent that describes its node (memory budget, batch limit, tier pacing) and real CPU
engines: it plans with that description, and GPU pressure under the budget stops and demotes an idle instance
(copy, then unload) so that another model can start, every step recorded."""

from __future__ import annotations

import httpx

from core.policies.autoscaling import KeepAlive
from core.policies.base import PolicyBundle
from core.policies.caching import SeedTiered
from core.policies.placement import TierAware
from live.checkpoint import generate_checkpoint
from live.gateway import AgentRef, Gateway, GatewayConfig, Tenant
from live.llama_config import model_spec
from live.registry import Registry
from tests.live_gateway.conftest import ADMIN_TOKEN, AGENT_TOKEN, serving, start_agent, stop_agent
from tests.live_gateway.fake_agent import wait_for


def test_a_real_node_budget_makes_room_by_demoting(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store_url = f"file://{tmp_path / 'cloud'}"
    specs = {}
    for seed, name in enumerate(("x", "y")):
        info = generate_checkpoint(tmp_path / "ckpt" / name, "tiny", seed)
        Registry([store_url]).publish(name, info.path)
        specs[name] = model_spec(name, info.params, 4)  # the CPU engine holds float32 weights
    budget = int(specs["x"].resident_bytes * 1.5)  # one model at a time
    proc, url = start_agent(tmp_path, "r0", store_url, extra_args=(
        "--memory-budget", str(budget), "--max-num-seqs", "3", "--tier-bw", "sata=200e6:100e6:0.001"))
    try:
        config = GatewayConfig(agents=[AgentRef("r0", url, AGENT_TOKEN)], tenants={"k": Tenant("t", ("x", "y"))},
                               models=specs, admin_token=ADMIN_TOKEN, tick=False)
        bundle = PolicyBundle(TierAware(), SeedTiered(demote_tier="dram"), KeepAlive(keep_alive_s=300))
        gw = Gateway(config, bundle)
        with serving(gw) as gs:
            node = gw.state.nodes["r0"]
            assert node.spec.gpu.mem_bytes == budget and node.gpu_free_bytes == [budget]
            assert node.spec.tiers["sata"].read_bw_Bps == 200e6 and node.spec.tiers["sata"].latency_s == 0.001

            def ask(model: str) -> httpx.Response:
                return httpx.post(gs.url + "/v1/completions", headers={"Authorization": "Bearer k"}, timeout=120,
                                  json={"model": model, "prompt": "hi", "max_tokens": 2})

            assert ask("x").status_code == 200
            (x,) = gw.state.instances.values()
            assert x.max_num_seqs == 3 and x.gpu_bytes == specs["x"].resident_bytes
            r = ask("y")
            assert r.status_code == 200, r.text
            assert [i.model.name for i in gw.state.instances.values()] == ["y"]
            acts = gw.actions().to_dict("records")
            copy = next(a for a in acts if a["kind"] == "copy" and a["detail"] == "demote")
            stop = next(a for a in acts if a["kind"] == "stop_instance")
            assert (copy["model"], copy["tier"], copy["outcome"]) == ("x", "dram", "done")
            # SeedTiered also writes each cloud download to SATA (on_load_done), as in the simulator
            assert {(a["model"], a["tier"]) for a in acts if a["detail"] == "cache"} <= {("x", "sata"), ("y", "sata")}
            assert (stop["detail"], stop["instance"], stop["outcome"]) == ("gpu_pressure", x.id, "done")
            assert wait_for(lambda: node.tiers["dram"].holds("x"), 5)
            status = httpx.get(url + "/status", headers={"Authorization": f"Bearer {AGENT_TOKEN}"}).json()
            assert "x" in status["tiers"]["dram"]["models"] and [i["model"] for i in status["instances"]] == ["y"]
    finally:
        stop_agent(proc)
