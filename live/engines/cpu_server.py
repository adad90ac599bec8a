"""The CPU engine: an OpenAI-compatible HTTP server (starlette + uvicorn) over `live.engines.llama`.

    python -m live.engines.cpu_server --model-dir DIR --port 8001 [--progressive] [--model-name NAME]
        [--max-num-seqs 8] [--prefill-chunk-tokens 256]

Endpoints: GET /ping and /health (200 once the model can serve, 503 while loading), GET /v1/models (with the
chat template in use: the checkpoint's own, `live.chat_template`, or the built-in one),
POST /v1/completions and /v1/chat/completions (non-streaming, or SSE with `stream: true`), GET /stats
(start-up phase timings, batching counters, the last request), and POST /v1/tierlab/detach (live
migration, below).

A stream sends one chunk per generated token as the step that generated it ends, as vLLM does: a token whose
text is held back (part of a UTF-8 character, or maybe the start of a stop string) gets a chunk with empty
text, and its text comes in a later chunk. A client timing TTFT and TPOT by chunks with a choice then times
token generation, not text arrival. A chat stream opens with a role chunk at once (before any token), and
every stream ends with a finish chunk carrying the finish_reason and any text still held back.

The server listens before torch is even imported; the model loads in a thread (`cpu_engine.Engine`).
Inference is continuously batched (`batching.Scheduler`): up to --max-num-seqs sequences decode together,
one forward pass per step; newcomers join between steps, their prefill chunked to --prefill-chunk-tokens
per step; more requests wait FIFO. The event loop stays free to answer probes and stream tokens. Both
load modes read the weights with tierlab's loader (`live.loader`). Without --progressive the server is
ready once every layer is resident (load-then-run); with --progressive it is ready as soon as the model
object exists and the first forward pass computes layer i as soon as layer i is there.
--max-read-MBps caps the loader's read rate (an emulated slower tier); --layer-delay-s instead reads
group by group with a sleep before each (a fake slow tier for tests); --step-delay-s sleeps after each
batch step (an emulated slower device).

Live migration, token based: POST /v1/tierlab/detach {"id": <response id>} takes that sequence out between
steps and answers {"id", "prompt_ids", "token_ids", "emitted_chars"} (404 if no waiting or running sequence
has that id). Its own stream ends with one event `data: {"tierlab_detached": {...}}` and no [DONE]; a
non-streaming request answers {"id", "tierlab_detached": {..., "emitted_chars": 0}}. A request carrying
`"tierlab_resume": {"prompt_ids", "token_ids", "emitted_chars"}` continues such a sequence here: prompt and
generated ids are prefilled, max_tokens counts from the original start, token k is drawn from (seed, k)
alone, and the text deltas continue after `emitted_chars` characters (a resumed chat stream sends no role
chunk). `emitted_chars` counts the generated text the client has received, carried-over characters included.
The detached state also carries the sequence's `seed` (one the engine drew, for an unseeded request), so that
its draws stay the same after the move. A request may name its response id (`"tierlab_id"`): a caller that
sees nothing of a non-streaming response before it is complete can still detach it.
"""

from __future__ import annotations

import time

# taken before the heavy imports, so that the stats can tell interpreter start from import time
_MODULE_START_UNIX = time.time()
_MODULE_START_PERF = time.perf_counter()

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import secrets  # noqa: E402
import sys  # noqa: E402
import uuid  # noqa: E402
from collections.abc import AsyncIterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from starlette.applications import Starlette  # noqa: E402
from starlette.exceptions import HTTPException  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse, Response, StreamingResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from live.engines.batching import SeqRequest  # noqa: E402
from live.engines.cpu_api import (  # noqa: E402
    RESUME_FIELD,
    ApiError,
    ResumeState,
    SamplingParams,
    _is_int,
    chat_prompt,
    parse_request_id,
    parse_resume,
    parse_sampling,
)
from live.engines.cpu_chat import ChatPrompts  # noqa: E402
from live.engines.cpu_engine import Engine  # noqa: E402
from live.engines.cpu_http import (  # noqa: E402
    Channel,
    check_model,
    collect_response,
    json_body,
    stream_events,
)
from live.engines.text_stream import TextStream  # noqa: E402
from live.lifecycle import exit_with_parent  # noqa: E402

log = logging.getLogger("live.engines.cpu_server")

# re-exported: callers written before the split import these from here
__all__ = ["ApiError", "Engine", "SamplingParams", "TextStream", "chat_prompt", "create_app", "main",
           "parse_args", "parse_sampling"]



