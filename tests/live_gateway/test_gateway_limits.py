"""The gateway's limits (issue 14, item 3): body size (413 before the rest is read), prompts that certainly do not
fit the model's context (400 before any engine), per-tenant request rate, token quota and concurrency (429 with
Retry-After), parameters no engine honours (400, never ignored), and client errors recorded as `rejected`.

The limiter's arithmetic is tested on a fake clock; each refusal once more through a real gateway (uvicorn on
loopback, null engine processes behind it), whose answers must conform to /openapi.json.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pandas as pd
import pytest

from core.metrics import summarize
from live.engines.null_server import NullEngineProcess
from live.gateway import Gateway
from live.gateway_api import (
    REFUSED_PARAMS,
    ApiError,
    Tenant,
    check_context,
    prompt_tokens_lower_bound,
    validate,
)
from live.gateway_limits import Limiter, LimitExceeded, TenantLimits, TokenBucket, retry_after_header
from tests.live_gateway.conftest import MODEL, GatewayServer, serving, static_config
from tests.live_gateway.test_openapi import conforms

StartEngine = Callable[..., NullEngineProcess]
ALICE = {"authorization": "Bearer sk-alice"}
CHAT, LEGACY = "/v1/chat/completions", "/v1/completions"
TENANT = Tenant("alice", (MODEL,))


def _chat(content: str = "hi", **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **fields}


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------------------------------------- units


def test_token_bucket_refills_at_its_rate_up_to_its_capacity() -> None:
    b = TokenBucket(rate=2.0, capacity=4, now=0.0)
    assert b.wait_s(4, 0.0) == 0
    b.take(4, 0.0)
    assert b.wait_s(1, 0.0) == pytest.approx(0.5)
    assert b.wait_s(4, 1.0) == pytest.approx(1.0)  # 2 back after 1 s
    assert b.wait_s(1, 100.0) == 0 and b.level == 4  # never above capacity
    assert math.isinf(b.wait_s(5, 100.0))
    b.take(6, 100.0)  # an overrun: the level goes below zero, the next wait is longer
    assert b.wait_s(1, 100.0) == pytest.approx(1.5)


def test_request_rate_with_burst_and_retry_after() -> None:
    clock = FakeClock()
    lim = Limiter({"alice": TenantLimits(requests_per_s=0.5, burst=2)}, clock)
    for _ in range(2):
        lim.release(lim.admit("alice", 10), 10)  # type: ignore[arg-type]
    with pytest.raises(LimitExceeded) as e:
        lim.admit("alice", 10)
    assert e.value.code == "rate_limit_exceeded" and e.value.retry_after_s == pytest.approx(2.0)
    clock.now = 1.9
    with pytest.raises(LimitExceeded):
        lim.admit("alice", 10)
    clock.now = 2.0
    assert lim.admit("alice", 10) is not None
    assert lim.admit("bob", 10) is None  # no limits of its own and no "*": unlimited


def test_every_tenant_entry_and_concurrency() -> None:
    lim = Limiter({"*": TenantLimits(max_concurrent=2)}, FakeClock())
    a, b = lim.admit("alice", 1), lim.admit("alice", 1)
    assert lim.admit("bob", 1) is not None  # each tenant its own count
    with pytest.raises(LimitExceeded) as e:
        lim.admit("alice", 1)
    assert e.value.code == "rate_limit_exceeded" and e.value.retry_after_s == 1.0
    lim.release(a, 0)  # type: ignore[arg-type]
    assert lim.admit("alice", 1) is not None
    assert b is not None


def test_token_quota_reserves_then_settles_with_usage() -> None:
    clock = FakeClock()
    lim = Limiter({"alice": TenantLimits(tokens_per_window=100, window_s=10.0)}, clock)
    p = lim.admit("alice", 80)
    with pytest.raises(LimitExceeded) as e:  # 20 left while 80 are reserved
        lim.admit("alice", 30)
    assert e.value.code == "insufficient_quota" and e.value.retry_after_s == pytest.approx(1.0)  # 10 tokens/s
    lim.release(p, 30)  # used 30 of the 80: 50 come back
    assert lim.admit("alice", 70) is not None  # 70 left
    with pytest.raises(LimitExceeded) as e:
        lim.admit("alice", 101)  # more than the whole quota: never
    assert e.value.retry_after_s is None and e.value.code == "exceeds_token_quota"
    # an overrun is charged: 0 left, then 20 more than reserved -> 2 s more to wait
    q = lim.admit("bob", 1)
    assert q is None
    clock.now = 100.0
    r = lim.admit("alice", 100)
    lim.release(r, 120)  # type: ignore[arg-type]
    with pytest.raises(LimitExceeded) as e:
        lim.admit("alice", 10)
    assert e.value.retry_after_s == pytest.approx(3.0)


def test_retry_after_is_whole_seconds_rounded_up() -> None:
    assert [retry_after_header(s) for s in (0.0, 0.2, 1.0, 1.01, 59.5)] == ["1", "1", "1", "2", "60"]


@pytest.mark.parametrize(("value", "field"), [
    ({"requests_per_s": 0}, "requests_per_s"), ({"requests_per_s": float("inf")}, "requests_per_s"),
    ({"burst": 2}, "burst"), ({"requests_per_s": 1, "burst": 1.5}, "burst"),
    ({"tokens_per_window": -1}, "tokens_per_window"), ({"window_s": 0}, "window_s"),
    ({"max_concurrent": True}, "max_concurrent"), ({"rps": 1}, "rps"),
])
def test_bad_limits_name_the_field(value: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        static_config(limits={"alice": value})


@pytest.mark.parametrize(("config", "field"), [
    ({"limits": {"carol": {"max_concurrent": 1}}}, "carol"), ({"max_body_bytes": 0}, "max_body_bytes"),
    ({"context_tokens": {"nope": 10}}, "context_tokens"), ({"context_tokens": {MODEL: 0}}, "context_tokens"),
    ({"max_token_bytes": 1.5}, "max_token_bytes"), ({"honoured_params": ["temperature"]}, "honoured_params"),
])
def test_bad_gateway_limits_config_names_the_field(config: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        static_config(**config)


def test_prompt_lower_bound_never_overcounts() -> None:
    text = "x" * 1000
    assert prompt_tokens_lower_bound({"prompt": text}, 256) == 4
    assert prompt_tokens_lower_bound({"prompt": [1, 2, 3]}) == 3  # token ids count exactly
    assert prompt_tokens_lower_bound({"prompt": ["a" * 600, "b"]}, 256) == 3  # a batch: its longest prompt
    parts = [{"type": "text", "text": "é" * 256}, {"type": "image_url", "image_url": {"url": "x" * 9999}}]
    assert prompt_tokens_lower_bound({"messages": [{"role": "user", "content": parts}]}, 256) == 2  # UTF-8 bytes
    assert prompt_tokens_lower_bound({"messages": "not a list"}) == 0


def test_check_context() -> None:
    check_context(_chat("x" * 256 * 10, max_tokens=90), CHAT, 100, 256)  # 10 + 90 fits
    with pytest.raises(ApiError) as e:
        check_context(_chat("x" * 256 * 10, max_tokens=91), CHAT, 100, 256)
    assert (e.value.status, e.value.code, e.value.param) == (400, "context_length_exceeded", "max_tokens")
    with pytest.raises(ApiError) as e:
        check_context({"model": MODEL, "prompt": "x" * 256 * 101}, LEGACY, 100, 256)
    assert e.value.param == "prompt"


@pytest.mark.parametrize("name", sorted(REFUSED_PARAMS))
def test_refused_parameters_only_when_they_ask_for_something(name: str) -> None:
    for neutral in (None, *REFUSED_PARAMS[name]):
        validate(_chat(**{name: neutral}), CHAT, TENANT, {MODEL})
    asking = {"response_format": {"type": "json_object"}, "tools": [{"type": "function"}], "tool_choice": "required",
              "functions": [{"name": "f"}], "function_call": {"name": "f"}, "logit_bias": {"50256": -100},
              "presence_penalty": 0.5, "frequency_penalty": True}[name]
    with pytest.raises(ApiError) as e:
        validate(_chat(**{name: asking}), CHAT, TENANT, {MODEL})
    assert (e.value.status, e.value.code, e.value.param) == (400, "unsupported_parameter", name)
    validate(_chat(**{name: asking}), CHAT, TENANT, {MODEL}, refused=())  # `honoured_params` lists it


# ---------------------------------------------------------------------------------------------- a live gateway


@pytest.fixture(scope="module")
def engine(null_engines: StartEngine) -> NullEngineProcess:
    return null_engines("--reply-tokens", "20")


@contextlib.contextmanager
def limited(engine: NullEngineProcess, **config: Any) -> Iterator[GatewayServer]:
    """A gateway with `config` on loopback, `tiny` adopted on `engine`."""
    gw = Gateway(static_config(**config))
    with serving(gw) as gs:
        gw.adopt_instance(MODEL, "s0", engine.url)  # no request is in flight yet
        yield gs


def rows(gs: GatewayServer, n: int) -> pd.DataFrame:
    """The gateway's records once it has `n` rows (a stream's row is written as it ends)."""
    deadline = time.monotonic() + 10
    while len(gs.gateway.records()) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    return gs.gateway.records()


def post(gs: GatewayServer, body: Any, path: str = CHAT, **kw: Any) -> httpx.Response:
    r = httpx.post(gs.url + path, headers=ALICE, timeout=30, **({"json": body} if isinstance(body, dict) else
                                                                 {"content": body}), **kw)
    conforms(r, path)
    return r


def engine_serial(r: httpx.Response) -> int:
    """The null engine's response number (`chatcmpl-null-<n>`): how many requests it has seen."""
    return int(r.json()["id"].rsplit("-", 1)[1])


