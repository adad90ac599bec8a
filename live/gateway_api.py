"""The gateway's API surface that needs no cluster: OpenAI-shaped errors, API keys, request validation, the
body-size cap and the prompt's context check."""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Container, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from starlette.requests import Request
from starlette.responses import JSONResponse

from core.prefix_cache import text_block_keys


@dataclass(frozen=True)
class Tenant:
    """An API key's owner and the models it may call."""

    name: str
    models: tuple[str, ...]


class ApiError(Exception):
    """An OpenAI-shaped error with an HTTP status."""

    TYPES: ClassVar[dict[int, str]] = {400: "invalid_request_error", 401: "authentication_error",
                                       403: "permission_error", 404: "not_found_error",
                                       413: "invalid_request_error", 429: "rate_limit_exceeded"}

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = dict(headers) if headers else None  # e.g. Retry-After of a 429

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bearer(request: Request) -> str:
    """The token of an `Authorization: Bearer <token>` header, or ""."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def safe_model_name(name: str) -> bool:
    """A model name that cannot reach outside a tier directory (no separators, no `..`, no padding)."""
    return bool(name) and "/" not in name and ".." not in name and "\\" not in name and name.strip() == name


def body_too_large(max_bytes: int, length: int | None = None) -> ApiError:
    """The 413 of a body over `max_bytes` (`length`: its declared Content-Length, if any)."""
    size = f"{length} bytes" if length is not None else "more"
    return ApiError(413, f"the request body is {size}, over this gateway's limit of {max_bytes} bytes",
                    "request_too_large")


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request's body, at most `max_bytes`: ApiError 413 before the rest is read.

    A declared Content-Length is checked before a byte is read (the HTTP server frames the body by it, so no
    more can arrive); a body without one (chunked) is read chunk by chunk and refused as soon as it passes
    the cap, so that a huge body never sits in memory nor reaches an engine."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise ApiError(400, f"invalid Content-Length {declared!r}", "invalid_content_length") from None
        if length > max_bytes:
            raise body_too_large(max_bytes, length)
        return await request.body()
    parts: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise body_too_large(max_bytes)
        parts.append(chunk)
    return b"".join(parts)


def parse_body(raw: bytes) -> dict[str, Any]:
    """The JSON object of a request body; ApiError 400 otherwise."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"could not parse the JSON body: {e}", "invalid_json") from None
    except RecursionError:  # nesting deeper than the parser's stack: refused like any other unparsable body
        raise ApiError(400, "could not parse the JSON body: nested too deeply", "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the JSON body must be an object", "invalid_json")
    return body


#: OpenAI parameters no engine that tierlab runs honours (the CPU engine and the null engine ignore them, and so
#: does Tokasaurus, which has no structured output, tools, logit bias or penalties), each with the values that ask
#: for nothing and so are accepted. Anything else is refused (400 `unsupported_parameter`) rather than silently
#: ignored; a gateway in front of engines that do honour some (vLLM) lists them in
#: `GatewayConfig.honoured_params`. Parameters the engines refuse themselves (`n` > 1, `logprobs`, `echo`, ...)
#: are left to them: Tokasaurus honours some, and the CPU engine's 400 names the parameter.
REFUSED_PARAMS: dict[str, tuple[Any, ...]] = {
    "response_format": ({"type": "text"},),
    "tools": ([],),
    "tool_choice": ("none", "auto"),  # with no tools, both ask for nothing
    "functions": ([],),
    "function_call": ("none", "auto"),
    "logit_bias": ({},),
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
}


def neutral(value: Any, neutral_values: tuple[Any, ...]) -> bool:
    """`value` asks for nothing: null or one of `neutral_values` (a boolean is never a number here)."""
    return value is None or (not isinstance(value, bool) and any(value == n for n in neutral_values))


