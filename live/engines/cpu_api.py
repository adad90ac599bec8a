"""The CPU engine's request API: OpenAI-shaped errors, sampling parameters, the chat template, and the
`tierlab_resume` extension (a sequence moved here from another engine), all validated with errors naming
the field. Pure Python: importing it loads neither torch nor a tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse

CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
MAX_STOP_SEQUENCES = 4
RESUME_FIELD = "tierlab_resume"
ID_FIELD = "tierlab_id"  # a response id chosen by the caller (the gateway), so it can detach a non-streaming request
_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")


class ApiError(Exception):
    """An error answered in the OpenAI shape {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _opt_int(body: dict[str, Any], name: str, minimum: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value):
        raise ApiError(400, f"'{name}' must be an integer", name, "invalid_type")
    if minimum is not None and value < minimum:
        raise ApiError(400, f"'{name}' must be >= {minimum}, got {value}", name, "invalid_value")
    return int(value)


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be a boolean", name, "invalid_type")
    return value


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value):
        raise ApiError(400, f"'{name}' must be a number", name, "invalid_type")
    if value > high or value < low or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise ApiError(400, f"'{name}' must be in {bracket}{low}, {high}], got {value}", name, "invalid_value")
    return float(value)


@dataclass
class SamplingParams:
    """What a request asks of the generation, validated."""

    max_tokens: int | None  # None: the endpoint's default
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens (trace replays need the lengths)


def parse_sampling(body: dict[str, Any], max_tokens_names: tuple[str, ...]) -> SamplingParams:
    """Validate the parameters both endpoints share; reject the ones this engine cannot honour."""
    for name in ("logprobs", "echo", "tools", "suffix", "top_logprobs"):
        if body.get(name):
            raise ApiError(400, f"'{name}' is not supported by this engine", name, "unsupported_parameter")
    for name in ("n", "best_of"):
        if body.get(name) not in (None, 1):
            raise ApiError(400, f"'{name}' must be 1 on this engine", name, "unsupported_parameter")
    max_tokens = None
    for name in max_tokens_names:
        value = _opt_int(body, name, minimum=1)
        if value is not None:
            max_tokens = value
    stop_raw = body.get("stop")
    if stop_raw is None:
        stop: list[str] = []
    elif isinstance(stop_raw, str):
        stop = [stop_raw]
    elif isinstance(stop_raw, list) and all(isinstance(s, str) for s in stop_raw):
        stop = list(stop_raw)
    else:
        raise ApiError(400, "'stop' must be a string or a list of strings", "stop", "invalid_type")
    if len(stop) > MAX_STOP_SEQUENCES or any(not s for s in stop):
        raise ApiError(400, f"'stop' takes 1..{MAX_STOP_SEQUENCES} non-empty strings", "stop", "invalid_value")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean", "stream", "invalid_type")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options", "invalid_type")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        seed=_opt_int(body, "seed"),
        stop=stop,
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
        ignore_eos=_flag(body, "ignore_eos"),
    )


def _message_text(message: dict[str, Any], index: int) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ApiError(400, "only text content parts are supported", f"messages[{index}].content")
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, "'content' must be a string or a list of parts", f"messages[{index}].content", "invalid_type")