def summary(df: pd.DataFrame) -> dict[str, Any]:
    return summarize(df, gpu_hours=0, cost_usd=0, cost_breakdown={}, memory_waste_frac=0, sim_s=1, wall_s=1,
                     ttft_slo_s=1)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_huge_body_is_413_before_it_is_read_and_never_reaches_the_engine(engine: NullEngineProcess,
                                                                         chunked: bool) -> None:
    huge = b'{"model": "tiny", "messages": [{"role": "user", "content": "' + b"x" * (10 << 20) + b'"}]}'
    with limited(engine, max_body_bytes=1 << 20) as gs:
        before = engine_serial(post(gs, _chat()))
        t0 = time.monotonic()
        if chunked:  # a generator: httpx sends it chunked, without Content-Length
            r = post(gs, (huge[i:i + 65536] for i in range(0, len(huge), 65536)))
        else:
            r = post(gs, huge)
        took = time.monotonic() - t0
        assert r.status_code == 413, r.text
        assert r.json()["error"]["code"] == "request_too_large"
        assert took < 5.0
        after = engine_serial(post(gs, _chat()))
        df = rows(gs, 3)
    assert after == before + 1  # the engine saw the two small requests only
    row = df[df["request_id"] == int(r.headers["x-tierlab-request-id"])].iloc[0]
    assert (row["outcome"], row["reason"], row["tenant"]) == ("rejected", "request_too_large", "alice")


