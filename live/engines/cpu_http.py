"""The CPU engine's HTTP plumbing: request bodies, the OpenAI response and SSE chunk shapes, and the relay of a
sequence's events (from the batching thread) into a streamed or a collected response. Split from
`live.engines.cpu_server`, which wires these into its routes."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from live.engines.batching import SeqRequest
from live.engines.cpu_api import ApiError, SamplingParams


class Channel:
    """Events from the batching thread to one request's coroutine (an asyncio queue fed thread-safely)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def emit(self, kind: str, payload: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is shutting down
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))


async def json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"could not parse the JSON body: {exc}", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the JSON body must be an object", None, "invalid_json")
    return body


def check_model(model_name: str, body: dict[str, Any]) -> None:
    model = body.get("model")
    if model is None:
        raise ApiError(400, "you must provide a 'model' parameter", "model", "missing_required_parameter")
    if not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", "model", "invalid_type")
    if model != model_name:
        raise ApiError(
            404,
            f"the model '{model}' does not exist; this engine serves '{model_name}'",
            "model",
            "model_not_found",
        )


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


def chunk(model_name: str, request_id: str, created: int, chat: bool, choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": model_name,
        "system_fingerprint": None,
        "choices": choices,
    }

def choice(chat: bool, text: str | None, finish_reason: str | None, first: bool = False) -> dict[str, Any]:
    if not chat:
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    delta: dict[str, Any] = {}
    if first:
        delta["role"] = "assistant"
    if text is not None:
        delta["content"] = text
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

async def stream_events(
    model_name: str, req: SeqRequest, channel: Channel, params: SamplingParams, created: int, chat: bool
) -> AsyncIterator[str]:
    request_id = req.request_id
    try:
        if chat and req.resume is None:  # a resumed stream continues one whose role chunk was sent
            yield sse(chunk(model_name, request_id, created, chat, [choice(chat, "", None, first=True)]))
        while True:
            kind, payload = await channel.events.get()
            if kind == "token":  # one chunk per token, "" included (a valid OpenAI delta)
                yield sse(chunk(model_name, request_id, created, chat, [choice(chat, payload, None)]))
            elif kind == "done":
                rest = payload["text"] or None  # text held back until the end
                yield sse(chunk(model_name, request_id, created, chat, [choice(chat, rest, payload["finish_reason"])]))
                if params.include_usage:
                    yield sse({**chunk(model_name, request_id, created, chat, []), "usage": payload["usage"]})
                break
            elif kind == "detached":
                yield sse({"tierlab_detached": payload})  # the sequence goes on elsewhere: no [DONE]
                return
            else:
                yield sse(payload.body())
                break
        yield sse("[DONE]")
    finally:
        req.cancelled.set()  # no-op when generation finished; frees its slot when the client left early

async def watch_disconnect(request: Request, req: SeqRequest) -> None:
    # the body has been read: the next ASGI message is the client hanging up
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            req.cancelled.set()
            return

async def collect_response(
    model_name: str, req: SeqRequest, channel: Channel, created: int, chat: bool, request: Request
) -> Response:
    parts: list[str] = []
    watcher = asyncio.create_task(watch_disconnect(request, req))
    try:
        while True:
            kind, payload = await channel.events.get()
            if kind == "token":
                parts.append(payload)
            elif kind == "done":
                parts.append(payload["text"])
                break
            elif kind == "detached":
                return JSONResponse({"id": req.request_id, "tierlab_detached": payload})
            else:
                return payload.response()
    finally:
        watcher.cancel()
    text = "".join(parts)
    if chat:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": payload["finish_reason"],
        }
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": payload["finish_reason"]}
    return JSONResponse(
        {
            "id": req.request_id,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": model_name,
            "system_fingerprint": None,
            "choices": [choice],
            "usage": payload["usage"],
        }
    )
