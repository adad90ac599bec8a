"""Queue accounting: requests beyond an engine's batch limit are `waiting` in the mirror (the engine queues them),
so the queue-threshold scale-up (`KeepAlive.scale_up_queue`, 4 per instance by default) starts a second
instance live, and fewer requests do not. Real gateway, fake agent over HTTP, null engine processes that batch 8
at a time and hold each request open for a while."""

from __future__ import annotations

import threading
import time

import httpx

from tests.live_gateway.conftest import MODEL, GatewayServer
from tests.live_gateway.fake_agent import FakeAgent, ask, fake_cluster, wait_for

BATCH = 8
ENGINE = ("--token-delay-s", "0.2", "--reply-tokens", "6", "--max-num-seqs", str(BATCH))


def _burst(gs: GatewayServer, n: int) -> tuple[list[int], list[tuple[int, int]]]:
    """`n` concurrent requests; their status codes and the (active, waiting) pairs of the first instance seen
    while they ran."""
    codes: list[int] = []
    first = next(iter(gs.gateway.state.instances.values()))
    seen: list[tuple[int, int]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            seen.append((first.active, first.waiting))
            time.sleep(0.01)

    def one() -> None:
        codes.append(ask(gs).status_code)

    sampler = threading.Thread(target=sample)
    sampler.start()
    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    done.set()
    sampler.join()
    return codes, seen


def test_requests_beyond_the_batch_limit_wait_and_start_another_instance() -> None:
    agent = FakeAgent("a0", {MODEL: 2000}, engine_args=ENGINE, max_num_seqs=BATCH)
    with fake_cluster(agent) as gs:
        gw = gs.gateway
        assert ask(gs).status_code == 200  # the first instance, cold
        (inst,) = gw.state.instances.values()
        assert inst.max_num_seqs == BATCH  # the engine's batch limit, from the agent's /status

        # 12 at once: 8 run and 4 wait, 4 per instance is not above the threshold: no second instance
        codes, seen = _burst(gs, 12)
        assert codes == [200] * 12
        assert max(a for a, _ in seen) == BATCH and (BATCH, 4) in seen
        assert all(a <= BATCH for a, _ in seen)
        assert list(gw.state.instances) == [inst.id] and (inst.active, inst.waiting) == (0, 0)

        # 24 at once: the 14th finds 5 waiting, so a second instance starts while the first is busy
        codes, _ = _burst(gs, 24)
        assert codes == [200] * 24
        assert wait_for(lambda: len(gw.state.instances) >= 2, 5)
        events = gw.instance_events()
        loads = events[events["event"] == "loading"]
        assert len(loads) >= 2 and inst.id in set(loads["instance"])
        df = gw.records()
        assert (df["outcome"] == "completed").all() and df["instance"].nunique() >= 2
        assert all(i.active == 0 and i.waiting == 0 for i in gw.state.instances.values())
        assert httpx.get(gs.url + "/healthz").status_code == 200
