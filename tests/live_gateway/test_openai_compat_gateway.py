"""The "openai" engine kind end to end: a real agent (`--engine openai --engine-spec FILE`) starts the null engine
through the generic adapter, and the gateway enforces the spec's capability flags and sees a crashed engine.

The spec declares an engine that cannot stream (the null server with --no-stream), serves no chat and has a
16-token context: a streaming request is answered as SSE made by the gateway from a whole answer (the path
Tokasaurus takes), a chat request and a request beyond the context get a clear 400, and an engine killed with
SIGKILL is seen dead by the agent (/status) and replaced by the gateway.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import httpx

from live.engines.base import running_group_members
from live.gateway import AgentRef, Gateway, GatewayConfig
from tests.live_gateway.conftest import (
    ADMIN_TOKEN,
    AGENT_TOKEN,
    KEYS,
    MODEL,
    publish_tiny,
    serving,
    start_agent,
    stop_agent,
)
from tests.live_gateway.fake_agent import wait_for

SPEC = """\
name: null-no-stream
command: "{python} -m live.engines.null_server --host {host} --port {port} --model-name {model_name} --no-stream"
cwd: "{repo_root}"
ready_path: /health
streaming: false
chat: false
max_context: 16
"""
AUTH = {"Authorization": "Bearer sk-alice"}


def agent_instances(url: str) -> list[dict[str, Any]]:
    status = httpx.get(url + "/status", headers={"Authorization": f"Bearer {AGENT_TOKEN}"}, timeout=10).json()
    return list(status["instances"])


def test_agent_runs_an_openai_engine_and_the_gateway_enforces_its_capabilities(tmp_path: Path) -> None:
    store_url = publish_tiny(tmp_path)
    spec = tmp_path / "engine.yaml"
    spec.write_text(SPEC)
    proc, url = start_agent(tmp_path, "o0", store_url, extra_args=("--engine", "openai", "--engine-spec", str(spec)))
    try:
        gateway = Gateway(GatewayConfig(agents=[AgentRef("o0", url, AGENT_TOKEN)], tenants=KEYS,
                                        admin_token=ADMIN_TOKEN, tick=False))
        with serving(gateway) as gs, httpx.Client(base_url=gs.url, headers=AUTH, timeout=60) as http:
            # streaming asked of an engine that cannot stream: the gateway streams the whole answer itself
            with http.stream("POST", "/v1/completions",
                             json={"model": MODEL, "prompt": "hi", "max_tokens": 3, "stream": True}) as r:
                assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
                events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]
                           if json.loads(e)["choices"]) == "Hello from the"
            (inst,) = agent_instances(url)
            assert (inst["engine"], inst["streaming"], inst["chat"], inst["max_context"]) == ("openai", False, False,
                                                                                             16)

            chat = http.post("/v1/chat/completions",
                             json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
            assert chat.status_code == 400 and "does not serve chat completions" in chat.json()["error"]["message"]
            long = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 100})
            assert long.status_code == 400
            assert "more than this model's context window of 16 tokens" in long.json()["error"]["message"]
            assert long.json()["error"]["code"] == "unsupported_by_engine"

            # the engine dies (SIGKILL, as an OOM kill): the agent reports it failed, the gateway replaces it
            os.kill(inst["pid"], signal.SIGKILL)
            assert wait_for(lambda: any(i["id"] == inst["id"] and i["status"] == "failed"
                                        for i in agent_instances(url)), 10)
            again = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
            assert again.status_code == 200 and again.json()["choices"][0]["text"] == "Hello from"
            assert wait_for(lambda: [i["status"] for i in agent_instances(url)] == ["ready"], 10)
            (new,) = agent_instances(url)
            assert new["id"] != inst["id"] and running_group_members(inst["pid"]) == []
        records = gateway.records()
        assert sorted(records["outcome"]) == ["completed", "completed", "rejected", "rejected"]
    finally:
        stop_agent(proc)
