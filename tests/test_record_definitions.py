"""queue_s and tpot_s mean the same interval live and in the simulator.

- TPOT: (last token - first token) / (output tokens - 1) on both sides (`live.gateway_records.tpot`, `sim.run`);
  NaN with one output token; NaN live for a request that was not streamed (its tokens arrive together).
- queue_s (live, `experiments.replay.merge_records`): the client's wait for a free slot plus the gateway's placement
  wait; the replayer's own timer lateness is not a queue of the system under test and is left out of queue_s, TTFT
  and e2e (the simulator issues each arrival exactly on time).
"""

from __future__ import annotations

import math

import pandas as pd
import pytest

pytest.importorskip("httpx")

from core.catalog import architecture
from core.records import REQUEST_SCHEMA
from core.spec_builders import cluster_from_dict
from core.specs import EngineSpec
from core.workload.trace import Workload
from experiments.replay import ClientRow, client_wait_s, merge_records, send_lateness
from experiments.setup import build_policy
from live.gateway_records import tpot
from sim.run import simulate
from tests.conftest import config

MODEL = "llama-3.2-1b"


def _sim(outputs: list[int], **engine: float) -> pd.DataFrame:
    """One warm-up request, then one request per entry of `outputs`, each alone on the warm engine."""
    arrivals = [0.0] + [60.0 + 10.0 * i for i in range(len(outputs))]
    wl = Workload.from_columns(arrivals, [32] * len(arrivals), [4, *outputs], model=f"{MODEL}/ft-0")
    cfg = config("cluster=small")["cluster"]
    cfg["node_groups"][0]["count"] = 1
    res = simulate(cluster_from_dict(cfg), [architecture(MODEL, f"{MODEL}/ft-0")], EngineSpec(**engine),
                   build_policy(config("policy=mvp")["policy"]), wl)
    return res.requests.iloc[1:].reset_index(drop=True)


@pytest.mark.parametrize("engine", [{}, {"request_overhead_s": 0.02, "step_overhead_s": 0.003}])
def test_sim_and_live_tpot_are_one_formula(engine: dict[str, float]) -> None:
    req = _sim([1, 2, 8], **engine)
    assert (req["outcome"] == "completed").all() and not req["cold_start"].any()
    # the live formula on the simulator's own timestamps (ttft, e2e from arrival) gives the simulator's TPOT
    for _, r in req.iterrows():
        live = tpot(r["e2e_s"], r["ttft_s"], int(r["output_tokens"]))
        if r["output_tokens"] == 1:
            assert math.isnan(r["tpot_s"]) and math.isnan(live)
        else:
            assert math.isclose(r["tpot_s"], live, rel_tol=1e-9), (r["tpot_s"], live)


def test_request_overhead_is_in_ttft_never_in_tpot() -> None:
    """Live, HTTP and the tokenizer delay the first token and the last alike; the simulator does the same."""
    base = _sim([8])
    with_over = _sim([8], request_overhead_s=0.02)
    assert math.isclose(with_over.loc[0, "ttft_s"] - base.loc[0, "ttft_s"], 0.02, abs_tol=1e-9)
    assert math.isclose(with_over.loc[0, "tpot_s"], base.loc[0, "tpot_s"], rel_tol=1e-9)


def test_live_tpot_edge_cases() -> None:
    assert tpot(1.0, 0.3, 8) == pytest.approx(0.1)
    assert math.isnan(tpot(1.0, 0.3, 1)) and math.isnan(tpot(1.0, 0.3, 0))
    assert math.isnan(tpot(1.0, math.nan, 8)) and math.isnan(tpot(math.nan, 0.3, 8))
    assert tpot(0.3, 0.3000001, 4) == 0.0  # clock jitter never makes it negative


def _gateway(ids: list[int], queue_s: float) -> pd.DataFrame:
    rows = []
    for i in ids:
        row = dict.fromkeys(REQUEST_SCHEMA, math.nan)
        row.update(request_id=i, tenant="demo", model="m", arrival_s=0.0, queue_s=queue_s, cold_start=False,
                   source_tier="gpu", node="n0", instance="i1", outcome="completed", reason="", prompt_tokens=5,
                   output_tokens=3)
        rows.append(row)
    return pd.DataFrame(rows, columns=list(REQUEST_SCHEMA))


