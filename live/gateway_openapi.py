"""The gateway's OpenAPI 3.1 document, served at GET /openapi.json (what API tooling, client generators and
fuzzers read).

The document is built from the constants the gateway itself answers with, so that the two cannot drift apart:
the error `type` values from `live.gateway_api.ApiError` (its own `body()`), the model-name rule of
`safe_model_name` (as a regex that `tests/live_gateway/test_openapi.py` checks against the function), the
record columns of `core.records.REQUEST_SCHEMA` and `live.gateway_actions.ACTION_COLUMNS`, the SSE error event
of `live.gateway_sse.error_event`, and the `x-tierlab-request-id` header of `live.gateway`. The request body
schemas state exactly what `live.gateway_api.validate` enforces (every other OpenAI field is passed to the
engine as is); the tests check the schema and `validate` agree body by body, and that a live gateway's
responses conform to the document.

Streamed answers (`"stream": true`) are `text/event-stream`; OpenAPI 3.1 has no schema for the events of a
stream, so each `data:` payload's schema is given in the extension `x-tierlab-event-schema`.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from core.records import REQUEST_SCHEMA
from core.response_cache import KINDS
from live.audit import FIELDS as AUDIT_FIELDS
from live.gateway_actions import ACTION_COLUMNS
from live.gateway_agents import OPENAPI_SECURITY as AGENT_SECURITY
from live.gateway_agents import openapi_paths as agent_openapi_paths
from live.gateway_api import REFUSED_PARAMS, ApiError
from live.gateway_auth import KEY_ID_LEN, ROLES
from live.gateway_cache import CACHE_HEADER
from live.gateway_sse import error_event

#: `live.gateway_api.safe_model_name` as an ECMA-262 / Python regex: not empty, no `/` or `\`, no `..`, no
#: leading or trailing whitespace (`[\s\S]` crosses newlines; the second lookahead keeps Python's `$` from
#: matching before a final newline).
MODEL_NAME_PATTERN = r"^(?![\s\S]*\.\.)(?![\s\S]*\n$)[^/\\\s](?:[^/\\]*[^/\\\s])?$"
#: The token-limit fields `validate` checks (non-negative integers, or null).
TOKEN_LIMIT_FIELDS = ("max_tokens", "max_completion_tokens")
#: Completion paths and the input field each requires besides `model`.
COMPLETION_INPUTS = {"/v1/chat/completions": "messages", "/v1/completions": "prompt"}

API_KEY, ADMIN_TOKEN = "apiKey", "adminToken"
_REF = "#/components/schemas/"

# what each status means where the gateway answers it, with the `code` values it sends
_STATUS_TEXT = {
    400: "Invalid request: unparsable JSON or not an object (`invalid_json`), a missing or ill-typed field "
         "(`missing_required_parameter`, `invalid_model_name`, `invalid_value`, `invalid_type`, "
         "`invalid_content_length`), a parameter no engine honours (`unsupported_parameter`, `param` names it), a "
         "prompt that certainly exceeds the model's context (`context_length_exceeded`), a request larger than "
         "the tenant's whole token quota (`exceeds_token_quota`), or a request the chosen engine cannot serve "
         "(`unsupported_by_engine`).",
    401: "Missing or invalid bearer token (`invalid_api_key`; `invalid_admin_token` on /admin).",
    403: "The API key's tenant may not use this model (`model_not_allowed`).",
    404: "The model does not exist (`model_not_found`).",
    413: "The request body is over the gateway's `max_body_bytes` (`request_too_large`); refused before the rest "
         "of it is read.",
    429: "The tenant is over a limit: its request rate or concurrent requests (`rate_limit_exceeded`) or its token "
         "quota (`insufficient_quota`); `Retry-After` says when to retry.",
    500: "An internal error of the gateway (`internal_error`).",
    502: "The engine or its node failed (`node_down`, `load_failed`, `engine_failed`, `migration_failed`, "
         "`bad_engine_answer`).",
    503: "No capacity: the policy rejected the request or nothing could serve it within the queue timeout "
         "(`code` is the policy's reason).",
    504: "The request timed out waiting for, or on, an engine (`timeout`).",
}
# the same statuses on /admin endpoints
_ADMIN_TEXT = {
    400: "Invalid request: unparsable JSON or not an object (`invalid_json`), a missing, unknown or ill-typed field "
         "(`missing_required_parameter`, `unknown_parameter`, `invalid_type`, `invalid_value`, "
         "`invalid_model_name`).",
    401: "No key, an unknown key, or a tenant key (`invalid_admin_token`): /admin needs an operator or admin key.",
    403: "The key's role lacks the permission this endpoint needs (`insufficient_role`), e.g. an operator key on "
         "key management.",
    404: "No valid key has this key_id (`key_not_found`).",
    409: "The key (or its key_id) is already taken, or was revoked (`key_exists`).",
    413: _STATUS_TEXT[413],
    500: _STATUS_TEXT[500],
}


def _error_types() -> list[str]:
    """Every `error.type` the gateway sends: ApiError's table and its fallback for other statuses."""
    return sorted({ApiError(status, "").body()["error"]["type"] for status in (*ApiError.TYPES, 500)})


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF + name}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _error_schema(gateway: bool) -> dict[str, Any]:
    """OpenAI's error shape; `gateway`: the gateway's own (typed) rather than an engine's relayed one."""
    err_type: dict[str, Any] = {"type": "string", "enum": _error_types()} if gateway else {"type": "string"}
    return {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"] if gateway else ["message"],
        "properties": {"message": {"type": "string"}, "type": err_type,
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}


def _table_schema(columns: list[str], what: str) -> dict[str, Any]:
    """`live.gateway_records.records_json`'s `{"columns": [...], "rows": [[...], ...]}`."""
    cell = {"type": ["string", "number", "boolean", "null"]}
    return {"type": "object", "required": ["columns", "rows"], "description": what, "properties": {
        "columns": {"const": columns},
        "rows": {"type": "array", "items": {"type": "array", "items": cell, "minItems": len(columns),
                                            "maxItems": len(columns)}}}}


def _request_schema(path: str) -> dict[str, Any]:
    """What `validate` enforces on a completion body at `path`; other fields go to the engine unchanged."""
    need = COMPLETION_INPUTS[path]
    inputs = {
        "messages": {"description": "OpenAI chat messages, passed to the engine as is.",
                     "examples": [[{"role": "user", "content": "Hello"}]]},
        "prompt": {"description": "A prompt (string, strings or token ids), passed to the engine as is.",
                   "examples": ["Hello"]},
    }
    props: dict[str, Any] = {
        "model": {"type": "string", "pattern": MODEL_NAME_PATTERN,
                  "description": "A model of the API key's tenant (GET /v1/models)."},
        need: inputs[need],
        # JSON Schema cannot say it: an integer written as a float (`5.0`) is refused too
        **{k: {"type": ["integer", "null"], "minimum": 0, "description": "Written as an integer (5, not 5.0)."}
           for k in TOKEN_LIMIT_FIELDS},
        "stream": {"type": "boolean", "description": "Answer as server-sent events (text/event-stream)."},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}},
                           "description": "`include_usage`: end the stream with a usage chunk."},
        **{name: _refused_schema(name) for name in REFUSED_PARAMS},
    }
    return {"type": "object", "required": ["model", need], "properties": props}


