"""A zero-cost engine: an OpenAI-compatible server that answers at once with a fixed tiny reply.

    python -m live.engines.null_server --port 8001 [--model-name null] [--no-stream]

For measuring what the gateway adds (tests/benchmarks/test_bench_gateway.py) and for fault tests. A bare ASGI
app (no framework) so that the engine itself costs as little as possible. GET /ping and /health (200),
GET /v1/models, POST /v1/completions and /v1/chat/completions (stream or not) answer with the words of
`REPLY`, one token each, cut to `max_tokens`. Knobs: `--no-stream` answers 400 to `stream: true` (an engine
that cannot stream, like Tokasaurus); `--token-delay-s` sleeps before each streamed token, and as long before a
whole answer (a slow engine, to kill mid-request). Start it as a process with `NullEngineProcess` (the
`CpuEngineProcess` lifecycle).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar

from live.engines.base import CpuEngineProcess

REPLY = ("Hello", " from", " the", " null", " engine")
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class NullEngineProcess(CpuEngineProcess):
    """`python -m live.engines.null_server` in its own process group: start / wait_ready / stop as for the CPU
    engine (same environment, orphan-free stop, `--exit-with-parent`). `extra_args` are the server's flags."""

    kind: ClassVar[str] = "null"

    def __init__(self, port: int, host: str = "127.0.0.1", *, model_name: str = "null",
                 extra_args: list[str] | None = None) -> None:
        super().__init__(Path(os.devnull), port, host, model_name=model_name, extra_args=extra_args)

    @property  # type: ignore[override]
    def streaming(self) -> bool:
        """False when started with --no-stream."""
        return "--no-stream" not in self.extra_args

    def command(self) -> list[str]:
        return [self.python, "-m", "live.engines.null_server", "--host", self.host, "--port", str(self.port),
                "--model-name", self.model_name or "null", "--exit-with-parent", str(os.getpid()),
                *self.extra_args]


class NullEngine:
    """The ASGI app."""

    def __init__(self, model_name: str, stream: bool = True, token_delay_s: float = 0.0) -> None:
        self.model_name = model_name
        self.stream = stream
        self.token_delay_s = token_delay_s
        self._ids = itertools.count(1)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if method == "GET" and path in ("/ping", "/health"):
            await _json(send, 200, {"status": "ok"})
        elif method == "GET" and path == "/v1/models":
            card = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "tierlab"}
            await _json(send, 200, {"object": "list", "data": [card]})
        elif method == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
            await self._complete(path.endswith("chat/completions"), await _body(receive), send)
        else:
            await _json(send, 404, _error(f"{method} {path}: not found", "not_found"))

    async def _complete(self, chat: bool, raw: bytes, send: Send) -> None:
        try:
            body = json.loads(raw)
        except ValueError as e:
            await _json(send, 400, _error(f"could not parse the JSON body: {e}", "invalid_json"))
            return
        if not isinstance(body, dict):
            await _json(send, 400, _error("the JSON body must be an object", "invalid_json"))
            return
        stream = body.get("stream") is True
        if stream and not self.stream:
            await _json(send, 400, _error("this engine does not stream", "stream_unsupported"))
            return
        limit = body.get("max_tokens") or body.get("max_completion_tokens")
        words = REPLY[:limit] if isinstance(limit, int) and limit > 0 else REPLY
        rid = f"{'chatcmpl' if chat else 'cmpl'}-null-{next(self._ids)}"
        head = {"id": rid, "created": int(time.time()), "model": body.get("model", self.model_name),
                "system_fingerprint": None}
        usage = {"prompt_tokens": 1, "completion_tokens": len(words), "total_tokens": 1 + len(words)}
        finish = "length" if len(words) < len(REPLY) else "stop"
        if stream:
            opts = body.get("stream_options")
            await self._stream(send, chat, head, words, finish,
                               usage if isinstance(opts, dict) and opts.get("include_usage") else None)
            return
        if self.token_delay_s > 0:  # as long as the stream would have taken
            await asyncio.sleep(self.token_delay_s * len(words))
        text = "".join(words)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                   "finish_reason": finish} if chat else
                  {"index": 0, "text": text, "logprobs": None, "finish_reason": finish})
        await _json(send, 200, {**head, "object": "chat.completion" if chat else "text_completion",
                                "choices": [choice], "usage": usage})

    async def _stream(self, send: Send, chat: bool, head: dict[str, Any], words: tuple[str, ...], finish: str,
                      usage: dict[str, Any] | None) -> None:
        obj = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

        def choice(text: str | None, reason: str | None, role: bool = False) -> dict[str, Any]:
            if not chat:
                return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}

        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
        events = [_event({**obj, "choices": [choice("", None, role=True)]})] if chat else []
        for word in words:
            if self.token_delay_s > 0:  # each token goes out on its own, after the delay
                await _chunk(send, b"".join(events))
                events = []
                await asyncio.sleep(self.token_delay_s)
            events.append(_event({**obj, "choices": [choice(word, None)]}))
        events.append(_event({**obj, "choices": [choice(None, finish)]}))
        if usage is not None:
            events.append(_event({**obj, "choices": [], "usage": usage}))
        events.append(b"data: [DONE]\n\n")
        await _chunk(send, b"".join(events))
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _error(message: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def _chunk(send: Send, data: bytes) -> None:
    if data:
        await send({"type": "http.response.body", "body": data, "more_body": True})


async def _body(receive: Receive) -> bytes:
    parts = []
    while True:
        message = await receive()
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(parts)


async def _json(send: Send, status: int, payload: dict[str, Any]) -> None:
    data = json.dumps(payload, separators=(",", ":")).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m live.engines.null_server", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--model-name", default="null")
    p.add_argument("--no-stream", action="store_true", help="answer 400 to stream=true (an engine that cannot stream)")
    p.add_argument("--token-delay-s", type=float, default=0.0, help="sleep before each token (streamed or not)")
    p.add_argument("--launched-at", type=float, help="the launcher's time.time() at spawn (accepted, unused)")
    p.add_argument("--exit-with-parent", type=int, metavar="PID", help="exit when this process is gone")
    p.add_argument("--log-level", default="warning")
    args = p.parse_args(argv)
    if args.token_delay_s < 0:
        p.error(f"--token-delay-s must be >= 0, got {args.token_delay_s}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper())
    if args.exit_with_parent:
        from live.lifecycle import exit_with_parent

        exit_with_parent(args.exit_with_parent)
    import uvicorn

    app = NullEngine(args.model_name, stream=not args.no_stream, token_delay_s=args.token_delay_s)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False, lifespan="on",
                timeout_graceful_shutdown=3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
