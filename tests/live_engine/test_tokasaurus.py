"""`TokasaurusProcess`, its size profiles, and the agent's engine selection, against a stand-in `toka`.

This machine has no GPU, so the `toka` executable is the one thing replaced: FAKE_TOKA below is a
real program run as a real subprocess. Like Tokasaurus it parses pydra `key=value` arguments
(refusing unknown keys), leaves an unreaped worker process in its group, answers `GET /ping` once
started, and serves `POST /v1/completions` without streaming. FAKE_TOKA_MODE selects a failure.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from live.agent import AgentConfig, AgentError, EngineSettings, NodeAgent, config_from_args
from live.agent_tiers import TierConfig
from live.checkpoint import generate_checkpoint
from live.engines import (
    ENGINE_KINDS,
    EngineStartError,
    TokaProfile,
    TokasaurusProcess,
    count_params,
    free_port,
    make_engine,
    running_group_members,
    toka_profile,
)
from live.engines.tokasaurus import MEDIUM_MAX_PARAMS, SMALL_MAX_PARAMS
from live.registry import Registry

FAKE_TOKA = r'''
import json, os, subprocess, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# a subset of tokasaurus.common_types.ServerConfig's fields; pydra refuses any other key
KNOWN = {"model", "port", "tp_size", "pp_size", "dp_size", "torch_compile", "kv_cache_num_tokens",
         "max_seqs_per_forward", "max_tokens_per_forward", "use_cudagraphs", "dtype", "uvicorn_log_level"}

config = {}
for arg in sys.argv[1:]:
    key, sep, value = arg.partition("=")
    if not sep or key not in KNOWN:
        sys.exit(f"pydra: cannot apply {arg!r}")
    config[key] = value
if "model" not in config:
    sys.exit("pydra: model is required")
if os.environ.get("FAKE_TOKA_ARGV_FILE"):
    with open(os.environ["FAKE_TOKA_ARGV_FILE"], "w") as f:
        json.dump(sys.argv[1:], f)
mode = os.environ.get("FAKE_TOKA_MODE", "ok")
print("Starting 3 processes: ['model_worker', 'manager', 'server']", flush=True)
if mode == "crash":
    print("RuntimeError: CUDA error: out of memory", file=sys.stderr, flush=True)
    sys.exit(1)
# the model worker: same process group, never waited for (Tokasaurus never joins its workers)
life_s = "0.2" if mode == "worker_dies" else "600"
worker = subprocess.Popen([sys.executable, "-c", f"import sys, time; time.sleep({life_s}); sys.exit(3)"])
if mode == "worker_dies":
    time.sleep(600)  # the launcher waits at the start-up barrier for a worker that is gone
time.sleep(float(os.environ.get("FAKE_TOKA_STARTUP_S", "0.2")))


class Handler(BaseHTTPRequestHandler):
    def reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/ping":
            self.reply(200, {"message": "pong"})
        else:
            self.reply(404, {"detail": "Not Found"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        if self.path != "/v1/completions" or "prompt" not in body:
            return self.reply(422, {"detail": "invalid request"})
        n = int(body.get("max_tokens", 16))
        text = body["prompt"][::-1][:n]  # deterministic; "stream" is ignored, as Tokasaurus does
        self.reply(200, {"id": "cmpl-fake", "object": "text_completion", "created": int(time.time()),
                         "model": body.get("model"), "choices": [{"index": 0, "text": text, "logprobs": None,
                                                                  "finish_reason": "length"}],
                         "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": len(text),
                                   "total_tokens": len(body["prompt"]) + len(text)}})


print(f"server on port {config['port']}", flush=True)
ThreadingHTTPServer(("127.0.0.1", int(config["port"])), Handler).serve_forever()
'''


@pytest.fixture(scope="module")
def toka_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", 0).path


@pytest.fixture
def engines() -> Iterator[list[TokasaurusProcess]]:
    """Engines a test started; each is closed (group killed, log deleted) even if the test failed."""
    started: list[TokasaurusProcess] = []
    yield started
    for engine in started:
        engine.close()


def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.perf_counter() + timeout_s
    while not condition():
        assert time.perf_counter() < deadline, "condition not reached in time"
        time.sleep(0.02)


# --------------------------------------------------------------------------- profiles


def test_profile_thresholds() -> None:
    assert toka_profile(1_200_000_000, 1) == TokaProfile("small", tp_size=1, torch_compile=False)
    assert toka_profile(SMALL_MAX_PARAMS, 8).name == "small"  # one GPU even when more are free
    assert toka_profile(SMALL_MAX_PARAMS + 1, 1) == TokaProfile("medium", tp_size=1, torch_compile=True)
    assert toka_profile(13_000_000_000, 8) == TokaProfile("medium", tp_size=1, torch_compile=True)
    assert toka_profile(MEDIUM_MAX_PARAMS, 1).name == "medium"
    assert toka_profile(MEDIUM_MAX_PARAMS + 1, 2) == TokaProfile("large", tp_size=2, torch_compile=True)
    assert toka_profile(70_000_000_000, 8).tp_size == 8
    assert toka_profile(70_000_000_000, 6).tp_size == 4  # a power of two that divides the heads
    assert toka_profile(405_000_000_000, 16).tp_size == 8  # one node at most
    with pytest.raises(ValueError, match=r"70B-parameter model needs tensor parallelism over >= 2 GPUs"):
        toka_profile(70_000_000_000, 1)
    for bad in ((0, 1), (1_000, 0), (1.5e9, 1), (True, 1)):
        with pytest.raises(ValueError, match="must be a positive int"):
            toka_profile(*bad)  # type: ignore[arg-type]
    assert TokaProfile("x", 4, True, ("kv_cache_num_tokens=524288",)).args() == [
        "tp_size=4", "torch_compile=T", "kv_cache_num_tokens=524288"]


def test_count_params_reads_the_headers(toka_ckpt: Path) -> None:
    config = json.loads((toka_ckpt / "config.json").read_text())
    h, i, v, n = config["hidden_size"], config["intermediate_size"], config["vocab_size"], config["num_hidden_layers"]
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    per_layer = 2 * h + 2 * h * h + 2 * kv * h + 3 * h * i
    assert count_params(toka_ckpt) == 2 * v * h + n * per_layer + h


# --------------------------------------------------------------------------- the process


def test_argv_from_the_profile_reaches_toka(fake_toka: Path, toka_ckpt: Path, tmp_path: Path,
                                            engines: list[TokasaurusProcess]) -> None:
    port = free_port()
    argv_file = tmp_path / "argv.json"
    engine = TokasaurusProcess(toka_ckpt, port, executable=str(fake_toka), extra_args=["kv_cache_num_tokens=65536"],
                               env={"FAKE_TOKA_ARGV_FILE": str(argv_file)})
    engines.append(engine)
    assert engine.command() == [str(fake_toka), f"model={toka_ckpt}", f"port={port}", "tp_size=1",
                                "torch_compile=F", "kv_cache_num_tokens=65536"]  # tiny -> small profile
    large = TokasaurusProcess(toka_ckpt, port, profile=toka_profile(70_000_000_000, 4), executable=str(fake_toka))
    assert large.command()[3:] == ["tp_size=4", "torch_compile=T"]
    engine.start()
    engine.wait_ready(timeout_s=30)
    assert json.loads(argv_file.read_text()) == engine.command()[1:]


def test_serves_without_streaming_and_stop_kills_the_whole_group(fake_toka: Path, toka_ckpt: Path,
                                                                 engines: list[TokasaurusProcess]) -> None:
    engine = TokasaurusProcess(toka_ckpt, free_port(), executable=str(fake_toka))
    engines.append(engine)
    assert engine.kind == "tokasaurus" and engine.streaming is False
    engine.start()
    ready_s = engine.wait_ready(timeout_s=30)
    assert 0 < ready_s < 30 and engine.alive() and engine.probe("/ping") == 200
    body = {"model": "tiny", "prompt": "hello world", "max_tokens": 5, "stream": True}
    out = httpx.post(engine.url + "/v1/completions", json=body, timeout=10)
    assert out.headers["content-type"] == "application/json"  # no SSE from Tokasaurus, whatever was asked
    assert out.json()["choices"][0]["text"] == "dlrow"
    pgid = engine.pgid
    assert pgid is not None and len(running_group_members(pgid)) == 2  # the launcher and its worker
    engine.stop()
    assert running_group_members(pgid) == [] and not engine.alive()
    log_path = engine.log_path
    assert log_path is not None and "Starting 3 processes" in log_path.read_text()
    engine.stop()  # idempotent


def test_crash_before_ready_is_reported_with_the_log_tail(fake_toka: Path, toka_ckpt: Path,
                                                          engines: list[TokasaurusProcess]) -> None:
    engine = TokasaurusProcess(toka_ckpt, free_port(), executable=str(fake_toka), env={"FAKE_TOKA_MODE": "crash"})
    engines.append(engine)
    engine.start()
    with pytest.raises(EngineStartError, match=r"(?s)exited with code 1 before it was ready.*CUDA error: out of mem"):
        engine.wait_ready(timeout_s=30)
    assert not engine.alive() and engine.returncode == 1


def test_a_dead_worker_is_a_crash_even_while_the_launcher_waits(fake_toka: Path, toka_ckpt: Path,
                                                                engines: list[TokasaurusProcess]) -> None:
    engine = TokasaurusProcess(toka_ckpt, free_port(), executable=str(fake_toka),
                               env={"FAKE_TOKA_MODE": "worker_dies"})
    engines.append(engine)
    engine.start()
    with pytest.raises(EngineStartError, match=r"child process \d+ died \(the engine itself still runs\)"):
        engine.wait_ready(timeout_s=30)
    pgid = engine.pgid
    assert pgid is not None and engine.returncode is None and not engine.alive()
    engine.stop()
    assert running_group_members(pgid) == []


def test_not_ready_in_time_is_a_timeout(fake_toka: Path, toka_ckpt: Path, engines: list[TokasaurusProcess]) -> None:
    engine = TokasaurusProcess(toka_ckpt, free_port(), executable=str(fake_toka), env={"FAKE_TOKA_STARTUP_S": "60"})
    engines.append(engine)
    engine.start()
    with pytest.raises(TimeoutError, match=r"not ready after 0\.5 s"):
        engine.wait_ready(timeout_s=0.5)
    assert engine.alive()


def test_bad_setup_fails_start_clearly_and_runs_nothing(toka_ckpt: Path, tmp_path: Path) -> None:
    missing = TokasaurusProcess(toka_ckpt, free_port(), executable="no-such-toka-binary")
    with pytest.raises(EngineStartError, match="executable 'no-such-toka-binary' not found"):
        missing.start()
    assert missing.pid is None

    (tmp_path / "empty").mkdir()
    no_model = TokasaurusProcess(tmp_path / "empty", free_port(), executable=sys.executable)
    with pytest.raises(EngineStartError, match=re.escape(f"{tmp_path / 'empty' / 'config.json'}")):
        no_model.start()

    with pytest.raises(ValueError, match="must be key=value"):
        TokasaurusProcess(toka_ckpt, 1, extra_args=["--show"])
    with pytest.raises(ValueError, match="must not set model or port"):
        TokasaurusProcess(toka_ckpt, 1, extra_args=["port=9"])


# --------------------------------------------------------------------------- agent integration


def test_factory_and_agent_settings() -> None:
    assert ENGINE_KINDS == ("cpu", "tokasaurus", "openai")
    assert make_engine("cpu", "/m", 1).streaming is True
    toka = make_engine("tokasaurus", "/m", 1, toka_executable="/opt/toka", n_gpus=4)
    assert isinstance(toka, TokasaurusProcess) and toka.executable == ["/opt/toka"] and toka.n_gpus == 4
    with pytest.raises(ValueError, match="unknown engine kind 'vllm'"):
        make_engine("vllm", "/m", 1)
    with pytest.raises(ValueError, match=r"EngineSettings\.kind must be one of"):
        EngineSettings(kind="vllm")
    config, _ = config_from_args(["--token", "t", "--store", "file:///s", "--engine", "tokasaurus",
                                  "--toka", "/opt/toka", "--gpus", "2"])
    assert (config.engine.kind, config.engine.toka_executable, config.engine.gpus) == ("tokasaurus", "/opt/toka", 2)


def test_agent_loads_a_tokasaurus_engine_and_says_it_cannot_stream(fake_toka: Path, toka_ckpt: Path,
                                                                    tmp_path: Path) -> None:
    store = f"file://{tmp_path / 'cloud'}"
    Registry([store]).publish("tiny", toka_ckpt)
    settings = EngineSettings(kind="tokasaurus", toka_executable=str(fake_toka), ready_timeout_s=30)
    agent = NodeAgent(AgentConfig(token="t", stores=[store], engine=settings,
                                  tiers={"dram": TierConfig("dram", tmp_path / "dram", 1 << 30)}))
    try:
        inst = agent.load("tiny")["instance"]
        assert (inst["engine"], inst["streaming"], inst["status"]) == ("tokasaurus", False, "ready")
        out = httpx.post(inst["url"] + "/v1/completions", json={"model": "tiny", "prompt": "abc"}, timeout=10)
        assert out.json()["choices"][0]["text"] == "cba"
        assert agent.status()["instances"][0]["engine"] == "tokasaurus"
        agent.unload(inst["id"])
        assert running_group_members(inst["pid"]) == []
    finally:
        agent.shutdown()

    broken = NodeAgent(AgentConfig(token="t", stores=[store],
                                   engine=EngineSettings(kind="tokasaurus", toka_executable="no-such-toka-binary"),
                                   tiers={"dram": TierConfig("dram", tmp_path / "dram2", 1 << 30)}))
    with pytest.raises(AgentError, match="cannot start: Tokasaurus executable 'no-such-toka-binary' not found") as err:
        broken.load("tiny")
    assert err.value.code == "engine_start_failed" and broken.status()["instances"] == []
    broken.shutdown()
