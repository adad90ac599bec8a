"""Agents on other hosts: real agents bound to 127.0.0.2 and 127.0.0.3 (standing in for two hosts) join a real
gateway on 127.0.0.1 on their own (`--gateway URL --token T`), serve through CPU engines whose URLs name the
agent's host, are marked gone when killed (health checks) or stopped (leave), and rejoin after a restart. One
test runs gateway <-> agent traffic over TLS with certificates made at test time; one runs an agent in its own
network namespace (skipped where unprivileged namespaces are not allowed)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import uvicorn

from live import lifecycle
from live.agent_config import config_from_args
from live.engines.base import free_port
from live.gateway import AgentRef, Gateway, GatewayConfig, Tenant, create_app
from tests import tls_certs  # the module, not its TestCerts: pytest would try to collect that class here

REPO = Path(__file__).resolve().parents[2]
# as tests/live_gateway/conftest.py's (its `publish_tiny` is imported where used: it loads torch, which the
# network namespace scenario's own process does without)
AGENT_TOKEN = "agent-token"
ADMIN_TOKEN = "admin-secret"
MODEL = "tiny"
KEYS = {"sk-alice": Tenant("alice", (MODEL,))}
START_TIMEOUT_S = 30.0
# health checks every 0.5 s, 6 misses: a killed agent is gone after ~3 s; a leave marks it gone at once
HEALTH = {"health_interval_s": 0.5, "health_failures": 6, "health_timeout_s": 0.5, "queue_timeout_s": 30.0}
GONE_WITHIN_S = 10.0  # the bound on noticing a killed agent (6 x 0.5 s of checks, plus slack for a slow CI)


@dataclass
class Agent:
    """A `python -m live.agent` process standing in for a node on another host."""

    node: str
    host: str  # the address it advertises (its "host")
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    certs: tls_certs.TestCerts | None = None

    def url(self) -> str:
        return f"{'https' if self.certs else 'http'}://{self.host}:{self.port}"

    def verify(self) -> ssl.SSLContext | bool:
        return ssl.create_default_context(cafile=self.certs.ca) if self.certs else True


def start_agent(tmp: Path, node: str, host: str, store_url: str, gateway_url: str, *, bind: str | None = None,
                port: int | None = None, certs: tls_certs.TestCerts | None = None, wait: bool = True) -> Agent:
    """An agent listening on `bind` (default `host`) that advertises `host` and joins `gateway_url` on its own;
    `wait`: until it answers /healthz (else call `wait_healthy` later: agents started together start faster)."""
    bind = bind or host
    port = port or free_port(host)
    argv = [sys.executable, "-m", "live.agent", "--node", node, "--bind-host", bind, "--advertise-host", host,
            "--port", str(port), "--token", AGENT_TOKEN, "--store", store_url, "--log-level", "info",
            "--gateway", gateway_url, "--join-interval-s", "1", "--tier", f"dram={tmp / f'{node}-dram'}:{1 << 30}"]
    if certs is not None:
        argv += ["--tls-cert", str(certs.cert), "--tls-key", str(certs.key), "--gateway-ca", str(certs.ca)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    log = tmp / f"agent-{node}.log"
    with open(log, "ab") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    agent = Agent(node, host, port, proc, log, certs)
    if wait:
        wait_healthy(agent)
    return agent


def wait_healthy(agent: Agent) -> None:
    lifecycle.wait_healthy(agent.url(), START_TIMEOUT_S, agent.proc, agent.log, f"agent {agent.node}", agent.verify())


def stop(agent: Agent, sig: int = signal.SIGTERM) -> None:
    """Signal the agent and wait for it to exit."""
    if agent.proc.poll() is None:
        agent.proc.send_signal(sig)
        try:
            agent.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            agent.proc.kill()
            agent.proc.wait()


@contextlib.contextmanager
def serving(gateway: Gateway, certs: tls_certs.TestCerts | None = None) -> Iterator[str]:
    """The gateway on 127.0.0.1 (HTTPS with `certs`) in a thread; its base URL."""
    port = free_port()
    tls = {"ssl_certfile": str(certs.cert), "ssl_keyfile": str(certs.key)} if certs else {}
    server = uvicorn.Server(uvicorn.Config(create_app(gateway), host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on", **tls))  # type: ignore[arg-type]
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"{'https' if certs else 'http'}://127.0.0.1:{port}"
    try:
        lifecycle.wait_healthy(url, START_TIMEOUT_S, what="gateway",
                               verify=ssl.create_default_context(cafile=certs.ca) if certs else True)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def wait_until(what: str, predicate: Callable[[], bool], timeout_s: float = START_TIMEOUT_S) -> float:
    """Poll `predicate` every 50 ms; the seconds it took. AssertionError naming `what` after `timeout_s`."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"{what}: not within {timeout_s:g} s")
        time.sleep(0.05)
    return time.monotonic() - t0