def create_app(engine: Engine) -> Starlette:
    """The ASGI app; `engine.start()` runs in its lifespan.

    Chat requests use the checkpoint's own chat template when it has one (`live.chat_template`), else the
    built-in simple one; a template that does not compile stops the server here, before it listens.
    """
    chats = ChatPrompts.for_checkpoint(engine.model_dir)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        engine.start()
        yield

    async def ping(request: Request) -> Response:
        if engine.state == "ready":
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": engine.state, "error": engine.error}, status_code=503)

    async def models(request: Request) -> Response:
        card = {"id": engine.model_name, "object": "model", "created": engine.created_unix, "owned_by": "tierlab",
                "chat_template": chats.describe()}
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

    async def resume_state(body: dict[str, Any]) -> ResumeState | None:
        if body.get(RESUME_FIELD) is None:
            return None
        await asyncio.to_thread(engine.ready.wait)  # validation needs the vocabulary and the tokenizer
        if engine.model is None:
            raise ApiError(503, f"the model is not available: {engine.error}", None, "model_unavailable",
                           "server_error")
        return parse_resume(body, engine.model.config.vocab_size, engine.context_tokens(), engine.decode)

    async def run(body: dict[str, Any], chat: bool, arrived_perf: float, request: Request) -> Response:
        check_model(engine.model_name, body)
        params = parse_sampling(body, ("max_tokens", "max_completion_tokens") if chat else ("max_tokens",))
        resume = await resume_state(body)
        if resume is not None:
            ids = resume.prompt_ids  # authoritative: the prompt is not tokenized again
        elif chat:
            if "messages" not in body:
                raise ApiError(400, "you must provide a 'messages' parameter", "messages", "missing_required_parameter")
            ids = await chats.prompt_ids(engine, body["messages"])
        else:
            if "prompt" not in body:
                raise ApiError(400, "you must provide a 'prompt' parameter", "prompt", "missing_required_parameter")
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
        if resume is not None and len(resume.token_ids) >= max_tokens:
            param = f"{RESUME_FIELD}.token_ids"
            raise ApiError(400, f"'{param}' already holds {len(resume.token_ids)} tokens; max_tokens (the original "
                           f"request's total) is {max_tokens}", param, "invalid_value")
        request_id = parse_request_id(body) or f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        channel = Channel()
        req = SeqRequest(
            request_id=request_id,
            prompt_ids=list(ids),
            max_tokens=max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            # without a seed, a fresh one (or the one a resumed sequence carries): one draw per position, so
            # a sequence moved to another engine keeps drawing what it would have drawn here
            seed=(params.seed if params.seed is not None
                  else resume.seed if resume is not None and resume.seed is not None else secrets.randbits(63)),
            stop=params.stop,
            ignore_eos=params.ignore_eos,
            stream=params.stream,
            emit=channel.emit,
            resume=resume,
            arrived_perf=arrived_perf,
        )
        engine.submit(req)
        created = int(time.time())
        if params.stream:
            return StreamingResponse(
                stream_events(engine.model_name, req, channel, params, created, chat),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await collect_response(engine.model_name, req, channel, created, chat, request)

    async def detach(request: Request) -> Response:
        body = await json_body(request)
        request_id = body.get("id")
        if not isinstance(request_id, str) or not request_id:
            raise ApiError(400, "'id' must be the response id of a running request", "id", "invalid_value")
        result = await asyncio.wrap_future(engine.scheduler.detach(request_id))
        if result is None:
            raise ApiError(404, f"no waiting or running sequence has id {request_id!r}", "id", "not_found")
        return JSONResponse(result)

    # arrival is stamped before parsing and tokenizing (which waits for a loading model): TTFT counts both
    async def completions(request: Request) -> Response:
        arrived_perf = time.perf_counter()
        return await run(await json_body(request), chat=False, arrived_perf=arrived_perf, request=request)

    async def chat_completions(request: Request) -> Response:
        arrived_perf = time.perf_counter()
        return await run(await json_body(request), chat=True, arrived_perf=arrived_perf, request=request)

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
            Route("/v1/tierlab/detach", detach, methods=["POST"]),
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
    parser.add_argument("--prefill-chunk-tokens", type=int, default=256,
                        help="prompt tokens prefilled per batch step (a long prompt is split over steps)")
    parser.add_argument("--step-delay-s", type=float, default=0.0,
                        help="sleep after each batch step (emulates a slower device)")
    # the env default lets a whole stack (agents launch the engines) turn it on: TIERLAB_PREFIX_CACHE_BLOCKS=N
    parser.add_argument("--prefix-cache-blocks", type=int,
                        default=int(os.environ.get("TIERLAB_PREFIX_CACHE_BLOCKS", 0)),
                        help="keep a prefix (KV) cache of this many blocks (0: off; default: the env variable)")
    parser.add_argument("--prefix-block-tokens", type=int, default=16, help="tokens per prefix-cache block")
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
    for name, value, low in (("--max-num-seqs", args.max_num_seqs, 1), ("--prefill-chunk-tokens",
                             args.prefill_chunk_tokens, 1), ("--step-delay-s", args.step_delay_s, 0),
                             ("--prefix-cache-blocks", args.prefix_cache_blocks, 0),
                             ("--prefix-block-tokens", args.prefix_block_tokens, 1)):
        if value < low:
            print(f"cpu_server: {name} must be >= {low}, got {value}", file=sys.stderr)
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
        max_num_seqs=args.max_num_seqs,
        prefill_chunk_tokens=args.prefill_chunk_tokens,
        step_delay_s=args.step_delay_s,
        process_started=(_MODULE_START_UNIX, _MODULE_START_PERF),
        prefix_cache_blocks=args.prefix_cache_blocks,
        prefix_block_tokens=args.prefix_block_tokens,
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
