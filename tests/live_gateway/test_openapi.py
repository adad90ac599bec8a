"""The gateway's OpenAPI document (GET /openapi.json): valid OpenAPI 3.1, in step with the route table and with
`validate`, and obeyed by a live gateway's answers (null engines behind it, loopback only).

Responses are checked with `jsonschema` (draft 2020-12, the dialect of OpenAPI 3.1's schemas): the status is
documented for the operation (explicitly or by its `4XX` range), the media type is one the document names,
the documented headers are present, and the JSON body (or each `data:` event of a stream) fits the schema.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("openapi_spec_validator")
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_spec

from live.engines.base import free_port
from live.engines.null_server import NullEngineProcess
from live.gateway import REQUEST_ID_HEADER, Gateway, create_app
from live.gateway_api import ApiError, Tenant, parse_body, safe_model_name, validate
from live.gateway_openapi import COMPLETION_INPUTS, MODEL_NAME_PATTERN, openapi_document
from tests.live_gateway.conftest import ADMIN_TOKEN, MODEL, OTHER, GatewayServer, serving, static_config

StartEngine = Callable[..., NullEngineProcess]
DOC = openapi_document(REQUEST_ID_HEADER)
ALICE, BOB = {"authorization": "Bearer sk-alice"}, {"authorization": "Bearer sk-bob"}
ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
CHAT, LEGACY = "/v1/chat/completions", "/v1/completions"


def schema_validator(schema: dict[str, Any]) -> Draft202012Validator:
    """A validator of `schema`, whose `#/components/...` references resolve in the document."""
    return Draft202012Validator({**schema, "components": DOC["components"]})


def sse_payloads(text: str) -> list[str]:
    """The `data:` payloads of an event stream, in order."""
    return [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]


def conforms(r: httpx.Response, path: str) -> None:
    """Assert that `r` (an answer to `path`) is what the document says that operation answers."""
    op = DOC["paths"][path][r.request.method.lower()]
    status = str(r.status_code)
    spec = op["responses"].get(status) or op["responses"].get(f"{status[0]}XX")
    assert spec is not None, f"{r.request.method} {path}: status {status} is not documented ({r.text[:200]})"
    media = r.headers["content-type"].split(";")[0].strip()
    assert media in spec["content"], f"{path} {status}: {media} is not documented"
    for header in spec.get("headers", {}):
        assert header in r.headers, f"{path} {status}: header {header} missing"
    content = spec["content"][media]
    if media == "application/json":
        schema_validator(content["schema"]).validate(r.json())
    elif media == "text/event-stream":
        payloads = sse_payloads(r.text)
        events = schema_validator(content["x-tierlab-event-schema"])
        assert payloads, "an empty stream"
        for payload in payloads:
            if payload != "[DONE]":
                events.validate(json.loads(payload))
    else:
        assert content["schema"] == {"type": "string"}


# ---------------------------------------------------------------------------------------------- the document


def test_document_is_valid_openapi_3_1() -> None:
    validate_spec(DOC)
    assert DOC["openapi"].startswith("3.1")


def test_every_route_is_documented_with_its_methods() -> None:
    app = create_app(Gateway(static_config()))
    routes = {r.path: {m.lower() for m in r.methods} - {"head"} for r in app.routes}  # type: ignore[attr-defined]
    assert routes == {path: set(ops) for path, ops in DOC["paths"].items()}


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab./\\ \t\n\u00a0\u2028x-_:"), max_size=8) | st.text(max_size=6))
def test_model_name_pattern_is_safe_model_name(name: str) -> None:
    assert bool(re.search(MODEL_NAME_PATTERN, name)) == safe_model_name(name)


_INT_LIKE = st.one_of(st.integers(-3, 10**12), st.booleans(), st.none(), st.text(max_size=2),
                      st.floats(allow_nan=False).filter(lambda f: not f.is_integer()))
_BODY = st.fixed_dictionaries({}, optional={
    "model": st.one_of(st.just(MODEL), st.just("../up"), st.just(" pad"), st.just(""), st.integers(), st.none()),
    "messages": st.just([{"role": "user", "content": "hi"}]),
    "prompt": st.one_of(st.just("hi"), st.none()),
    "max_tokens": _INT_LIKE,
    "max_completion_tokens": _INT_LIKE,
    "stream": st.one_of(st.booleans(), st.none(), st.integers(0, 1), st.text(max_size=1)),
    "stream_options": st.just({"include_usage": True}),
    "temperature": st.floats(0, 2),
})


@settings(max_examples=400, deadline=None)
@given(path=st.sampled_from(list(COMPLETION_INPUTS)), body=_BODY)
def test_request_schema_accepts_what_validate_accepts(path: str, body: dict[str, Any]) -> None:
    """Body by body, the documented request schema and `validate` agree (the model known and the tenant's)."""
    model = body.get("model") if isinstance(body.get("model"), str) else MODEL
    name = "ChatCompletionRequest" if path == CHAT else "CompletionRequest"
    try:
        validate(body, path, Tenant("t", (model,)), {model})
        accepted = True
    except ApiError as e:
        assert e.status == 400
        accepted = False
    assert schema_validator({"$ref": f"#/components/schemas/{name}"}).is_valid(body) == accepted


@pytest.mark.parametrize("raw", [b"[]", b'"x"', b"1", b"null", b"{"])
def test_request_schema_and_parse_body_both_refuse_non_objects(raw: bytes) -> None:
    with pytest.raises(ApiError):
        parse_body(raw)
    if raw != b"{":
        assert not schema_validator({"$ref": "#/components/schemas/CompletionRequest"}).is_valid(json.loads(raw))


# ---------------------------------------------------------------------------------------------- a live gateway


@pytest.fixture(scope="module")
def gateway(null_engines: StartEngine) -> Iterator[GatewayServer]:
    """A gateway on loopback: `tiny` on a null engine (s0); `other` is served by nothing."""
    engine = null_engines()
    gw = Gateway(static_config(("s0", "s1"), queue_timeout_s=0.3))
    with serving(gw) as gs:
        gw.adopt_instance(MODEL, "s0", engine.url)  # no request is in flight yet
        yield gs


def _chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **fields}


