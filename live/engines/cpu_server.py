"""The CPU engine: an OpenAI-compatible HTTP server (starlette + uvicorn) over `live.engines.llama`.

    python -m live.engines.cpu_server --model-dir DIR --port 8001 [--progressive] [--model-name NAME]

Endpoints: GET /ping and /health (200 once the model can serve, 503 while loading), GET /v1/models,
POST /v1/completions and /v1/chat/completions (non-streaming, or SSE with `stream: true`), and
GET /stats (start-up phase timings and the last request's first-token time).

The server listens before torch is even imported; the model loads in a thread. Inference runs in
one worker thread, one request at a time (later requests queue), so the event loop stays free to
answer probes and stream tokens. Both modes read the weights with tierlab's loader (`live.loader`:
parallel chunked reads, O_DIRECT where allowed) and the same settings. Without --progressive the
server is ready once every layer is resident (load-then-run); with --progressive it is ready as soon
as the model object exists, the loading thread converts each layer group to the compute dtype as it
lands, and the first forward pass computes layer i as soon as layer i is there.
--max-read-MBps caps the loader's read rate (an emulated slower tier); --layer-delay-s instead reads
group by group with a sleep before each (a fake slow tier for tests).
"""

from __future__ import annotations

import time

# taken before the heavy imports, so that the stats can tell interpreter start from import time
_MODULE_START_UNIX = time.time()
_MODULE_START_PERF = time.perf_counter()

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import queue  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
import uuid  # noqa: E402
from collections.abc import AsyncIterator, Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from starlette.applications import Starlette  # noqa: E402
from starlette.exceptions import HTTPException  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse, Response, StreamingResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from live.lifecycle import exit_with_parent  # noqa: E402

log = logging.getLogger("live.engines.cpu_server")

CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
MAX_STOP_SEQUENCES = 4


# --------------------------------------------------------------------------- errors and validation


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