def check_messages(messages: object) -> list[dict[str, Any]]:
    """A chat request's `messages`, validated: a non-empty list of objects with a known role and text content."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages", "invalid_value")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError(400, "each message must be an object", f"messages[{i}]", "invalid_type")
        if message.get("role") not in CHAT_ROLES:
            raise ApiError(400, f"message role must be one of {sorted(CHAT_ROLES)}", f"messages[{i}].role")
        _message_text(message, i)  # text content only
    return messages


BUILT_IN_TEMPLATE = '"<|role|>: content\\n" per message, then "<|assistant|>:"'


def chat_prompt(messages: object) -> str:
    """The simple built-in chat template (for checkpoints without one of their own): one
    "<|role|>: content" line per message, then "<|assistant|>:"."""
    checked = check_messages(messages)
    lines = [f"<|{message['role']}|>: {_message_text(message, i)}\n" for i, message in enumerate(checked)]
    return "".join(lines) + "<|assistant|>:"


@dataclass(frozen=True)
class ResumeState:
    """A sequence detached from another engine: its prompt, the tokens generated so far, and how many
    characters of their text the client has already received."""

    prompt_ids: list[int]
    token_ids: list[int]
    emitted_chars: int
    seed: int | None = None  # the draws' seed: an unseeded request got one from its first engine, and keeps it

    def payload(self) -> dict[str, Any]:
        """The JSON form shared by the detach reply, the detached event and `tierlab_resume`."""
        out: dict[str, Any] = {"prompt_ids": self.prompt_ids, "token_ids": self.token_ids,
                               "emitted_chars": self.emitted_chars}
        if self.seed is not None:
            out["seed"] = self.seed
        return out


def _id_list(raw: dict[str, Any], name: str, vocab_size: int, allow_empty: bool) -> list[int]:
    value = raw.get(name)
    param = f"{RESUME_FIELD}.{name}"
    if not isinstance(value, list) or not all(_is_int(t) for t in value):
        raise ApiError(400, f"'{param}' must be a list of token ids", param, "invalid_type")
    if not value and not allow_empty:
        raise ApiError(400, f"'{param}' must not be empty", param, "invalid_value")
    if any(not 0 <= t < vocab_size for t in value):
        raise ApiError(400, f"'{param}' holds ids outside 0..{vocab_size - 1}", param, "invalid_value")
    return [int(t) for t in value]


def parse_resume(
    body: dict[str, Any], vocab_size: int, context_tokens: int, decode: Callable[[list[int]], str]
) -> ResumeState | None:
    """The request's `tierlab_resume` field, validated against this model (None when absent).

    prompt_ids: 1+ ids in the vocabulary; token_ids: ids in the vocabulary, prompt + tokens leaving room
    for one more token in the context; emitted_chars: 0..len(decode(token_ids)); seed (optional): the
    sequence's draws, when its original request named none.
    """
    raw = body.get(RESUME_FIELD)
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ApiError(400, f"'{RESUME_FIELD}' must be an object", RESUME_FIELD, "invalid_type")
    unknown = sorted(set(raw) - {"prompt_ids", "token_ids", "emitted_chars", "seed"})
    if unknown:
        raise ApiError(400, f"'{RESUME_FIELD}' has unknown fields {unknown}", RESUME_FIELD, "invalid_value")
    prompt_ids = _id_list(raw, "prompt_ids", vocab_size, allow_empty=False)
    token_ids = _id_list(raw, "token_ids", vocab_size, allow_empty=True)
    if len(prompt_ids) + len(token_ids) >= context_tokens:
        param = f"{RESUME_FIELD}.token_ids" if token_ids else f"{RESUME_FIELD}.prompt_ids"
        raise ApiError(
            400,
            f"'{param}': {len(prompt_ids)} prompt + {len(token_ids)} generated tokens leave no room for another "
            f"in this model's context of {context_tokens}",
            param,
            "context_length_exceeded",
        )
    emitted = raw.get("emitted_chars")
    param = f"{RESUME_FIELD}.emitted_chars"
    if not _is_int(emitted):
        raise ApiError(400, f"'{param}' must be an integer", param, "invalid_type")
    text_chars = len(decode(token_ids)) if token_ids else 0
    if not 0 <= emitted <= text_chars:
        raise ApiError(
            400, f"'{param}' must be in 0..{text_chars} (the text of token_ids), got {emitted}", param, "invalid_value"
        )
    seed = raw.get("seed")
    if seed is not None and not _is_int(seed):
        param = f"{RESUME_FIELD}.seed"
        raise ApiError(400, f"'{param}' must be an integer", param, "invalid_type")
    return ResumeState(prompt_ids, token_ids, int(emitted), None if seed is None else int(seed))


def parse_request_id(body: dict[str, Any]) -> str | None:
    """The request's `tierlab_id` (1..128 characters of [A-Za-z0-9-_.:]), None when absent.

    The engine uses it as its response id, so a caller that never sees the response before it is complete (a
    non-streaming request) can still name the sequence to `/v1/tierlab/detach`. The caller keeps it unique.
    """
    value = body.get(ID_FIELD)
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= 128 or not set(value) <= _ID_CHARS:
        raise ApiError(400, f"'{ID_FIELD}' must be 1..128 characters of letters, digits and -_.:", ID_FIELD,
                       "invalid_value")
    return value