def _legacy(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "hi", "max_tokens": 4, **fields}


# (case, path, headers, JSON body or raw bytes, expected status)
POSTS: list[tuple[str, str, dict[str, str], Any, int]] = [
    ("chat", CHAT, ALICE, _chat(), 200),
    ("chat-stream", CHAT, ALICE, _chat(stream=True), 200),
    ("chat-stream-usage", CHAT, ALICE, _chat(stream=True, stream_options={"include_usage": True}), 200),
    ("legacy", LEGACY, ALICE, _legacy(), 200),
    ("legacy-stream", LEGACY, ALICE, _legacy(stream=True), 200),
    ("no-key", CHAT, {}, _chat(), 401),
    ("bad-key", LEGACY, {"authorization": "Bearer sk-nobody"}, _legacy(), 401),
    ("admin-token-is-no-api-key", CHAT, ADMIN, _chat(), 401),
    ("bad-json", CHAT, ALICE, b"{not json", 400),
    ("not-an-object", LEGACY, ALICE, b"[1, 2]", 400),
    ("no-model", CHAT, ALICE, {"messages": []}, 400),
    ("model-not-a-string", LEGACY, ALICE, _legacy(model=7), 400),
    ("unsafe-model-name", CHAT, ALICE, _chat(model="../etc"), 400),
    ("no-messages", CHAT, ALICE, {"model": MODEL}, 400),
    ("no-prompt", LEGACY, ALICE, {"model": MODEL}, 400),
    ("negative-max-tokens", CHAT, ALICE, _chat(max_tokens=-1), 400),
    ("max-tokens-a-string", LEGACY, ALICE, _legacy(max_tokens="4"), 400),
    ("max-completion-tokens-a-bool", CHAT, ALICE, _chat(max_completion_tokens=True), 400),
    ("stream-not-a-bool", LEGACY, ALICE, _legacy(stream="yes"), 400),
    ("unknown-model", CHAT, ALICE, _chat(model="nope"), 404),
    ("not-the-tenants-model", LEGACY, ALICE, _legacy(model=OTHER), 403),
    ("unplaceable", LEGACY, BOB, _legacy(model=OTHER), 503),
]


