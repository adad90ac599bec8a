"""core/policies/hybrid.py (LocalityForecast): decisions on small hand-built states, and its bundle from yaml.

States are the shipped small cluster (2 nodes x 2 H100), built with tests/test_policies.py's helpers.
"""

from __future__ import annotations

import pytest

from core.config import build_policy
from core.decisions import Copy, StartInstance, StopInstance
from core.policies.base import Hooks
from core.policies.hybrid import LocalityForecast
from core.policies.placement import StartupTime
from tests.conftest import config
from tests.test_policies import A1, A3, B8, C14, N0, N1, Req, inst, put, world


def fed(arrivals: dict[str, list[float]], **kw) -> LocalityForecast:
    """A policy that has seen `arrivals` (model -> arrival times)."""
    p = LocalityForecast(**kw)
    events = sorted((t, m) for m, ts in arrivals.items() for t in ts)
    for k, (t, m) in enumerate(events):
        p.on_arrival(Req(k, m, arrival_s=t), None)  # type: ignore[arg-type]
    return p


def test_rejects_inconsistent_keep_alives():
    with pytest.raises(ValueError, match="min_keep_alive_s"):
        LocalityForecast(min_keep_alive_s=400.0, keep_alive_s=300.0)
    with pytest.raises(ValueError, match="min_keep_alive_s"):
        LocalityForecast(keep_alive_s=300.0, max_keep_alive_s=100.0)


def test_loads_land_in_the_dram_pool_and_downloads_on_nvme():
    state, _, view = world()
    p = LocalityForecast()
    assert p.on_load_done(inst(state, B8, N0, source="cloud"), view) == [
        Copy(B8, N0, "nvme", kind="cache"), Copy(B8, N0, "dram", kind="cache")]
    put(state, N1, "dram", A3)
    assert p.on_load_done(inst(state, A3, N1, source="dram"), view) == ()


def test_quiet_model_with_a_dram_copy_is_stopped_early():
    state, clock, view = world(now=0.0)
    put(state, N0, "dram", B8)
    i = inst(state, B8, N0, idle_since=670.0)
    p = fed({B8: [5.0]})  # one request long ago: after ten empty windows the forecast is 0
    clock.now = 699.0
    assert p.on_tick(view) == ()
    clock.now = 701.0
    assert p.on_tick(view) == [StopInstance(i.id, reason="keep_alive")]


def test_quiet_model_without_a_local_copy_keeps_the_plain_keep_alive():
    state, clock, view = world()
    i = inst(state, B8, N0, idle_since=0.0)
    p = fed({B8: [1.0]})
    clock.now = 299.0
    assert not any(isinstance(a, StopInstance) for a in p.on_tick(view))
    clock.now = 301.0
    assert StopInstance(i.id, reason="keep_alive") in p.on_tick(view)


def test_busy_model_is_kept_past_the_keep_alive():
    state, clock, view = world()
    put(state, N0, "dram", B8)
    i = inst(state, B8, N0, idle_since=300.0)
    # 2 requests a minute for 10 minutes (served elsewhere): ~0.033 req/s, ~10 expected within keep_alive_s
    p = fed({B8: [k * 30.0 for k in range(20)]})
    clock.now = 620.0
    assert not any(isinstance(a, StopInstance) for a in p.on_tick(view))
    assert p.ttl_s(i, view) == 900.0


def test_min_instances_are_kept():
    state, clock, view = world()
    put(state, N0, "dram", B8)
    inst(state, B8, N0, idle_since=0.0)
    clock.now = 1000.0
    assert fed({}, min_instances=1).on_tick(view) == ()


def test_gpu_pressure_stops_the_coldest_forecast_first_and_demotes_to_the_pool():
    state, _, view = world(now=600.0)
    # N0: a 14B on GPU 0, a 1B and an 8B fine-tune on GPU 1, all idle
    hot = inst(state, C14, N0, gpus=[0], last_used=10.0)   # least recently used, but forecast hot
    cold = inst(state, A1, N0, gpus=[1], last_used=500.0)
    cold8 = inst(state, "llama-3.1-8b/ft-1", N0, gpus=[1], last_used=400.0)
    put(state, N0, "dram", A1)
    p = fed({C14: [float(t) for t in range(0, 600, 20)]})
    need = "llama-3.1-70b"  # both GPUs of the node: every idle instance must go, coldest first
    got = p.pressure_stops(state.nodes[N0], need, view)
    assert [a.instance_id for a in got] == [cold8.id, cold.id, hot.id]
    demotes = {a.instance_id: a.demote_to for a in got}
    assert demotes == {cold8.id: "dram", cold.id: None, hot.id: "dram"}  # A1 is already in the pool


