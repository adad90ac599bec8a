"""Fixtures: a tiny checkpoint in a file:// store, real agent processes, null engines, and gateways (uvicorn in a
thread) over them."""

from __future__ import annotations

import contextlib
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

for _dep in ("torch", "safetensors", "tokenizers", "starlette", "uvicorn", "openai"):
    pytest.importorskip(_dep)
import uvicorn  # noqa: E402

from core.policies.base import PolicyBundle  # noqa: E402
from live import lifecycle  # noqa: E402
from live.checkpoint import generate_checkpoint  # noqa: E402
from live.engines.base import free_port  # noqa: E402
from live.engines.null_server import NullEngineProcess  # noqa: E402
from live.gateway import AgentRef, Gateway, GatewayConfig, Tenant, create_app  # noqa: E402
from live.registry import Registry  # noqa: E402
from tests.tls_certs import TestCerts  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
AGENT_TOKEN = "agent-token"
ADMIN_TOKEN = "admin-secret"
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


@dataclass
class Cluster:
    """Agent processes (by node) over one store, and the gateway driving them."""

    tmp: Path
    store_url: str
    agents: dict[str, subprocess.Popen[bytes]]
    urls: dict[str, str]
    gs: GatewayServer


def wait_healthy(url: str, proc: subprocess.Popen[bytes] | None = None, log: Path | None = None) -> None:
    lifecycle.wait_healthy(url, START_TIMEOUT_S, proc, log)


def start_agent(tmp: Path, node: str, store_url: str, port: int | None = None,
                extra_args: tuple[str, ...] = (), tls: TestCerts | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """A real `python -m live.agent` with dram and sata tiers under `tmp` (same dirs on a restart); `extra_args`
    are more of its flags (--memory-budget, --max-num-seqs, --tier-bw, ...); `tls`: serve HTTPS with it."""
    port = port or free_port()
    argv = [sys.executable, "-m", "live.agent", "--node", node, "--port", str(port), "--token", AGENT_TOKEN,
            "--store", store_url, "--log-level", "warning", *extra_args]
    if tls is not None:
        argv += ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key)]
    for name in ("dram", "sata"):
        argv += ["--tier", f"{name}={tmp / f'{node}-{name}'}:{1 << 30}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    log = tmp / f"{node}.log"
    with open(log, "ab") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    lifecycle.wait_healthy(url, START_TIMEOUT_S, proc, log, "agent",
                           ssl.create_default_context(cafile=tls.ca) if tls else True)
    return proc, url


def stop_agent(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM: the agent stops its engines on the way out."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def serving(gateway: Gateway) -> Iterator[GatewayServer]:
    """Serve `gateway` with uvicorn in a thread on a free loopback port until the block ends."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(gateway), host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url)
        yield GatewayServer(gateway, url, server, thread)
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def publish_tiny(tmp: Path) -> str:
    """Publish the `tiny` checkpoint to a file:// store under `tmp`; the store URL."""
    ckpt = generate_checkpoint(tmp / "ckpt" / MODEL, "tiny", 0).path
    store_url = f"file://{tmp / 'cloud'}"
    Registry([store_url]).publish(MODEL, ckpt)
    return store_url


@contextlib.contextmanager
def cluster(tmp: Path, nodes: tuple[str, ...], bundle: PolicyBundle | None = None,
            **config: object) -> Iterator[Cluster]:
    """Agents for `nodes` over a fresh store, and a gateway (with `bundle`, default the gateway's) over them;
    everything stopped at the end."""
    store_url = publish_tiny(tmp)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    urls: dict[str, str] = {}
    try:
        for node in nodes:
            procs[node], urls[node] = start_agent(tmp, node, store_url)
        agents = [AgentRef(node, urls[node], AGENT_TOKEN) for node in nodes]
        gateway = Gateway(GatewayConfig(agents=agents, tenants=KEYS, admin_token=ADMIN_TOKEN, **config),  # type: ignore[arg-type]
                          bundle)
        with serving(gateway) as gs:
            yield Cluster(tmp, store_url, procs, urls, gs)
    finally:
        for proc in procs.values():
            stop_agent(proc)


@pytest.fixture(scope="module")
def gateway_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    """Publish `tiny`, start agents n0 and n1, then the gateway over them; all stopped at teardown."""
    with cluster(tmp_path_factory.mktemp("gw"), ("n0", "n1"), queue_timeout_s=2.0) as c:
        yield c.gs


@pytest.fixture(scope="module")
def null_engines() -> Iterator[Callable[..., NullEngineProcess]]:
    """Start null engine processes (`start(*extra_args)`); all stopped at teardown."""
    started: list[NullEngineProcess] = []

    def start(*extra_args: str, model_name: str = MODEL) -> NullEngineProcess:
        engine = NullEngineProcess(free_port(), model_name=model_name, extra_args=list(extra_args))
        started.append(engine)
        engine.start()
        engine.wait_ready(START_TIMEOUT_S)
        return engine

    try:
        yield start
    finally:
        for engine in started:
            engine.close()


def static_config(nodes: tuple[str, ...] = ("s0",), **config: object) -> GatewayConfig:
    """A gateway config over nodes without agents (instances come from `adopt_instance`)."""
    return GatewayConfig(agents=[AgentRef(n, "", "") for n in nodes], tenants=KEYS, admin_token=ADMIN_TOKEN,
                         **config)  # type: ignore[arg-type]


def kill_engine(engine: NullEngineProcess) -> None:
    """SIGKILL a null engine process and wait (up to 5 s) until it is gone."""
    assert engine.pid is not None
    os.kill(engine.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while lifecycle.pid_alive(engine.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
