"""Cache-aware routing behind the live gateway: the gateway gives each request its prompt's block keys
(`live.gateway_api.prefix_keys`), and the same `core.policies.prefix_aware.PrefixAware` the simulator runs
sends a conversation's next turn to the instance that served its prefix. With plain tier-aware placement (the
mechanism off) the turn goes to the idle instance instead. Real gateways over two null engines."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from core.policies.autoscaling import KeepAlive
from core.policies.base import PolicyBundle
from core.policies.caching import NoCaching
from core.policies.placement import TierAware
from core.policies.prefix_aware import PrefixAware
from live.engines.null_server import NullEngineProcess
from live.gateway import Gateway
from live.gateway_api import prefix_keys
from live.gateway_records import cached_prompt_tokens
from tests.live_gateway.conftest import KEYS, MODEL, serving, static_config

StartEngine = Callable[..., NullEngineProcess]
SYSTEM = "You are a careful assistant for a serverless inference testbed. " * 6  # ~380 characters: 5 blocks


def turn(user: str) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 4,
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]}


def test_prefix_keys_share_the_common_prefix_only() -> None:
    a, b = prefix_keys(turn("first question " * 10)), prefix_keys(turn("a different one " * 10))
    assert len(a) >= 7 and a[:5] == b[:5] and a != b
    assert prefix_keys({"prompt": "short"}) == ()
    assert cached_prompt_tokens({"prompt_tokens": 9, "prompt_tokens_details": {"cached_tokens": 8}}) == 8
    assert cached_prompt_tokens({"prompt_tokens": 9}) == 0


def _second_turn_instance(placement: Any, null_engines: StartEngine) -> tuple[str, str]:
    """(instance of the first turn, instance of the second), the second sent while the first still runs."""
    engines = [null_engines("--token-delay-s", "0.4") for _ in range(2)]
    gw = Gateway(static_config(("s0", "s1"), tick=False),
                 PolicyBundle(placement, NoCaching(), KeepAlive(keep_alive_s=300), name="prefix_test"))
    key = next(iter(KEYS))
    headers = {"authorization": f"Bearer {key}"}
    with serving(gw) as served:
        gw.adopt_instance(MODEL, "s0", engines[0].url)
        gw.adopt_instance(MODEL, "s1", engines[1].url)
        first = threading.Thread(target=lambda: httpx.post(f"{served.url}/v1/chat/completions", json=turn("one"),
                                                           headers=headers, timeout=30))
        first.start()
        time.sleep(0.5)  # the first turn is running on its instance
        r = httpx.post(f"{served.url}/v1/chat/completions", json=turn("two"), headers=headers, timeout=30)
        assert r.status_code == 200, r.text
        first.join(30)
        rec = gw.records().sort_values("request_id")
    assert list(rec["outcome"]) == ["completed", "completed"]
    return str(rec["instance"].iloc[0]), str(rec["instance"].iloc[1])


def test_the_next_turn_follows_its_prefix(null_engines: StartEngine) -> None:
    a, b = _second_turn_instance(PrefixAware(TierAware(), balance_slack=4), null_engines)
    assert a == b


def test_without_cache_aware_routing_the_next_turn_goes_to_the_idle_instance(null_engines: StartEngine) -> None:
    a, b = _second_turn_instance(TierAware(), null_engines)
    assert a != b


def test_the_gateway_records_the_cpu_engines_cached_tokens(tmp_path_factory: Any) -> None:
    """The whole live chain: a CPU engine with a prefix cache behind the gateway; the second prompt sharing the
    first's start is answered partly from the engine's cache, and the gateway's record says how many tokens."""
    from tests.live_engine.conftest import make_checkpoint, serve_engine

    ckpt = make_checkpoint(tmp_path_factory.mktemp("prefix_gw") / MODEL)
    shared = "Serverless inference loads a model when the first request arrives. " * 3
    key = next(iter(KEYS))
    with serve_engine(ckpt, MODEL, prefix_cache_blocks=64, prefix_block_tokens=8) as engine:
        gw = Gateway(static_config(("s0",), tick=False))
        with serving(gw) as served:
            gw.adopt_instance(MODEL, "s0", engine.url)
            for tail in ("hello world", "a cold start"):
                r = httpx.post(f"{served.url}/v1/completions", headers={"authorization": f"Bearer {key}"},
                               json={"model": MODEL, "prompt": shared + tail, "max_tokens": 3}, timeout=60)
                assert r.status_code == 200, r.text
            rec = gw.records().sort_values("request_id")
    assert list(rec["outcome"]) == ["completed", "completed"]
    assert rec["cached_tokens"].iloc[0] == 0 and rec["cached_tokens"].iloc[1] >= 8
    # the live run's summary reports the hits with the simulator's keys (core.metrics.prefix_cache_stats)
    from live.outputs import live_summary

    summary = live_summary(rec.reset_index(drop=True), wall_s=1.0, ttft_slo_s=10.0)
    assert summary["cached_tokens"] == int(rec["cached_tokens"].sum())
    assert summary["prefix_hit_requests"] == 0.5
    assert summary["prefix_hit_rate"] == summary["cached_tokens"] / rec["prompt_tokens"].sum()