def test_gpu_pressure_spares_instances_younger_than_the_minimum_residency():
    state, _, view = world(now=600.0)
    old = inst(state, C14, N0, gpus=[0])
    young = inst(state, C14, N0, gpus=[1])
    old.ready_at_s, young.ready_at_s = 100.0, 590.0
    p = LocalityForecast(min_residency_s=60.0)
    # another 14B (44.1 GB) fits once GPU 0 is free; a 32B (49.2 GB on both GPUs) would need the young one too
    assert p.pressure_stops(state.nodes[N0], C14, view) == [StopInstance(old.id, "gpu_pressure", "dram")]
    assert p.pressure_stops(state.nodes[N0], "qwen2.5-32b", view) == []
    assert len(LocalityForecast().pressure_stops(state.nodes[N0], "qwen2.5-32b", view)) == 2


def test_gpu_pressure_with_room_or_without_hope_stops_nothing():
    state, _, view = world()
    p = LocalityForecast()
    assert p.pressure_stops(state.nodes[N0], B8, view) == []
    inst(state, C14, N0, gpus=[0], active=1)
    inst(state, C14, N0, gpus=[1], active=1)
    assert p.pressure_stops(state.nodes[N0], "llama-3.1-70b", view) == []  # busy instances are never stopped


def test_forecast_burst_prefetches_and_prewarms_where_the_model_is_closest():
    state, _, view = world(now=60.0)
    put(state, N1, "nvme", B8)
    p = fed({B8: [k * 2.0 for k in range(30)]})  # 0.5 req/s in the first minute
    assert p.on_tick(view) == [Copy(B8, N1, "dram", kind="prefetch"), StartInstance(B8, N1, "nvme", "prewarm")]


def test_no_prewarm_beyond_forecast_load_nor_for_cold_models():
    state, _, view = world(now=60.0)
    inst(state, B8, N0, status="loading")
    p = fed({B8: [k * 2.0 for k in range(30)]}, service_s=1.0)  # 0.5 x 1 s = 0.5 instance; one is coming
    assert not any(isinstance(a, StartInstance) for a in p.on_tick(view))
    quiet = fed({A1: [1.0]}, prefetch_rate=0.5)
    assert quiet.on_tick(view) == ()


def test_bundle_from_yaml_uses_startup_time_placement_and_binds_the_autoscaler():
    cfg = config("policy=locality_forecast", "cluster=small")
    bundle = build_policy(cfg["policy"])
    assert bundle.name == "locality_forecast" and bundle.progressive
    assert isinstance(bundle.placement, StartupTime)
    assert isinstance(bundle.autoscaling, LocalityForecast) and bundle.placement.autoscaler is bundle.autoscaling
    assert type(bundle.caching) is Hooks
    assert bundle.tick_s == 10.0


def test_small_simulation_reloads_from_dram():
    """End to end on the small cluster: with a short window and memory pressure, reloads come from the pool."""
    from experiments.simulate import run

    cfg = config("policy=locality_forecast", "cluster=small", "workload.window=[0,300]")
    cfg["output"] = {"plots": False, "records": False}
    s = run(cfg, None).summary
    assert s["completed"] == s["requests"]
    assert s["loads_by_tier"].get("cloud", 0) > 0
    assert s["loads_by_tier"].get("dram", 0) > 0, s["loads_by_tier"]


def test_the_live_stack_builds_the_same_bundle():
    """The live gateway composes conf/live/serve.yaml, whose `policy` group is the simulator's: the same classes."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from tests.conftest import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("live/serve", overrides=["policy=locality_forecast"])
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    bundle = build_policy(plain["policy"])
    assert isinstance(bundle.autoscaling, LocalityForecast) and isinstance(bundle.placement, StartupTime)
