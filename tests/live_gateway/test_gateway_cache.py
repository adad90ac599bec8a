"""The gateway's response cache (`live.gateway_cache`) with a real uvicorn gateway and a real null-engine
process: a hit is answered after the engine is killed (so without it), plain and streamed, marked by the
`x-tierlab-cache` header and the record's `cache` column; other tenants and non-deterministic requests never
get it; with the cache off (the default) the same requests fail."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pandas as pd
import pytest

from live.engines.null_server import REPLY, NullEngineProcess
from live.gateway import AgentRef, Gateway, GatewayConfig, Tenant
from live.gateway_cache import CACHE_HEADER
from tests.live_gateway import prom
from tests.live_gateway.conftest import ADMIN_TOKEN, MODEL, kill_engine, serving

StartEngine = Callable[..., NullEngineProcess]
KEYS = {"sk-alice": Tenant("alice", (MODEL,)), "sk-carol": Tenant("carol", (MODEL,))}
CACHE = {"exact": True, "semantic": True, "threshold": 0.8, "ttl_s": 600, "capacity": 100}
QUESTION = "What is the capital city of France?"


def _config(response_cache: dict[str, Any] | None) -> GatewayConfig:
    return GatewayConfig(agents=[AgentRef("s0", "", "")], tenants=dict(KEYS), admin_token=ADMIN_TOKEN,
                         queue_timeout_s=0.5, response_cache=response_cache)


def _ask(url: str, content: str, key: str = "sk-alice", stream: bool = False, **extra: Any) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "temperature": 0,
            "max_tokens": 8, "stream": stream, **extra}
    return httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                      timeout=30)


def _stream_text(r: httpx.Response) -> str:
    parts = []
    for line in r.text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            msg = json.loads(line[6:])
            for choice in msg.get("choices") or []:
                parts.append((choice.get("delta") or {}).get("content") or "")
    assert r.text.rstrip().endswith("data: [DONE]")
    return "".join(parts)




def _records(gw: Gateway, n: int) -> pd.DataFrame:
    deadline = time.monotonic() + 5
    while len(gw.records()) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    return gw.records()


def _warm_thenkill_engine(gw: Gateway, url: str, engine: NullEngineProcess) -> None:
    """Two misses served by the engine (one plain, one streamed), then the engine is killed."""
    gw.adopt_instance(MODEL, "s0", engine.url)
    first = _ask(url, QUESTION)
    assert first.status_code == 200 and first.headers[CACHE_HEADER] == ("miss" if gw.response_cache else "off")
    assert first.json()["choices"][0]["message"]["content"] == "".join(REPLY)
    streamed = _ask(url, "Name three prime numbers.", stream=True)
    assert streamed.status_code == 200 and _stream_text(streamed) == "".join(REPLY)
    _records(gw, 2)
    kill_engine(engine)


def test_hits_are_served_without_the_engine_plain_and_streamed(null_engines: StartEngine) -> None:
    engine = null_engines()
    gw = Gateway(_config(CACHE))
    with serving(gw) as gs:
        _warm_thenkill_engine(gw, gs.url, engine)
        # the engine is dead: whatever answers now comes from the cache
        exact = _ask(gs.url, QUESTION)
        assert exact.status_code == 200 and exact.headers[CACHE_HEADER] == "exact"
        assert exact.json()["choices"][0]["message"]["content"] == "".join(REPLY)
        assert exact.json()["usage"]["completion_tokens"] == len(REPLY)
        hit_stream = _ask(gs.url, QUESTION, stream=True, stream_options={"include_usage": True})
        assert hit_stream.status_code == 200 and hit_stream.headers[CACHE_HEADER] == "exact"
        assert hit_stream.headers["content-type"].startswith("text/event-stream")
        assert _stream_text(hit_stream) == "".join(REPLY) and '"usage"' in hit_stream.text
        cached_stream = _ask(gs.url, "Name three prime numbers.")  # stored from a relayed stream
        assert cached_stream.status_code == 200 and cached_stream.headers[CACHE_HEADER] == "exact"
        similar = _ask(gs.url, "what is the capital city of france")
        assert similar.status_code == 200 and similar.headers[CACHE_HEADER] == "semantic"
        # never across tenants, never for sampled answers, never for other parameters: these need the engine
        for r in (_ask(gs.url, QUESTION, key="sk-carol"), _ask(gs.url, QUESTION, temperature=0.7),
                  _ask(gs.url, QUESTION, max_tokens=4)):
            assert r.status_code in (502, 503) and CACHE_HEADER not in r.headers  # the engine is gone
        df = _records(gw, 9)
        assert list(df["cache"]) == ["", "", "exact", "exact", "exact", "semantic", "", "", ""]
        hits = df[df["cache"] != ""]
        assert (hits["outcome"] == "completed").all() and (hits["instance"] == "").all()
        assert (hits["cost_usd"] == 0).all() and (hits["output_tokens"] == len(REPLY)).all()
        assert (df.loc[df["cache"] == "", "outcome"][2:] != "completed").all()
        metrics = prom.parse(httpx.get(gs.url + "/metrics").text)
        assert prom.total(metrics, "tierlab_response_cache_hits_total", kind="exact") == 3
        assert prom.total(metrics, "tierlab_response_cache_hits_total", kind="semantic") == 1
        assert prom.total(metrics, "tierlab_response_cache_hits_total", tenant="carol") == 0
        assert prom.total(metrics, "tierlab_response_cache_lookups_total") == 8  # the 0.7 one is not cacheable


@pytest.mark.parametrize("cache", [None, {"exact": False, "semantic": False}])
def test_with_the_cache_off_every_request_needs_the_engine(null_engines: StartEngine,
                                                           cache: dict[str, Any] | None) -> None:
    engine = null_engines()
    gw = Gateway(_config(cache))
    assert gw.response_cache is None
    with serving(gw) as gs:
        _warm_thenkill_engine(gw, gs.url, engine)
        again = _ask(gs.url, QUESTION)
        assert again.status_code in (502, 503) and CACHE_HEADER not in again.headers
        assert list(_records(gw, 3)["cache"]) == ["", "", ""]


def test_bad_cache_config_is_refused() -> None:
    with pytest.raises(ValueError, match="response_cache"):
        _config({"exact": True, "ttl": 5})
