"""Fixtures: a tiny checkpoint in a file:// store, two real agent processes and a gateway (uvicorn in a thread)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

for _dep in ("torch", "safetensors", "tokenizers", "starlette", "uvicorn", "openai"):
    pytest.importorskip(_dep)
import httpx  # noqa: E402
import uvicorn  # noqa: E402

from live.checkpoint import generate_checkpoint  # noqa: E402
from live.engines.base import free_port  # noqa: E402
from live.gateway import AgentRef, Gateway, GatewayConfig, Tenant, create_app  # noqa: E402
from live.registry import Registry  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
AGENT_TOKEN = "agent-token"
MODEL = "tiny"
OTHER = "other"  # in the catalog (tenant bob), never published: never loaded by these tests
KEYS = {"sk-alice": Tenant("alice", (MODEL,)), "sk-bob": Tenant("bob", (OTHER,))}
START_TIMEOUT_S = 30.0


@dataclass
class GatewayServer:
    """A running gateway: its object (for records()), its base URL and its uvicorn server."""

    gateway: Gateway
    url: str
    server: uvicorn.Server
    thread: threading.Thread


def _wait(url: str, proc: subprocess.Popen[bytes] | None, log: Path | None) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}:\n{log.read_text()[-3000:] if log else ''}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} not healthy in {START_TIMEOUT_S} s")


def _start_agent(tmp: Path, node: str, store_url: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    argv = [sys.executable, "-m", "live.agent", "--node", node, "--port", str(port), "--token", AGENT_TOKEN,
            "--store", store_url, "--log-level", "warning"]
    for name in ("dram", "sata"):
        argv += ["--tier", f"{name}={tmp / f'{node}-{name}'}:{1 << 30}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    log = tmp / f"{node}.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    _wait(url, proc, log)
    return proc, url


@pytest.fixture(scope="module")
def gateway_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    """Publish `tiny`, start agents n0 and n1, then the gateway over them; all stopped at teardown."""
    tmp = tmp_path_factory.mktemp("gw")
    ckpt = generate_checkpoint(tmp / "ckpt" / MODEL, "tiny", 0).path
    store_url = f"file://{tmp / 'cloud'}"
    Registry([store_url]).publish(MODEL, ckpt)
    procs: list[subprocess.Popen[bytes]] = []
    server: uvicorn.Server | None = None
    thread: threading.Thread | None = None
    try:
        agents = []
        for node in ("n0", "n1"):
            proc, url = _start_agent(tmp, node, store_url)
            procs.append(proc)
            agents.append(AgentRef(node, url, AGENT_TOKEN))
        gateway = Gateway(GatewayConfig(agents=agents, tenants=KEYS, queue_timeout_s=2.0))
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(create_app(gateway), host="127.0.0.1", port=port, log_level="warning",
                                               lifespan="on"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{port}"
        _wait(url, None, None)
        yield GatewayServer(gateway, url, server, thread)
    finally:
        if server is not None and thread is not None:
            server.should_exit = True
            thread.join(timeout=15)
        for proc in procs:  # SIGTERM: each agent stops its engines on the way out
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