def _refused_schema(name: str) -> dict[str, Any]:
    """A parameter of `REFUSED_PARAMS`: accepted only with a value that asks for nothing (or null)."""
    return {"anyOf": [{"type": "null"}, *({"const": v} for v in REFUSED_PARAMS[name])],
            "description": "No engine behind the gateway honours it: anything but these values is refused (400 "
                           "`unsupported_parameter`) unless the gateway's `honoured_params` lists it."}


def _choice(chat: bool, chunk: bool) -> dict[str, Any]:
    content = {"type": ["string", "null"]}
    if not chat:
        body: dict[str, Any] = {"text": {"type": "string"}}
    elif chunk:
        body = {"delta": {"type": "object", "properties": {"role": {"type": "string"}, "content": content}}}
    else:
        body = {"message": {"type": "object", "required": ["role"],
                            "properties": {"role": {"type": "string"}, "content": content}}}
    return {"type": "object", "required": ["index", *body],
            "properties": {"index": {"type": "integer"}, "finish_reason": {"type": ["string", "null"]}, **body}}


def _completion_schema(chat: bool, chunk: bool) -> dict[str, Any]:
    """An OpenAI completion (or stream chunk) as the engine answers it; the gateway relays it unchanged."""
    obj = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
    return {"type": "object", "required": ["id", "object", "created", "model", "choices"], "properties": {
        "id": {"type": "string"}, "object": {"const": obj}, "created": {"type": "integer"},
        "model": {"type": "string"}, "choices": {"type": "array", "items": _choice(chat, chunk)},
        "usage": {"oneOf": [_ref("Usage"), {"type": "null"}]}}}