def up(gw: Gateway, node: str) -> bool:
    return gw.state is not None and node in gw.state.nodes and gw.state.nodes[node].up


def ask(url: str, verify: ssl.SSLContext | bool = True) -> dict[str, Any]:
    """One chat completion through the gateway; the gateway's record of it."""
    r = httpx.post(url + "/v1/chat/completions", headers={"Authorization": "Bearer sk-alice"}, verify=verify,
                   json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] is not None
    return {"request_id": r.headers["x-tierlab-request-id"]}


def served_by(gw: Gateway) -> str:
    """The node that served the gateway's last request."""
    rows = gw.records()
    assert rows["outcome"].iloc[-1] == "completed", rows.tail(3).to_dict("records")
    return str(rows["node"].iloc[-1])


def engine_hosts(gw: Gateway, node: str) -> set[str]:
    """The hosts of the engine URLs the gateway forwards to on `node` (as its agent reported them)."""
    return {str(urlsplit(lv.url).hostname) for lv in list(gw.live.values()) if lv.inst.node == node and lv.url}


def agent_instance_urls(agent: Agent) -> list[str]:
    """The engine URLs the agent itself reports (GET /status)."""
    r = httpx.get(agent.url() + "/status", headers={"Authorization": f"Bearer {AGENT_TOKEN}"}, verify=agent.verify(),
                  timeout=10)
    return [i["url"] for i in r.json()["instances"]]


def publish_tiny(tmp: Path) -> str:
    """The `tiny` checkpoint in a file:// store under `tmp`; its URL."""
    from tests.live_gateway.conftest import publish_tiny as publish

    return publish(tmp)


def test_agents_on_two_hosts_join_leave_and_rejoin(tmp_path: Path) -> None:
    store_url = publish_tiny(tmp_path)
    port_a = free_port("127.0.0.2")
    # "a" is on the gateway's list (registration by the gateway); "b" is unknown to it and joins on its own
    gw = Gateway(GatewayConfig(agents=[AgentRef("a", f"http://127.0.0.2:{port_a}", AGENT_TOKEN)], tenants=KEYS,
                               admin_token=ADMIN_TOKEN, **HEALTH))  # type: ignore[arg-type]
    agents: dict[str, Agent] = {}
    try:
        with serving(gw) as url:
            assert not up(gw, "a")  # not started yet: down at start, brought in when it comes
            agents["a"] = start_agent(tmp_path, "a", "127.0.0.2", store_url, url, port=port_a, wait=False)
            agents["b"] = start_agent(tmp_path, "b", "127.0.0.3", store_url, url, wait=False)
            for agent in agents.values():
                wait_healthy(agent)
            wait_until("both agents joined", lambda: up(gw, "a") and up(gw, "b"))
            assert gw.agents["b"].url == f"http://127.0.0.3:{agents['b'].port}"
            assert gw.state is not None and {n.name for n in gw.state.cluster.nodes} == {"a", "b"}

            ask(url)
            first = served_by(gw)
            other = "b" if first == "a" else "a"
            host = agents[first].host
            assert engine_hosts(gw, first) == {host}, "engine URLs must name the agent's host, not 127.0.0.1"
            assert [urlsplit(u).hostname for u in agent_instance_urls(agents[first])] == [host]

            # killed without a word: the health checks notice within a bounded time, requests go to the other
            stop(agents[first], signal.SIGKILL)
            gone_s = wait_until(f"{first} marked down", lambda: not up(gw, first), GONE_WITHIN_S)
            print(f"killed agent {first} marked down {gone_s:.2f} s after exit")
            ask(url)
            assert served_by(gw) == other
            assert engine_hosts(gw, other) == {agents[other].host}

            # restarted on another port of the same host: it rejoins at its new URL and serves again
            agents[first] = start_agent(tmp_path, first, host, store_url, url)
            wait_until(f"{first} rejoined", lambda: up(gw, first))
            assert gw.agents[first].url == f"http://{host}:{agents[first].port}"

            # stopped cleanly: its leave marks it down at once (well before 6 missed health checks would)
            stop(agents[other])
            left_s = wait_until(f"{other} marked down by its leave", lambda: not up(gw, other), 1.0)
            print(f"stopped agent {other} marked down {left_s:.2f} s after exit")
            ask(url)
            assert served_by(gw) == first
            assert engine_hosts(gw, first) == {host}
            assert "joined gateway" in agents[first].log.read_text()
    finally:
        for a in agents.values():
            stop(a)


