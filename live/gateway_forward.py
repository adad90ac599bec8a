"""The request path: place a request (`bundle.place`), forward it to its engine, relay the answer (SSE event by
event, or synthesized for engines that cannot stream), retry once after an engine or load failure, and close the
request's record.

A stream whose sequence a migration detached ends, on its engine, with a `tierlab_detached` event: the relay
drops that event and continues the client's stream from the destination engine (`tierlab_resume`), keeping the
response id the client saw; if the destination cannot take it, the sequence resumes on the source (stopped only
after the handover), and if neither can, the stream ends with an SSE error event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import httpx
import orjson
from starlette.responses import Response

from core.decisions import ColdStart, Queue, Reject, Route
from live import gateway_sse as sse
from live import tracing
from live.engines.openai_compat import capability_error
from live.gateway_agents import connection_error
from live.gateway_api import ApiError, check_context, include_usage
from live.gateway_cache import StreamText
from live.gateway_mirror import EngineFailed, Flight, Live, NodeLost
from live.gateway_records import RequestInfo, apply_load_timings, cached_prompt_tokens, request_row, tpot
from live.gateway_regions import emulate_rtt
from live.gateway_upstream import UpstreamResponse

if TYPE_CHECKING:
    from live.gateway import Gateway

log = logging.getLogger("live.gateway")

SSE_HEADERS = {"Cache-Control": "no-cache"}


class ResumeFailed(Exception):
    """A detached sequence could be resumed on no engine."""


class ForwardMixin:
    """Placement, forwarding, relaying and the request's record."""

    async def _place(self: Gateway, req: RequestInfo, exclude: set[str]) -> Live:
        """Ask the bundle until it names an instance, and wait for it to be ready.

        ApiError(503) on Reject or when nothing is found within `queue_timeout_s`; NodeLost / EngineFailed
        if the instance's load failed; TimeoutError if it did not load within `load_timeout_s`.
        """
        view = self._view()
        t0 = time.monotonic()
        deadline = t0 + self.config.queue_timeout_s
        asked: set[object] = set()  # migrations this request already asked for (each is tried, and recorded, once)
        pressured: str | None = None  # the node where this request last asked for GPU-pressure stops
        self.queued += 1
        self.queued_by_model[req.model] += 1
        try:
            while True:
                decision = self.bundle.place(req, view)
                lv: Live | None = None
                reason = ""
                if isinstance(decision, Route):
                    lv = self.live.get(decision.instance_id)
                    reason = "routed_to_unknown_instance"
                    if lv is not None and decision.instance_id in exclude:
                        lv, reason = None, "only_failed_instance"
                elif isinstance(decision, ColdStart):
                    lv = self.cold_start(req.model, decision.node, decision.source_tier)
                    reason = "no_gpu_capacity"
                    if lv is None and decision.migrate is not None:
                        reason = "migration_in_flight"
                        if decision.migrate not in asked:
                            asked.add(decision.migrate)
                            reason = self._begin_migration(decision.migrate, decision.node)
                    elif lv is None and not self._stopping.get(decision.node) and not (
                            pressured is not None and self._stopping.get(pressured)):
                        # stops already under way on the node free its memory soon: no second round of them; nor
                        # on another node while this request's own stop is under way (re-asked every poll, a
                        # round-robin policy names the next node each time and would empty every node for one
                        # request: the twin found live stopping two engines where the simulator stopped one)
                        self.execute(self.bundle.on_gpu_pressure(decision.node, req.model, view))
                        pressured = decision.node
                elif isinstance(decision, Queue):
                    reason = decision.reason
                elif isinstance(decision, Reject):
                    raise ApiError(503, f"rejected: {decision.reason}", decision.reason)
                if lv is not None:
                    break
                if time.monotonic() >= deadline:
                    raise ApiError(503, f"no capacity for {req.model!r}: {reason}", reason)
                await asyncio.sleep(self.config.queue_poll_s)
            req.queue_s = time.monotonic() - t0
            inst = lv.inst
            cold = inst.status == "loading"
            lv.load_waiters += 1
            self._sync_counts(lv)
            try:
                if cold:
                    await asyncio.wait_for(lv.ready.wait(), self.config.load_timeout_s)
            finally:
                lv.load_waiters -= 1
                self._sync_counts(lv)
        finally:
            self.queued -= 1
            self.queued_by_model[req.model] -= 1
        if lv.error:
            raise (NodeLost if lv.node_lost else EngineFailed)(lv.error)
        req.cold_start = cold
        req.source_tier = inst.source_tier if cold else "gpu"
        req.node, req.instance = inst.node, inst.id
        if cold:
            apply_load_timings(req, lv.timings)
            req.cold_start_s = time.monotonic() - t0 - req.queue_s
        tracing.placed(req)
        return lv

    async def _serve(self: Gateway, req: RequestInfo, body: dict[str, Any], raw: bytes, path: str, t_arrival: float,
                     deadline: float) -> Response:
        """Place and forward; one retry after an engine or load failure, and a new placement each time the
        chosen instance's node is lost (at most once per node)."""
        failed: set[str] = set()
        retries, replacements = 1, len(self.agents)
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    with tracing.span("placement"):
                        lv = await self._place(req, failed)
            except ApiError as e:
                self._finish(req, t_arrival, "rejected", e.code or "rejected")
                return e.response()
            except NodeLost as e:
                if replacements > 0:
                    replacements -= 1
                    continue
                return self._fail(req, t_arrival, 502, str(e), "node_down")
            except (EngineFailed, TimeoutError) as e:
                if isinstance(e, TimeoutError) and asyncio.get_running_loop().time() >= deadline:
                    return self._fail(req, t_arrival, 504, "request timed out waiting for an engine", "timeout")
                if retries > 0:
                    retries -= 1
                    continue
                return self._fail(req, t_arrival, 502, str(e) or "engine load timed out", "load_failed")
            await emulate_rtt(self, req, lv)  # regions: the client <-> node round trip (nothing when off)
            try:
                with tracing.span("engine"):
                    return await self._forward(lv, path, body, raw, req, t_arrival, deadline)
            except EngineFailed as e:
                failed.add(lv.inst.id)
                log.warning("engine %s failed before its first byte: %s", lv.inst.id, e)
                if await self._engine_lost(lv, e) and replacements > 0:
                    replacements -= 1
                    continue
                if retries > 0:
                    retries -= 1
                    continue
                return self._fail(req, t_arrival, 502, f"engine failed: {e}", "engine_failed")

    async def _engine_lost(self: Gateway, lv: Live, err: BaseException) -> bool:
        """Retire a failed engine; after a connection failure ask its agent, and mark the node down if it is
        silent too. True if the node is down."""
        self._retire(lv)
        node = lv.inst.node
        agent = self.agents[node]
        connection = getattr(err, "connection", False) or connection_error(err)
        if not connection or not agent.url:
            return False
        if not await self._agents.healthy(node):
            self._node_down(node, f"engine {lv.inst.id} unreachable and agent silent")
        return not self._state().nodes[node].up

    def _retire(self: Gateway, lv: Live) -> None:
        """Forget an instance whose engine failed (and ask its agent to stop it)."""
        inst = lv.inst
        if inst.id in self._state().instances:
            self._drop(inst, "engine_failed")
            if lv.agent_instance and self._state().nodes[inst.node].up:
                self._spawn(self._quiet_unload(inst.node, lv.agent_instance))

    async def _forward(self: Gateway, lv: Live, path: str, body: dict[str, Any], raw: bytes, req: RequestInfo,
                       t_arrival: float, deadline: float) -> Response:
        """Send the request (`raw`, the client's bytes, parsed as `body`) to `lv`'s engine. EngineFailed before
        the first byte; after it, the outcome is the response's (a stream that breaks ends with an SSE error
        event)."""
        refusal = capability_error(path, body, lv.chat, lv.max_context)
        if refusal is not None:  # what the engine cannot serve is the client's error, not an engine failure
            self._finish(req, t_arrival, "rejected", "unsupported_by_engine")
            return ApiError(400, refusal, "unsupported_by_engine").response()
        if lv.max_context is not None and self.config.context_tokens.get(req.model) != lv.max_context:
            try:  # the engine's own window (unless the config's, already checked, is the same)
                check_context(body, path, lv.max_context, self.config.max_token_bytes)
            except ApiError as e:
                self._finish(req, t_arrival, "rejected", e.code or "rejected")
                return e.response()
        stream = bool(body.get("stream"))
        synthesize = stream and not lv.streaming
        usage_chunk = include_usage(body)
        if synthesize:  # the engine cannot stream: ask for the whole answer and stream it ourselves
            body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")} | {"stream": False}
            raw = json.dumps(body).encode()
        flight = Flight(lv, path, body)
        if stream and not synthesize and req.cache_slot is not None:
            flight.text = StreamText()  # the answer, gathered as it is relayed, for the response cache
        if (not stream or synthesize) and lv.streaming and self.may_migrate:
            # a whole answer shows no id until it is complete: name it, so a migration can detach it
            flight.engine_id = f"tl-{req.id}-{secrets.token_hex(4)}"
            flight.body = body = {**body, "tierlab_id": flight.engine_id}
            raw = json.dumps(body).encode()
        elif stream and not synthesize and not usage_chunk:
            # the record's token count comes from the engine's usage chunk, not from counting text events (a
            # byte-level tokenizer may send several tokens as one event); the client, who did not ask, never sees it
            options = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
            flight.body = body = {**body, "stream_options": {**options, "include_usage": True}}
            flight.strip_usage = True
            raw = json.dumps(body).encode()
        self._begin(flight)
        upstream: UpstreamResponse | None = None
        try:
            async with asyncio.timeout_at(deadline):
                # the client's bytes as they came: no second JSON encoding on the hot path
                upstream = await self._upstream.post(lv.url + path, raw)
                if upstream.status_code >= 500:
                    raise EngineFailed(f"HTTP {upstream.status_code}")
                if stream and not synthesize and upstream.status_code == 200:
                    chunks = upstream.aiter_raw()
                    first = await anext(chunks, None)
                    if first is None:
                        raise EngineFailed("stream ended before its first byte")
                    relay = self._relay(flight, upstream, first, chunks, req, t_arrival, deadline)
                    upstream = None  # the relay owns it now
                    return sse.RelayResponse(relay, media_type="text/event-stream", headers=SSE_HEADERS)
                answer_raw = await upstream.aread()
                if upstream.status_code == 200 and sse.DETACHED in answer_raw:
                    answer_raw = await self._resume_whole(flight, answer_raw)
                    req.node, req.instance = flight.lv.inst.node, flight.lv.inst.id
        except (TimeoutError, httpx.TimeoutException):
            self._end(flight)
            return self._fail(req, t_arrival, 504, "the engine did not answer in time", "timeout")
        except httpx.HTTPError as e:
            self._end(flight)
            raise EngineFailed(f"{type(e).__name__}: {e}", connection=connection_error(e)) from None
        except EngineFailed:
            self._end(flight)
            raise
        except ResumeFailed as e:
            self._end(flight)
            return self._fail(req, t_arrival, 502, str(e), "migration_failed")
        finally:
            flight.moved.set()  # a migration waiting on this request need not wait any longer
            if upstream is not None:
                await upstream.aclose()
        self._end(flight)
        status = upstream.status_code
        if status != 200:
            # an engine's 4xx is the client's error (a prompt too long for its tokenizer, a parameter it refuses):
            # rejected, as the gateway's own 400s are; anything else is the engine's failure
            self._finish(req, t_arrival, "rejected" if 400 <= status < 500 else "failed", f"engine_{status}")
            return Response(answer_raw, status_code=status, media_type="application/json")
        req.ttft_s = time.monotonic() - t_arrival  # non-stream: the first token arrives with the rest
        try:
            answer = orjson.loads(answer_raw)  # the C parser: every whole answer is read for its usage
            usage = answer.get("usage") or {}
            req.in_tokens = int(usage.get("prompt_tokens", 0))
            req.out_tokens = int(usage.get("completion_tokens", 0))
            req.cached_tokens = cached_prompt_tokens(usage)
        except (ValueError, AttributeError, TypeError):
            return self._fail(req, t_arrival, 502, "the engine's answer is not OpenAI JSON", "bad_engine_answer")
        self._finish(req, t_arrival, "completed", "")
        if req.cache_slot is not None and self.response_cache is not None:
            self.response_cache.store_whole(req.cache_slot, answer)
        if synthesize:
            content = sse.synthesize_stream(answer, path.endswith("chat/completions"), usage_chunk)
            return Response(content, media_type="text/event-stream", headers=SSE_HEADERS)
        return Response(answer_raw, status_code=200, media_type="application/json")

    async def _relay(self: Gateway, flight: Flight, upstream: UpstreamResponse, first: bytes,
                     chunks: AsyncIterator[bytes], req: RequestInfo, t_arrival: float,
                     deadline: float) -> AsyncIterator[bytes]:
        """Yield the engine's SSE events whole, as they come (TTFT is the first event standing for a token); a detached
        sequence continues from the engine it moved to. If the engine fails mid-stream, or the request's time is
        up, end with an SSE error event instead."""
        outcome, reason, pending = "failed", "client_disconnected", b""
        req.token_stream = True
        idle_s = self.config.stream_idle_timeout_s
        loop = asyncio.get_running_loop()
        lost: BaseException | None = None
        try:
            try:
                chunk: bytes | None = first
                while True:
                    detached: dict[str, Any] | None = None
                    while chunk is not None and detached is None:
                        pending += chunk
                        cut = sse.complete_end(pending)
                        if cut:
                            out, pending = pending[:cut], pending[cut:]
                            if sse.DETACHED in out:
                                out, detached = sse.split_detached(out)
                            if sse.DONE in out:
                                # the client has the whole answer once this is out: a client that hangs up
                                # right after [DONE] (the openai client does) was served, not disconnected
                                outcome, reason = "completed", ""
                            self._scan(out, req, t_arrival, flight)
                            if flight.strip_usage and sse.USAGE in out:
                                out = sse.drop_usage_events(out)
                            if flight.client_id is not None and flight.engine_id != flight.client_id:
                                out = sse.with_id(out, flight.client_id)  # moved: keep the client's id
                            if out:
                                yield out
                        if detached is None:
                            async with asyncio.timeout_at(min(deadline, loop.time() + idle_s)):
                                chunk = await anext(chunks, None)
                    if detached is None:
                        break
                    await upstream.aclose()
                    async with asyncio.timeout_at(deadline):
                        upstream, chunks, chunk = await self._resume(flight, detached)
                    req.node, req.instance = flight.lv.inst.node, flight.lv.inst.id  # as the simulator records it
                    pending = b""
                if pending:  # a last event without its blank line
                    self._scan(pending, req, t_arrival, flight)
                    yield pending
                outcome, reason = "completed", ""
            except (httpx.HTTPError, TimeoutError, ResumeFailed) as e:
                if outcome != "completed":
                    timed_out = isinstance(e, TimeoutError | httpx.TimeoutException)
                    reason = ("timeout" if timed_out else "migration_failed" if isinstance(e, ResumeFailed)
                              else "engine_stream_error")
                    outcome, lost = "failed", (None if timed_out or isinstance(e, ResumeFailed) else e)
                    message = ("the engine went silent or the request ran out of time" if timed_out
                               else str(e) if isinstance(e, ResumeFailed)
                               else f"the engine failed mid-stream: {type(e).__name__}")
                    yield sse.error_event(message, reason)
        finally:
            # bookkeeping before the one await: a cancelled stream (client gone) may not get past it
            lv = flight.lv
            self._end(flight)
            flight.moved.set()
            self._finish(req, t_arrival, outcome, reason)
            if outcome == "completed" and flight.text is not None and self.response_cache is not None:
                self.response_cache.store(req.cache_slot, flight.text.answer(req))
            if lost is not None:
                self._spawn(self._engine_lost(lv, lost))
            await upstream.aclose()

    def _resume_targets(self: Gateway, flight: Flight) -> list[Live]:
        """Where a detached sequence may continue: the migration's destination, then the engine it left."""
        targets = [t for t in (flight.move_to, flight.lv) if t is not None and t.url and not t.error]
        flight.move_to = None
        return list(dict.fromkeys(targets))

    async def _resume(self: Gateway, flight: Flight, detached: dict[str, Any]
                      ) -> tuple[UpstreamResponse, AsyncIterator[bytes], bytes]:
        """Continue a detached stream: (upstream, its chunks, its first chunk) on the first engine that takes
        it; ResumeFailed if none does."""
        raw = json.dumps({**flight.body, "tierlab_resume": detached}).encode()
        errors = []
        for lv in self._resume_targets(flight):
            self._move(flight, lv)
            up: UpstreamResponse | None = None
            try:
                up = await self._upstream.post(lv.url + flight.path, raw)
                if up.status_code == 200:
                    chunks = up.aiter_raw()
                    first = await anext(chunks, None)
                    if first is not None:
                        flight.moved.set()
                        return up, chunks, first
                errors.append(f"{lv.inst.id}: HTTP {up.status_code}")
            except httpx.HTTPError as e:
                errors.append(f"{lv.inst.id}: {type(e).__name__}")
                if connection_error(e):  # a dead engine leaves routing (as after a failure before the first byte)
                    self._spawn(self._engine_lost(lv, e))
            except BaseException:  # cancelled (the client left): the new upstream must not leak
                if up is not None:
                    await up.aclose()
                raise
            if up is not None:
                await up.aclose()
        flight.moved.set()
        raise ResumeFailed(f"the request's sequence was moved and could not be resumed ({'; '.join(errors)})")

    async def _resume_whole(self: Gateway, flight: Flight, answer_raw: bytes) -> bytes:
        """A detached non-streaming answer: the whole answer from the engine it continues on, with its id."""
        assert self._http is not None
        try:
            answer = json.loads(answer_raw)
            detached = answer["tierlab_detached"]
        except (ValueError, KeyError, TypeError):
            return answer_raw
        body = {**flight.body, "tierlab_resume": detached}
        for lv in self._resume_targets(flight):
            self._move(flight, lv)
            try:
                r = await self._http.post(lv.url + flight.path, json=body)
            except httpx.HTTPError:
                continue
            if r.status_code == 200:
                flight.moved.set()
                out = r.json()
                out["id"] = answer.get("id", out.get("id"))
                return json.dumps(out).encode()
        raise ResumeFailed("the request's sequence was moved and could not be resumed")

    def _move(self: Gateway, flight: Flight, lv: Live) -> None:
        """Account `flight` on `lv` from now on."""
        if flight.lv is lv and flight in lv.flights:
            return
        self._end(flight, served=False)
        flight.lv = lv
        self._begin(flight)

    @staticmethod
    def _scan(events: bytes, req: RequestInfo, t_arrival: float, flight: Flight | None = None) -> None:
        """Read whole SSE events for tokens (the first's and last's times), usage, and the engine's response id.

        A token is a chunk with a choice, empty text included (`sse.token_choice`): engines stream one chunk
        per generated token and send "" while its text is held back, so timing chunks with text would time
        text arrival (late TTFT, near-zero TPOT when the text comes at the end) instead of generation."""
        now = time.monotonic() - t_arrival
        for msg in sse.data_messages(events):
            rid = msg.get("id")
            if flight is not None and isinstance(rid, str) and rid != flight.engine_id:
                flight.engine_id = rid
                if flight.client_id is None:
                    flight.client_id = rid
            usage = msg.get("usage")
            if isinstance(usage, dict):
                req.in_tokens = int(usage.get("prompt_tokens", 0) or 0)
                req.out_tokens = int(usage.get("completion_tokens", 0) or 0)
                req.cached_tokens = cached_prompt_tokens(usage)
            choice = sse.token_choice(msg)
            if choice is None:
                continue
            if flight is not None and flight.text is not None:
                flight.text.add(choice)
            if math.isnan(req.ttft_s):
                req.ttft_s = now
            req.last_token_s = now
            if not usage and (choice.get("finish_reason") is None or sse.choice_text(choice)):
                # one chunk per token (a bare finish chunk is none), until the usage chunk says otherwise
                req.out_tokens += 1

    def _fail(self: Gateway, req: RequestInfo, t_arrival: float, status: int, message: str, code: str) -> Response:
        self._finish(req, t_arrival, "failed", code)
        return ApiError(status, message, code).response()

    def _finish(self: Gateway, req: RequestInfo, t_arrival: float, outcome: str, reason: str) -> None:
        """Close the request's record (once) and count it."""
        if req.finished:
            return
        req.finished = True
        req.outcome, req.reason = outcome, reason
        req.e2e_s = time.monotonic() - t_arrival
        if req.token_stream:
            req.tpot_s = tpot(req.last_token_s, req.ttft_s, req.out_tokens)
        self._rows.append(request_row(req))
        if self._permits:  # the tenant's limits: free its slot, settle its tokens against the engine's usage
            permit = self._permits.pop(req.id, None)
            if permit is not None:
                self.limiter.release(permit, req.in_tokens + req.out_tokens)
        lv = self.live.get(req.instance) if req.cold_start else None
        if lv is not None and lv.url:
            self._spawn(self._add_engine_read(lv, req, len(self._rows) - 1))

    async def _add_engine_read(self: Gateway, lv: Live, req: RequestInfo, row: int, wait_s: float = 10.0) -> None:
        """Add the engine's own weight read (tier -> host memory, from its GET /stats `load_s`) to a cold row.

        The agent times the tier-to-tier hops; the engine reads the weights from its tier itself, and with
        progressive loading that read ends only after the first forward pass began, so it is asked for
        once the request is done. Engines without /stats (Tokasaurus) keep the agent's hops alone.
        """
        assert self._http is not None
        read_s = lv.timings.get("read_s")
        deadline = time.monotonic() + wait_s
        while read_s is None:
            try:
                r = await self._http.get(lv.url + "/stats", timeout=2.0)
                stats = r.json() if r.status_code == 200 else {}
            except (httpx.HTTPError, ValueError):
                return
            read_s = stats.get("load_s")
            if read_s is None:
                if not stats or time.monotonic() > deadline:
                    return
                await asyncio.sleep(0.2)
            elif "read_s" not in lv.timings and not stats.get("progressive"):
                # without progressive loading the engine was ready only after the read: not init time
                lv.timings["ready_s"] = max(0.0, float(lv.timings.get("ready_s", 0.0)) - float(read_s))
        lv.timings["read_s"] = float(read_s)
        apply_load_timings(req, lv.timings)
        self._rows[row] = request_row(req)