def _components() -> dict[str, Any]:
    usage = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
             "properties": {k: {"type": "integer", "minimum": 0}
                            for k in ("prompt_tokens", "completion_tokens", "total_tokens")}}
    model = {"type": "object", "required": ["id", "object", "created", "owned_by"], "properties": {
        "id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
        "owned_by": {"type": "string"}}, "description": "More fields (e.g. the chat template) where configured."}
    # the error event an engine dying mid-stream ends a stream with (the gateway's own shape)
    stream_error = json.loads(error_event("the engine failed mid-stream: ReadError", "engine_stream_error")
                              .decode().removeprefix("data:").strip())
    return {
        "securitySchemes": {
            API_KEY: {"type": "http", "scheme": "bearer", "description": "A tenant's API key."},
            **AGENT_SECURITY,
            ADMIN_TOKEN: {"type": "http", "scheme": "bearer",
                          "description": "An operator or admin key (`live.gateway_auth`: the role decides what it "
                                         "may call; a tenant key never opens /admin)."},
        },
        "schemas": {
            "Error": _error_schema(gateway=True),
            "EngineError": _error_schema(gateway=False),
            "StreamError": {"$ref": _REF + "Error", "examples": [stream_error],
                            "description": "The event a stream ends with when its engine fails or times out."},
            "Usage": usage,
            "ChatCompletionRequest": _request_schema("/v1/chat/completions"),
            "CompletionRequest": _request_schema("/v1/completions"),
            "ChatCompletion": _completion_schema(chat=True, chunk=False),
            "ChatCompletionChunk": _completion_schema(chat=True, chunk=True),
            "Completion": _completion_schema(chat=False, chunk=False),
            "CompletionChunk": {**_completion_schema(chat=False, chunk=False),
                                "description": "A stream event of /v1/completions (same shape as the answer)."},
            "Model": model,
            "ModelList": {"type": "object", "required": ["object", "data"], "properties": {
                "object": {"const": "list"}, "data": {"type": "array", "items": _ref("Model")}}},
            "Health": {"type": "object", "required": ["ok", "started"], "properties": {
                "ok": {"type": "boolean"}, "started": {"type": "boolean",
                                                       "description": "The cluster mirror is built."}}},
            "Records": _table_schema(list(REQUEST_SCHEMA), "One row per finished request (core.records)."),
            "Actions": _table_schema(list(ACTION_COLUMNS), "One row per policy action carried out."),
            **_admin_schemas(),
        },
    }


def _errors(*statuses: int, headers: dict[str, Any] | None = None, text: dict[int, str] = _STATUS_TEXT
            ) -> dict[str, Any]:
    """The gateway's own error responses for `statuses`."""
    return {str(s): {"description": text[s], "content": _json(_ref("Error")),
                     **({"headers": headers} if headers else {})} for s in statuses}


def _admin_errors(*statuses: int) -> dict[str, Any]:
    return _errors(*statuses, text=_ADMIN_TEXT)


def _admin_schemas() -> dict[str, Any]:
    """The bodies of the /admin endpoints beyond records and actions (`live.gateway_admin`)."""
    cell = {"type": ["string", "number", "boolean", "null"]}
    key = {"type": "object", "required": ["key_id", "name", "role", "models", "source"], "properties": {
        "key_id": {"type": "string", "pattern": f"^[0-9a-f]{{{KEY_ID_LEN}}}$",
                   "description": "The key's fingerprint (the first hex digits of its sha256), never the key."},
        "name": {"type": "string"}, "role": {"enum": list(ROLES)},
        "models": {"type": "array", "items": {"type": "string"}},
        "source": {"enum": ["config", "file", "api"]}}}
    entry = {"type": "object", "required": list(AUDIT_FIELDS), "properties": {
        "seq": {"type": "integer"}, "time_unix": {"type": "number"}, "actor": {"type": "string"},
        "action": {"type": "string"}, "target": {"type": "string"}, "outcome": {"type": "string"},
        "details": {"type": "object"}, "prev": {"type": "string"}, "hash": {"type": "string"}}}
    return {
        "Key": key,
        "KeyList": {"type": "object", "required": ["keys", "keys_file"], "properties": {
            "keys": {"type": "array", "items": _ref("Key")},
            "keys_file": {"type": "object", "required": ["path", "error"], "properties": {
                "path": {"type": ["string", "null"]},
                "error": {"type": "string", "description": "Why its last change was not taken (\"\" if it was)."}}}}},
        "KeyRequest": {"type": "object", "required": ["name", "role"], "additionalProperties": False, "properties": {
            "name": {"type": "string", "minLength": 1}, "role": {"enum": list(ROLES)},
            "models": {"type": "array", "items": {"type": "string"},
                       "description": "A tenant's models (served ones); none for admin and operator keys."},
            "sha256": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$",
                       "description": "The key's sha256 (hex); without it a key is generated and answered once."}}},
        "KeyCreated": {"allOf": [_ref("Key")], "properties": {"key": {
            "type": "string", "description": "The generated key: shown this once, stored as its hash only."}}},
        "KeyRevoked": {"allOf": [_ref("Key")], "required": ["revoked"], "properties": {"revoked": {"const": True}}},
        "AuditLog": {"type": "object", "required": ["path", "entries", "verdict"], "properties": {
            "path": {"type": ["string", "null"], "description": "null: the gateway keeps no audit log."},
            "entries": {"type": "array", "items": entry, "description": "The last entries (at most 1000)."},
            "verdict": {"type": "object", "required": ["ok", "entries", "bad_line", "problem"], "properties": {
                "ok": {"type": "boolean"}, "entries": {"type": "integer"}, "bad_line": {"type": ["integer", "null"]},
                "problem": {"type": "string"}}}}},
        "TierCopyRequest": _move_request("to_tier"),
        "TierEvictRequest": _move_request("tier"),
        "TierMove": {"type": "object", "required": ["action"], "properties": {"action": {
            "type": "object", "required": list(ACTION_COLUMNS), "properties": dict.fromkeys(ACTION_COLUMNS, cell),
            "description": "The move's row of GET /admin/actions (`detail` \"operator\")."}}},
    }


