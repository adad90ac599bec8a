"""Agent faults, with real agents (their own, not the shared fixture's: these tests kill them), in order:

1. the agent loading a request's model is SIGKILLed: its node is marked down and the waiting request is placed
   again on the other node;
2. an agent answers again on that address: its node is marked up, its tiers re-read;
3. an idle agent is SIGKILLed: the health loop marks it down within the failure threshold, its instance is
   dropped, the next request cold-starts elsewhere, and its engine does not outlive it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from live.lifecycle import pid_alive
from tests.live_gateway import prom
from tests.live_gateway.conftest import AGENT_TOKEN, MODEL, Cluster, cluster, start_agent

HEALTH_INTERVAL_S = 0.2
HEALTH_FAILURES = 3
SLACK_S = 3.0  # scheduling on a busy 2-core machine, plus one probe timeout


@pytest.fixture(scope="module")
def fragile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    # `cluster` stops every process in Cluster.agents at the end, restarted agents too
    with cluster(tmp_path_factory.mktemp("fragile"), ("a0", "a1"), health_interval_s=HEALTH_INTERVAL_S,
                 health_failures=HEALTH_FAILURES, health_timeout_s=0.5, queue_timeout_s=10.0) as c:
        yield c


def _ask(c: Cluster) -> None:
    client = openai.OpenAI(base_url=c.gs.url + "/v1", api_key="sk-alice", max_retries=0, timeout=120)
    out = client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert out.choices[0].text is not None


def _metrics(c: Cluster) -> dict[str, prom.Family]:
    return prom.parse(httpx.get(c.gs.url + "/metrics").text)


def _engine_pids(c: Cluster, node: str) -> list[int]:
    status = httpx.get(c.urls[node] + "/status", headers={"Authorization": f"Bearer {AGENT_TOKEN}"}).json()
    return [i["pid"] for i in status["instances"]]


def _wait(cond: object, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.01)
    return bool(cond())  # type: ignore[operator]


def test_request_waiting_on_a_load_is_placed_again_when_the_agent_dies(fragile: Cluster) -> None:
    gw = fragile.gs.gateway
    errors: list[BaseException] = []

    def ask() -> None:
        try:
            _ask(fragile)
        except BaseException as e:  # reported by the test thread below
            errors.append(e)

    asker = threading.Thread(target=ask)
    asker.start()
    # TierAware breaks the tie between two empty nodes by name: the cold start goes to a0
    assert _wait(lambda: any(i.loading and i.node == "a0" for i in gw.state.instances.values()), 30)
    assert gw.queued == 1
    fragile.agents["a0"].kill()  # SIGKILL mid-load
    fragile.agents["a0"].wait()
    asker.join(timeout=120)
    assert not asker.is_alive() and not errors, errors
    assert not gw.state.nodes["a0"].up  # the broken /load said so at once
    (row,) = gw.records().itertuples()
    assert (row.outcome, row.node, row.cold_start) == ("completed", "a1", True)
    assert gw.queued == 0 and [i.node for i in gw.state.instances.values()] == ["a1"]
    events = gw.instance_events()
    assert list(events[events["event"] == "stopped"]["reason"]) == ["node_down"]


def test_agent_back_on_its_address_is_marked_up_with_its_tiers(fragile: Cluster) -> None:
    gw = fragile.gs.gateway
    port = int(fragile.urls["a0"].rsplit(":", 1)[1])
    fragile.agents["a0"], _ = start_agent(fragile.tmp, "a0", fragile.store_url, port=port)  # same tier dirs
    assert _wait(lambda: gw.state.nodes["a0"].up, HEALTH_INTERVAL_S + SLACK_S), "not marked up again"
    status = httpx.get(fragile.urls["a0"] + "/status", headers={"Authorization": f"Bearer {AGENT_TOKEN}"}).json()
    for tier, t in status["tiers"].items():  # the mirror holds what the agent's tiers hold
        assert set(gw.state.nodes["a0"].tiers[tier].entries) == set(t["models"])
    assert status["instances"] == []
    assert prom.value(_metrics(fragile), "tierlab_agents", state="down") == 0


def test_killed_idle_agent_is_marked_down_and_its_model_placed_elsewhere(fragile: Cluster) -> None:
    gw = fragile.gs.gateway
    (inst,) = gw.state.instances.values()
    (engine_pid,) = _engine_pids(fragile, "a1")
    fragile.agents["a1"].kill()  # SIGKILL: no shutdown; its engine exits with its parent
    fragile.agents["a1"].wait()
    assert _wait(lambda: not gw.state.nodes["a1"].up, HEALTH_INTERVAL_S * HEALTH_FAILURES + SLACK_S), \
        "not marked down within the threshold"
    assert inst.id not in gw.state.instances and inst.id not in gw.live
    fams = _metrics(fragile)
    assert prom.value(fams, "tierlab_agents", state="down") == 1
    assert prom.value(fams, "tierlab_agent_up", node="a1") == 0
    assert prom.value(fams, "tierlab_instances", status="ready") == 0

    _ask(fragile)
    row = gw.records().iloc[-1]
    assert (row["outcome"], row["node"], row["cold_start"]) == ("completed", "a0", True)
    assert _wait(lambda: not pid_alive(engine_pid), 5), "the dead agent's engine outlived it"