def chat_prompt(messages: object) -> str:
    """The simple chat template: one "<|role|>: content" line per message, then "<|assistant|>:"."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages", "invalid_value")
    lines = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError(400, "each message must be an object", f"messages[{i}]", "invalid_type")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise ApiError(400, f"message role must be one of {sorted(CHAT_ROLES)}", f"messages[{i}].role")
        lines.append(f"<|{role}|>: {_message_text(message, i)}\n")
    return "".join(lines) + "<|assistant|>:"


# --------------------------------------------------------------------------- text streaming


class TextStream:
    """Incremental detokenization with stop strings.

    Re-decodes all generated ids each step (byte-level BPE may split a character across tokens;
    a trailing U+FFFD means "wait for the next byte") and holds back the last len(stop)-1 chars
    so that a stop string split across tokens is never half-emitted. The concatenated deltas equal
    the non-streamed text.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: list[str]) -> None:
        self.decode = decode
        self.stop = stop
        self.holdback_chars = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.emitted_chars = 0
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; the text that is now safe to emit (sets `stopped` on a stop string)."""
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        self.text = text
        return self._release(final=False)

    def flush(self) -> str:
        """The rest of the text at the end of generation."""
        if self.stopped:
            return ""
        self.text = self.decode(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        hits = [i for i in (self.text.find(s, self.emitted_chars) for s in self.stop) if i >= 0]
        if hits:
            end, self.stopped = min(hits), True
        else:
            end = len(self.text) if final else len(self.text) - self.holdback_chars
        if end <= self.emitted_chars:
            return ""
        out = self.text[self.emitted_chars : end]
        self.emitted_chars = end
        return out


# --------------------------------------------------------------------------- the engine


@dataclass
class Job:
    """One request on its way through the worker thread; events flow back to the event loop."""

    prompt_ids: list[int]
    max_tokens: int
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived_perf: float = field(default_factory=time.perf_counter)

    def emit(self, kind: str, payload: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is shutting down
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))


class Engine:
    """Model, tokenizer, the inference worker and the start-up timings."""

    def __init__(
        self,
        model_dir: Path,
        model_name: str,
        progressive: bool = False,
        dtype: str = "float32",
        threads: int | None = None,
        launched_at_unix: float | None = None,
        default_chat_max_tokens: int = 256,
        layer_delay_s: float = 0.0,
        max_read_Bps: float | None = None,
    ) -> None:
        self.model_dir = model_dir
        self.model_name = model_name
        self.progressive = progressive
        self.dtype_name = dtype
        self.threads = threads
        self.default_chat_max_tokens = default_chat_max_tokens
        self.layer_delay_s = layer_delay_s
        self.max_read_Bps = max_read_Bps
        self.created_unix = int(time.time())
        # every *_at_s is measured from t0: the parent's launch time when it passed one, else module start
        self.t0_unix = launched_at_unix if launched_at_unix is not None else _MODULE_START_UNIX
        self.state = "loading"  # loading -> ready -> (failed)
        self.error: str | None = None
        self.ready = threading.Event()
        self.on_fatal: Callable[[], None] = lambda: None
        self.model: Any = None
        self.tokenizer: Any = None
        self.bos_token_id: int | None = None
        self._jobs: queue.Queue[Job] = queue.Queue()
        self.timings: dict[str, float | None] = {
            "process_started_at_s": _MODULE_START_UNIX - self.t0_unix,
            "listening_at_s": None,
            "imports_done_at_s": None,
            "weights_resident_at_s": None,
            "ready_at_s": None,
            "load_s": None,  # load start -> every group resident in the model, in the compute dtype
            "read_s": None,  # load start -> the source (the loader) had read every group
            "first_token_at_s": None,  # the first request's first token: the cold start's TTFT
        }
        self.requests_done = 0
        self.requests_failed = 0
        self.last_request: dict[str, Any] | None = None

    def since_t0_s(self) -> float:
        return time.time() - self.t0_unix

    def perf_to_at_s(self, perf: float) -> float:
        """A perf_counter() reading as seconds since t0 (perf_counter is monotonic, time.time() is not)."""
        return perf - _MODULE_START_PERF + (_MODULE_START_UNIX - self.t0_unix)

    def start(self) -> None:
        self.timings["listening_at_s"] = self.since_t0_s()
        threading.Thread(target=self._load, name="model-loader", daemon=True).start()
        threading.Thread(target=self._work, name="inference", daemon=True).start()

    def _fail(self, what: str, exc: BaseException) -> None:
        self.state = "failed"
        self.error = f"{what}: {exc!r}"
        log.error("%s\n%s", self.error, "".join(traceback.format_exception(exc)))
        self.ready.set()  # wake queued jobs: they answer with the error
        self.on_fatal()

    def _load(self) -> None:
        try:
            import torch
            from tokenizers import Tokenizer

            from live.engines.llama import DTYPES, LlamaModel

            if self.threads:
                torch.set_num_threads(self.threads)
            self.timings["imports_done_at_s"] = self.since_t0_s()
            start = time.perf_counter()
            # both modes read through the same source with the same settings: they differ only in
            # whether the first forward pass may begin before the last group is resident
            source = self._layer_source()
            self.tokenizer = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))  # while the read runs
            self.model = LlamaModel.from_dir(self.model_dir, DTYPES[self.dtype_name], layer_source=source)
            if not self.progressive:
                self.model.materialize()
                self._weights_resident(source, start)
            self.bos_token_id = self.model.config.bos_token_id
            self.state = "ready"
            self.timings["ready_at_s"] = self.since_t0_s()
            self.ready.set()
            log.info(
                "model %s ready at %.3f s (progressive=%s)",
                self.model_name,
                self.timings["ready_at_s"],
                self.progressive,
            )
            if self.progressive:
                # take (and convert to the compute dtype) each group as soon as it is resident, in this
                # thread: the first forward pass then finds layer i ready instead of converting it itself,
                # so conversion overlaps compute rather than adding to it
                self.model.materialize()
                self._weights_resident(source, start)
        except BaseException as exc:  # any load failure is fatal for the process
            self._fail("loading the model failed", exc)

    def _layer_source(self) -> Any:
        """The weights' source: tierlab's parallel, layer-ordered loader, or the artificial slow tier."""
        from live.manifest import WEIGHTS_FILE

        # the loader reads one model.safetensors; a sharded checkpoint is read shard by shard instead
        if self.layer_delay_s > 0 or not (self.model_dir / WEIGHTS_FILE).is_file():
            from live.engines.base import BackgroundSafetensorsLayerSource

            if self.max_read_Bps is not None:
                log.warning("--max-read-MBps applies to the loader only; ignored for %s", self.model_dir)
            # layer_delay_s: an experiment knob, a sleep per group standing in for a slow tier
            return BackgroundSafetensorsLayerSource(self.model_dir, self.layer_delay_s).start()
        from live.engines.loader_source import LoaderLayerSource

        return LoaderLayerSource(self.model_dir, max_read_Bps=self.max_read_Bps)

    def _weights_resident(self, source: Any, start_perf: float) -> None:
        """Record when the model held every group; a late source error (a failed checksum) is fatal."""
        source.done.wait()
        if source.error is not None:
            raise source.error
        # the last group's time, not this call's: the forward pass may have taken the last group itself
        resident_perf = max(self.model.group_resident_at.values())
        self.timings["load_s"] = resident_perf - start_perf
        self.timings["read_s"] = source.load_s
        self.timings["weights_resident_at_s"] = self.perf_to_at_s(resident_perf)

    # -- requests

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt, with the checkpoint's BOS in front (Llama expects it)."""
        self.ready.wait()  # the tokenizer loads with the model
        if self.tokenizer is None:
            raise ApiError(503, f"the model is not available: {self.error}", None, "model_unavailable", "server_error")
        ids = list(self.tokenizer.encode(text).ids)
        if self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids.insert(0, self.bos_token_id)
        return ids

    def context_tokens(self) -> int:
        return int(self.model.config.max_position_embeddings)

    def submit(self, job: Job) -> None:
        self._jobs.put(job)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                self._run(job)
            except BaseException as exc:  # one bad request must not kill the worker
                log.exception("request failed")
                self.requests_failed += 1
                job.emit("error", ApiError(500, f"inference failed: {exc!r}", None, None, "server_error"))

    def _run(self, job: Job) -> None:
        self.ready.wait()
        if self.state == "failed":
            raise RuntimeError(self.error)
        if job.cancelled.is_set():
            return
        started = time.perf_counter()
        params = job.params
        generation = self.model.generate(
            job.prompt_ids, job.max_tokens, temperature=params.temperature, top_p=params.top_p, seed=params.seed,
            eos_token_ids=() if params.ignore_eos else None,
        )
        text = TextStream(lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True), params.stop)
        first_token_perf = None
        for token in generation:
            if first_token_perf is None:
                first_token_perf = time.perf_counter()
                if self.timings["first_token_at_s"] is None:
                    self.timings["first_token_at_s"] = self.since_t0_s()
            if job.cancelled.is_set():  # the client went away: free the worker for the next request
                break
            delta = text.push(token)
            if delta:
                job.emit("text", delta)
            if text.stopped:
                break
        finish_reason = "stop" if text.stopped else generation.finish_reason or "stop"
        rest = text.flush()
        if rest:
            job.emit("text", rest)
        done = time.perf_counter()
        usage = {
            "prompt_tokens": len(job.prompt_ids),
            "completion_tokens": len(generation.tokens),
            "total_tokens": len(job.prompt_ids) + len(generation.tokens),
        }
        self.requests_done += 1
        self.last_request = {
            **usage,
            "finish_reason": finish_reason,
            "queue_s": started - job.arrived_perf,
            "first_token_s": None if first_token_perf is None else first_token_perf - job.arrived_perf,
            "e2e_s": done - job.arrived_perf,
            "cancelled": job.cancelled.is_set(),
        }
        job.emit("done", {"finish_reason": finish_reason, "usage": usage})

    def _group_times(self, perf_by_group: dict[int, float]) -> list[float | None]:
        times = dict(perf_by_group)  # a snapshot: the inference thread may add to it meanwhile
        return [self.perf_to_at_s(times[g]) if g in times else None for g in range(self.model.n_groups)]

    def stats(self) -> dict[str, Any]:
        model = self.model
        return {
            "model": self.model_name,
            "state": self.state,
            "error": self.error,
            "progressive": self.progressive,
            "dtype": self.dtype_name,
            "pid": os.getpid(),
            "t0_unix": self.t0_unix,
            **self.timings,
            "weights_resident": bool(model is not None and model.resident),
            # per layer group (0 = embeddings .. N+1 = norm + lm_head): when the model took it, and when
            # the first forward pass had computed it; with --progressive the two interleave
            "group_resident_at_s": None if model is None else self._group_times(model.group_resident_at),
            "group_computed_at_s": None if model is None else self._group_times(model.group_computed_at),
            "requests": self.requests_done,
            "requests_failed": self.requests_failed,
            "requests_queued": self._jobs.qsize(),
            "first_token_s": None if self.last_request is None else self.last_request["first_token_s"],
            "last_request": self.last_request,
        }


