"""The defragmentation policy (core/policies/defrag.py, `policy=defrag`) served live, unchanged: over a real agent
and a real CPU engine, an idle instance on a quiet node gives its memory back long before keep-alive would,
its weights demoted to host memory on the way out, and its next request reloads from there. With plain
keep-alive (the mechanism off) the same idle instance stays loaded."""

from __future__ import annotations

import time

import httpx
import pytest

from core.policies.autoscaling import KeepAlive
from core.policies.base import PolicyBundle
from core.policies.caching import SeedTiered
from core.policies.defrag import DefragKeepAlive
from core.policies.placement import TierAware
from live.checkpoint import generate_checkpoint
from live.gateway import AgentRef, Gateway, GatewayConfig, Tenant
from live.llama_config import model_spec
from live.registry import Registry
from tests.live_gateway.conftest import ADMIN_TOKEN, AGENT_TOKEN, serving, start_agent, stop_agent
from tests.live_gateway.fake_agent import wait_for

IDLE_MIN_S = 1.0


@pytest.mark.parametrize("defrag", [True, False], ids=["defrag", "keep_alive_only"])
def test_defrag_stops_an_idle_instance_early_and_it_reloads_from_dram(tmp_path, defrag: bool) -> None:  # type: ignore[no-untyped-def]
    store_url = f"file://{tmp_path / 'cloud'}"
    info = generate_checkpoint(tmp_path / "ckpt" / "x", "tiny", 0)
    Registry([store_url]).publish("x", info.path)
    specs = {"x": model_spec("x", info.params, 4)}  # the CPU engine holds float32 weights
    proc, url = start_agent(tmp_path, "r0", store_url)
    autoscaling = (DefragKeepAlive(keep_alive_s=300, tick_s=0.2, idle_min_s=IDLE_MIN_S, max_reload_s=1e3)
                   if defrag else KeepAlive(keep_alive_s=300, tick_s=0.2))
    # the cache-on-load copy goes to nvme, which this agent lacks (dram and sata only): x has no local copy, so the
    # only way it reaches DRAM is the defrag demote
    bundle = PolicyBundle(TierAware(), SeedTiered(demote_tier="dram", download_tier="nvme"), autoscaling)
    try:
        config = GatewayConfig(agents=[AgentRef("r0", url, AGENT_TOKEN)], tenants={"k": Tenant("t", ("x",))},
                               models=specs, admin_token=ADMIN_TOKEN)
        gw = Gateway(config, bundle)
        with serving(gw) as gs:
            def ask() -> httpx.Response:
                return httpx.post(gs.url + "/v1/completions", headers={"Authorization": "Bearer k"}, timeout=120,
                                  json={"model": "x", "prompt": "hi", "max_tokens": 2})

            assert ask().status_code == 200
            node = gw.state.nodes["r0"]
            assert not node.tiers["dram"].holds("x")
            t_idle = time.monotonic()
            if not defrag:  # keep-alive alone holds the idle instance for its 300 s
                time.sleep(IDLE_MIN_S + 2.0)
                assert [i.model.name for i in gw.state.instances.values()] == ["x"]
                assert not any(a["kind"] == "stop_instance" for a in gw.actions().to_dict("records"))
                return
            assert wait_for(lambda: not gw.state.instances, 20), "defrag did not stop the idle instance"
            assert time.monotonic() - t_idle < 20 < 300  # long before keep-alive would have
            acts = gw.actions().to_dict("records")
            stop = next(a for a in acts if a["kind"] == "stop_instance")
            copy = next(a for a in acts if a["kind"] == "copy")
            assert (stop["detail"], stop["outcome"]) == ("defrag", "done")
            assert (copy["detail"], copy["model"], copy["tier"], copy["outcome"]) == ("demote", "x", "dram", "done")
            assert wait_for(lambda: node.tiers["dram"].holds("x"), 5)
            status = httpx.get(url + "/status", headers={"Authorization": f"Bearer {AGENT_TOKEN}"}).json()
            assert "x" in status["tiers"]["dram"]["models"] and status["instances"] == []
            # the next request is a cold start from the DRAM copy, not from the cloud store
            assert ask().status_code == 200
            rec = gw.records()
            cold = rec[rec["cold_start"].astype(bool)]
            assert list(cold["source_tier"]) == ["cloud", "dram"], cold[["source_tier", "cold_start_s"]]
    finally:
        stop_agent(proc)
