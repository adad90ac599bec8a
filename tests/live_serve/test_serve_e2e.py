"""`python -m experiments.serve` end to end: a gateway process, 2 agent processes and CPU engine processes on
loopback, with serve.yaml's paced tier hierarchy, driven by the real `openai` client, then
`python -m experiments.replay` against it, then Ctrl-C. Also: the console scripts reject a bad config."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

for _dep in ("torch", "safetensors", "tokenizers", "uvicorn", "openai"):
    pytest.importorskip(_dep)
import pandas as pd  # noqa: E402

from core.records import INSTANCE_SCHEMA, MOVE_SCHEMA, REQUEST_SCHEMA  # noqa: E402
from experiments.simulate import run as simulate_run  # noqa: E402
from tests.conftest import config  # noqa: E402
from tests.live_serve.serving import Served, env, processes, serve  # noqa: E402

KEEP_ALIVE_S = 3.0


def _processes_mentioning(*needles: str) -> list[int]:
    """Pids whose command line mentions any needle (engines carry their tier path in --model-dir)."""
    return [p.pid for p in processes() if any(n in p.cmdline for n in needles)]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    overrides = ["nodes=2", "~catalog.small-a", f"policy.autoscaling.keep_alive_s={KEEP_ALIVE_S}",
                 "policy.autoscaling.tick_s=0.5"]
    with serve(tmp_path_factory.mktemp("serve"), overrides, policy="seed_tiered") as s:
        yield s


def assert_cold_starts_by_tier(summary: dict, df: pd.DataFrame) -> None:
    """summary.json's per-source-tier cold starts (the simulator's `cold_start_by_tier`) match the records."""
    cold = df[df["cold_start"] & (df["outcome"] == "completed")]
    assert set(summary["cold_start_by_tier"]) == set(cold["source_tier"])
    for tier, stats in summary["cold_start_by_tier"].items():
        rows = cold[cold["source_tier"] == tier]
        assert stats["count"] == len(rows)
        assert stats["mean_s"] == pytest.approx(rows["cold_start_s"].mean(), nan_ok=True)


def _ready_instances(s: Served) -> int:
    return int(s.metric('tierlab_instances{status="ready"}'))


def test_cold_from_cloud_warm_then_from_local_tier(served: Served) -> None:
    s = served
    assert (s.out_dir / "serve.json").stat().st_mode & 0o077 == 0  # it holds API keys
    client = s.client()
    assert sorted(m.id for m in client.models.list()) == ["tiny-a", "tiny-b"]

    first = client.chat.completions.create(model="tiny-a", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert first.usage is not None and first.usage.completion_tokens >= 1
    chunks = list(client.completions.create(model="tiny-a", prompt="warm", max_tokens=4, stream=True))
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")

    # idle past the keep-alive: the policy stops the instance; its weights stay in a local tier
    deadline = time.monotonic() + 30
    while _ready_instances(s) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _ready_instances(s) == 0, "the keep-alive policy did not stop the idle instance"
    third = list(client.chat.completions.create(model="tiny-a", messages=[{"role": "user", "content": "again"}],
                                                max_tokens=3, stream=True))
    assert third[-1].choices[0].finish_reason in ("length", "stop")
    other = client.completions.create(model="tiny-b", prompt="x", max_tokens=2)
    assert other.choices[0].text is not None

    # the engine's own read of its tier is added to a cold row once the engine reports it (GET /stats)
    deadline = time.monotonic() + 15
    df = s.records()
    while df.loc[df["cold_start"], "fetch_s"].isna().any() and time.monotonic() < deadline:
        time.sleep(0.2)
        df = s.records()
    assert list(df.columns) == list(REQUEST_SCHEMA)
    df = df.sort_values("request_id").reset_index(drop=True)
    assert list(df["outcome"]) == ["completed"] * 4
    assert list(df["model"]) == ["tiny-a", "tiny-a", "tiny-a", "tiny-b"]
    assert list(df["cold_start"]) == [True, False, True, True]
    assert df.loc[0, "source_tier"] == "cloud" and df.loc[1, "source_tier"] == "gpu"
    assert df.loc[2, "source_tier"] in ("nvme", "sata"), df.loc[2].to_dict()
    assert df.loc[3, "source_tier"] == "cloud"
    cold = df[df["cold_start"]]
    assert (cold["fetch_s"] > 0).all() and (cold["engine_init_s"] > 0).all() and (cold["cold_start_s"] > 0).all()
    assert (df["ttft_s"] > 0).all() and (df["e2e_s"] >= df["ttft_s"]).all()
    # a warm request skips the load: it is far faster than the cold one before it
    assert df.loc[1, "ttft_s"] < df.loc[0, "ttft_s"]


def test_a_stream_is_recorded_with_the_engines_token_count(served: Served) -> None:
    """A client that does not ask for the usage chunk never sees one, yet the gateway records the tokens the
    engine generated (it asks the engine for usage and drops the chunk), not the number of text events: a
    byte-level tokenizer may send several tokens as one event."""
    n = 24
    chunks = list(served.client().completions.create(model="tiny-b", prompt="count me", max_tokens=n, stream=True,
                                                     extra_body={"ignore_eos": True}))
    assert chunks and all(c.usage is None for c in chunks)
    rid = chunks[0].id
    text_events = sum(1 for c in chunks if c.choices and c.choices[0].text)
    rows = served.wait_for("the stream's record", lambda: [r for r in served.records().to_dict("records")
                                                          if r["model"] == "tiny-b" and r["output_tokens"] == n])
    assert rows and rows[-1]["outcome"] == "completed", (rid, text_events)


def test_replay_writes_records_and_the_simulators_summary_keys(served: Served, tmp_path: Path) -> None:
    out = tmp_path / "replay"
    argv = [sys.executable, "-m", "experiments.replay", f"serve_json={served.out_dir / 'serve.json'}",
            f"hydra.run.dir={out}", "workload=poisson", "workload.options.rate_per_s=2.0",
            "workload.window=[0,4]", "workload.max_requests=6", "replay.max_output_tokens=3", "progress=false"]
    done = subprocess.run(argv, capture_output=True, text=True, env=env(), cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "replayed" in done.stdout.splitlines()[-1]
    df = pd.read_parquet(out / "records.parquet")
    assert list(df.columns) == list(REQUEST_SCHEMA) and len(df) >= 1
    assert (df["outcome"] == "completed").all(), df[["outcome", "reason"]]
    assert set(df["model"]) <= {"tiny-a", "tiny-b"}
    assert (df["output_tokens"] == 3).all()  # ignore_eos: the trace's (clipped) lengths are generated
    assert (df["node"].isin(["n0", "n1"])).all()  # the gateway's rows were joined in
    summary = json.loads((out / "summary.json").read_text())
    sim = simulate_run(config("cluster=small", "models=small", "workload=poisson", "workload.max_requests=20",
                              "output.plots=false"), None).summary
    assert set(sim) - {"total_wall_s"} <= set(summary)
    assert summary["requests"] == len(df) and summary["completed"] == len(df)
    assert_cold_starts_by_tier(summary, df)


def test_ctrl_c_stops_everything_and_writes_the_records(served: Served) -> None:
    s = served
    needles = (str(s.out_dir), s.info["dram_root"])  # agents and engines name their tier dirs in their argv
    assert _processes_mentioning(str(s.out_dir)), "no engine was running from the run's tiers"
    s.proc.send_signal(signal.SIGINT)
    s.proc.wait(timeout=90)
    log = s.log.read_text()
    assert s.proc.returncode == 0, log[-3000:]
    assert "served" in log.splitlines()[-1]
    for a in s.info["agents"]:
        assert not Path(f"/proc/{a['pid']}").exists() or "Z" in Path(f"/proc/{a['pid']}/stat").read_text()
    assert _processes_mentioning(*needles) == []
    assert not Path(s.info["dram_root"]).exists()
    df = pd.read_parquet(s.out_dir / "records.parquet")
    assert len(df) >= 4 and list(df.columns) == list(REQUEST_SCHEMA)
    summary = json.loads((s.out_dir / "summary.json").read_text())
    assert summary["requests"] == len(df) and summary["policy"] == "seed_tiered"
    assert_cold_starts_by_tier(summary, df)
    assert summary["cold_start_by_tier"]["cloud"]["count"] >= 2  # tiny-a and tiny-b came from the cloud first
    moves = pd.read_parquet(s.out_dir / "tier_moves.parquet")
    assert list(moves.columns) == list(MOVE_SCHEMA) and summary["tier_moves"] == len(moves)
    # both models came down from the cloud through host memory, and seed_tiered cached them from there into a
    # local tier (as the simulator's staged copies: no second cloud read), on the gateway's clock
    fetched = moves[moves["from_tier"] == "host"]
    assert set(fetched["model"]) == {"tiny-a", "tiny-b"} and (fetched["bytes"] > 0).all()
    assert (fetched["time_s"] >= 0).all() and (fetched["end_s"] <= summary["wall_s"] + 60).all()
    instances = pd.read_parquet(s.out_dir / "instances.parquet")
    assert list(instances.columns) == list(INSTANCE_SCHEMA)
    assert {"loading", "ready", "stopped"} <= set(instances["event"])
