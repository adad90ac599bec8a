"""Server-sent events as the gateway handles them: splitting relayed bytes at event boundaries, reading the
`data:` payloads, the error event sent when an engine dies mid-stream, and an OpenAI stream synthesized from
a non-streaming answer (for engines that cannot stream, e.g. Tokasaurus).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from typing import Any

import orjson
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

DONE = b"data: [DONE]"
#: Marks the event a detached stream ends with (token-based migration): `data: {"tierlab_detached": {...}}`.
DETACHED = b'"tierlab_detached"'
#: The usage chunk of a stream (`stream_options.include_usage`): `{"choices": [], "usage": {...}}`.
USAGE = b'"usage"'
_EVENT_SPLIT = re.compile(rb"(\r?\n\r?\n)")


class RelayResponse(StreamingResponse):
    """Starlette's StreamingResponse, its stop on client disconnect done with two plain asyncio tasks.

    Under an ASGI server of spec < 2.4 (uvicorn), a send after the client left is silently dropped, so the
    response must listen for `http.disconnect` while it streams, and stop the stream (the relay's generator
    then records `client_disconnected`). Starlette does this with an anyio task group, which cost ~15% of the
    gateway's CPU per streamed request (task group, cancel scopes, task names: docs/results/gateway_wire.md).
    Here the stream and the listener race as tasks and the loser is cancelled, as there; the stream's error, if
    it failed, is raised."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return

        async def listen() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        loop = asyncio.get_running_loop()
        streaming = loop.create_task(self.stream_response(send))
        listening = loop.create_task(listen())
        try:
            await asyncio.wait((streaming, listening), return_when=asyncio.FIRST_COMPLETED)
        finally:
            listening.cancel()
            if not streaming.done():  # the client left (or this task was cancelled): end the stream too
                streaming.cancel()
                await asyncio.gather(streaming, return_exceptions=True)
        if not streaming.cancelled() and streaming.exception() is not None:
            raise streaming.exception()  # type: ignore[misc]
        if self.background is not None:
            await self.background()


def complete_end(buf: bytes) -> int:
    """Length of the longest prefix of `buf` made of whole events (each ends with a blank line); 0 if none."""
    lf = buf.rfind(b"\n\n")
    crlf = buf.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


def drop_usage_events(events: bytes) -> bytes:
    """`events` (whole events) without the usage chunk: the one the gateway asked for and the client did not."""
    parts = _EVENT_SPLIT.split(events)
    out = []
    for body, sep in zip(parts[0::2], [*parts[1::2], b""], strict=True):
        messages = list(data_messages(body)) if USAGE in body else []
        if any(m.get("usage") and not m.get("choices") for m in messages):
            continue
        out.append(body + sep)
    return b"".join(out)


def data_messages(events: bytes) -> Iterator[dict[str, Any]]:
    """The JSON objects of the `data:` lines in `events` ([DONE] and unparsable lines are skipped)."""
    for line in events.splitlines():
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if not payload or payload == b"[DONE]":
            continue
        try:
            msg = orjson.loads(payload)  # every relayed event is read: the C parser (a JSONDecodeError is a ValueError)
        except ValueError:
            continue
        if isinstance(msg, dict):
            yield msg


def token_choice(msg: dict[str, Any]) -> dict[str, Any] | None:
    """The first choice of a stream chunk if the chunk stands for a generated token, else None.

    A token's chunk is any chunk with a choice, even with empty text: an engine streams one chunk per token
    and sends "" while the token's text is held back (part of a UTF-8 character, a possible stop string), so
    chunk times are token times, as TTFT and TPOT mean them (vLLM's benchmarks time chunks the same way).
    Not tokens: the usage chunk (`choices: []`), errors, and a chat stream's opening role chunk (role, no
    content), which an engine may send before it has generated anything.
    """
    choices = msg.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    choice = choices[0]
    delta = choice.get("delta")
    if (isinstance(delta, dict) and "role" in delta and not delta.get("content")
            and choice.get("finish_reason") is None):
        return None
    return choice


