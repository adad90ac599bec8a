"""A zero-cost engine: an OpenAI-compatible server that answers at once with a fixed tiny reply.

    python -m live.engines.null_server --port 8001 [--model-name null] [--no-stream]

For measuring what the gateway adds (tests/benchmarks/test_bench_gateway.py) and for fault tests. A bare ASGI
app (no framework) so that the engine itself costs as little as possible. GET /ping and /health (200),
GET /v1/models, POST /v1/completions and /v1/chat/completions (stream or not) answer with the words of
`REPLY`, one token each, cut to `max_tokens`. Knobs: `--no-stream` answers 400 to `stream: true` (an engine
that cannot stream, like Tokasaurus); `--token-delay-s` sleeps before each token, streamed or not (a slow engine,
to kill mid-request); `--max-num-seqs` lets that many requests generate at once and queues the rest FIFO, as a
batching engine does; `--reply-tokens` sets an answer's length. It implements tierlab's detach / resume contract
for token-based live migration (POST /v1/tierlab/detach, `tierlab_resume`; see `NullEngine`) faithfully, so
that the gateway's migration can be tested before a real engine has it. Start it as a process with
`NullEngineProcess` (the `CpuEngineProcess` lifecycle).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
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
        # the batch limit is the server's own flag (--max-num-seqs, default: none), not the CPU engine's default
        limit = next((a.split("=", 1)[1] for a in self.extra_args if a.startswith("--max-num-seqs=")), None)
        if "--max-num-seqs" in self.extra_args:
            limit = self.extra_args[self.extra_args.index("--max-num-seqs") + 1]
        self.max_num_seqs = int(limit) if limit else 0

    @property  # type: ignore[override]
    def streaming(self) -> bool:
        """False when started with --no-stream."""
        return "--no-stream" not in self.extra_args

    def command(self) -> list[str]:
        return [self.python, "-m", "live.engines.null_server", "--host", self.host, "--port", str(self.port),
                "--model-name", self.model_name or "null", "--exit-with-parent", str(os.getpid()),
                *self.extra_args]


@dataclass(eq=False)
class _Sequence:
    """One request's tokens as the engine has them (for tierlab detach / resume)."""

    prompt_ids: list[int]
    token_ids: list[int]
    emitted_chars: int = 0  # characters of text sent to the client so far
    detach: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)  # the request stopped generating
    detached: bool = False

    def state(self) -> dict[str, Any]:
        return {"prompt_ids": list(self.prompt_ids), "token_ids": list(self.token_ids),
                "emitted_chars": self.emitted_chars}


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def parse_resume(value: Any, n_words: int) -> dict[str, Any]:
    """A `tierlab_resume` object, checked; ValueError naming the field."""
    if not isinstance(value, dict):
        raise ValueError("'tierlab_resume' must be an object {prompt_ids, token_ids, emitted_chars}")
    for key in ("prompt_ids", "token_ids"):
        if not _int_list(value.get(key)):
            raise ValueError(f"'tierlab_resume.{key}' must be a list of integers, got {value.get(key)!r}")
    if any(not 0 <= t < n_words for t in value["token_ids"]):
        raise ValueError(f"'tierlab_resume.token_ids' must be ids of this engine's words (0..{n_words - 1})")
    chars = value.get("emitted_chars")
    if not isinstance(chars, int) or isinstance(chars, bool) or chars < 0:
        raise ValueError(f"'tierlab_resume.emitted_chars' must be an integer >= 0, got {chars!r}")
    return value


