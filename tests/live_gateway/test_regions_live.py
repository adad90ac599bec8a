"""Regions, live: agents labelled by region (`--region`), the gateway routing by the client's region
(`x-tierlab-client-region`) with the same policy as the simulator (core/policies/regions.py), the emulated round
trip recorded as `network_s`, and failover to another region when a region's agent and engines stop answering,
detected by the gateway's health checks (interval + timeout + misses), not by a fixed delay."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from core.policies.base import Hooks, PolicyBundle
from core.policies.regions import RegionKeepAlive, RegionRouting
from core.regions import regions_from_dict
from live.gateway import REQUEST_ID_HEADER, AgentRef, Gateway, GatewayConfig
from live.gateway_records import CLIENT_REGION_HEADER
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

REPO = Path(__file__).resolve().parents[2]
REGIONS = yaml.safe_load((REPO / "conf" / "regions" / "default.yaml").read_text())
NODES = {"use": "us-east-1", "euw": "eu-west-1"}
# health checks every 0.1 s, each given 0.2 s, 3 misses: a silent region is marked down ~0.6-0.9 s after it stops
HEALTH = {"health_interval_s": 0.1, "health_timeout_s": 0.2, "health_failures": 3}
FAILOVER_LIMIT_S = 2.0


def _bundle() -> PolicyBundle:
    return PolicyBundle(RegionRouting(REGIONS), Hooks(), RegionKeepAlive(REGIONS, keep_alive_s=600.0),
                        name="region_aware")


@contextlib.contextmanager
def _regions_cluster(tmp: Path) -> Iterator[tuple[Any, dict[str, Any], dict[str, str]]]:
    store_url = publish_tiny(tmp)
    procs: dict[str, Any] = {}
    urls: dict[str, str] = {}
    try:
        for node, region in NODES.items():
            procs[node], urls[node] = start_agent(tmp, node, store_url, extra_args=("--region", region))
        agents = [AgentRef(n, urls[n], AGENT_TOKEN) for n in NODES]
        gw = Gateway(GatewayConfig(agents=agents, tenants=dict(KEYS), admin_token=ADMIN_TOKEN, queue_timeout_s=30.0,
                                   **HEALTH), _bundle())  # type: ignore[arg-type]
        with serving(gw) as gs:
            yield gs, procs, urls
    finally:
        for proc in procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
            stop_agent(proc)


def _ask(url: str, client_region: str, timeout_s: float = 60.0) -> int:
    """One completion from a client in `client_region`; the gateway's request id."""
    r = httpx.post(url + "/v1/completions", timeout=timeout_s,
                   headers={"Authorization": "Bearer sk-alice", CLIENT_REGION_HEADER: client_region},
                   json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
    r.raise_for_status()
    return int(r.headers[REQUEST_ID_HEADER])


def _row(gw: Gateway, rid: int) -> Any:
    df = gw.records()
    return df[df.request_id == rid].iloc[0]


def _wait(cond: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.02)
    return bool(cond())


def test_agents_carry_regions_routing_follows_the_client_and_a_silent_region_fails_over(tmp_path: Path) -> None:
    table = regions_from_dict(REGIONS)
    with _regions_cluster(tmp_path) as (gs, procs, urls):
        gw = gs.gateway
        assert {n: gw.state.nodes[n].spec.region for n in NODES} == NODES  # from the agents' /status
        # a European client: cold start in eu-west-1 (both empty; the near one wins)
        row = _row(gw, _ask(gs.url, "eu-west-1"))
        assert row.node == "euw" and row.client_region == "eu-west-1"
        assert row.network_s == pytest.approx(table.client_rtt_s("eu-west-1", "eu-west-1"))
        # an American client: served warm from Europe at once (68 ms away beats a cold start), while a replica
        # starts in us-east-1 in the background (RegionKeepAlive)
        row = _row(gw, _ask(gs.url, "us-east-1"))
        assert row.node == "euw" and row.network_s == pytest.approx(table.client_rtt_s("us-east-1", "eu-west-1"))
        assert row.ttft_s >= row.network_s
        assert _wait(lambda: any(i.node == "use" and i.ready for i in gw.state.instances.values()), 60)
        row = _row(gw, _ask(gs.url, "us-east-1"))
        assert row.node == "use" and row.network_s == pytest.approx(table.access_ms / 1e3)

        # us-east-1 goes silent: its agent and engines stop (SIGSTOP: connections hang, nothing is refused)
        status = httpx.get(urls["use"] + "/status", headers={"Authorization": f"Bearer {AGENT_TOKEN}"}).json()
        pids = [procs["use"].pid, *(i["pid"] for i in status["instances"] if i.get("pid"))]
        results: list[tuple[float, float, int | None]] = []  # (sent, answered, request id) after the stop
        lock = threading.Lock()

        def ask_at(t_sent: float) -> None:
            try:
                rid: int | None = _ask(gs.url, "us-east-1", timeout_s=20.0)
            except httpx.HTTPError:
                rid = None
            with lock:
                results.append((t_sent, time.monotonic(), rid))

        t_stop = time.monotonic()
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        threads = []
        while time.monotonic() - t_stop < 4.0:  # a us-east-1 client asks every 100 ms
            th = threading.Thread(target=ask_at, args=(time.monotonic(),), daemon=True)
            th.start()
            threads.append(th)
            time.sleep(0.1)
        assert not gw.state.nodes["use"].up  # marked down by missed health checks
        down_events = gw.instance_events()
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        for th in threads:
            th.join(timeout=30)
        nodes = {rid: _row(gw, rid).node for _, _, rid in results if rid is not None}
        moved = [(t_done - t_stop) for _, t_done, rid in results if rid is not None and nodes[rid] == "euw"]
        assert moved, "no request failed over to eu-west-1"
        first_s = min(moved)
        stopped = down_events[(down_events.node == "use") & (down_events.reason == "node_down")]
        print(f"failover: first request answered from eu-west-1 {first_s:.2f} s after us-east-1 stopped; "
              f"{len(moved)} of {len(results)} requests sent over 4 s served there; node_down events: {len(stopped)}")
        assert first_s < FAILOVER_LIMIT_S
        # once failed over, every later request from the silent region's clients is served from eu-west-1
        late = [rid for t_sent, _, rid in results if t_sent - t_stop > FAILOVER_LIMIT_S]
        assert late and all(rid is not None and nodes[rid] == "euw" for rid in late)