# --------------------------------------------------------------------------- HTTP


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"could not parse the JSON body: {exc}", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the JSON body must be an object", None, "invalid_json")
    return body


def _check_model(engine: Engine, body: dict[str, Any]) -> None:
    model = body.get("model")
    if model is None:
        raise ApiError(400, "you must provide a 'model' parameter", "model", "missing_required_parameter")
    if not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", "model", "invalid_type")
    if model != engine.model_name:
        raise ApiError(
            404,
            f"the model '{model}' does not exist; this engine serves '{engine.model_name}'",
            "model",
            "model_not_found",
        )


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


def create_app(engine: Engine) -> Starlette:
    """The ASGI app; `engine.start()` runs in its lifespan."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        engine.start()
        yield

    async def ping(request: Request) -> Response:
        if engine.state == "ready":
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": engine.state, "error": engine.error}, status_code=503)

    async def models(request: Request) -> Response:
        card = {"id": engine.model_name, "object": "model", "created": engine.created_unix, "owned_by": "tierlab"}
        return JSONResponse({"object": "list", "data": [card]})

    async def stats(request: Request) -> Response:
        return JSONResponse(engine.stats())

    async def prompt_ids(prompt: object) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            return await asyncio.to_thread(engine.encode, prompt)
        if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
            await asyncio.to_thread(engine.ready.wait)
            if engine.model is None:
                raise ApiError(
                    503, f"the model is not available: {engine.error}", None, "model_unavailable", "server_error"
                )
            vocab = engine.model.config.vocab_size
            if any(not 0 <= t < vocab for t in prompt):
                raise ApiError(400, f"prompt token ids must be in 0..{vocab - 1}", "prompt", "invalid_value")
            return list(prompt)
        raise ApiError(400, "'prompt' must be a string, a list of token ids, or a list of one of these", "prompt")

    async def run(body: dict[str, Any], chat: bool, arrived_perf: float) -> Response:
        _check_model(engine, body)
        if chat:
            if "messages" not in body:
                raise ApiError(400, "you must provide a 'messages' parameter", "messages", "missing_required_parameter")
            params = parse_sampling(body, ("max_tokens", "max_completion_tokens"))
            ids = await prompt_ids(chat_prompt(body["messages"]))
        else:
            if "prompt" not in body:
                raise ApiError(400, "you must provide a 'prompt' parameter", "prompt", "missing_required_parameter")
            params = parse_sampling(body, ("max_tokens",))
            ids = await prompt_ids(body["prompt"])
        if engine.model is None:
            raise ApiError(
                503, f"the model is not available: {engine.error}", None, "model_unavailable", "server_error"
            )
        context = engine.context_tokens()
        room = context - len(ids)
        if room < 1:
            raise ApiError(
                400,
                f"the prompt has {len(ids)} tokens; this model's context holds {context}",
                "messages" if chat else "prompt",
                "context_length_exceeded",
            )
        if params.max_tokens is None:
            # OpenAI's legacy completions default to 16 tokens; chat runs until the end (capped here)
            max_tokens = min(room, engine.default_chat_max_tokens if chat else 16)
        elif params.max_tokens > room:
            raise ApiError(
                400,
                f"the prompt ({len(ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds this "
                f"model's context of {context} tokens",
                "max_tokens",
                "context_length_exceeded",
            )
        else:
            max_tokens = params.max_tokens
        job = Job(ids, max_tokens, params, asyncio.get_running_loop(), arrived_perf=arrived_perf)
        engine.submit(job)
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        if params.stream:
            return StreamingResponse(
                _stream(job, request_id, created, chat),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await _collect(job, request_id, created, chat)

    def _chunk(request_id: str, created: int, chat: bool, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": request_id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
            "model": engine.model_name,
            "system_fingerprint": None,
            "choices": choices,
        }

    def _choice(chat: bool, text: str | None, finish_reason: str | None, first: bool = False) -> dict[str, Any]:
        if not chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    async def _stream(job: Job, request_id: str, created: int, chat: bool) -> AsyncIterator[str]:
        try:
            if chat:
                yield _sse(_chunk(request_id, created, chat, [_choice(chat, "", None, first=True)]))
            while True:
                kind, payload = await job.events.get()
                if kind == "text":
                    yield _sse(_chunk(request_id, created, chat, [_choice(chat, payload, None)]))
                elif kind == "done":
                    yield _sse(_chunk(request_id, created, chat, [_choice(chat, None, payload["finish_reason"])]))
                    if job.params.include_usage:
                        yield _sse({**_chunk(request_id, created, chat, []), "usage": payload["usage"]})
                    break
                else:
                    yield _sse(payload.body())
                    break
            yield _sse("[DONE]")
        finally:
            job.cancelled.set()  # no-op when generation finished; stops it when the client left early

    async def _collect(job: Job, request_id: str, created: int, chat: bool) -> Response:
        parts: list[str] = []
        while True:
            kind, payload = await job.events.get()
            if kind == "text":
                parts.append(payload)
            elif kind == "done":
                break
            else:
                return payload.response()
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
                "id": request_id,
                "object": "chat.completion" if chat else "text_completion",
                "created": created,
                "model": engine.model_name,
                "system_fingerprint": None,
                "choices": [choice],
                "usage": payload["usage"],
            }
        )

    # arrival is stamped before parsing and tokenizing (which waits for a loading model): TTFT counts both
    async def completions(request: Request) -> Response:
        arrived_perf = time.perf_counter()
        return await run(await _json_body(request), chat=False, arrived_perf=arrived_perf)

    async def chat_completions(request: Request) -> Response:
        arrived_perf = time.perf_counter()
        return await run(await _json_body(request), chat=True, arrived_perf=arrived_perf)

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return exc.response()

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = "not_found" if exc.status_code == 404 else None
        return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", None, code).response()

    async def server_error(request: Request, exc: Exception) -> Response:
        return ApiError(500, f"internal error: {exc!r}", None, None, "server_error").response()

    return Starlette(
        routes=[
            Route("/ping", ping),
            Route("/health", ping),
            Route("/stats", stats),
            Route("/v1/models", models),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        ],
        exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
    )


# --------------------------------------------------------------------------- process entry point


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m live.engines.cpu_server", description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", required=True, type=Path, help="HF Llama checkpoint directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--model-name", help="name served in the API (default: the directory's name)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--progressive", action="store_true", help="serve while the layers load")
    parser.add_argument("--layer-delay-s", type=float, default=0.0, help="sleep per layer group (a fake slow tier)")
    parser.add_argument("--max-read-MBps", type=float, help="cap the weights read at this many MB/s "
                        "(emulates a slower tier; off by default)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads")
    parser.add_argument("--max-num-seqs", type=int, default=8, help="sequences batched per decode step")
    parser.add_argument("--default-chat-max-tokens", type=int, default=256)
    parser.add_argument("--launched-at", type=float, help="the launcher's time.time() at spawn (t0 of the stats)")
    parser.add_argument("--exit-with-parent", type=int, metavar="PID", help="exit when this process is gone")
    parser.add_argument("--log-level", default="info")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.max_read_MBps is not None and not args.max_read_MBps > 0:
        print(f"cpu_server: --max-read-MBps must be > 0, got {args.max_read_MBps}", file=sys.stderr)
        return 2
    # fail fast, before importing torch, on a directory that cannot be a checkpoint
    for name in ("config.json", "tokenizer.json"):
        if not (args.model_dir / name).is_file():
            print(f"cpu_server: {args.model_dir / name} does not exist", file=sys.stderr)
            return 2
    if args.exit_with_parent:
        exit_with_parent(args.exit_with_parent)  # the launcher may die without calling stop()
    # torch's OpenMP threads spin at every barrier by default; sharing the cores with the loader's
    # threads, the server and other processes, a spinning thread takes the core its partner needs and
    # each op of a batch-1 forward pass stalls for a scheduler slice. Set before torch is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # OpenMP workers then sleep when out of work

    import uvicorn

    engine = Engine(
        model_dir=args.model_dir,
        model_name=args.model_name or args.model_dir.resolve().name,
        progressive=args.progressive,
        dtype=args.dtype,
        threads=args.threads,
        launched_at_unix=args.launched_at,
        default_chat_max_tokens=args.default_chat_max_tokens,
        layer_delay_s=args.layer_delay_s,
        max_read_Bps=None if args.max_read_MBps is None else args.max_read_MBps * 1e6,
    )
    config = uvicorn.Config(
        create_app(engine),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=3,  # an open stream must not keep a stopping engine alive
    )
    server = uvicorn.Server(config)
    exit_code = 0

    def fatal() -> None:
        nonlocal exit_code
        exit_code = 1
        server.should_exit = True

    engine.on_fatal = fatal
    server.run()
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
