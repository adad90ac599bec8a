"""Engine stops that take time (`EngineSpec.stop_s`, `demote_before_stop`; `sim.stopping`): on a GPU that holds one
engine, a cold start that needs a running engine's memory waits for that engine's stop; with the defaults a stop is
free, as before."""

from __future__ import annotations

import dataclasses
import math

import pandas as pd
import pytest

from core.catalog import architecture
from core.spec_builders import cluster_from_dict
from core.specs import EngineSpec
from core.workload.trace import Workload
from experiments.setup import build_policy
from sim.run import SimResult, simulate
from tests.conftest import config

BASE = "llama-3.1-8b"
A, B = f"{BASE}/ft-0", f"{BASE}/ft-1"
SECOND_ARRIVAL_S = 20.0  # the first is done by ~13.4 s; its engine is idle, kept alive (300 s), not yet on NVMe


def one_engine_cluster(nodes: int = 1):
    """`nodes` nodes of one GPU each, with room for a single 8B engine (16 GB weights + 8 GB KV of 27 GB usable)."""
    cfg = config("cluster=small")["cluster"]
    g = cfg["node_groups"][0]
    g["count"], g["n_gpus"] = nodes, 1
    g["gpu"]["mem_bytes"] = 30e9
    return cluster_from_dict(cfg)


def _run(policy: str, **engine: float | bool) -> SimResult:
    wl = Workload.from_columns([0.0, SECOND_ARRIVAL_S], [64, 64], [16, 16], model=[A, B])
    models = [architecture(BASE, A), architecture(BASE, B)]
    bundle = build_policy(config(f"policy={policy}")["policy"])
    return simulate(one_engine_cluster(), models, EngineSpec(**engine), bundle, wl, request_timeout_s=600,
                    drain_timeout_s=3600)


def _second(res: SimResult) -> pd.Series:
    return res.requests.set_index("model").loc[B]


def _stop_and_load(res: SimResult) -> tuple[float, float]:
    """When the first engine's stop ended (its "stopped" row) and when the second engine began to load."""
    inst = res.instances
    stopped = inst[(inst["model"] == A) & (inst["event"] == "stopped")].iloc[0]
    loading = inst[(inst["model"] == B) & (inst["event"] == "loading")].iloc[0]
    assert stopped["reason"] == "gpu_pressure"
    return float(stopped["time_s"]), float(loading["time_s"])


def test_a_cold_start_waits_for_the_stopping_engines_memory() -> None:
    free = _run("mvp")
    slow = _run("mvp", stop_s=2.5)
    assert (free.requests["outcome"] == "completed").all() and (slow.requests["outcome"] == "completed").all()
    # free: the engine goes and the next load starts in the same instant
    assert _stop_and_load(free) == (SECOND_ARRIVAL_S, SECOND_ARRIVAL_S)
    # 2.5 s: the memory is held for the stop; the load starts the moment it is free
    assert _stop_and_load(slow) == (SECOND_ARRIVAL_S + 2.5, SECOND_ARRIVAL_S + 2.5)
    a, b = _second(free), _second(slow)
    assert math.isclose(b["ttft_s"] - a["ttft_s"], 2.5, abs_tol=1e-9)
    # the wait is queueing (no instance could take the request), not part of the cold start that followed
    assert math.isclose(a["queue_s"], 0.0, abs_tol=1e-9) and math.isclose(b["queue_s"], 2.5, abs_tol=1e-9)
    assert math.isclose(b["cold_start_s"], a["cold_start_s"], abs_tol=1e-9)
    # the first request never saw the stop, but it pays for it: the stopping engine is billed while it holds its
    # memory (its "stopped" row comes at the stop's end, as live records it after the unload)
    first = ["ttft_s", "e2e_s", "tpot_s", "queue_s", "cold_start_s"]
    pd.testing.assert_series_equal(free.requests.iloc[0][first], slow.requests.iloc[0][first])
    assert slow.requests.iloc[0]["cost_usd"] > free.requests.iloc[0]["cost_usd"]
    assert slow.summary["gpu_hours"] > free.summary["gpu_hours"]


def test_defaults_are_the_free_stop_and_identical_records() -> None:
    default = _run("seed_tiered")
    zero = _run("seed_tiered", stop_s=0.0, demote_before_stop=False)
    for x, y in ((default.requests, zero.requests), (default.moves, zero.moves), (default.instances, zero.instances)):
        pd.testing.assert_frame_equal(x, y)
    again = _run("seed_tiered", stop_s=1.0, demote_before_stop=True)
    pd.testing.assert_frame_equal(again.requests, _run("seed_tiered", stop_s=1.0, demote_before_stop=True).requests)


def test_a_demoting_stop_holds_the_memory_until_the_copy_lands() -> None:
    """seed_tiered demotes the stopped engine's weights to NVMe: live copies first, then unloads."""
    res = _run("seed_tiered", stop_s=0.5, demote_before_stop=True)
    moves = res.moves
    demote = moves[(moves["kind"] == "demote") & (moves["model"] == A)].iloc[0]
    assert demote["time_s"] == SECOND_ARRIVAL_S and demote["duration_s"] > 0
    stopped, loading = _stop_and_load(res)
    assert math.isclose(stopped, demote["end_s"] + 0.5, abs_tol=1e-9) and loading == stopped
    # without demote_before_stop the copy runs beside the stop: only stop_s is waited for
    assert _stop_and_load(_run("seed_tiered", stop_s=0.5)) == (SECOND_ARRIVAL_S + 0.5, SECOND_ARRIVAL_S + 0.5)


@pytest.mark.parametrize("bad", [-1.0, math.inf, "1"])
def test_stop_s_is_validated(bad: object) -> None:
    from core.errors import ConfigError
    from core.spec_builders import engine_from_dict

    with pytest.raises(ConfigError, match=r"engine\.stop_s"):
        engine_from_dict({"stop_s": bad})


def test_engine_spec_default_stop_is_free() -> None:
    spec = EngineSpec()
    assert spec.stop_s == 0.0 and spec.demote_before_stop is False
    assert dataclasses.replace(spec, stop_s=1.0).stop_s == 1.0