def validate(body: dict[str, Any], path: str, tenant: Tenant, models: Container[str],
             refused: Collection[str] = tuple(REFUSED_PARAMS)) -> None:
    """Check a completion request: 400 (fields, a `refused` parameter asking for something), 404 (unknown
    model), 403 (model not the tenant's)."""
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
    for name in refused:
        if name in body and not neutral(body[name], REFUSED_PARAMS[name]):
            raise ApiError(400, f"'{name}' is not supported by this gateway's engines (it would be ignored)",
                           "unsupported_parameter", name)
    if model not in models:
        raise ApiError(404, f"the model '{model}' does not exist", "model_not_found", "model")
    if model not in tenant.models:
        raise ApiError(403, f"tenant '{tenant.name}' may not use model '{model}'", "model_not_allowed", "model")


def prompt_tokens(body: dict[str, Any]) -> int:
    """A rough estimate (4 characters a token) for the policy; the engine's usage replaces it."""
    text = json.dumps(body.get("messages", body.get("prompt", "")))
    return max(1, len(text) // 4)


def prefix_keys(body: dict[str, Any], block_chars: int = 64) -> tuple[int, ...]:
    """The prompt's chained block ids (`core.prefix_cache.text_block_keys`) over the same text `prompt_tokens`
    reads, so that cache-aware placement (`core.policies.prefix_aware`) can route by shared prefix."""
    return text_block_keys(json.dumps(body.get("messages", body.get("prompt", ""))), block_chars)


#: At most how many bytes of UTF-8 text one token stands for, by default: the tokenizers of the models tierlab serves
#: (byte-level BPE as Llama 3 / tiktoken's, SentencePiece as Llama 2's) cut the text into pieces of its bytes and
#: never collapse it, and their longest pieces (runs of spaces or punctuation) are well under 256 bytes. So
#: `ceil(bytes / 256)` tokens is a lower bound: it can only undercount, never refuse a prompt that fits.
DEFAULT_MAX_TOKEN_BYTES = 256


def _text_bytes(value: Any) -> int:
    """UTF-8 bytes of a message's content: a string, or text parts (other parts count 0, never more)."""
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, list):
        return sum(len(p["text"].encode()) for p in value if isinstance(p, dict) and isinstance(p.get("text"), str))
    return 0


def prompt_tokens_lower_bound(body: dict[str, Any], max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES) -> int:
    """Tokens the prompt certainly has (no tokenizer here): its text bytes / `max_token_bytes`, rounded up; a
    prompt of token ids counts exactly. A batch of prompts (a list) counts its longest, each being its own
    sequence. The chat template's tokens come on top, so leaving them out keeps it a lower bound."""
    messages = body.get("messages")
    if isinstance(messages, list):
        size = sum(_text_bytes(m.get("content")) for m in messages if isinstance(m, dict))
        return math.ceil(size / max_token_bytes)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return math.ceil(len(prompt.encode()) / max_token_bytes)
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) for t in prompt):
            return len(prompt)
        return max(prompt_tokens_lower_bound({"prompt": p}, max_token_bytes) for p in prompt)
    return 0


def completion_limit(body: dict[str, Any]) -> int | None:
    """The request's `max_tokens` (or `max_completion_tokens`), None if it sets none."""
    for key in ("max_tokens", "max_completion_tokens"):
        v = body.get(key)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def check_context(body: dict[str, Any], path: str, context: int, max_token_bytes: int) -> None:
    """ApiError 400 `context_length_exceeded` if the prompt certainly does not fit a `context`-token window,
    alone or with the completion tokens asked for (checked before any engine is involved)."""
    need = "messages" if path.endswith("chat/completions") else "prompt"
    lower = prompt_tokens_lower_bound(body, max_token_bytes)
    if lower > context:
        raise ApiError(400, f"the prompt has at least {lower} tokens, more than this model's context window of "
                       f"{context} tokens", "context_length_exceeded", need)
    limit = completion_limit(body)
    if limit is not None and lower + limit > context:
        key = "max_tokens" if isinstance(body.get("max_tokens"), int) else "max_completion_tokens"
        raise ApiError(400, f"the prompt has at least {lower} tokens and '{key}' asks for {limit} more, over this "
                       f"model's context window of {context} tokens", "context_length_exceeded", key)


def include_usage(body: dict[str, Any]) -> bool:
    """True if a streaming request asked for the usage chunk (`stream_options.include_usage`)."""
    opts = body.get("stream_options")
    return isinstance(opts, dict) and bool(opts.get("include_usage"))