class NullEngine:
    """The ASGI app.

    Token i of an answer is `REPLY[i % len(REPLY)]` (its token id is `i % len(REPLY)`); an answer has
    `reply_tokens` tokens (default len(REPLY)), cut to `max_tokens`. With `max_num_seqs`, at most that many
    requests generate at once and the others wait in line (FIFO), as a batching engine queues them.

    tierlab detach / resume (token-based migration): `POST /v1/tierlab/detach {"id"}` stops a running (or
    queued) request at a token boundary and answers `{"id", "prompt_ids", "token_ids", "emitted_chars"}` (404 if
    unknown or finished); its stream then ends with `data: {"tierlab_detached": {...}}` and no [DONE], a
    non-streaming request answers `{"id", "tierlab_detached": {...}}`. A request carrying `tierlab_resume`
    continues the sequence: it first sends the text of the tokens the client has not seen
    (`emitted_chars` onwards), then the next tokens; a resumed chat stream has no role chunk, and usage counts
    all the sequence's tokens.
    """

    def __init__(self, model_name: str, stream: bool = True, token_delay_s: float = 0.0,
                 max_num_seqs: int = 0, reply_tokens: int = len(REPLY)) -> None:
        self.model_name = model_name
        self.stream = stream
        self.token_delay_s = token_delay_s
        self.reply_tokens = reply_tokens
        self._slots = asyncio.Semaphore(max_num_seqs) if max_num_seqs > 0 else None  # FIFO wakeups
        self._ids = itertools.count(1)
        self._running: dict[str, _Sequence] = {}

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
        elif method == "POST" and path == "/v1/tierlab/detach":
            await self._detach(await _body(receive), send)
        else:
            await _json(send, 404, _error(f"{method} {path}: not found", "not_found"))

    async def _detach(self, raw: bytes, send: Send) -> None:
        try:
            rid = json.loads(raw).get("id")
        except (ValueError, AttributeError):
            rid = None
        if not isinstance(rid, str):
            await _json(send, 400, _error("'id' must be the response id of a running request", "invalid_value"))
            return
        seq = self._running.get(rid)
        if seq is None:
            await _json(send, 404, _error(f"no running request {rid!r}", "not_found"))
            return
        seq.detach.set()
        await seq.done.wait()  # the request stops at its next token boundary
        if not seq.detached:  # it finished first
            await _json(send, 404, _error(f"request {rid!r} finished", "not_found"))
            return
        await _json(send, 200, {"id": rid, **seq.state()})

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
        resume = None
        if "tierlab_resume" in body:
            try:
                resume = parse_resume(body["tierlab_resume"], len(REPLY))
            except ValueError as e:
                await _json(send, 400, _error(str(e), "invalid_value"))
                return
        limit = body.get("max_tokens") or body.get("max_completion_tokens")
        n = min(limit, self.reply_tokens) if isinstance(limit, int) and limit > 0 else self.reply_tokens
        seq = (_Sequence(list(resume["prompt_ids"]), list(resume["token_ids"]), resume["emitted_chars"]) if resume
               else _Sequence([1], []))
        rid = body.get("tierlab_id")  # a caller-chosen response id (the gateway's, to detach non-streaming requests)
        if not (isinstance(rid, str) and rid):
            rid = f"{'chatcmpl' if chat else 'cmpl'}-null-{next(self._ids)}"
        head = {"id": rid, "created": int(time.time()), "model": body.get("model", self.model_name),
                "system_fingerprint": None}
        self._running[rid] = seq
        try:
            if stream:
                opts = body.get("stream_options")
                await self._stream(send, chat, head, seq, n, resume is not None,
                                   isinstance(opts, dict) and bool(opts.get("include_usage")))
            else:
                await self._whole(send, chat, head, seq, n)
        finally:
            self._running.pop(rid, None)
            seq.done.set()

    async def _generate(self, seq: _Sequence, n: int) -> AsyncIterator[str]:
        """The sequence's next words, one per token, until `n` tokens or a detach (then `seq.detached`)."""
        if self._slots is not None:
            acquire = asyncio.ensure_future(self._slots.acquire())
            detach = asyncio.ensure_future(seq.detach.wait())
            await asyncio.wait([acquire, detach], return_when=asyncio.FIRST_COMPLETED)
            detach.cancel()
            if not acquire.done() or acquire.cancelled():
                acquire.cancel()
                seq.detached = True  # detached while waiting in line
                return
        try:
            while len(seq.token_ids) < n:
                if self.token_delay_s > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(seq.detach.wait(), self.token_delay_s)
                if seq.detach.is_set():
                    seq.detached = True
                    return
                token = len(seq.token_ids) % len(REPLY)
                seq.token_ids.append(token)
                yield REPLY[token]
        finally:
            if self._slots is not None:
                self._slots.release()

    @staticmethod
    def _usage(seq: _Sequence) -> dict[str, int]:
        return {"prompt_tokens": len(seq.prompt_ids), "completion_tokens": len(seq.token_ids),
                "total_tokens": len(seq.prompt_ids) + len(seq.token_ids)}

    async def _whole(self, send: Send, chat: bool, head: dict[str, Any], seq: _Sequence, n: int) -> None:
        async with contextlib.aclosing(self._generate(seq, n)) as words:
            async for _ in words:
                pass
        if seq.detached:
            await _json(send, 200, {"id": head["id"], "tierlab_detached": seq.state()})
            return
        text = "".join(REPLY[t] for t in seq.token_ids)[seq.emitted_chars:]
        finish = "length" if len(seq.token_ids) < self.reply_tokens else "stop"
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                   "finish_reason": finish} if chat else
                  {"index": 0, "text": text, "logprobs": None, "finish_reason": finish})
        await _json(send, 200, {**head, "object": "chat.completion" if chat else "text_completion",
                                "choices": [choice], "usage": self._usage(seq)})

    async def _stream(self, send: Send, chat: bool, head: dict[str, Any], seq: _Sequence, n: int, resumed: bool,
                      usage: bool) -> None:
        obj = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

        def choice(text: str | None, reason: str | None, role: bool = False) -> dict[str, Any]:
            if not chat:
                return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}

        def text_event(text: str) -> bytes:
            seq.emitted_chars += len(text)
            return _event({**obj, "choices": [choice(text, None)]})

        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
        events = [_event({**obj, "choices": [choice("", None, role=True)]})] if chat and not resumed else []
        unseen = "".join(REPLY[t] for t in seq.token_ids)[seq.emitted_chars:]
        if unseen:  # generated before a detach but never sent to the client
            events.append(text_event(unseen))
        if self.token_delay_s > 0:  # a slow engine still answers at once (role chunk), then takes its time
            await _chunk(send, b"".join(events))
            events = []
        async with contextlib.aclosing(self._generate(seq, n)) as words:  # the batch slot is freed even if
            async for word in words:                                        # the client hangs up
                events.append(text_event(word))
                if self.token_delay_s > 0:  # a slow engine sends each token on its own, as soon as it is made
                    await _chunk(send, b"".join(events))
                    events = []
        if seq.detached:
            events.append(_event({"tierlab_detached": seq.state()}))
        else:
            finish = "length" if len(seq.token_ids) < self.reply_tokens else "stop"
            events.append(_event({**obj, "choices": [choice(None, finish)]}))
            if usage:
                events.append(_event({**obj, "choices": [], "usage": self._usage(seq)}))
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
    p.add_argument("--max-num-seqs", type=int, default=0,
                   help="requests generating at once; later ones wait in line (0: no limit)")
    p.add_argument("--reply-tokens", type=int, default=len(REPLY), help="tokens in a whole answer (words of REPLY, "
                   "repeated)")
    p.add_argument("--launched-at", type=float, help="the launcher's time.time() at spawn (accepted, unused)")
    p.add_argument("--exit-with-parent", type=int, metavar="PID", help="exit when this process is gone")
    p.add_argument("--log-level", default="warning")
    args = p.parse_args(argv)
    if args.token_delay_s < 0:
        p.error(f"--token-delay-s must be >= 0, got {args.token_delay_s}")
    if args.max_num_seqs < 0:
        p.error(f"--max-num-seqs must be >= 0, got {args.max_num_seqs}")
    if args.reply_tokens < 1:
        p.error(f"--reply-tokens must be >= 1, got {args.reply_tokens}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper())
    if args.exit_with_parent:
        from live.lifecycle import exit_with_parent

        exit_with_parent(args.exit_with_parent)
    import uvicorn

    app = NullEngine(args.model_name, stream=not args.no_stream, token_delay_s=args.token_delay_s,
                     max_num_seqs=args.max_num_seqs, reply_tokens=args.reply_tokens)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False, lifespan="on",
                timeout_graceful_shutdown=3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
