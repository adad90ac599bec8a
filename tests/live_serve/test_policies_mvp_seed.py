"""The `mvp` and `seed_tiered` policy bundles, live: each promise the policy makes is checked on a real
`python -m experiments.serve` (gateway, agents, CPU engines on loopback) driven by the `openai` client, from
what the gateway records (GET /admin/records, /admin/actions, /metrics) and what it writes at the stop
(instances / tier_moves / actions parquet, summary.json).

mvp: round-robin placement, every cold start from the cloud, nothing cached below the GPU, keep-alive scale to
zero, LRU stops of idle instances under GPU-memory pressure.
seed_tiered: tier-aware placement, every download cached to SATA, LRU stop + demotion to NVMe under GPU pressure
(a demoted model's next cold start reads NVMe), and queue-threshold scale-up.

A tiny model is ~10 MB on disk and 20 MB in a float32 engine; `node.memory_budget=45M` (47.2 MB) holds two tiny
engines, not three.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pandas as pd
import pytest

for _dep in ("torch", "safetensors", "tokenizers", "uvicorn", "openai"):
    pytest.importorskip(_dep)

from tests.live_serve.serving import Served, serve  # noqa: E402

TWO_MODELS = ["~catalog.small-a"]  # tiny-a (seed 0), tiny-b (seed 1)
THREE_MODELS = [*TWO_MODELS, "+catalog.tiny-c={preset:tiny,seed:3}"]
TWO_ENGINES = "node.memory_budget=45M"
LOCAL_TIERS = ("dram", "nvme", "sata")


def ask(s: Served, model: str, max_tokens: int = 2) -> None:
    """One completion through the gateway with the openai client."""
    out = s.client().completions.create(model=model, prompt="policy", max_tokens=max_tokens)
    assert out.choices[0].text is not None, f"{model}: no answer"


def cold_rows(s: Served) -> pd.DataFrame:
    """The completed cold starts so far, in arrival order."""
    df = s.records().sort_values("request_id").reset_index(drop=True)
    assert (df["outcome"] == "completed").all(), df[["model", "outcome", "reason"]].to_string()
    return df[df["cold_start"]].reset_index(drop=True)


def done_actions(s: Served, kind: str, detail: str | None = None) -> pd.DataFrame:
    """Actions of `kind` (and `detail`: reason or copy kind) carried out so far."""
    a = s.actions()
    rows = a[(a["kind"] == kind) & (a["outcome"] == "done")]
    return rows if detail is None else rows[rows["detail"] == detail]


def ready_instances(s: Served) -> float:
    """Ready instances, as /metrics reports them."""
    return s.metric('tierlab_instances{status="ready"}')


# --------------------------------------------------------------------------- mvp


def test_mvp_round_robin_from_the_cloud_and_scale_to_zero(tmp_path: Path) -> None:
    """mvp on 2 nodes: cold starts alternate nodes; every cold start reads the cloud, even a model loaded before
    (nothing is kept in a local tier: no tier copy, no copy action); an idle instance is stopped after the
    keep-alive (instances.parquet `stopped` / keep_alive, `/metrics` ready instances 0)."""
    keep_alive_s = 2.0
    overrides = [*TWO_MODELS, "nodes=2", f"policy.autoscaling.keep_alive_s={keep_alive_s}",
                 "policy.autoscaling.tick_s=0.5"]
    with serve(tmp_path, overrides, policy="mvp") as s:
        ask(s, "tiny-a")
        ask(s, "tiny-b")
        s.wait_for("scale to zero after the keep-alive", lambda: ready_instances(s) == 0, 30)
        ask(s, "tiny-a")  # loaded before: from the cloud again
        s.wait_for("scale to zero again", lambda: ready_instances(s) == 0, 30)
        assert ready_instances(s) == 0
        cold = cold_rows(s)
        s.stop()

    assert list(cold["model"]) == ["tiny-a", "tiny-b", "tiny-a"], cold[["model", "node"]].to_string()
    nodes = list(cold["node"])
    assert set(nodes) == {"n0", "n1"} and all(a != b for a, b in itertools.pairwise(nodes)), (
        f"round robin: consecutive cold starts must go to different nodes, got {nodes}")
    assert list(cold["source_tier"]) == ["cloud"] * 3, (
        f"mvp loads every cold start from the cloud, got {list(cold['source_tier'])}")
    assert (cold["fetch_s"] > 0).all()

    moves = s.table("tier_moves")
    into_tiers = moves[moves["to_tier"].isin(LOCAL_TIERS)]
    assert into_tiers.empty, f"mvp keeps nothing below the GPU, but tier_moves has:\n{into_tiers.to_string()}"
    actions = s.table("actions")
    assert not (actions["kind"].isin(["copy", "evict"])).any(), actions.to_string()

    instances = s.table("instances")
    stopped = instances[instances["event"] == "stopped"]
    assert len(stopped) == 3 and (stopped["reason"] == "keep_alive").all(), (
        f"each of the 3 instances is stopped by the keep-alive:\n{stopped.to_string()}")
    assert s.summary["actions"] == {"stop_instance": {"done": 3}}, s.summary["actions"]
    assert s.summary["cold_start_by_tier"]["cloud"]["count"] == 3
    assert set(s.summary["cold_start_by_tier"]) == {"cloud"}


def test_mvp_stops_the_lru_idle_instance_under_gpu_pressure(tmp_path: Path) -> None:
    """mvp on 1 node whose memory holds 2 tiny engines, 3 models: tiny-a, tiny-b, tiny-a again (warm), then
    tiny-c must stop the least recently used idle instance, tiny-b's, not tiny-a's; tiny-b's next request
    stops tiny-a (now the LRU) and loads tiny-b from the cloud again (nothing was kept)."""
    overrides = [*THREE_MODELS, "nodes=1", TWO_ENGINES, "policy.autoscaling.keep_alive_s=600"]
    with serve(tmp_path, overrides, policy="mvp") as s:
        ask(s, "tiny-a")
        ask(s, "tiny-b")
        ask(s, "tiny-a")  # warm: tiny-a is now the most recently used
        ask(s, "tiny-c")  # no room for a third engine: the LRU idle one goes
        stops = done_actions(s, "stop_instance", "gpu_pressure")
        assert list(stops["model"]) == ["tiny-b"], f"the LRU idle instance is tiny-b's:\n{s.actions().to_string()}"
        ask(s, "tiny-b")
        stops = done_actions(s, "stop_instance", "gpu_pressure")
        assert list(stops["model"]) == ["tiny-b", "tiny-a"], s.actions().to_string()
        assert (stops["tier"] == "").all(), f"mvp demotes nothing:\n{stops.to_string()}"
        assert ready_instances(s) == 2
        cold = cold_rows(s)
        s.stop()

    assert list(cold["model"]) == ["tiny-a", "tiny-b", "tiny-c", "tiny-b"]
    assert list(cold["source_tier"]) == ["cloud"] * 4, list(cold["source_tier"])
    instances = s.table("instances")
    stopped = instances[(instances["event"] == "stopped") & (instances["reason"] == "gpu_pressure")]
    assert list(stopped["model"]) == ["tiny-b", "tiny-a"], instances.to_string()
    assert s.table("tier_moves")["to_tier"].isin(LOCAL_TIERS).sum() == 0


# --------------------------------------------------------------------------- seed_tiered


def test_seed_tiered_caches_to_sata_demotes_to_nvme_and_reloads_from_nvme(tmp_path: Path) -> None:
    """seed_tiered on 1 node whose memory holds 2 tiny engines, 3 models in turn: the first loads come from the
    cloud and are copied to SATA; the third model stops the LRU idle instance (tiny-a's) WITH demotion to NVMe
    (a copy into nvme in tier_moves); tiny-a's next cold start reads NVMe, the fastest tier holding it.

    The policy's tick (promotion, SATA -> NVMe) is set beyond the test, so that NVMe gets tiny-a by demotion only.
    """
    overrides = [*THREE_MODELS, "nodes=1", TWO_ENGINES, "policy.autoscaling.keep_alive_s=600",
                 "policy.autoscaling.tick_s=600", "policy.caching.tick_s=600"]
    with serve(tmp_path, overrides, policy="seed_tiered") as s:
        for model in ("tiny-a", "tiny-b"):
            ask(s, model)
            s.wait_for(f"{model} cached to SATA", lambda m=model: (done_actions(s, "copy", "cache")
                                                                   .query("model == @m and tier == 'sata'")
                                                                   .shape[0]), 30)
        ask(s, "tiny-c")  # GPU full: tiny-a (LRU) stopped and demoted to NVMe
        stops = done_actions(s, "stop_instance", "gpu_pressure")
        assert list(stops["model"]) == ["tiny-a"], s.actions().to_string()
        assert list(stops["tier"]) == ["nvme"], f"the LRU stop demotes to nvme:\n{stops.to_string()}"
        demote = done_actions(s, "copy", "demote")
        assert list(zip(demote["model"], demote["tier"], strict=True)) == [("tiny-a", "nvme")], demote.to_string()
        ask(s, "tiny-a")  # from NVMe (tiny-b, now the LRU, is stopped and demoted)
        cold = cold_rows(s)
        s.stop()

    assert list(cold["model"]) == ["tiny-a", "tiny-b", "tiny-c", "tiny-a"]
    assert list(cold["source_tier"]) == ["cloud", "cloud", "cloud", "nvme"], (
        f"first loads from the cloud, the demoted tiny-a from nvme; got {list(cold['source_tier'])}")
    moves = s.table("tier_moves")
    to_sata = moves[moves["to_tier"] == "sata"]
    assert set(to_sata["model"]) == {"tiny-a", "tiny-b", "tiny-c"}, moves.to_string()
    to_nvme = moves[(moves["to_tier"] == "nvme") & (moves["model"] == "tiny-a")]
    assert len(to_nvme) == 1 and to_nvme["from_tier"].iloc[0] in ("sata", "host"), moves.to_string()
    actions = s.table("actions")
    stops = actions[(actions["kind"] == "stop_instance") & (actions["detail"] == "gpu_pressure")]
    assert list(zip(stops["model"], stops["tier"], stops["outcome"], strict=True)) == [
        ("tiny-a", "nvme", "done"), ("tiny-b", "nvme", "done")], stops.to_string()
    assert s.summary["cold_start_by_tier"]["nvme"]["count"] == 1


async def _burst(s: Served, model: str, n: int, max_tokens: int) -> None:
    """`n` concurrent completions of `model` (async openai client)."""
    client = s.async_client()
    try:
        outs = await asyncio.gather(*(client.completions.create(model=model, prompt=f"burst {i}",
                                                                max_tokens=max_tokens) for i in range(n)))
    finally:
        await client.close()
    assert all(o.choices[0].text is not None for o in outs)


def test_seed_tiered_scales_up_past_the_queue_threshold(tmp_path: Path) -> None:
    """keep_alive's scale-up rule: one instance takes up to max_num_seqs x (1 + scale_up_queue) requests
    (2 x 1.5 = 3 here); 3 concurrent requests to tiny-a share one instance, 6 concurrent requests to tiny-b
    start a second instance of it."""
    overrides = [*TWO_MODELS, "nodes=1", "node.memory_budget=100M", "node.max_num_seqs=2",
                 "policy.autoscaling.scale_up_queue=0.5", "policy.autoscaling.keep_alive_s=600"]
    with serve(tmp_path, overrides, policy="seed_tiered") as s:
        asyncio.run(_burst(s, "tiny-a", 3, 8))
        asyncio.run(_burst(s, "tiny-b", 6, 8))
        df = s.records()
        s.stop()

    assert (df["outcome"] == "completed").all(), df[["model", "outcome", "reason"]].to_string()
    per_model = df.groupby("model")["instance"].nunique()
    assert per_model["tiny-a"] == 1, f"3 requests fit one instance (2 x (1 + 0.5)):\n{df.to_string()}"
    assert per_model["tiny-b"] >= 2, f"6 concurrent requests must start a second instance:\n{df.to_string()}"
    instances = s.table("instances")
    loads = instances[(instances["event"] == "loading") & (instances["model"] == "tiny-b")]
    assert len(loads) >= 2, instances.to_string()