@pytest.mark.parametrize(("case", "path", "headers", "body", "status"), POSTS, ids=[p[0] for p in POSTS])
def test_completion_answers_conform(gateway: GatewayServer, case: str, path: str, headers: dict[str, str],
                                    body: Any, status: int) -> None:
    kw: dict[str, Any] = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(gateway.url + path, headers=headers, timeout=30, **kw)
    assert r.status_code == status, r.text
    conforms(r, path)
    if body is not None and isinstance(body, dict) and body.get("stream") and status == 200:
        assert r.headers["content-type"].startswith("text/event-stream")
        assert sse_payloads(r.text)[-1] == "[DONE]"


GETS: list[tuple[str, dict[str, str], int]] = [
    ("/v1/models", ALICE, 200), ("/v1/models", {}, 401), ("/v1/models", ADMIN, 401),
    ("/healthz", {}, 200), ("/metrics", {}, 200), ("/openapi.json", {}, 200),
    ("/admin/records", ADMIN, 200), ("/admin/records", ALICE, 401), ("/admin/records", {}, 401),
    ("/admin/actions", ADMIN, 200), ("/admin/actions", ALICE, 401),
]


@pytest.mark.parametrize(("path", "headers", "status"), GETS, ids=[f"{p}-{s}-{bool(h)}" for p, h, s in GETS])
def test_get_answers_conform(gateway: GatewayServer, path: str, headers: dict[str, str], status: int) -> None:
    httpx.post(gateway.url + CHAT, headers=ALICE, json=_chat(), timeout=30)  # at least one record
    r = httpx.get(gateway.url + path, headers=headers, timeout=30)
    assert r.status_code == status, r.text
    conforms(r, path)


def test_served_document_is_the_document(gateway: GatewayServer) -> None:
    assert httpx.get(gateway.url + "/openapi.json", timeout=10).json() == DOC


@pytest.mark.parametrize(("path", "body"), [(LEGACY, _legacy(model=OTHER)), (CHAT, _chat(model=OTHER, stream=True))])
def test_dead_engines_are_a_documented_502(gateway: GatewayServer, path: str, body: dict[str, Any]) -> None:
    """Both instances of the model are at dead addresses: the try and its one retry fail, 502."""
    for node in ("s0", "s1"):  # no request in flight: both are retired by the request below
        gateway.gateway.adopt_instance(OTHER, node, f"http://127.0.0.1:{free_port()}")
    r = httpx.post(gateway.url + path, headers=BOB, json=body, timeout=30)
    assert r.status_code == 502, r.text
    conforms(r, path)


def test_timeouts_are_a_documented_504_and_stream_error_event(null_engines: StartEngine) -> None:
    """An engine slower than `request_timeout_s`: a whole answer is a 504; a stream ends with an error event."""
    slow = null_engines("--token-delay-s", "0.4")
    gw = Gateway(static_config(request_timeout_s=1.0))
    with serving(gw) as gs:
        gw.adopt_instance(MODEL, "s0", slow.url)
        whole = httpx.post(gs.url + LEGACY, headers=ALICE, json=_legacy(max_tokens=8), timeout=30)
        stream = httpx.post(gs.url + CHAT, headers=ALICE, json=_chat(max_tokens=8, stream=True), timeout=30)
    assert whole.status_code == 504, whole.text
    conforms(whole, LEGACY)
    assert stream.status_code == 200
    conforms(stream, CHAT)
    assert json.loads(sse_payloads(stream.text)[-1])["error"]["code"] == "timeout"
