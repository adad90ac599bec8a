"""The generic OpenAI-compatible engine kind (`live.engines.openai_compat`), run for real without a GPU.

tierlab's CPU engine and null engine are launched THROUGH the adapter from the example specs in
conf/live/engines/ (their real command lines and readiness probes), serve real requests on loopback, and are
then stopped, crashed and orphaned: stop() kills the whole process group, a SIGKILLed engine is reported dead,
and a SIGKILLed launcher takes the engine's group with it (the watchdog sidecar). The vLLM / SGLang /
llama-server specs are checked as config (argv, probe, capabilities); their programs are not installed here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from live.engines import ENGINE_KINDS, EngineStartError, make_engine
from live.engines.base import free_port, running_group_members
from live.engines.openai_compat import (
    EngineSpecError,
    OpenAICompatProcess,
    OpenAICompatSpec,
    capability_error,
    load_spec,
)
from live.lifecycle import pid_alive
from tests.live_engine.test_watchdog import kill_launcher_and_expect_no_orphan, wait_until

REPO = Path(__file__).resolve().parents[2]
SPECS = REPO / "conf" / "live" / "engines"


@pytest.fixture
def engines() -> Iterator[list[OpenAICompatProcess]]:
    """Engines a test started; each closed (group killed, log deleted) even if the test failed."""
    started: list[OpenAICompatProcess] = []
    yield started
    for engine in started:
        engine.close()


def start(engines: list[OpenAICompatProcess], spec: OpenAICompatSpec, model_dir: Path | str = os.devnull,
          model_name: str = "m") -> OpenAICompatProcess:
    engine = make_engine("openai", model_dir, free_port(), model_name=model_name, spec=spec)
    assert isinstance(engine, OpenAICompatProcess)
    engines.append(engine)
    engine.start()
    return engine


# --------------------------------------------------------------------------- config


def test_example_specs_render_the_real_command_lines() -> None:
    values = {"model_dir": "/models/my model", "port": 8123, "host": "127.0.0.1", "model_name": "llama"}
    vllm, sglang, llama = (load_spec(SPECS / f"{n}.yaml") for n in ("vllm", "sglang", "llama_server"))
    assert vllm.argv(vllm.values(**values)) == [
        "vllm", "serve", "/models/my model", "--host", "127.0.0.1", "--port", "8123", "--served-model-name", "llama",
        "--max-model-len", "8192"]
    assert sglang.argv(sglang.values(**values))[:4] == ["python3", "-m", "sglang.launch_server", "--model-path"]
    assert llama.argv(llama.values(**values))[:3] == ["llama-server", "-m", "/models/my model/model.gguf"]
    for spec in (vllm, sglang, llama):
        assert (spec.ready_path, spec.streaming, spec.chat) == ("/health", True, True) and spec.max_context
    assert "openai" in ENGINE_KINDS


def test_template_is_split_by_shlex_and_never_run_by_a_shell(tmp_path: Path) -> None:
    spec = OpenAICompatSpec(name="t", command="{python} -c 'import sys; print(sys.argv[1:])' {model_name} {model_dir}")
    name = "$(touch pwned); echo x"
    argv = spec.argv(spec.values(tmp_path / "a dir", 1, "127.0.0.1", name))
    assert argv[3:] == [name, str(tmp_path / "a dir")]  # one word each: a value is never split again


@pytest.mark.parametrize(("cfg", "message"), [
    ({"name": "x", "command": "serve {model} --port {port}"}, r"engine\.command: unknown placeholder \{model\}"),
    ({"name": "x", "command": "serve {port!r}"}, r"engine\.command: .*format spec or conversion"),
    ({"name": "x", "command": "serve {port"}, r"engine\.command: malformed template word"),
    ({"name": "x", "command": "serve 'unclosed"}, r"engine\.command: cannot split"),
    ({"name": "x", "command": "  "}, r"engine\.command: empty"),
    ({"name": "x", "command": "s --ctx {max_context}"}, r"\{max_context\} is used but engine\.max_context is not set"),
    ({"name": "x", "command": "s", "ready_path": "health"}, r"engine\.ready_path: an absolute URL path"),
    ({"name": "x", "command": "s", "streaming": "yes"}, r"engine\.streaming: true or false"),
    ({"name": "x", "command": "s", "max_context": 0}, r"engine\.max_context: an integer >= 1"),
    ({"name": "x", "command": "s", "cwd": "{nope}"}, r"engine\.cwd: unknown placeholder \{nope\}"),
    ({"name": "x", "command": "s", "stop_grace_s": -1}, r"engine\.stop_grace_s: a number of seconds > 0"),
    ({"name": "x", "command": "s", "env": {"A": 1}}, r"engine\.env: a mapping of strings to strings"),
    ({"name": "x", "command": "s", "streming": True}, r"engine: unknown key\(s\) \['streming'\]"),
    ({"command": "s"}, r"engine\.name: required"),
])
def test_bad_specs_are_config_errors_naming_the_field(cfg: dict[str, object], message: str) -> None:
    with pytest.raises(EngineSpecError, match=message):
        OpenAICompatSpec.from_mapping(cfg)


def test_a_spec_file_error_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ncommand: serve {weights}\n")
    with pytest.raises(EngineSpecError, match=rf"{bad}\.command: unknown placeholder \{{weights\}}"):
        load_spec(bad)
    with pytest.raises(ValueError, match="engine kind 'openai' needs a spec"):
        make_engine("openai", "/m", 1)


def test_capability_errors() -> None:
    assert capability_error("/v1/chat/completions", {}, chat=False, max_context=None) is not None
    assert capability_error("/v1/completions", {"max_tokens": 100}, chat=False, max_context=None) is None
    message = capability_error("/v1/completions", {"max_tokens": 100}, chat=True, max_context=64)
    assert message is not None and "'max_tokens' is 100" in message and "64 tokens" in message
    assert capability_error("/v1/completions", {"max_tokens": 64}, chat=True, max_context=64) is None


# --------------------------------------------------------------------------- the null engine through the adapter


def test_null_engine_through_the_adapter_serves_then_stop_kills_the_group(
        engines: list[OpenAICompatProcess]) -> None:
    engine = start(engines, load_spec(SPECS / "tierlab_null.yaml"))
    assert engine.kind == "openai" and engine.streaming and engine.chat and engine.ready_path == "/health"
    assert 0 < engine.wait_ready(30) < 30 and engine.alive()
    with httpx.Client(base_url=engine.url, timeout=30) as http:
        whole = http.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        assert whole.json()["choices"][0]["message"]["content"] == "Hello from the null engine"
        with http.stream("POST", "/v1/completions", json={"model": "m", "prompt": "x", "stream": True}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and json.loads(events[0][6:])["choices"][0]["text"] == "Hello"
    pgid, dog = engine.pgid, engine.watchdog_pid
    assert pgid is not None and dog is not None and running_group_members(pgid) == [pgid]
    assert dog not in running_group_members(pgid)  # the sidecar is outside the group it polices
    engine.stop()
    assert running_group_members(pgid) == [] and not engine.alive() and not pid_alive(dog)
    assert engine.watchdog_pid is None
    engine.stop()  # idempotent


def test_a_sigkilled_engine_is_reported_dead(engines: list[OpenAICompatProcess]) -> None:
    engine = start(engines, load_spec(SPECS / "tierlab_null.yaml"))
    engine.wait_ready(30)
    pid, dog = engine.pid, engine.watchdog_pid
    assert pid is not None and dog is not None
    os.kill(pid, signal.SIGKILL)  # the engine alone dies, as in an OOM kill
    wait_until(lambda: not engine.alive(), 10, "the adapter sees the engine dead")
    assert engine.crash_reason() == f"engine exited with code {-signal.SIGKILL}"
    assert engine.probe("/health") is None
    with pytest.raises(EngineStartError, match="exited"):
        engine.wait_ready(timeout_s=5)
    wait_until(lambda: not pid_alive(dog), 10, "the sidecar leaves once the group is empty")
    engine.stop()
    assert engine.watchdog_pid is None


def test_an_engine_that_cannot_stream_says_so(engines: list[OpenAICompatProcess]) -> None:
    base = load_spec(SPECS / "tierlab_null.yaml")
    spec = dataclasses.replace(base, command=base.command + " --no-stream", streaming=False)
    engine = start(engines, spec)
    engine.wait_ready(30)
    assert engine.streaming is False  # the agent reports it; the gateway then streams whole answers itself
    refused = httpx.post(engine.url + "/v1/completions", json={"model": "m", "prompt": "x", "stream": True})
    assert refused.status_code == 400


def test_a_missing_program_fails_start_and_runs_nothing(engines: list[OpenAICompatProcess]) -> None:
    spec = OpenAICompatSpec(name="vllm", command="no-such-vllm-binary serve {model_dir} --port {port}")
    engine = OpenAICompatProcess(spec, "/m", free_port())
    with pytest.raises(EngineStartError, match="cannot run 'no-such-vllm-binary'"):
        engine.start()
    assert engine.pid is None and engine.watchdog_pid is None


def test_null_engine_group_exits_when_its_launcher_is_sigkilled() -> None:
    launcher = textwrap.dedent(f"""
        import time
        from live.engines.base import free_port
        from live.engines.openai_compat import OpenAICompatProcess, load_spec
        engine = OpenAICompatProcess(load_spec({str(SPECS / "tierlab_null.yaml")!r}), "/dev/null", free_port())
        engine.start()
        engine.wait_ready(30)
        print(engine.pgid, engine.watchdog_pid, flush=True)
        time.sleep(600)
    """)
    kill_launcher_and_expect_no_orphan(launcher)


# --------------------------------------------------------------------------- the CPU engine through the adapter


def test_cpu_engine_through_the_adapter_probes_health_serves_and_stops(
        tiny_llama: Path, engines: list[OpenAICompatProcess]) -> None:
    base = load_spec(SPECS / "tierlab_cpu.yaml")
    # a slow fake tier: the real /health probe must answer 503 first and 200 only once the weights are in
    spec = dataclasses.replace(base, command=base.command + " --layer-delay-s 0.3")
    engine = start(engines, spec, tiny_llama, model_name="tiny")
    wait_until(lambda: engine.probe("/health") is not None, 60, "the CPU engine listens")
    assert engine.probe("/health") == 503  # loading: not ready
    engine.wait_ready(60)
    assert engine.probe("/health") == 200
    with httpx.Client(base_url=engine.url, timeout=60) as http:
        out = http.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 4, "temperature": 0,
                                                      "messages": [{"role": "user", "content": "hello"}]})
        assert out.status_code == 200, out.text
        assert out.json()["usage"]["completion_tokens"] == 4
        too_long = http.post("/v1/completions", json={"model": "tiny", "prompt": "hello " * 300, "max_tokens": 4})
        assert too_long.status_code == 400  # beyond the checkpoint's 256 positions: the engine's own clear 400
    pgid = engine.pgid
    assert pgid is not None
    engine.stop()
    assert running_group_members(pgid) == []


def test_cpu_engine_group_exits_when_its_launcher_is_sigkilled(tiny_llama: Path) -> None:
    launcher = textwrap.dedent(f"""
        import time
        from live.engines.base import free_port
        from live.engines.openai_compat import OpenAICompatProcess, load_spec
        spec = load_spec({str(SPECS / "tierlab_cpu.yaml")!r})
        engine = OpenAICompatProcess(spec, {str(tiny_llama)!r}, free_port(), model_name="tiny")
        engine.start()
        engine.wait_ready(60)
        print(engine.pgid, engine.watchdog_pid, flush=True)
        time.sleep(600)
    """)
    kill_launcher_and_expect_no_orphan(launcher)


def test_agent_takes_the_kind_and_its_spec_from_its_command_line(capsys: pytest.CaptureFixture[str],
                                                                 tmp_path: Path) -> None:
    from live.agent import EngineSettings, config_from_args

    common = ["--token", "t", "--store", "file:///s", "--engine", "openai"]
    config, _ = config_from_args([*common, "--engine-spec", str(SPECS / "vllm.yaml")])
    assert config.engine.kind == "openai" and config.engine.openai == load_spec(SPECS / "vllm.yaml")
    with pytest.raises(ValueError, match=r"EngineSettings\.openai: required for kind 'openai'"):
        EngineSettings(kind="openai")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ncommand: serve\nready_path: health\n")
    with pytest.raises(SystemExit):
        config_from_args([*common, "--engine-spec", str(bad)])
    assert f"{bad}.ready_path: an absolute URL path" in capsys.readouterr().err