def choice_text(choice: dict[str, Any]) -> str:
    """The text a completions or chat chunk's choice carries ("" if none)."""
    delta = choice.get("delta")
    text = choice.get("text") if not isinstance(delta, dict) else delta.get("content")
    return text if isinstance(text, str) else ""


def event(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def error_event(message: str, code: str, err_type: str = "server_error") -> bytes:
    """An OpenAI-shaped error as one SSE event (the openai client raises APIError on it)."""
    return event({"error": {"message": message, "type": err_type, "param": None, "code": code}})


def _chunk(answer: dict[str, Any], chat: bool, choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": answer.get("id", ""), "object": "chat.completion.chunk" if chat else "text_completion",
            "created": answer.get("created", 0), "model": answer.get("model", ""),
            "system_fingerprint": answer.get("system_fingerprint"), "choices": choices}


def synthesize_stream(answer: dict[str, Any], chat: bool, include_usage: bool) -> bytes:
    """The SSE stream an OpenAI server would have sent for the non-streaming `answer`.

    chat: per choice a role delta, a content delta (if any text) and a finish_reason chunk; completions: a
    text chunk and a finish_reason chunk; then a usage chunk (`choices: []`) if asked for, then `[DONE]`.
    """
    out: list[bytes] = []
    for i, choice in enumerate(answer.get("choices") or []):
        index = choice.get("index", i)
        if chat:
            message = choice.get("message") or {}
            role = {"role": message.get("role", "assistant"), "content": ""}
            out.append(event(_chunk(answer, chat, [{"index": index, "delta": role, "logprobs": None,
                                                    "finish_reason": None}])))
            if message.get("content"):
                out.append(event(_chunk(answer, chat, [{"index": index, "delta": {"content": message["content"]},
                                                        "logprobs": None, "finish_reason": None}])))
            last = {"index": index, "delta": {}, "logprobs": None, "finish_reason": choice.get("finish_reason")}
        else:
            out.append(event(_chunk(answer, chat, [{"index": index, "text": choice.get("text") or "",
                                                    "logprobs": None, "finish_reason": None}])))
            last = {"index": index, "text": "", "logprobs": None, "finish_reason": choice.get("finish_reason")}
        out.append(event(_chunk(answer, chat, [last])))
    if include_usage and answer.get("usage") is not None:
        out.append(event({**_chunk(answer, chat, []), "usage": answer["usage"]}))
    out.append(DONE + b"\n\n")
    return b"".join(out)


def split_detached(events: bytes) -> tuple[bytes, dict[str, Any] | None]:
    """(the whole events before a `tierlab_detached` event, its payload), or (`events`, None) if there is none.

    The detached event is the engine's last word on a sequence it handed over: it is never relayed."""
    parts = _EVENT_SPLIT.split(events)  # event, separator, event, separator, ..., rest
    kept: list[bytes] = []
    for i in range(0, len(parts), 2):
        ev, sep = parts[i], parts[i + 1] if i + 1 < len(parts) else b""
        if DETACHED in ev:
            for msg in data_messages(ev):
                payload = msg.get("tierlab_detached")
                if isinstance(payload, dict):
                    return b"".join(kept), payload
        kept.append(ev + sep)
    return events, None


def with_id(events: bytes, response_id: str) -> bytes:
    """`events` with every JSON payload's "id" set to `response_id` (a stream moved to another engine keeps
    the id its client saw first)."""
    out = []
    for line in events.split(b"\n"):
        payload = line[5:].strip() if line.startswith(b"data:") else b""
        if payload and payload != b"[DONE]":
            try:
                msg = json.loads(payload)
            except ValueError:
                msg = None
            if isinstance(msg, dict) and "id" in msg and msg["id"] != response_id:
                msg["id"] = response_id
                line = b"data: " + json.dumps(msg, separators=(",", ":")).encode() + (b"\r" if line.endswith(b"\r")
                                                                                       else b"")
        out.append(line)
    return b"\n".join(out)
