"""The issue's must-show, live: one `python -m experiments.serve` run whose cold starts come from every tier of the
hierarchy (dram, nvme, sata and the cloud), each load taking the time the configured bandwidths say.

The policy is `seed_tiered` (tier-aware placement: a cold start reads the fastest tier holding the model), on one
node whose GPU budget holds one tiny engine, with its rules steered into all four tiers:

- every cloud download is cached to SATA (`download_tier: sata`);
- SATA -> NVMe on the tick, only while NVMe has room for it (its capacity holds one tiny model);
- an instance stopped under GPU pressure is demoted to DRAM (`demote_tier: dram`); one stopped by the keep-alive
  is not demoted.

So: a (cloud; cached to SATA, promoted to NVMe, stopped idle) -> a (nvme) -> b (cloud; a stopped under pressure
and demoted to DRAM; b cached to SATA, NVMe full; stopped idle) -> b (sata) -> a (dram; b stopped under pressure
and demoted to DRAM) -> b (dram).

The emulated devices are slow enough for the paced phases to dominate the noise of a busy CPU (10 MB models):
nvme 20 MB/s (0.5 s), sata 8 MB/s (1.25 s), cloud 4 streams x 1 MB/s (2.5 s). (At 40 MB/s the NVMe read, 0.25 s,
is within reach of an unpaced DRAM read on a loaded machine: 0.22 s was seen.) The assertions compare only
those paced phases with bytes / bandwidth; CPU-bound phases (engine start, the CPU part of a read) are bounded
loosely.

Live versus the simulator's model (`core.loadtime`): the simulator's cold start from the cloud is a fetch hop
(cloud -> host at streams x per-stream bandwidth, after the store's first-byte latency) and a copy host -> GPU;
live, the agent fetches into host memory (the same hop, `fetch_s`'s first part) and the CPU engine then reads
that host copy unpaced (there is no GPU, so no `to_gpu` hop; the read shows up in `fetch_s` too). From a local
tier, the simulator's fetch hop is `tier read bandwidth x loader efficiency` after the tier latency; live, the
engine itself reads the tier through the pacer at the tier's read bandwidth (the loader's efficiency is 1), plus
its CPU work on the bytes (safetensors parsing, bf16 -> float32). From DRAM the simulator has no fetch hop at all
(only host -> GPU); live, the engine's read of the DRAM tier is unpaced but not free (CPU copy + conversion).
Engine start (process, imports, model build) is a fixed engine-init time in the model; live it is CPU-bound and
varies with the machine's load. Caching copies (tier_moves) are the simulator's copy hops: min(source read,
destination write) after the source's latency; a copy out of an instance's host copy is paced by the
destination's write alone.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

for _dep in ("torch", "safetensors", "tokenizers", "uvicorn", "openai"):
    pytest.importorskip(_dep)

from tests.live_serve.serving import Served, checkpoint_cache, serve  # noqa: E402

MB = 1e6
NVME_MBPS, SATA_MBPS, CLOUD_STREAMS, CLOUD_STREAM_MBPS = 20.0, 8.0, 4, 1.0
CLOUD_LATENCY_S, LOCAL_LATENCY_S = 0.02, 0.0001
KEEP_ALIVE_S = 4.0
TOLERANCE = 0.20  # paced phases: within 20% of bytes / bandwidth (+ latency)
# an engine's read of a tier is the paced read plus its CPU work on the bytes; bounded by what the same engine
# needs to read the unpaced DRAM tier (measured in the run), with this floor for a busy machine
CPU_READ_FLOOR_S = 0.15

OVERRIDES = [
    "nodes=1",
    "~catalog.small-a",  # tiny-a (seed 0) and tiny-b (seed 1): ~10 MB each on disk, bf16
    # GPU budget: one tiny float32 engine (20 MB), not two
    "node.memory_budget=30M", "node.max_num_seqs=4",
    # dram: room for every model (demotions never need an eviction); nvme: one tiny model (so SATA -> NVMe
    # promotes only the first); sata: everything. Tier space is the checkpoint's size on disk (~10 MB, bf16),
    # so 15M holds one model, not two; memory is the engine's (float32: 20 MB).
    "tiers.dram={capacity:64M,read_MBps:null,write_MBps:null}",
    f"tiers.nvme={{capacity:15M,read_MBps:{NVME_MBPS},write_MBps:{NVME_MBPS},latency_ms:0.1}}",
    f"tiers.sata={{capacity:1G,read_MBps:{SATA_MBPS},write_MBps:{SATA_MBPS},latency_ms:0.1}}",
    f"cloud={{streams:{CLOUD_STREAMS},stream_MBps:{CLOUD_STREAM_MBPS},latency_ms:{CLOUD_LATENCY_S * 1e3:g}}}",
    # sequential phases: the engine serves only once its weights are resident (cold start = fetch + engine)
    "engine.progressive=false",
    "policy.caching.download_tier=sata", "policy.caching.demote_tier=dram",
    "policy.caching.promote_rate_per_hour=1e9",  # no NVMe -> GPU pre-starts: every load is a request's
    "policy.caching.tick_s=0.5", "policy.autoscaling.tick_s=0.5",
    f"policy.autoscaling.keep_alive_s={KEEP_ALIVE_S}",
]


def weights_bytes(seed: int) -> int:
    """Bytes of the checkpoint's weights file (what an engine reads from its tier)."""
    return (checkpoint_cache() / f"tiny-s{seed}-bfloat16" / "model.safetensors").stat().st_size