def test_remote_agents_over_tls_with_tokens(tmp_path: Path) -> None:
    certs = tls_certs.make_certs(tmp_path / "pki", ("127.0.0.1", "127.0.0.2", "127.0.0.3", "localhost"))
    verify = ssl.create_default_context(cafile=certs.ca)
    store_url = publish_tiny(tmp_path)
    port_a = free_port("127.0.0.2")
    gw = Gateway(GatewayConfig(agents=[AgentRef("a", f"https://127.0.0.2:{port_a}", AGENT_TOKEN)], tenants=KEYS,
                               admin_token=ADMIN_TOKEN, agent_ca=str(certs.ca), **HEALTH))  # type: ignore[arg-type]
    agents: list[Agent] = []
    try:
        with serving(gw, certs) as url:
            assert url.startswith("https://")
            # b listens on every interface and advertises 127.0.0.3: what it reports must name 127.0.0.3
            agents.append(start_agent(tmp_path, "b", "127.0.0.3", store_url, url, bind="0.0.0.0", certs=certs))
            wait_until("b joined over TLS", lambda: up(gw, "b"))
            assert gw.agents["b"].url == f"https://127.0.0.3:{agents[0].port}"
            ask(url, verify)
            assert served_by(gw) == "b"
            assert engine_hosts(gw, "b") == {"127.0.0.3"}  # not 0.0.0.0, the address it is bound to
            assert [urlsplit(u).hostname for u in agent_instance_urls(agents[0])] == ["127.0.0.3"]

            # tokens: a join with a wrong token, or as a listed node with another's token, is refused
            body = {"node": "mallory", "url": "https://127.0.0.3:1", "boot_id": "x"}
            wrong = httpx.post(url + "/agents/join", json=body, verify=verify,
                               headers={"Authorization": "Bearer not-the-token"}, timeout=10)
            assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_agent_token"
            anonymous = httpx.post(url + "/agents/leave", json={"node": "b", "boot_id": "x"}, verify=verify,
                                   timeout=10)
            assert anonymous.status_code == 401 and up(gw, "b")
            bad = httpx.post(url + "/agents/join", json={**body, "url": "ftp://127.0.0.3"}, verify=verify,
                             headers={"Authorization": f"Bearer {AGENT_TOKEN}"}, timeout=10)
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "url"
            # a leave of an earlier run of b (another boot_id) cannot take down the running one
            stale = httpx.post(url + "/agents/leave", json={"node": "b", "boot_id": "an-earlier-run"}, verify=verify,
                               headers={"Authorization": f"Bearer {AGENT_TOKEN}"}, timeout=10)
            assert stale.status_code == 409 and up(gw, "b")
            assert "mallory" not in gw.agents
            # a join over plain HTTP does not reach an HTTPS gateway at all
            with pytest.raises(httpx.TransportError):
                httpx.post(url.replace("https://", "http://") + "/agents/join", json=body, timeout=5)
    finally:
        for a in agents:
            stop(a)


