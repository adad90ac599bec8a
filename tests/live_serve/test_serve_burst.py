"""The reported burst, live, with the default serve config: 40 concurrent streaming chat requests to small-a are
batched by the engine, and the queue beyond the batch limit starts a second instance; every request completes.

The report: one `small-a` instance served a burst of 40 one sequence at a time (p50 TTFT 10 s, the last after
20 s) and no second instance started, because the CPU engine did not batch while the gateway's policy believed it
batches 8. Now the engine batches (`node.max_num_seqs`, default 8) and the gateway counts the requests beyond an
instance's batch limit as waiting, so `KeepAlive.scale_up_queue` (4 per instance) is passed and placement starts
another instance (the default node budget holds one small-a per node: at most 2 here).

As in the report, one request is served first (an instance of small-a is up and warm when the burst arrives), so
the second instance is a scale-up of a running deployment, not part of the first cold start. The burst is sent by
`scripts/burst.py` (the load generator documented in the README). Evidence of batching: the engines' own
counters (GET /stats, unauthenticated: `max_batch_size`, `mean_batch_size`; the engines are the agents' child
processes, their port on their command line) and the gateway's records (requests on one instance streaming at
the same time). Only port, output dir, checkpoint cache and progress bars are overridden (`serving.serve`).
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest

for _dep in ("torch", "safetensors", "tokenizers", "uvicorn", "openai"):
    pytest.importorskip(_dep)

from scripts.burst import admin_rows, burst, summarize  # noqa: E402
from tests.live_serve.serving import Served, processes, serve  # noqa: E402

MODEL = "small-a"
N = 40
MAX_TOKENS = 16  # shorter than the script's default: the same batching and queueing, less CPU
BATCH_LIMIT = 8  # serve.yaml's node.max_num_seqs


def engine_ports(served: Served) -> dict[int, int]:
    """pid -> --port of each engine process of this run's agents (the agents' children, per /proc)."""
    agent_pids = {int(a["pid"]) for a in served.info["agents"]}
    return {p.pid: int(p.argv[p.argv.index("--port") + 1]) for p in processes()
            if p.ppid in agent_pids and "--port" in p.argv and "live.engines.cpu_server" in p.argv}


def engine_stats(served: Served) -> list[dict[str, Any]]:
    """GET /stats of every engine of this run (those that answer)."""
    out = []
    for port in engine_ports(served).values():
        try:
            out.append(httpx.get(f"http://127.0.0.1:{port}/stats", timeout=10).json())
        except (httpx.HTTPError, ValueError):
            continue
    return out


def max_concurrent_streams(rows: pd.DataFrame) -> int:
    """The most requests streaming at one moment (between their first token and their end) on one instance."""
    events = sorted([(r.arrival_s + r.ttft_s, 1) for r in rows.itertuples()]
                    + [(r.arrival_s + r.e2e_s, -1) for r in rows.itertuples()], key=lambda e: (e[0], e[1]))
    best = now = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return best


def test_burst_is_batched_and_scales_up(tmp_path: Path) -> None:
    with serve(tmp_path, []) as served:
        # warm-up: one request, one instance of small-a up when the burst arrives
        warm = served.client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=4)
        assert warm.choices[0].message.content
        before = served.records()
        assert before["instance"].nunique() == 1
        warm_instance = before["instance"].iloc[0]

        results, total_s = asyncio.run(burst(served.info, MODEL, N, MAX_TOKENS, "Tell me a story.", 120.0))
        summary = summarize(results, total_s, admin_rows(served.url, served.info["admin_token"]), MODEL, MAX_TOKENS)
        stats = [s for s in engine_stats(served) if s.get("model") == MODEL]
        records = served.records()
        summary_json = served.stop()
        instances = served.table("instances")

    print(f"\n{N} concurrent requests to {MODEL} (default config, warm instance first): "
          f"p50 TTFT {summary['ttft_p50_s']:.2f} s, p90 {summary['ttft_p90_s']:.2f} s, total {total_s:.2f} s; "
          f"requests per instance {summary['requests_per_instance']}")
    for s in stats:
        print(f"  engine {s['model']}: steps {s['steps']}, mean batch {s['mean_batch_size']:.2f}, "
              f"max batch {s['max_batch_size']}, requests {s['requests']}")

    # every request completes, whole (ignore_eos: max_tokens tokens each), and has its gateway row
    failed = [r for r in summary["results"] if not (r["status"] == 200 and r["finished"] and not r["error"])]
    assert not failed, failed[:3]
    assert all(r.completion_tokens == MAX_TOKENS for r in results), [r.completion_tokens for r in results]
    ids = {r.request_id for r in results}
    burst_rows = records[records["request_id"].isin(ids)]
    assert len(burst_rows) == N and (burst_rows["outcome"] == "completed").all()
    assert (burst_rows["output_tokens"] == MAX_TOKENS).all(), burst_rows["output_tokens"].tolist()
    assert summary_json["completed"] == N + 1 and summary_json["failed"] == 0 and summary_json["rejected"] == 0

    # scale-up: a second instance of small-a served part of the burst ...
    served_by = burst_rows.groupby("instance").size()
    assert len(served_by) >= 2, f"one instance served the whole burst: {served_by.to_dict()}"
    assert warm_instance in served_by.index
    # ... started during the burst (placement's queue threshold; the keep-alive tick never starts instances)
    loads = instances[(instances["model"] == MODEL) & (instances["event"] == "loading")]
    burst_start = burst_rows["arrival_s"].min()
    new = loads[loads["instance"] != warm_instance]
    assert len(new) >= 1 and (new["time_s"] >= burst_start - 1e-6).all(), loads
    assert (new["time_s"] <= burst_rows["arrival_s"].max() + 1.0).all(), (loads, burst_start)
    assert set(new["instance"]) <= set(served_by.index)

    # batching: the engines stepped several sequences at once ...
    assert stats, "no small-a engine answered GET /stats"
    assert max(s["max_batch_size"] for s in stats) > 1, stats
    assert all(s["max_batch_size"] <= BATCH_LIMIT for s in stats), stats
    assert any(s["mean_batch_size"] is not None and s["mean_batch_size"] > 1 for s in stats), stats
    # ... and the gateway saw requests on one instance stream at the same time
    overlap = {inst: max_concurrent_streams(rows) for inst, rows in burst_rows.groupby("instance")}
    print(f"  most requests streaming at once, per instance: {overlap}")
    assert max(overlap.values()) > 1, overlap
    assert math.isfinite(summary["ttft_p50_s"])