def test_prompt_over_the_context_is_400_before_the_engine(engine: NullEngineProcess) -> None:
    with limited(engine, context_tokens={MODEL: 100}, max_token_bytes=4) as gs:
        before = engine_serial(post(gs, _chat()))
        long = post(gs, _chat("x" * 404))  # at least 101 tokens
        room = post(gs, _chat("x" * 360, max_tokens=11))  # 90 + 11
        fits = post(gs, _chat("x" * 360, max_tokens=10))
        df = rows(gs, 4)
    assert long.status_code == 400 and long.json()["error"]["param"] == "messages", long.text
    assert room.status_code == 400 and room.json()["error"]["param"] == "max_tokens", room.text
    assert long.json()["error"]["code"] == room.json()["error"]["code"] == "context_length_exceeded"
    assert fits.status_code == 200 and engine_serial(fits) == before + 1  # the engine saw no refused request
    assert list(df["outcome"]) == ["completed", "rejected", "rejected", "completed"]


def test_an_engines_declared_context_is_checked_before_it_is_asked(engine: NullEngineProcess) -> None:
    with limited(engine, max_token_bytes=4) as gs:
        (lv,) = gs.gateway.live.values()
        lv.max_context = 50  # as an agent reports it for an engine with `max_context`
        r = post(gs, _chat("x" * 400))
        df = rows(gs, 1)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert (df["outcome"].iloc[0], df["reason"].iloc[0]) == ("rejected", "context_length_exceeded")


