"""`python -m experiments.serve` end to end with the ServerlessLLM-style bundle (`policy=sllm`: StartupTime placement
over a DRAM LRU checkpoint pool, downloads kept on NVMe, optional token-based live migration) and the forecasting
bundle (`policy=predictive`: Holt forecast, prefetch into DRAM, pre-warmed instances), driven by the real `openai`
client against real agent and CPU engine processes on loopback.

What each test proves is in its docstring. The catalogs are tiny generated checkpoints (plus the small one where a
model must be slow to fetch from the cloud); timings are never asserted on CPU-bound phases, only orderings that the
policies decide, and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

for _dep in ("torch", "safetensors", "tokenizers", "uvicorn", "openai"):
    pytest.importorskip(_dep)
import httpx  # noqa: E402
import openai  # noqa: E402
import pandas as pd  # noqa: E402

from core.specs import TIER_RANK  # noqa: E402
from tests.live_serve.serving import Served, checkpoint_cache, processes, serve  # noqa: E402

TICK = ["policy.autoscaling.tick_s=0.25"]


# --------------------------------------------------------------------------- helpers


def _metric(s: Served, status: str) -> int:
    return int(s.metric(f'tierlab_instances{{status="{status}"}}'))


def _nothing_running(s: Served) -> bool:
    """No instance ready or loading, and every instance that served a request is gone (stopped or migrated away):
    a stop under way still holds its node's memory in the gateway's plan."""
    if _metric(s, "ready") or _metric(s, "loading"):
        return False
    rec, act = s.records(), s.actions()
    served = set(rec.loc[rec["outcome"] == "completed", "instance"]) | set(
        act.loc[(act["kind"] == "start_instance") & (act["outcome"] == "done"), "instance"])
    gone = set(act.loc[act["kind"].isin(["stop_instance", "migration"]) & (act["outcome"] == "done"), "instance"])
    return served <= gone


def _done(s: Served, kind: str, model: str, *, detail: str | None = None, tier: str | None = None,
          node: str | None = None, outcome: str = "done") -> Callable[[], list[dict[str, Any]] | None]:
    """A predicate for `Served.wait_for`: the action rows matching (as dicts), or None while there are none."""

    def rows() -> list[dict[str, Any]] | None:
        df = s.actions()
        m = (df["kind"] == kind) & (df["model"] == model) & (df["outcome"] == outcome)
        for col, value in (("detail", detail), ("tier", tier), ("node", node)):
            if value is not None:
                m &= df[col] == value
        return df[m].to_dict("records") if m.any() else None

    return rows


def _ask(s: Served, model: str, max_tokens: int = 2) -> None:
    r = s.client().completions.create(model=model, prompt="hello", max_tokens=max_tokens)
    assert r.usage is not None and r.usage.completion_tokens >= 1


def _holdings(actions: pd.DataFrame, node: str, model: str, t: float) -> set[str]:
    """The local tiers holding `model` on `node` at gateway time `t`, as the gateway's mirror had them: a copy
    counts from when it was done, an eviction from when it was issued (the mirror drops it at once)."""
    events: list[tuple[float, str, bool]] = []
    for r in actions[(actions["model"] == model) & (actions["node"] == node)].itertuples():
        if r.kind == "copy" and r.outcome == "done":
            events.append((r.time_s + r.duration_s, r.tier, True))
        elif r.kind == "evict" and r.outcome == "done":
            events.append((r.time_s, r.tier, False))
    held: set[str] = set()
    for when, tier, add in sorted(events):
        if when <= t:
            (held.add if add else held.discard)(tier)
    return held


def _local_dir_with_long_context(tmp: Path, seed: int) -> Path:
    """The cached tiny checkpoint of `seed`, copied with a 16k context, so that a long `ignore_eos` stream keeps a
    sequence in flight for many seconds (serve cannot pass the engine's --step-delay-s)."""
    src = checkpoint_cache() / f"tiny-s{seed}-bfloat16"
    if not (src / "model.safetensors").exists():  # generated once per cache by the harness's first run
        from live.checkpoint import generate_checkpoint

        generate_checkpoint(src, "tiny", seed, dtype="bfloat16")
    dst = tmp / f"tiny-long-s{seed}"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["max_position_embeddings"] = 16384
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    tok = dst / "tokenizer_config.json"
    if tok.exists():
        tc = json.loads(tok.read_text())
        tc["model_max_length"] = 16384
        tok.write_text(json.dumps(tc, indent=2))
    return dst


def _engine_pids(roots: tuple[str, ...], *needles: str) -> list[int]:
    """Pids of live engine processes whose command line has --model-dir, one of `roots` (this run's own tier
    dirs: other people's stacks may run the same models on nodes of the same names) and every needle."""
    return [p.pid for p in processes() if "--model-dir" in p.argv and any(r in p.cmdline for r in roots)
            and all(n in p.cmdline for n in needles)]


# --------------------------------------------------------------------------- 1. sllm: tiers and the LRU pool


def test_sllm_cold_starts_come_from_the_fastest_tier_holding_the_model(tmp_path: Path) -> None:
    """sllm on one node with a DRAM pool that holds two tiny checkpoints (24 MiB; 9.5 MiB each as stored):

    - a model's first load comes from the cloud, after which LocalityLru copies it to nvme (download tier) and dram
      (pool): copy actions done, and the agents' tier_moves show the copies into nvme and dram;
    - after keep-alive stops it, its next cold start comes from dram;
    - a third model pushes the least recently used one (the first) out of the DRAM pool (an LRU evict action), so the
      second still loads from dram while the first now loads from nvme;
    - sllm's promise holds for every cold start: its source tier is the fastest local tier that held the model on
      that node when it was placed (from the gateway's own copy / evict actions), else the cloud.
    """
    catalog = "+catalog={tiny-a:{preset:tiny,seed:0},tiny-b:{preset:tiny,seed:1},tiny-c:{preset:tiny,seed:3}}"
    overrides = ["nodes=1", "~catalog", catalog, "tiers.dram.capacity=24M",
                 "policy.autoscaling.keep_alive_s=1.0", *TICK]
    with serve(tmp_path, overrides, policy="sllm") as s:
        def cold(model: str, copies: tuple[str, ...] = ()) -> None:
            _ask(s, model)
            for tier in copies:
                s.wait_for(f"{model} cached in {tier}", _done(s, "copy", model, detail="cache", tier=tier))
            s.wait_for("keep-alive to stop every instance", lambda: _nothing_running(s), timeout_s=60)

        cold("tiny-a", ("nvme", "dram"))   # cloud, then kept on nvme and in the dram pool
        cold("tiny-a")                     # dram
        cold("tiny-b", ("nvme", "dram"))   # cloud; the pool now holds a and b
        cold("tiny-c", ("nvme", "dram"))   # cloud; the pool evicts a (least recently used) for c
        s.wait_for("tiny-a evicted from dram", _done(s, "evict", "tiny-a", tier="dram"))
        assert _done(s, "evict", "tiny-b", tier="dram")() is None, "the LRU pool evicted tiny-b, not the LRU tiny-a"
        cold("tiny-b")                     # dram: still in the pool
        cold("tiny-a")                     # nvme: out of the pool, still on the download tier
        df = s.records().sort_values("request_id").reset_index(drop=True)
        actions = s.actions()
        summary = s.stop()

    assert list(df["outcome"]) == ["completed"] * 6, df[["outcome", "reason"]]
    assert df["cold_start"].all() and set(df["node"]) == {"n0"}
    assert list(zip(df["model"], df["source_tier"], strict=True)) == [
        ("tiny-a", "cloud"), ("tiny-a", "dram"), ("tiny-b", "cloud"), ("tiny-c", "cloud"), ("tiny-b", "dram"),
        ("tiny-a", "nvme")]
    # the promise, checked against the gateway's own record of what each tier held when the request was placed
    for r in df.itertuples():
        held = _holdings(actions, r.node, r.model, r.arrival_s + r.queue_s)
        expected = min(held, key=TIER_RANK.__getitem__) if held else "cloud"
        assert r.source_tier == expected, (r.request_id, r.model, r.source_tier, held)
    assert summary["cold_start_by_tier"]["cloud"]["count"] == 3
    assert summary["cold_start_by_tier"]["dram"]["count"] == 2
    assert summary["cold_start_by_tier"]["nvme"]["count"] == 1
    moves = s.table("tier_moves")
    for model in ("tiny-a", "tiny-b", "tiny-c"):
        mine = moves[moves["model"] == model]
        # the download lands in host memory first: the agent keeps it on nvme and in the pool from there
        assert {"nvme", "dram"} <= set(mine["to_tier"]) and (mine["bytes"] > 0).all(), mine


# --------------------------------------------------------------------------- 2. sllm with live migration

MIGRATION_TOKENS = 4000  # ~12 s of decoding on an idle core: the stream outlives the destination's load


def _migration_overrides(long_dir: Path) -> list[str]:
    """Two nodes whose 200 MiB budget holds small-a (190 MiB in float32) or tiny-a (19 MiB) but not both, and a
    cloud of one 8 MB/s stream: StartupTime estimates small-a (99 MB on disk) from the cloud at ~14.5 s, from DRAM
    at 6 s, and moving a busy tiny-a to the other node at 6 s + 0.5 s, so a DRAM load plus a migration wins."""
    catalog = f"+catalog={{tiny-a:{{local_dir:'{long_dir}'}},small-a:{{preset:small,seed:2}}}}"
    return ["nodes=2", "~catalog", catalog, "node.memory_budget=200M", "cloud.streams=1", "cloud.stream_MBps=8",
            "policy.placement.migration=true", "policy.autoscaling.keep_alive_s=1.5", *TICK,
            "gateway.queue_timeout_s=150"]


def _stream_request() -> dict[str, Any]:
    """The long request both runs send. Greedy: a resumed sequence recomputes its KV cache in one prefill, whose
    float32 rounding differs from the step-by-step decode's, and over thousands of positions of a random model's flat
    distribution that flips sampled tokens now and then (seen at temperature 0.8); argmax is stable against it."""
    return {"model": "tiny-a", "prompt": "a cold start is", "max_tokens": MIGRATION_TOKENS, "temperature": 0.0,
            "seed": 7, "stream_options": {"include_usage": True}, "extra_body": {"ignore_eos": True}}


class _Stream(threading.Thread):
    """One streaming completion, read to the end on its own thread: its text, id(s), finish reason or error."""

    def __init__(self, s: Served) -> None:
        super().__init__(daemon=True)
        self.client = s.client(timeout_s=300)
        self.text = ""
        self.ids: set[str] = set()
        self.chunks = 0
        self.finish: str | None = None
        self.tokens: int | None = None  # completion tokens, from the usage chunk
        self.error: BaseException | None = None
        self.started = threading.Event()

    def run(self) -> None:
        try:
            for chunk in self.client.completions.create(stream=True, **_stream_request()):
                self.ids.add(chunk.id)
                if chunk.usage is not None:
                    self.tokens = chunk.usage.completion_tokens
                if chunk.choices:
                    self.text += chunk.choices[0].text or ""
                    self.finish = chunk.choices[0].finish_reason or self.finish
                self.chunks += 1
                if self.chunks >= 2:  # the engine's response id is known from the first event on
                    self.started.set()
        except BaseException as e:  # an SSE error event surfaces as openai.APIError
            self.error = e
        finally:
            self.started.set()


class _Ask(threading.Thread):
    """One non-streaming completion on its own thread (it may wait for a migration): the response or the error."""

    def __init__(self, s: Served, model: str) -> None:
        super().__init__(daemon=True)
        self.client, self.model = s.client(timeout_s=300), model
        self.response: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.response = self.client.completions.create(model=self.model, prompt="hello", max_tokens=2)
        except BaseException as e:
            self.error = e


def _kill_when_up(roots: tuple[str, ...], model: str, stop: threading.Event, killed: list[int]) -> None:
    """Wait for an engine of `model` under one of `roots`; as soon as it answers (or after 20 s of trying), SIGKILL
    it (by pid: it is this test's own stack's engine)."""
    deadline = time.monotonic() + 120
    while not stop.is_set() and time.monotonic() < deadline:
        pids = _engine_pids(roots, model)
        if not pids:
            time.sleep(0.02)
            continue
        pid = pids[0]
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        port = re.search(r"--port (\d+)", cmd)
        up_by = time.monotonic() + 20
        while port and time.monotonic() < up_by and not stop.is_set():
            try:
                if httpx.get(f"http://127.0.0.1:{port.group(1)}/ping", timeout=0.5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.01)
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except ProcessLookupError:
            pass
        return


def test_sllm_migrates_a_busy_stream_to_free_a_node_holding_the_model_in_dram(tmp_path: Path) -> None:
    """sllm with `policy.placement.migration=true` on two nodes:

    - staging: small-a is loaded on n0 from the cloud and kept in n0's DRAM; after keep-alive, a long `ignore_eos`
      stream of tiny-a (greedy, seed 7) runs on n0 — once as the unmigrated reference, then again;
    - a request for small-a while that stream is in flight: StartupTime prefers n0 (small-a in DRAM, plus moving the
      busy tiny-a to n1) over a slow cloud load on n1, so the gateway starts tiny-a on n1, detaches the in-flight
      sequence from n0's engine and resumes it on n1: the client's stream continues under one id and its text equals
      the reference exactly (no token lost or repeated); the migration action is done, the victim is stopped with
      reason `migrated`, the request's record finishes on n1, and small-a then starts on n0 from dram; exactly one
      migration is carried out (the destination is not itself moved on while the sequence is on its way to it);
    - the same again, but the destination engine on n1 is SIGKILLed as soon as it answers: the migration is recorded
      failed, and the stream either finishes on n0 with the reference text or ends with an error event — within a
      bounded time, never a hang; no instance is left loading and small-a is still served (from the cloud on n1,
      now empty again, or on n0 once the stream is done).
    """
    long_dir = _local_dir_with_long_context(tmp_path, 0)
    with serve(tmp_path, _migration_overrides(long_dir), policy="sllm") as s:
        _ask(s, "small-a")
        s.wait_for("small-a cached in n0's dram", _done(s, "copy", "small-a", tier="dram", node="n0"), timeout_s=120)
        s.wait_for("keep-alive to stop small-a", lambda: _nothing_running(s), timeout_s=60)

        # the unmigrated reference (tiny-a goes to n0: nowhere yet, both nodes empty, ties go to n0)
        reference = _Stream(s)
        reference.run()
        assert reference.error is None and reference.finish == "length", reference.error
        assert len(reference.text) > 0 and reference.tokens == MIGRATION_TOKENS

        # the same request, moved mid-stream by a migration that frees n0 for small-a
        moved = _Stream(s)
        moved.start()
        assert moved.started.wait(120) and moved.error is None, moved.error
        asker = _Ask(s, "small-a")
        asker.start()
        moved.join(240)
        asker.join(240)
        assert not moved.is_alive() and not asker.is_alive(), "the migrated stream or small-a's request hung"
        assert moved.error is None, moved.error
        assert asker.error is None, asker.error
        assert moved.finish == "length" and len(moved.ids) == 1 and moved.tokens == MIGRATION_TOKENS
        assert moved.text == reference.text, "the migrated stream differs from the unmigrated one"
        migration = s.wait_for("the migration's record", _done(s, "migration", "tiny-a", node="n0"))
        assert migration[0]["reason"] == "1 sequence(s) moved", migration
        assert migration[0]["detail"] == "to n1"
        # one migration, no ping-pong: the destination is never moved on while the victim's sequences are on their
        # way to it (small-a's placement, polled meanwhile, would otherwise pick it as the next victim)
        assert len(_done(s, "migration", "tiny-a")() or []) == 1, s.actions()
        df = s.records().sort_values("request_id").reset_index(drop=True)
        streams = df[df["model"] == "tiny-a"]
        assert list(streams["node"]) == ["n0", "n1"], streams  # the reference ran on n0, the moved one ended on n1
        assert list(streams["outcome"]) == ["completed"] * 2
        assert list(streams["output_tokens"]) == [MIGRATION_TOKENS] * 2  # the usage the client saw
        small = df[df["model"] == "small-a"].iloc[-1]
        assert small["outcome"] == "completed" and small["node"] == "n0" and small["source_tier"] == "dram", small
        victim = migration[0]["instance"]

        # --- the destination dies during the handover
        s.wait_for("tiny-a cached in n1's dram", _done(s, "copy", "tiny-a", tier="dram", node="n1"), timeout_s=60)
        s.wait_for("keep-alive to stop every instance", lambda: _nothing_running(s), timeout_s=120)
        doomed = _Stream(s)  # n0 and n1 both hold tiny-a in dram: the tie goes to n0 again
        doomed.start()
        assert doomed.started.wait(120) and doomed.error is None, doomed.error
        stop, killed = threading.Event(), []
        n1_dirs = (f"{s.info['dram_root']}/n1/", f"{s.out_dir}/work/n1/")  # n1's tiers and its host staging dir
        killer = threading.Thread(target=_kill_when_up, args=(n1_dirs, "tiny-a", stop, killed), daemon=True)
        killer.start()
        asker2 = _Ask(s, "small-a")
        asker2.start()
        doomed.join(240)
        stop.set()
        killer.join(30)
        assert not doomed.is_alive(), "the stream hung after its migration's destination died"
        assert killed, "no destination engine for tiny-a appeared on n1"
        failed = s.wait_for("the failed migration's record", _done(s, "migration", "tiny-a", node="n0",
                                                                    outcome="failed"))
        assert "destination" in failed[-1]["reason"], failed
        if doomed.error is None:  # it finished where it was (or resumed on the source)
            assert doomed.finish == "length" and doomed.text == reference.text
        else:  # a clean error event, never a hang
            assert isinstance(doomed.error, openai.APIError), repr(doomed.error)
        asker2.join(240)
        assert not asker2.is_alive(), "small-a's request hung"
        assert asker2.error is None, repr(asker2.error)  # served: on n0 once it is free, or on n1 from the cloud
        s.wait_for("no instance left loading", lambda: _metric(s, "loading") == 0, timeout_s=60)
        df = s.records().sort_values("request_id").reset_index(drop=True)
        last = df[df["model"] == "tiny-a"].iloc[-1]
        assert last["outcome"] == ("completed" if doomed.error is None else "failed"), last
        s.stop()
    instances = s.table("instances")
    gone = instances[(instances["instance"] == victim) & (instances["event"] == "stopped")]
    assert list(gone["reason"]) == ["migrated"], instances[instances["instance"] == victim]


# --------------------------------------------------------------------------- 3. predictive


def _predictive_overrides() -> list[str]:
    """One node with room for three tiny instances; 1 s forecast windows, a 0.2 s tick, thresholds low enough for
    a few requests per second: at 4 req/s a model's forecast load (rate x 0.4 s) wants a second instance, at the
    other model's 2 req/s it does not. A one-stream 5 MB/s cloud makes a cloud load take seconds."""
    catalog = "+catalog={tiny-a:{preset:tiny,seed:0},tiny-b:{preset:tiny,seed:1},tiny-x:{preset:tiny,seed:3}}"
    return ["nodes=1", "~catalog", catalog, "node.memory_budget=60M", "cloud.streams=1", "cloud.stream_MBps=5",
            "policy.caching.tick_s=0.2", "policy.caching.window_s=1.0", "policy.caching.horizon_s=1.0",
            "policy.caching.prefetch_rate=0.5", "policy.caching.prewarm_rate=1.0", "policy.caching.service_s=0.4",
            "policy.caching.max_prewarm_per_tick=1", "policy.autoscaling.keep_alive_s=2.0",
            "policy.autoscaling.scale_up_queue=1000", *TICK]


async def _steady(client: openai.AsyncOpenAI, model: str, rate_per_s: float, until: Callable[[], bool],
                  max_s: float) -> list[BaseException | None]:
    """Requests to `model` at a steady rate (each on its own task, so a cold one does not hold the others back)
    until `until()` or `max_s`; each one's error or None."""

    async def one() -> BaseException | None:
        try:
            await client.completions.create(model=model, prompt="hi", max_tokens=2)
        except Exception as e:
            return e
        return None

    tasks = []
    t0 = time.monotonic()
    while not until() and time.monotonic() - t0 < max_s:
        tasks.append(asyncio.create_task(one()))
        await asyncio.sleep(1.0 / rate_per_s)
    return list(await asyncio.gather(*tasks))


def test_predictive_prefetches_and_prewarms_without_blocking_and_a_failed_prewarm_leaves_nothing_loading(
        tmp_path: Path) -> None:
    """predictive with a 0.2 s tick and 1 s windows:

    - a steady 4 req/s to tiny-a makes the policy prefetch it into dram (a `copy`/`prefetch` action done) and
      pre-warm a second instance (`start_instance`/`prewarm` done);
    - the pre-warm does not block the gateway: requests to tiny-b (2 req/s, warm) are served start to finish while
      the pre-warm loads (inside its action's issue-to-done interval), since the tick loop never waits for a load;
    - a pre-warm of a model whose load fails (tiny-x, its checkpoint gone from the cloud store) is recorded
      `failed`, leaves no instance stuck `loading` (/metrics returns to 0), and the gateway serves on.
    """
    with serve(tmp_path, _predictive_overrides(), policy="predictive") as s:
        _ask(s, "tiny-b")  # warm, before the burst
        prewarm = _done(s, "start_instance", "tiny-a", detail="prewarm")

        async def drive() -> tuple[list[BaseException | None], list[BaseException | None]]:
            client = s.async_client()
            done = asyncio.Event()
            prewarm_seen = threading.Event()

            async def hot() -> list[BaseException | None]:
                out = await _steady(client, "tiny-a", 4.0, prewarm_seen.is_set, 60.0)
                done.set()
                return out

            async def watch() -> None:
                while not done.is_set():
                    if await asyncio.to_thread(prewarm) is not None:
                        prewarm_seen.set()
                    await asyncio.sleep(0.5)

            a, b, _ = await asyncio.gather(hot(), _steady(client, "tiny-b", 2.0, done.is_set, 60.0), watch())
            await client.close()
            return a, b

        hot_errors, other_errors = asyncio.run(drive())
        assert hot_errors and all(e is None for e in hot_errors), hot_errors
        assert other_errors and all(e is None for e in other_errors), other_errors
        warm = s.wait_for("tiny-a's prewarm done", prewarm)[0]
        s.wait_for("tiny-a prefetched into dram", _done(s, "copy", "tiny-a", detail="prefetch", tier="dram"))
        df = s.records()
        t0, t1 = warm["time_s"], warm["time_s"] + warm["duration_s"]
        other = df[(df["model"] == "tiny-b") & (df["outcome"] == "completed")]
        inside = other[(other["arrival_s"] >= t0) & (other["arrival_s"] + other["e2e_s"] <= t1)]
        assert len(inside) >= 1, ("no tiny-b request was served while the prewarm loaded", t0, t1,
                                  other[["arrival_s", "e2e_s"]])

        # --- a pre-warm whose load fails
        bad = s.out_dir / "work" / "cloud" / "tiny-x"
        assert bad.is_dir(), f"the cloud store is not where expected: {bad}"
        for f in bad.iterdir():
            if f.name.endswith(".safetensors"):
                f.unlink()
        s.wait_for("every instance stopped (room for tiny-x)", lambda: _nothing_running(s), timeout_s=60)
        for _ in range(3):
            with pytest.raises(openai.APIStatusError):
                s.client().completions.create(model="tiny-x", prompt="x", max_tokens=2)
        failed = s.wait_for("tiny-x's prewarm recorded failed",
                            _done(s, "start_instance", "tiny-x", detail="prewarm", outcome="failed"), timeout_s=30)
        assert "tiny-x" in failed[0]["reason"]
        assert _done(s, "start_instance", "tiny-x", detail="prewarm")() is None  # never done
        seen: list[int] = []

        def settled() -> bool:
            """No instance loading, and no new tiny-x attempt over the last 1.5 s (the forecast has cooled)."""
            act = s.actions()
            seen.append(int(((act["model"] == "tiny-x") & (act["kind"] == "start_instance")).sum()))
            return _metric(s, "loading") == 0 and len(seen) > 1 and seen[-1] == seen[-2]

        s.wait_for("the forecast to cool and nothing to be left loading", settled, timeout_s=60, every_s=1.5)
        rows = s.records()
        xs = rows[rows["model"] == "tiny-x"]
        assert len(xs) == 3 and (xs["outcome"] == "failed").all(), xs[["outcome", "reason"]]
        _ask(s, "tiny-b")  # the gateway serves on
        summary = s.stop()
    assert summary["policy"] == "predictive" and summary["requests"] == len(rows) + 1