def _move_request(tier: str) -> dict[str, Any]:
    return {"type": "object", "required": ["node", "model", tier], "additionalProperties": False, "properties": {
        "node": {"type": "string"}, "model": {"type": "string", "pattern": MODEL_NAME_PATTERN},
        tier: {"type": "string", "description": "A tier of the node (dram, nvme, sata, ...)."}}}


def _admin_get(operation_id: str, summary: str, schema: str, errors: tuple[int, ...] = (401, 403, 500)
               ) -> dict[str, Any]:
    return {"operationId": operation_id, "summary": summary, "security": [{ADMIN_TOKEN: []}],
            "responses": {"200": {"description": summary + ".", "content": _json(_ref(schema))},
                          **_admin_errors(*errors)}}


def _move_operation(operation_id: str, summary: str, request: str) -> dict[str, Any]:
    moved = {"content": _json(_ref("TierMove"))}
    return {"post": {
        "operationId": operation_id, "summary": summary, "security": [{ADMIN_TOKEN: []}],
        "requestBody": {"required": True, "content": _json(_ref(request))},
        "responses": {"200": {"description": "Done.", **moved},
                      "202": {"description": "Still running after the load timeout (`outcome` \"running\").", **moved},
                      "409": {"description": "Skipped: unknown node, model or tier, already there or not there, no "
                                             "room, a node without an agent (`reason` says).", **moved},
                      "502": {"description": "The agent failed it (`reason` says).", **moved},
                      **_admin_errors(400, 401, 403, 413, 500)}}}


def _admin_paths() -> dict[str, Any]:
    return {
        "/admin/audit": {"get": _admin_get("adminAudit", "The audit log's last entries and its chain verdict",
                                           "AuditLog")},
        "/admin/tiers/copy": _move_operation("adminTierCopy", "Copy a model into a tier of a node", "TierCopyRequest"),
        "/admin/tiers/evict": _move_operation("adminTierEvict", "Drop a model from a tier of a node",
                                              "TierEvictRequest"),
        "/admin/keys": {
            "get": _admin_get("adminListKeys", "The valid keys, by fingerprint", "KeyList"),
            "post": {"operationId": "adminAddKey", "summary": "Add a key (in memory until restart)",
                     "security": [{ADMIN_TOKEN: []}],
                     "requestBody": {"required": True, "content": _json(_ref("KeyRequest"))},
                     "responses": {"201": {"description": "Added.", "content": _json(_ref("KeyCreated"))},
                                   **_admin_errors(400, 401, 403, 409, 413, 500)}}},
        "/admin/keys/{key_id}": {"delete": {
            "operationId": "adminRevokeKey", "summary": "Revoke a key until restart, whichever source lists it",
            "security": [{ADMIN_TOKEN: []}],
            "parameters": [{"name": "key_id", "in": "path", "required": True,
                            "schema": {"type": "string", "pattern": f"^[0-9a-f]{{{KEY_ID_LEN}}}$"}}],
            "responses": {"200": {"description": "Revoked.", "content": _json(_ref("KeyRevoked"))},
                          **_admin_errors(400, 401, 403, 404, 500)}}},
    }


