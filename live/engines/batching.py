"""Continuous batching for the CPU engine: one worker thread steps up to `max_num_seqs` sequences together.

Each step is ONE `LlamaModel.forward_batch` over every running sequence: a decode token for each sequence
that has finished its prefill, and prefill chunks of newcomers within a per-step budget of
`prefill_chunk_tokens` prompt tokens (so a long prompt never stalls the others' decoding for more than a
chunk). Between steps the worker admits waiting requests (FIFO) into free slots, drops cancelled ones
(their client left), and carries out detach requests (live migration: the sequence leaves with its
prompt and generated ids, see `detach`). Each sequence owns its KV cache; a finished, cancelled or
detached sequence frees its slot at once.

Generated token k of a sequence is drawn with `position_generator(seed, k)`: a sequence resumed on
another engine (prompt + generated ids prefilled again) draws exactly what it would have drawn here.

Events go back through each request's `emit(kind, payload)`: ("token", str) once per generated token, at
the step that generated it, with the text it releases ("" while the text is held back: a partial UTF-8
character or a possible stop string, see `TextStream`), so that a stream's chunks time the generation, not
the text; ("done", {"finish_reason", "usage", "text"}) where "text" is what the end released (held-back text,
"" if none); ("detached", {"prompt_ids", "token_ids", "emitted_chars"}) or ("error", ApiError). Importing
this module does not import torch (the server must listen before torch loads); `serve()` brings it in.

With a prefix cache (`prefix_cache_blocks` > 0, `live.engines.prefix_store`), a newcomer whose prompt starts
with whole blocks another prompt computed takes their KV instead of prefilling them, and its "done" usage says
how many in `prompt_tokens_details.cached_tokens` (OpenAI's field); a prompt's blocks are kept when its
prefill ends. Off (the default), nothing changes.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from live.engines.cpu_api import ApiError, ResumeState
from live.engines.prefix_store import KVPrefixStore
from live.engines.text_stream import TextStream

log = logging.getLogger("live.engines.batching")


@dataclass
class SeqRequest:
    """One generation request as the scheduler sees it (validated by the HTTP layer)."""

    request_id: str
    prompt_ids: list[int]
    max_tokens: int  # generated tokens in total, counting the ones a resumed sequence brings
    temperature: float
    top_p: float
    seed: int
    stop: list[str]
    ignore_eos: bool
    stream: bool
    emit: Callable[[str, Any], None]
    resume: ResumeState | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived_perf: float = field(default_factory=time.perf_counter)


class _Seq:
    """A running sequence: its request, KV cache, generated ids and text stream."""

    def __init__(self, req: SeqRequest, model: Any, decode: Callable[[list[int]], str]) -> None:
        self.req = req
        context = model.config.max_position_embeddings
        self.budget_tokens = min(req.max_tokens, context - len(req.prompt_ids))
        resumed = req.resume.token_ids if req.resume is not None else []
        self.tokens: list[int] = list(resumed)
        # what the prefill feeds: the prompt, then (resumed) every generated id, recomputing their KV
        self.pending = [*req.prompt_ids, *resumed]
        self.fed = 0  # positions of `pending` already in the cache
        # the last sampled token is never fed back, so prompt + budget - 1 positions suffice
        self.cache = model.new_cache(len(req.prompt_ids) + self.budget_tokens)
        emitted = req.resume.emitted_chars if req.resume is not None else 0
        self.text = TextStream(decode, req.stop, ids=resumed, emitted_chars=emitted)
        self.admitted_perf = time.perf_counter()
        self.first_token_perf: float | None = None
        self.cached_tokens = 0  # prompt tokens whose KV came from the prefix cache

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.pending)

    def state(self) -> ResumeState:
        """What another engine needs to continue this sequence."""
        # a non-streaming client has received nothing from this engine: only what it had before (if resumed)
        base = self.req.resume.emitted_chars if self.req.resume is not None else 0
        return ResumeState(list(self.req.prompt_ids), list(self.tokens), self.text.emitted_chars if self.req.stream
                           else base, self.req.seed)


def _waiting_state(req: SeqRequest) -> ResumeState:
    """A request detached before it was admitted: it leaves as it came."""
    if req.resume is not None:
        return ResumeState(list(req.prompt_ids), list(req.resume.token_ids), req.resume.emitted_chars, req.seed)
    return ResumeState(list(req.prompt_ids), [], 0, req.seed)


class Scheduler:
    """The batching worker; thread-safe `submit`, `detach`, `serve`, `fail` and `stats`."""

    def __init__(self, max_num_seqs: int = 8, prefill_chunk_tokens: int = 256, step_delay_s: float = 0.0,
                 prefix_cache_blocks: int = 0, prefix_block_tokens: int = 16) -> None:
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if prefill_chunk_tokens < 1:
            raise ValueError(f"prefill_chunk_tokens must be >= 1, got {prefill_chunk_tokens}")
        if step_delay_s < 0:
            raise ValueError(f"step_delay_s must be >= 0, got {step_delay_s}")
        self.max_num_seqs = max_num_seqs
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.step_delay_s = step_delay_s  # a sleep after each step: emulates a slower device (experiments, tests)
        # the prefix (KV) cache, worker-owned; None: off
        self.prefix: KVPrefixStore | None = (KVPrefixStore(prefix_cache_blocks, prefix_block_tokens)
                                             if prefix_cache_blocks > 0 else None)
        self._cond = threading.Condition()
        self._incoming: list[SeqRequest] = []  # submitted, not yet seen by the worker (guarded by _cond)
        self._detaches: list[tuple[str, concurrent.futures.Future[dict[str, Any] | None]]] = []
        self._waiting: collections.deque[SeqRequest] = collections.deque()  # worker-owned from here on
        self._running: list[_Seq] = []
        self._model: Any = None
        self._decode: Callable[[list[int]], str] | None = None
        self._eos: frozenset[int] = frozenset()
        self._failed: ApiError | None = None
        self._closed = False
        self._thread: threading.Thread | None = None
        # counters read by stats()
        self.steps = 0
        self.step_seqs_total = 0  # sum over steps of the sequences in the step
        self.max_batch_seen = 0
        self.prefill_tokens = 0
        self.decode_tokens = 0
        self.requests_done = 0
        self.requests_failed = 0
        self.requests_detached = 0
        self.first_token_perf: float | None = None
        self.last_request: dict[str, Any] | None = None
        # pure decode steps (no prefill chunk in them) by batch size: {B: [steps, seconds]}, each timed from its
        # start to the next step's start when the worker went straight on (the whole loop iteration: admission,
        # forward pass, sampling, handing tokens out, the GIL shared with the streaming threads): what a
        # calibration probe reads as one decode step at batch B, free of the client-side noise of HTTP timing
        self.decode_step_s: dict[int, list[float]] = {}
        self._open_decode_step: tuple[int, float] | None = None  # (batch, start) of a decode step to close

    # -- the other threads' side

    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="batching", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the worker after its current step; requests still here are answered with a 503."""
        self.fail("the engine is shutting down")
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(30)

    def serve(self, model: Any, decode: Callable[[list[int]], str]) -> None:
        """The model can run: steps begin (requests submitted while it loaded wait until now)."""
        from live.engines.llama import position_generator, sample_token  # torch, now that the model exists

        self._position_generator, self._sample_token = position_generator, sample_token
        with self._cond:
            self._model, self._decode = model, decode
            self._eos = frozenset(model.config.eos_token_ids)
            self._cond.notify()

    def fail(self, message: str) -> None:
        """The engine cannot serve: every request, now and later, is answered with a 503."""
        with self._cond:
            self._failed = ApiError(503, f"the model is not available: {message}", None, "model_unavailable",
                                    "server_error")
            self._cond.notify()

    def submit(self, req: SeqRequest) -> None:
        """Queue a request (answered through `req.emit`)."""
        with self._cond:
            if self._closed:  # no worker any more: answer now rather than never
                assert self._failed is not None
                req.emit("error", self._failed)
                return
            self._incoming.append(req)
            self._cond.notify()

    def detach(self, request_id: str) -> concurrent.futures.Future[dict[str, Any] | None]:
        """Take a waiting or running sequence out between steps.

        The future resolves to {"id", "prompt_ids", "token_ids", "emitted_chars"} (the request itself gets
        a "detached" event with the same state), or None when no waiting or running sequence has that id.
        """
        future: concurrent.futures.Future[dict[str, Any] | None] = concurrent.futures.Future()
        with self._cond:
            if self._closed:
                future.set_result(None)
                return future
            self._detaches.append((request_id, future))
            self._cond.notify()
        return future

    def stats(self) -> dict[str, Any]:
        """Batching counters, and the sequences now here (ids a gateway may detach)."""
        steps = self.steps
        running, waiting = list(self._running), [*self._waiting, *self._incoming]  # snapshots: the worker moves on
        sequences = [{"id": s.req.request_id, "phase": "prefill" if s.prefilling else "decode",
                      "completion_tokens": len(s.tokens)} for s in running]
        sequences += [{"id": r.request_id, "phase": "waiting", "completion_tokens": 0} for r in waiting]
        return {
            "max_num_seqs": self.max_num_seqs,
            "prefill_chunk_tokens": self.prefill_chunk_tokens,
            "running": len(running),
            "waiting": len(waiting),
            "steps": steps,
            "mean_batch_size": self.step_seqs_total / steps if steps else None,
            "max_batch_size": self.max_batch_seen,
            "prefill_tokens": self.prefill_tokens,
            "decode_tokens": self.decode_tokens,
            "requests": self.requests_done,
            "requests_failed": self.requests_failed,
            "requests_detached": self.requests_detached,
            "last_request": self.last_request,
            "decode_steps": {str(b): {"steps": int(n), "seconds": t}
                             for b, (n, t) in sorted(self.decode_step_s.items())},
            "sequences": sequences,
            **({"prefix_cache": self.prefix.stats()} if self.prefix is not None else {}),
        }

    # -- the worker

    def _has_work(self) -> bool:
        if self._incoming or self._detaches or self._closed:
            return True
        can_run = self._model is not None or self._failed is not None
        return can_run and bool(self._waiting or self._running)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._has_work():
                    self._cond.wait()
                closing = self._closed
                self._waiting.extend(self._incoming)
                self._incoming.clear()
                detaches, self._detaches = self._detaches, []
            for request_id, future in detaches:
                future.set_result(self._detach(request_id))
            try:
                if self._failed is not None:
                    self._answer_all(self._failed)
                elif self._model is not None:
                    self._drop_cancelled()
                    self._admit()
                    if self._running:
                        self._step()
            except BaseException as exc:  # a failed step must not kill the worker nor leave a request hanging
                log.error("batch step failed\n%s", "".join(traceback.format_exception(exc)))
                # the running sequences' caches are now half-written: they fail; the waiting ones get their turn
                error = ApiError(500, f"inference failed: {exc!r}", None, None, "server_error")
                for seq in self._running:
                    self.requests_failed += 1
                    seq.req.emit("error", error)
                self._running.clear()
            if closing:
                return

    def _answer_all(self, error: ApiError) -> None:
        """Fail every running and waiting request with `error` (their slots are freed)."""
        for seq in self._running:
            self.requests_failed += 1
            seq.req.emit("error", error)
        self._running.clear()
        while self._waiting:
            self.requests_failed += 1
            self._waiting.popleft().emit("error", error)

    def _detach(self, request_id: str) -> dict[str, Any] | None:
        state: ResumeState | None = None
        target: SeqRequest | None = None
        for req in self._waiting:
            if req.request_id == request_id:
                self._waiting.remove(req)
                state, target = _waiting_state(req), req
                break
        else:
            for seq in self._running:
                if seq.req.request_id == request_id:
                    self._running.remove(seq)
                    state, target = seq.state(), seq.req
                    break
        if state is None or target is None:
            return None
        self.requests_detached += 1
        target.emit("detached", state.payload())
        return {"id": request_id, **state.payload()}

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self._running if s.req.cancelled.is_set()]:
            self._finish(seq, "cancelled")
        if any(req.cancelled.is_set() for req in self._waiting):  # their clients left while they waited
            self._waiting = collections.deque(req for req in self._waiting if not req.cancelled.is_set())

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.max_num_seqs:
            req = self._waiting.popleft()
            assert self._decode is not None
            try:
                seq = _Seq(req, self._model, self._decode)  # allocates its KV cache
            except Exception as exc:  # e.g. out of memory: this request fails, the others go on
                log.exception("admitting %s failed", req.request_id)
                self.requests_failed += 1
                req.emit("error", ApiError(500, f"admitting the request failed: {exc!r}", None, None, "server_error"))
                continue
            if self.prefix is not None:
                seq.cached_tokens = seq.fed = self.prefix.reuse(req.prompt_ids, seq.cache)
            self._running.append(seq)

    def _step(self) -> None:
        t0 = time.perf_counter()
        if self._open_decode_step is not None:
            batch, start = self._open_decode_step
            acc = self.decode_step_s.setdefault(batch, [0, 0.0])
            acc[0] += 1
            acc[1] += t0 - start
            self._open_decode_step = None
        segments: list[tuple[list[int], Any]] = []
        sampled: list[_Seq | None] = []  # per segment: the sequence that samples from its logits, if any
        budget = self.prefill_chunk_tokens
        prefill_in_step = False
        prefilled: list[_Seq] = []  # sequences whose prefill this step completes (their blocks get cached)
        for seq in self._running:
            if seq.prefilling:
                if budget <= 0:
                    continue  # its turn comes in a later step
                prefill_in_step = True
                n = min(budget, len(seq.pending) - seq.fed)
                chunk = seq.pending[seq.fed : seq.fed + n]
                budget -= n
                seq.fed += n
                self.prefill_tokens += n
                sampled.append(None if seq.prefilling else seq)
                if self.prefix is not None and not seq.prefilling:
                    prefilled.append(seq)
            else:
                chunk = [seq.tokens[-1]]  # decode: feed the last sampled token
                self.decode_tokens += 1
                sampled.append(seq)
            segments.append((chunk, seq.cache))
        logits = self._model.forward_batch(segments)
        if self.prefix is not None:
            for seq in prefilled:
                self.prefix.store(seq.req.prompt_ids, seq.cache)
        self.steps += 1
        self.step_seqs_total += len(segments)
        self.max_batch_seen = max(self.max_batch_seen, len(segments))
        for row, seq in enumerate(sampled):
            if seq is not None:
                self._take_token(seq, logits[row])
        if self.step_delay_s > 0:
            time.sleep(self.step_delay_s)
        # closed by the next step, if the worker goes straight on to it (a sequence still running)
        self._open_decode_step = (len(segments), t0) if not prefill_in_step and self._running else None

    def _take_token(self, seq: _Seq, logits: Any) -> None:
        req = seq.req
        now = time.perf_counter()
        if seq.first_token_perf is None:
            seq.first_token_perf = now
            if self.first_token_perf is None:
                self.first_token_perf = now
        k = len(seq.tokens)  # generated token k of the sequence: its draw depends on (seed, k) only
        generator = None if req.temperature <= 0.0 else self._position_generator(req.seed, k)
        token = self._sample_token(logits, req.temperature, req.top_p, generator)
        if not req.ignore_eos and token in self._eos:
            self._finish(seq, "stop")
            return
        seq.tokens.append(token)
        # one event per token even when its text is held back (delta ""): the client times tokens, as with vLLM
        req.emit("token", seq.text.push(token))
        if seq.text.stopped:
            self._finish(seq, "stop")
        elif len(seq.tokens) >= seq.budget_tokens:
            self._finish(seq, "length")

    def _finish(self, seq: _Seq, reason: str) -> None:
        """The sequence is done (or its client left): free its slot, send the rest of the text and "done"."""
        self._running.remove(seq)
        req = seq.req
        cancelled = reason == "cancelled"
        # the held-back text rides on "done" (not a "token" event of its own): one token event per token
        rest = "" if cancelled else seq.text.flush()
        done = time.perf_counter()
        usage: dict[str, Any] = {
            "prompt_tokens": len(req.prompt_ids),
            "completion_tokens": len(seq.tokens),
            "total_tokens": len(req.prompt_ids) + len(seq.tokens),
        }
        if self.prefix is not None:
            usage["prompt_tokens_details"] = {"cached_tokens": seq.cached_tokens}
        finish_reason = "stop" if cancelled else reason
        self.requests_done += 1
        self.last_request = {
            **usage,
            "finish_reason": finish_reason,
            "queue_s": seq.admitted_perf - req.arrived_perf,
            "first_token_s": None if seq.first_token_perf is None else seq.first_token_perf - req.arrived_perf,
            "e2e_s": done - req.arrived_perf,
            "cancelled": cancelled,
            "resumed": req.resume is not None,
        }
        req.emit("done", {"finish_reason": finish_reason, "usage": usage, "text": rest})