def test_unsupported_parameters_are_refused_not_ignored(engine: NullEngineProcess) -> None:
    with limited(engine) as gs:
        refused = post(gs, _chat(response_format={"type": "json_object"}))
        plain = post(gs, _chat(response_format={"type": "text"}, presence_penalty=0, temperature=0.5, seed=3))
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"] | {"message": ""} == {
        "message": "", "type": "invalid_request_error", "param": "response_format", "code": "unsupported_parameter"}
    assert plain.status_code == 200, plain.text
    with limited(engine, honoured_params=["response_format"]) as gs:  # engines that honour it (vLLM)
        assert post(gs, _chat(response_format={"type": "json_object"})).status_code == 200


def test_an_engines_client_error_is_recorded_rejected(null_engines: StartEngine) -> None:
    """An engine that refuses a request (400: it cannot stream) told the client off: `rejected`, not `failed`."""
    no_stream = null_engines("--no-stream")
    gw = Gateway(static_config())
    with serving(gw) as gs:
        gw.adopt_instance(MODEL, "s0", no_stream.url, streaming=True)  # the gateway believes it streams
        r = post(gs, _chat(stream=True))
        df = rows(gs, 1)
    assert r.status_code == 400, r.text
    assert (df["outcome"].iloc[0], df["reason"].iloc[0]) == ("rejected", "engine_400")
    s = summary(df)
    assert (s["rejected"], s["failed"]) == (1, 0)


def test_request_rate_is_429_with_retry_after(engine: NullEngineProcess) -> None:
    with limited(engine, limits={"alice": {"requests_per_s": 0.01, "burst": 2}}) as gs:
        ok = [post(gs, _chat()) for _ in range(2)]
        over = post(gs, _chat())
        df = rows(gs, 3)
    assert [r.status_code for r in ok] == [200, 200]
    assert over.status_code == 429, over.text
    assert over.json()["error"]["code"] == "rate_limit_exceeded"
    assert over.json()["error"]["type"] == "rate_limit_exceeded"
    assert 90 <= int(over.headers["retry-after"]) <= 100  # one request every 100 s
    assert (df["outcome"].iloc[2], df["reason"].iloc[2]) == ("rejected", "rate_limit_exceeded")


def test_token_quota_is_settled_with_the_engines_usage(engine: NullEngineProcess) -> None:
    """40 tokens an hour: 31 reserved (1 + max_tokens 30), 21 used (1 prompt + 20 reply): 19 left."""
    with limited(engine, limits={"*": {"tokens_per_window": 40, "window_s": 3600}}) as gs:
        first = post(gs, _chat(max_tokens=30))
        over = post(gs, _chat(max_tokens=30), path=CHAT)
        small = post(gs, {"model": MODEL, "prompt": "hi", "max_tokens": 10, "stream": True}, path=LEGACY)
        never = post(gs, _chat(max_tokens=100))
    assert first.status_code == 200 and first.json()["usage"]["total_tokens"] == 21
    assert over.status_code == 429 and over.json()["error"]["code"] == "insufficient_quota", over.text
    assert 1000 <= int(over.headers["retry-after"]) <= 1100  # 12 tokens short at 40 per 3600 s
    assert small.status_code == 200, small.text  # 11 fit in what the first request gave back
    assert never.status_code == 400 and never.json()["error"]["code"] == "exceeds_token_quota", never.text


def test_concurrency_is_429_and_freed_when_a_request_ends(null_engines: StartEngine) -> None:
    slow = null_engines("--token-delay-s", "0.2")
    with limited(slow, limits={"alice": {"max_concurrent": 1}}) as gs:
        first: list[httpx.Response] = []
        t = threading.Thread(target=lambda: first.append(post(gs, _chat(max_tokens=5, stream=True))))
        t.start()
        deadline = time.monotonic() + 10
        while not gs.gateway._permits and time.monotonic() < deadline:
            time.sleep(0.01)
        busy = post(gs, _chat(max_tokens=1))
        t.join(30)
        rows(gs, 2)
        free = post(gs, _chat(max_tokens=1))
    assert first[0].status_code == 200
    assert busy.status_code == 429 and busy.json()["error"]["code"] == "rate_limit_exceeded", busy.text
    assert busy.headers["retry-after"] == "1"
    assert free.status_code == 200, free.text