def _completion_operation(path: str, request_id_header: str) -> dict[str, Any]:
    chat = path.endswith("chat/completions")
    name = "ChatCompletion" if chat else "Completion"
    headers = {request_id_header: {"description": "The request's row in GET /admin/records (`request_id`).",
                                   "schema": {"type": "string"}}}
    events = {"oneOf": [_ref(f"{name}Chunk"), _ref("StreamError")],
              "description": "Each `data:` payload; the stream ends with `data: [DONE]`, or with an error event "
                             "if the engine failed mid-stream."}
    cached = {CACHE_HEADER: {"description": "Whether the gateway's response cache answered (`live.gateway_cache`): "
                                            "`exact` (the same deterministic request) or `semantic` (a similar "
                                            "prompt of the same tenant, model and parameters), served without an "
                                            "engine (a cached stream has the same events as a synthesized one); "
                                            "`miss` (an engine answered) or `off` (the cache is off).",
                             "schema": {"type": "string", "enum": [*KINDS, "miss", "off"]}}}
    ok = {"description": f"The answer; with `\"stream\": true`, server-sent events of {name}Chunk.",
          "headers": {**headers, **cached},
          "content": {"application/json": {"schema": _ref(name)},
                      "text/event-stream": {"schema": {"type": "string"}, "x-tierlab-event-schema": events}}}
    client = {"description": _STATUS_TEXT[400] + " Or an engine's own error, relayed as is.", "headers": headers,
              "content": _json({"anyOf": [_ref("Error"), _ref("EngineError")]})}
    relayed = {"description": "An engine's client error (other than 400), relayed with its status and body.",
               "headers": headers, "content": _json(_ref("EngineError"))}
    retry = {**headers, "Retry-After": {"description": "Whole seconds after which a retry may pass.",
                                        "required": True, "schema": {"type": "string", "pattern": "^[0-9]+$"}}}
    return {"post": {
        "operationId": "createChatCompletion" if chat else "createCompletion",
        "summary": f"OpenAI {'chat ' if chat else ''}completion, placed by the gateway's policy",
        "security": [{API_KEY: []}],
        "requestBody": {"required": True, "content": _json(_ref(f"{name}Request"))},
        "responses": {"200": ok, "400": client, **_errors(401, 403, 404, 413, headers=headers),
                      **_errors(429, headers=retry), "4XX": relayed,
                      **_errors(500, 502, 503, 504, headers=headers)}}}


def _get(operation_id: str, summary: str, ok: dict[str, Any], security: list[dict[str, list[str]]],
         errors: tuple[int, ...] = ()) -> dict[str, Any]:
    return {"get": {"operationId": operation_id, "summary": summary, "security": security,
                    "responses": {"200": ok, **_errors(*errors)}}}


def openapi_document(request_id_header: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route of `live.gateway.create_app`."""
    public: list[dict[str, list[str]]] = []
    return {
        "openapi": "3.1.0",
        "info": {"title": "tierlab gateway", "version": "1",
                 "description": "An OpenAI-compatible gateway whose routing is decided by a tierlab policy."},
        "security": [{API_KEY: []}],
        "paths": {
            **{path: _completion_operation(path, request_id_header) for path in COMPLETION_INPUTS},
            "/v1/models": _get("listModels", "The API key's models", {
                "description": "The caller's models.", "content": _json(_ref("ModelList"))}, [{API_KEY: []}], (401,)),
            "/healthz": _get("health", "Liveness", {"description": "Up.", "content": _json(_ref("Health"))}, public),
            "/metrics": _get("metrics", "Prometheus metrics", {
                "description": "Prometheus text exposition.",
                "content": {"text/plain": {"schema": {"type": "string"}}}}, public),
            "/admin/records": {"get": _admin_get("adminRecords", "The request records", "Records")},
            "/admin/actions": {"get": _admin_get("adminActions", "The policy and operator actions carried out",
                                                 "Actions")},
            **_admin_paths(),
            **agent_openapi_paths(),  # POST /agents/join, /agents/leave
            "/openapi.json": _get("openapi", "This document", {
                "description": "The OpenAPI document.", "content": _json({"type": "object"})}, public),
        },
        "components": _components(),
    }


@functools.cache
def _document_bytes() -> bytes:
    from live.gateway import REQUEST_ID_HEADER  # here: live.gateway imports this module

    return json.dumps(openapi_document(REQUEST_ID_HEADER)).encode()


async def openapi_endpoint(request: Request) -> Response:
    """GET /openapi.json (built once, then served from memory)."""
    return Response(_document_bytes(), media_type="application/json")