def checkpoint_bytes(seed: int) -> int:
    """Bytes of every file of the checkpoint (what a cloud fetch downloads)."""
    return sum(f.stat().st_size for f in (checkpoint_cache() / f"tiny-s{seed}-bfloat16").iterdir() if f.is_file())


def ask(s: Served, model: str) -> None:
    """One completion through the gateway (a cold start when no instance of `model` is running)."""
    out = s.client().completions.create(model=model, prompt="tier", max_tokens=2)
    assert out.choices[0].text is not None


def done(s: Served, kind: str, model: str, tier: str, detail: str | None = None) -> bool:
    """An action of `kind` on `model` into / from `tier` was carried out."""
    a = s.actions()
    rows = a[(a["kind"] == kind) & (a["model"] == model) & (a["tier"] == tier) & (a["outcome"] == "done")]
    if detail is not None:
        rows = rows[rows["detail"] == detail]
    return not rows.empty


def idle_stopped(s: Served, model: str, count: int) -> bool:
    """At least `count` instances of `model` were stopped by the keep-alive (never demoted)."""
    a = s.actions()
    rows = a[(a["kind"] == "stop_instance") & (a["model"] == model) & (a["detail"] == "keep_alive")
             & (a["outcome"] == "done")]
    return len(rows) >= count


def expected_read_s(tier: str, nbytes: float) -> float:
    """The paced part of an engine's read of `tier` (0 for the unpaced DRAM)."""
    bw = {"nvme": NVME_MBPS, "sata": SATA_MBPS}.get(tier)
    return 0.0 if bw is None else LOCAL_LATENCY_S + nbytes / (bw * MB)


