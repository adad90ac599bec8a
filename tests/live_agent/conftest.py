"""Fixtures: a tiny checkpoint published to a file:// "cloud" store, and real agent processes started via the CLI."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from live.checkpoint import generate_checkpoint
from live.engines.base import free_port
from live.lifecycle import wait_healthy
from live.registry import Registry
from tests.tls_certs import TestCerts

# without the live extra (pip install -e ".[live]") these tests are skipped, not failed
for _dep in ("torch", "safetensors", "tokenizers", "starlette", "uvicorn"):
    pytest.importorskip(_dep)
httpx = pytest.importorskip("httpx")

REPO = Path(__file__).resolve().parents[2]
TOKEN = "test-token"
MODEL = "tiny"
START_TIMEOUT_S = 30.0


@dataclass
class Cloud:
    """A file:// store holding published models."""

    url: str
    root: Path
    registry: Registry


@dataclass
class AgentProc:
    """A `python -m live.agent` subprocess and an authorized client for it."""

    proc: subprocess.Popen[bytes]
    url: str
    tiers: dict[str, Path]
    log_path: Path
    host_dir: Path  # the agent's host-memory staging of cloud loads (not a tier)
    verify: ssl.SSLContext | bool = True  # trusts an https agent's CA
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120,
                                   verify=self.verify)

    def post(self, path: str, body: dict) -> httpx.Response:
        return self.client.post(path, json=body)

    def status(self) -> dict:
        return self.client.get("/status").json()

    def stop(self) -> int:
        """SIGTERM the agent and wait for it to exit; returns its exit code."""
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_checkpoint(tmp_path_factory.mktemp("ckpt") / MODEL, "tiny", 0).path


@pytest.fixture
def cloud(tmp_path: Path, tiny_ckpt: Path) -> Cloud:
    """A fresh file:// store with `tiny` published to it."""
    root = tmp_path / "cloud"
    url = f"file://{root}"
    registry = Registry([url])
    registry.publish(MODEL, tiny_ckpt)
    return Cloud(url, root, registry)


def _wait_healthy(agent: AgentProc, verify: ssl.SSLContext | bool = True) -> None:
    wait_healthy(agent.url, START_TIMEOUT_S, agent.proc, agent.log_path, "agent", verify)


@pytest.fixture
def start_agent(tmp_path: Path) -> Iterator[Callable[..., AgentProc]]:
    """Start agents with given tier capacities (bytes) against a store URL; all are stopped at teardown."""
    started: list[AgentProc] = []

    def start(store_url: str, capacities: dict[str, int] | None = None, store_options: dict | None = None,
              extra: Sequence[str] = (), tier_dirs: dict[str, Path] | None = None,
              host_dir: Path | None = None, tls: TestCerts | None = None) -> AgentProc:
        """`extra`: more agent flags (e.g. --tier-bw); `tier_dirs`, `host_dir`: reuse these dirs (a restarted
        agent); `tls`: serve HTTPS with that certificate."""
        capacities = capacities or {"dram": 1 << 30, "nvme": 1 << 30, "sata": 1 << 30}
        port = free_port()
        node = f"t{uuid.uuid4().hex[:6]}"
        tiers = tier_dirs or {name: tmp_path / f"{node}-{name}" for name in capacities}
        host_dir = host_dir or tmp_path / f"{node}-host"
        argv = [sys.executable, "-m", "live.agent", "--node", node, "--port", str(port), "--token", TOKEN,
                "--store", store_url, "--copy-streams", "4", "--log-level", "warning",
                "--store-options", json.dumps({store_url: store_options or {}}), "--host-dir", str(host_dir),
                *extra]
        if tls is not None:
            argv += ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key)]
        for name, cap in capacities.items():
            argv += ["--tier", f"{name}={tiers[name]}:{cap}"]
        log_path = tmp_path / f"{node}.log"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        agent = AgentProc(proc, f"{'https' if tls else 'http'}://127.0.0.1:{port}", tiers, log_path, host_dir,
                          ssl.create_default_context(cafile=tls.ca) if tls else True)
        started.append(agent)
        _wait_healthy(agent, agent.verify)
        return agent

    yield start
    for agent in started:
        agent.stop()
