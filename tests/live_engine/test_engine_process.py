"""`CpuEngineProcess`: lifecycle of real engine processes (progressive start, stop, crash, kill, orphans)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from tokenizers import Tokenizer

from live.engines.base import CpuEngineProcess, EngineHandle, EngineStartError, free_port, running_group_members
from live.engines.llama import LlamaModel

REPO = Path(__file__).resolve().parents[2]


def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.perf_counter() + timeout_s
    while not condition():
        assert time.perf_counter() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_progressive_engine_serves_while_layers_load_then_stops_cleanly(tiny_llama: Path) -> None:
    # per layer group: 5 groups, so the weights take >= 4 s after the engine is up; a shorter window let a
    # loaded CI machine deliver the first request only after the last layer had landed
    delay_s = 0.8
    engine = CpuEngineProcess(
        tiny_llama,
        free_port(),
        progressive=True,
        model_name="p",
        threads=1,
        extra_args=["--layer-delay-s", str(delay_s)],
    )
    assert isinstance(engine, EngineHandle)
    engine.start()
    try:
        engine.wait_ready(timeout_s=60)
        with httpx.Client(base_url=engine.url, timeout=30) as http:
            early = http.get("/stats").json()
            assert early["progressive"] and early["state"] == "ready"
            assert not early["weights_resident"] and early["weights_resident_at_s"] is None  # ready before the weights
            body = {"model": "p", "prompt": "hello world", "max_tokens": 6, "temperature": 0}
            out = http.post("/v1/completions", json=body).json()
            stats = http.get("/stats").json()
    finally:
        pgid = engine.pgid
        engine.stop()
    log_path = engine.log_path
    assert log_path is not None and "Uvicorn running" in log_path.read_text()  # the log outlives stop()...

    model, tokenizer = LlamaModel.from_dir(tiny_llama), Tokenizer.from_file(str(tiny_llama / "tokenizer.json"))
    ids = [model.config.bos_token_id, *tokenizer.encode("hello world").ids]
    assert out["choices"][0]["text"] == tokenizer.decode(list(model.generate(ids, 6)), skip_special_tokens=True)
    assert stats["weights_resident"] and stats["load_s"] >= 5 * delay_s
    assert stats["ready_at_s"] < stats["weights_resident_at_s"] <= stats["first_token_at_s"]
    # the first forward pass computed the early layers while later ones were still loading
    computed, resident = stats["group_computed_at_s"], stats["group_resident_at_s"]
    assert computed[1] < resident[-1]
    assert all(c >= r for c, r in zip(computed, resident, strict=True))

    assert pgid is not None and not engine.alive()
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)
    engine.stop()  # idempotent
    engine.close()
    assert not log_path.exists()  # ...until close()


def test_engine_that_cannot_start_is_reported_with_its_stderr(tmp_path: Path) -> None:
    engine = CpuEngineProcess(tmp_path / "no-such-model", free_port())
    engine.start()
    with pytest.raises(EngineStartError, match=re.escape("no-such-model/config.json does not exist")):
        engine.wait_ready(timeout_s=30)
    assert not engine.alive() and engine.returncode == 2
    engine.close()


def test_loading_engine_queues_requests_a_killed_one_is_detected_and_stop_reaps_orphans(
    tiny_llama: Path, tmp_path: Path
) -> None:
    # a launcher that leaves a child behind in the engine's process group, as a forking engine would
    wrapper = tmp_path / "python-with-child"
    wrapper.write_text(f'#!/bin/sh\nsleep 60 &\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    engine = CpuEngineProcess(tiny_llama, free_port(), python=str(wrapper), threads=1, model_name="m")
    engine.start()
    try:
        # the server listens before torch is imported: 503 while loading, and a request sent now waits
        wait_until(lambda: engine.probe("/ping") is not None, timeout_s=30)
        assert engine.probe("/ping") == 503 and engine.probe("/health") == 503
        body = {"model": "m", "prompt": "hello", "max_tokens": 3}
        early = httpx.post(engine.url + "/v1/completions", json=body, timeout=60)
        assert early.status_code == 200 and early.json()["usage"]["completion_tokens"] == 3
        engine.wait_ready(timeout_s=60)
        stats = httpx.get(engine.url + "/stats").json()
        arrived_at_s = stats["first_token_at_s"] - stats["first_token_s"]
        assert arrived_at_s < stats["ready_at_s"] < stats["first_token_at_s"]  # it arrived early, and waited
        assert engine.alive()
        pgid = engine.pgid
        assert pgid is not None and len(running_group_members(pgid)) == 2  # the engine and the sleep

        os.kill(engine.pid, signal.SIGKILL)  # the engine alone dies, as in an OOM kill
        wait_until(lambda: not engine.alive())
        assert engine.returncode == -signal.SIGKILL
        assert engine.probe("/ping") is None
        with pytest.raises(EngineStartError, match="exited"):
            engine.wait_ready(timeout_s=5)
        assert len(running_group_members(pgid)) == 1  # the orphan still runs...
    finally:
        engine.close()
    assert running_group_members(pgid) == []  # ...until stop() kills the whole group


def test_engine_exits_when_its_launcher_dies(tiny_llama: Path) -> None:
    launcher = textwrap.dedent(f"""
        import sys, time
        from live.engines.base import CpuEngineProcess
        engine = CpuEngineProcess({str(tiny_llama)!r}, {free_port()})
        engine.start()
        print(engine.pid, engine.url, engine.log_path, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", launcher], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    pid_text, url, log_path = parent.stdout.readline().split()
    engine_pid = int(pid_text)

    def answers() -> bool:
        try:
            return httpx.get(url + "/ping", timeout=1).status_code in (200, 503)
        except httpx.TransportError:
            return False

    try:
        wait_until(answers, timeout_s=30)  # the engine runs...
        parent.kill()  # ...and its launcher dies without calling stop()
        parent.wait()
        wait_until(lambda: running_group_members(engine_pid) == [], timeout_s=5)
    finally:
        parent.kill()
        parent.wait()
        if running_group_members(engine_pid):
            os.killpg(engine_pid, signal.SIGKILL)
        Path(log_path).unlink(missing_ok=True)