def test_cold_starts_from_every_tier_take_the_paced_times(tmp_path: Path) -> None:
    """summary.json's `cold_start_by_tier` has dram, nvme, sata and cloud; every paced phase (cloud fetch, tier
    read, tier copy) is within 20% of bytes / bandwidth (+ latency); the mean fetch times are ordered
    dram < nvme < sata < cloud as the bandwidths imply; each cold start is its fetch plus its engine start."""
    with serve(tmp_path, OVERRIDES, policy="seed_tiered") as s:
        ask(s, "tiny-a")  # cloud; cached to sata
        s.wait_for("tiny-a promoted SATA -> NVMe", lambda: done(s, "copy", "tiny-a", "nvme", "promote"), 60)
        s.wait_for("tiny-a stopped by the keep-alive", lambda: idle_stopped(s, "tiny-a", 1), 60)
        ask(s, "tiny-a")  # nvme
        ask(s, "tiny-b")  # cloud (tiny-a: pressure stop, demoted to DRAM); cached to sata; NVMe is full
        s.wait_for("tiny-b cached to SATA", lambda: done(s, "copy", "tiny-b", "sata", "cache"), 60)
        s.wait_for("tiny-b stopped by the keep-alive", lambda: idle_stopped(s, "tiny-b", 1), 60)
        ask(s, "tiny-b")  # sata
        ask(s, "tiny-a")  # dram: tiny-a was demoted there when tiny-b came; now tiny-b is demoted there
        ask(s, "tiny-b")  # dram
        # the engines' own reads are added to the cold rows once each engine reports them
        s.wait_for("the engines' reads in every cold row",
                   lambda: s.records().pipe(lambda d: d.loc[d["cold_start"], "fetch_s"].notna().all()), 30)
        summary = s.stop()

    df = s.table("records")
    moves = s.table("tier_moves")
    actions = s.table("actions")
    assert (df["outcome"] == "completed").all(), df[["model", "outcome", "reason"]]
    cold = df[df["cold_start"]].sort_values("request_id").reset_index(drop=True)
    by_tier = summary["cold_start_by_tier"]
    order = list(zip(cold["model"], cold["source_tier"], strict=True))
    assert {"dram", "nvme", "sata", "cloud"} <= set(by_tier), (
        f"cold starts by tier {by_tier}; sources in order {order}\nactions:\n{actions.to_string()}")
    # each cold start read the fastest tier holding its model, as the scripted workload placed them
    assert order == [("tiny-a", "cloud"), ("tiny-a", "nvme"), ("tiny-b", "cloud"), ("tiny-b", "sata"),
                     ("tiny-a", "dram"), ("tiny-b", "dram")], f"{order}\nactions:\n{actions.to_string()}"

    # the engine reads the weights file; a cloud fetch downloads the whole checkpoint (tokenizer included)
    nbytes = {"tiny-a": weights_bytes(0), "tiny-b": weights_bytes(1)}
    fetched = {"tiny-a": checkpoint_bytes(0), "tiny-b": checkpoint_bytes(1)}
    cloud_bw = CLOUD_STREAMS * CLOUD_STREAM_MBPS * MB
    dram_reads = cold.loc[cold["source_tier"] == "dram", "fetch_s"]
    cpu_read_s = max(CPU_READ_FLOOR_S, float(dram_reads.max()))  # an unpaced read: the CPU part of any read

    table = []
    for tier in ("dram", "nvme", "sata", "cloud"):
        rows = cold[cold["source_tier"] == tier]
        expect = [(CLOUD_LATENCY_S + fetched[m] / cloud_bw) if tier == "cloud" else expected_read_s(tier, nbytes[m])
                  for m in rows["model"]]
        assert by_tier[tier]["count"] == len(rows), (tier, by_tier[tier], len(rows))
        assert by_tier[tier]["mean_s"] == pytest.approx(rows["cold_start_s"].mean()), (tier, by_tier[tier])
        table.append((tier, len(rows), rows["fetch_s"].mean(), sum(expect) / len(expect),
                      rows["engine_init_s"].mean(), rows["cold_start_s"].mean()))
        for (_, row), paced in zip(rows.iterrows(), expect, strict=True):
            what = f"{row['model']} cold start from {tier} (request {row['request_id']})"
            # the paced part within 20%; above it at most the CPU's share of a read (measured from DRAM)
            assert row["fetch_s"] >= paced * (1 - TOLERANCE), f"{what}: fetch {row['fetch_s']:.3f} s < {paced:.3f} s"
            assert row["fetch_s"] <= paced * (1 + TOLERANCE) + cpu_read_s, (
                f"{what}: fetch {row['fetch_s']:.3f} s > {paced:.3f} s + 20% + CPU read {cpu_read_s:.3f} s")
            # cold start = fetch + engine start (+ the gateway's and agent's own work, bounded loosely)
            assert row["cold_start_s"] >= row["fetch_s"], f"{what}: cold start shorter than its fetch"
            parts = row["fetch_s"] + row["engine_init_s"]
            assert math.isclose(row["cold_start_s"], parts, rel_tol=0.25, abs_tol=1.0), (
                f"{what}: cold start {row['cold_start_s']:.3f} s, fetch + engine init {parts:.3f} s")

    # the paced hops of the caching copies: min(source read, destination write) after the source latency;
    # from an instance's host copy only the destination write is paced
    bw = {"dram": math.inf, "nvme": NVME_MBPS * MB, "sata": SATA_MBPS * MB, "host": math.inf}
    lat = {"dram": 0.0, "nvme": LOCAL_LATENCY_S, "sata": LOCAL_LATENCY_S, "host": 0.0}
    copies = moves[moves["kind"] == "copy"]
    hops = set(zip(copies["from_tier"], copies["to_tier"], strict=True))
    assert {("host", "sata"), ("sata", "nvme"), ("nvme", "dram"), ("sata", "dram")} <= hops, moves.to_string()
    for _, m in moves.iterrows():
        if m["from_tier"] == "cloud":  # a download into a tier (the instance's host copy was gone)
            rate, latency = min(cloud_bw, bw[m["to_tier"]]), CLOUD_LATENCY_S
        else:
            rate, latency = min(bw[m["from_tier"]], bw[m["to_tier"]]), lat[m["from_tier"]]
        assert math.isfinite(rate), m.to_dict()  # every move here has a paced side
        paced = latency + m["bytes"] / rate
        assert m["duration_s"] == pytest.approx(paced, rel=TOLERANCE), (
            f"copy {m['model']} {m['from_tier']} -> {m['to_tier']}: {m['duration_s']:.3f} s, "
            f"{m['bytes']} B at {rate / MB:.0f} MB/s = {paced:.3f} s")

    print("\ntier   n  mean fetch_s  bytes/bw (+lat)  mean engine_init_s  mean cold_start_s")
    for tier, n, fetch, paced, init, total in table:
        print(f"{tier:6s} {n:2d} {fetch:12.3f} {paced:16.3f} {init:19.3f} {total:18.3f}")
    print("tier moves: " + "; ".join(f"{r.model} {r.from_tier}->{r.to_tier} {r.duration_s:.3f} s"
                                     for r in moves.itertuples()))

    # as the bandwidths imply: the faster the tier, the shorter its fetch. (Not asserted on the whole cold start:
    # engine start, CPU-bound, varied from 1.0 to 3.4 s between runs on the shared machine, more than the paced
    # gaps between tiers.)
    means = pd.Series({tier: cold.loc[cold["source_tier"] == tier, "fetch_s"].mean()
                       for tier in ("dram", "nvme", "sata", "cloud")})
    assert means["dram"] < means["nvme"] < means["sata"] < means["cloud"], means.to_dict()