def test_a_wildcard_bind_needs_an_advertised_address(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--token", "t", "--store", f"file://{tmp_path}", "--tier", f"dram={tmp_path / 'd'}:1M"]
    with pytest.raises(SystemExit):
        config_from_args([*base, "--bind-host", "0.0.0.0"])
    assert "advertise_host" in capsys.readouterr().err
    config, _ = config_from_args([*base, "--bind-host", "0.0.0.0", "--advertise-host", "10.1.2.3", "--port", "9"])
    assert (config.host, config.url) == ("0.0.0.0", "http://10.1.2.3:9")
    with pytest.raises(SystemExit):
        config_from_args([*base, "--gateway", "gw:8080"])
    assert "AgentConfig.gateway" in capsys.readouterr().err


def _netns_allowed() -> str:
    """"" if an unprivileged user + network namespace with a veth pair can be made here, else why not."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs unshare and ip (iproute2)"
    r = subprocess.run(["unshare", "-rn", "ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1"],
                       capture_output=True, text=True, timeout=10)
    return "" if r.returncode == 0 else f"unprivileged network namespaces are not permitted: {r.stderr.strip()}"


NETNS_GATEWAY, NETNS_AGENT = "10.77.0.1", "10.77.0.2"  # a veth pair between two private network namespaces


def _netns_scenario(tmp: Path, store_url: str) -> None:
    """Run inside `unshare -rn` (a private user and network namespace): the agent gets a network namespace of
    its own, joined to this one by a veth pair, so that its 127.0.0.1 is not the gateway's and only its advertised
    address 10.77.0.2 reaches it. The gateway serves a request through it, then notices it was killed."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    log = tmp / "agent-far.log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    port = 8700  # the agent's namespace is its own: no other process there can hold the port
    gw = Gateway(GatewayConfig(agents=[AgentRef("far", f"http://{NETNS_AGENT}:{port}", AGENT_TOKEN)], tenants=KEYS,
                               admin_token=ADMIN_TOKEN, **HEALTH))  # type: ignore[arg-type]
    with contextlib.ExitStack() as stack:
        gw_port = free_port()
        server = uvicorn.Server(uvicorn.Config(create_app(gw), host=NETNS_GATEWAY, port=gw_port,
                                               log_level="warning", lifespan="on"))
        url = f"http://{NETNS_GATEWAY}:{gw_port}"
        # the agent's namespace: wait for its end of the veth pair, give it the address, then become the agent
        agent_cmd = (f"until ip link show v1 >/dev/null 2>&1; do sleep 0.05; done; ip link set lo up; "
                     f"ip addr add {NETNS_AGENT}/24 dev v1; ip link set v1 up; "
                     f"exec {sys.executable} -m live.agent --node far --bind-host {NETNS_AGENT} --port {port} "
                     f"--token {AGENT_TOKEN} --store {store_url} --tier dram={tmp / 'far-dram'}:{1 << 30} "
                     f"--gateway {url} --join-interval-s 1 --log-level info")
        with open(log, "ab") as f:
            proc = subprocess.Popen(["unshare", "-n", "sh", "-c", agent_cmd], stdout=f, stderr=subprocess.STDOUT,
                                    env=env, cwd=REPO)
        stack.callback(lambda: (proc.kill(), proc.wait()))
        subprocess.run(["ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1", "netns", str(proc.pid)],
                       check=True)
        subprocess.run(["ip", "addr", "add", f"{NETNS_GATEWAY}/24", "dev", "v0"], check=True)
        subprocess.run(["ip", "link", "set", "v0", "up"], check=True)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        stack.callback(lambda: (setattr(server, "should_exit", True), thread.join(timeout=15)))
        lifecycle.wait_healthy(url, START_TIMEOUT_S, what="gateway")
        wait_until("the agent in its own namespace joined", lambda: up(gw, "far"), 60)
        assert gw.agents["far"].url == f"http://{NETNS_AGENT}:{port}"
        ask(url)
        assert served_by(gw) == "far"
        assert engine_hosts(gw, "far") == {NETNS_AGENT}
        proc.kill()
        proc.wait()
        wait_until("far marked down", lambda: not up(gw, "far"), GONE_WITHIN_S)
    print("netns scenario passed", flush=True)


def test_an_agent_in_its_own_network_namespace(tmp_path: Path) -> None:
    why = _netns_allowed()
    if why:
        pytest.skip(why)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    store_url = publish_tiny(tmp_path)  # here: the scenario's process need not load torch
    r = subprocess.run(["unshare", "-rn", sys.executable, "-m", "tests.live_serve.test_remote_agents", "netns",
                        str(tmp_path), store_url], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    agent_log = (tmp_path / "agent-far.log").read_text()[-2000:] if (tmp_path / "agent-far.log").exists() else ""
    assert r.returncode == 0 and "netns scenario passed" in r.stdout, \
        f"rc {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}\nagent log:\n{agent_log}"


if __name__ == "__main__":  # the network namespace scenario, run by the test above inside `unshare -rn`
    if sys.argv[1:2] == ["netns"]:
        _netns_scenario(Path(sys.argv[2]), sys.argv[3])
