"""The gateway's API surface that needs no cluster: OpenAI-shaped errors, API keys, and request validation."""

from __future__ import annotations

import hmac
import json
from collections.abc import Container, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from starlette.requests import Request
from starlette.responses import JSONResponse


@dataclass(frozen=True)
class Tenant:
    """An API key's owner and the models it may call."""

    name: str
    models: tuple[str, ...]


class ApiError(Exception):
    """An OpenAI-shaped error with an HTTP status."""

    TYPES: ClassVar[dict[int, str]] = {400: "invalid_request_error", 401: "authentication_error",
                                       403: "permission_error", 404: "not_found_error"}

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def bearer(request: Request) -> str:
    """The token of an `Authorization: Bearer <token>` header, or ""."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def token_matches(given: str, expected: str) -> bool:
    """Constant-time comparison; an empty expected token never matches (the door stays shut)."""
    return bool(given) and bool(expected) and hmac.compare_digest(given.encode(), expected.encode())


def authenticate(request: Request, tenants: Mapping[str, Tenant]) -> Tenant:
    """The tenant owning the request's API key; ApiError 401 if there is none."""
    key = bearer(request)
    for known, tenant in tenants.items():
        if token_matches(key, known):
            return tenant
    raise ApiError(401, "missing or invalid API key (Authorization: Bearer <key>)", "invalid_api_key")


def safe_model_name(name: str) -> bool:
    """A model name that cannot reach outside a tier directory (no separators, no `..`, no padding)."""
    return bool(name) and "/" not in name and ".." not in name and "\\" not in name and name.strip() == name


def parse_body(raw: bytes) -> dict[str, Any]:
    """The JSON object of a request body; ApiError 400 otherwise."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"could not parse the JSON body: {e}", "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the JSON body must be an object", "invalid_json")
    return body


def validate(body: dict[str, Any], path: str, tenant: Tenant, models: Container[str]) -> None:
    """Check a completion request: 400 (fields), 404 (unknown model), 403 (model not the tenant's)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "you must provide a 'model' string", "missing_required_parameter", "model")
    if not safe_model_name(model):
        raise ApiError(400, f"invalid model name {model!r}", "invalid_model_name", "model")
    need = "messages" if path.endswith("chat/completions") else "prompt"
    if need not in body:
        raise ApiError(400, f"you must provide a '{need}' parameter", "missing_required_parameter", need)
    for k in ("max_tokens", "max_completion_tokens"):
        v = body.get(k)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise ApiError(400, f"'{k}' must be a non-negative integer, got {v!r}", "invalid_value", k)
    if "stream" in body and not isinstance(body["stream"], bool):
        raise ApiError(400, f"'stream' must be a boolean, got {body['stream']!r}", "invalid_type", "stream")
    if model not in models:
        raise ApiError(404, f"the model '{model}' does not exist", "model_not_found", "model")
    if model not in tenant.models:
        raise ApiError(403, f"tenant '{tenant.name}' may not use model '{model}'", "model_not_allowed", "model")


def prompt_tokens(body: dict[str, Any]) -> int:
    """A rough estimate (4 characters a token) for the policy; the engine's usage replaces it."""
    text = json.dumps(body.get("messages", body.get("prompt", "")))
    return max(1, len(text) // 4)


def include_usage(body: dict[str, Any]) -> bool:
    """True if a streaming request asked for the usage chunk (`stream_options.include_usage`)."""
    opts = body.get("stream_options")
    return isinstance(opts, dict) and bool(opts.get("include_usage"))