def test_replay_queue_excludes_the_client_timers_lateness() -> None:
    late = ClientRow(0, "m", 1.0, 5, 3, stream=True, gateway_id=1, woke_s=1.006, sent_s=1.006, ttft_s=0.2,
                     e2e_s=0.45, last_token_s=0.4, out_tokens=3, outcome="completed")
    slot = ClientRow(1, "m", 2.0, 5, 3, stream=False, gateway_id=2, woke_s=2.004, sent_s=2.504, ttft_s=0.3,
                     e2e_s=0.3, out_tokens=3, outcome="completed")
    old = ClientRow(2, "m", 3.0, 5, 3, stream=False, gateway_id=None, sent_s=3.25, ttft_s=0.1, e2e_s=0.1,
                    out_tokens=3, outcome="completed")  # no timer reading: counted from arrival, as before
    assert client_wait_s(late) == 0.0 and client_wait_s(slot) == pytest.approx(0.5)
    assert client_wait_s(old) == pytest.approx(0.25)
    df = merge_records([late, slot, old], _gateway([1, 2], queue_s=0.0002)).set_index("request_id")
    # 6 ms late: none of it is queueing, nor in TTFT / e2e; the gateway's placement wait is
    assert df.loc[0, "queue_s"] == pytest.approx(0.0002)
    assert df.loc[0, "ttft_s"] == pytest.approx(0.2) and df.loc[0, "e2e_s"] == pytest.approx(0.45)
    # streamed: (last token - first token) / (3 - 1), the client's token chunks (the end of the stream, after
    # its last token, is not a token: TPOT used e2e until it timed token chunks)
    assert df.loc[0, "tpot_s"] == pytest.approx(0.1)
    # 0.5 s waiting for a free client slot is a queue the request really saw
    assert df.loc[1, "queue_s"] == pytest.approx(0.5002) and df.loc[1, "ttft_s"] == pytest.approx(0.8)
    assert math.isnan(df.loc[1, "tpot_s"])  # not streamed: its tokens came together, no TPOT
    assert df.loc[2, "queue_s"] == pytest.approx(0.25)
    lateness = send_lateness([late, slot, old])
    assert lateness["p50"] == pytest.approx(0.005) and lateness["max"] == pytest.approx(0.006)
    assert send_lateness([old]) == {"p50": None, "max": None}


def test_sim_queue_is_zero_for_an_idle_warm_engine() -> None:
    """The simulator's queue_s: arrival -> prefill begins (less any load waited for); 0 on an idle warm engine, as
    live's is the gateway's sub-millisecond placement once the replayer's timer lateness is left out."""
    assert _sim([8]).loc[0, "queue_s"] == 0.0


def test_sim_cold_start_wait_leaves_the_request_overhead_in_ttft() -> None:
    """A cold request placed on arrival: queue_s 0 and cold_start_s the load's wait, whatever the request overhead
    (live records the same: placement -> instance ready, the overhead only in TTFT)."""
    arrivals, outs = [0.0], [4]
    wl = Workload.from_columns(arrivals, [32], outs, model=f"{MODEL}/ft-0")
    cfg = config("cluster=small")["cluster"]
    cfg["node_groups"][0]["count"] = 1
    runs = [simulate(cluster_from_dict(cfg), [architecture(MODEL, f"{MODEL}/ft-0")], EngineSpec(**e),
                     build_policy(config("policy=mvp")["policy"]), wl).requests.iloc[0]
            for e in ({}, {"request_overhead_s": 0.05})]
    assert all(r["cold_start"] for r in runs)
    assert runs[0]["queue_s"] == 0.0 and runs[1]["queue_s"] == 0.0
    assert math.isclose(runs[1]["cold_start_s"], runs[0]["cold_start_s"], abs_tol=1e-9)
    assert math.isclose(runs[1]["ttft_s"] - runs[0]["ttft_s"], 0.05, abs_tol=1e-9)