def test_an_agent_started_with_a_prefix_cache_gives_it_to_its_engines(tmp_path: Any) -> None:
    """`live.agent --prefix-cache-blocks N` (what `live.serve`'s `node.prefix_cache_blocks` passes): the CPU engine
    it starts caches prefixes, so a second prompt sharing the first's start is partly served from the cache; an
    agent without the flag starts engines without one (cached_tokens stays 0)."""
    from live.checkpoint import generate_checkpoint
    from live.gateway import AgentRef, GatewayConfig, Tenant
    from live.llama_config import model_spec
    from live.registry import Registry
    from tests.live_gateway.conftest import ADMIN_TOKEN, AGENT_TOKEN, start_agent, stop_agent

    store_url = f"file://{tmp_path / 'cloud'}"
    info = generate_checkpoint(tmp_path / "ckpt" / "x", "tiny", 0)
    Registry([store_url]).publish("x", info.path)
    shared = "Serverless inference loads a model when the first request arrives. " * 3
    cached = {}
    for blocks in (64, 0):
        (tmp_path / f"b{blocks}").mkdir()
        proc, url = start_agent(tmp_path / f"b{blocks}", "p0", store_url,
                                extra_args=("--prefix-cache-blocks", str(blocks), "--prefix-block-tokens", "8"))
        try:
            status = httpx.get(url + "/status", headers={"Authorization": f"Bearer {AGENT_TOKEN}"}).json()
            assert status["engine"]["prefix_cache_blocks"] == blocks
            config = GatewayConfig(agents=[AgentRef("p0", url, AGENT_TOKEN)], tenants={"k": Tenant("t", ("x",))},
                                   models={"x": model_spec("x", info.params, 4)}, admin_token=ADMIN_TOKEN, tick=False)
            gw = Gateway(config, PolicyBundle(TierAware(), NoCaching(), KeepAlive(keep_alive_s=300)))
            with serving(gw) as gs:
                for tail in ("hello world", "a cold start"):
                    r = httpx.post(gs.url + "/v1/completions", headers={"Authorization": "Bearer k"}, timeout=120,
                                   json={"model": "x", "prompt": shared + tail, "max_tokens": 2})
                    assert r.status_code == 200, r.text
                cached[blocks] = list(gw.records().sort_values("request_id")["cached_tokens"])
        finally:
            stop_agent(proc)
    assert cached[64][0] == 0 and cached[64][1] >= 8
    assert cached[0] == [0, 0]


def test_a_prefix_cache_for_an_engine_that_has_its_own_is_refused() -> None:
    from live.agent_config import EngineSettings

    with pytest.raises(ValueError, match="prefix_cache_blocks: only the cpu engine"):
        EngineSettings(kind="tokasaurus", prefix_cache_blocks=16)
    with pytest.raises(ValueError, match="prefix_cache_blocks must be >= 0"):
        EngineSettings(prefix_cache_blocks=-1)
