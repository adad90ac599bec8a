"""OpenTelemetry traces for the gateway and the agents: one trace per request, context carried to the agents in a
W3C `traceparent` header. Off by default; when off no span object is ever created.

Each gateway / agent owns a `Tracing` (its own `TracerProvider`: tests run several in one process). Its
`server(name, headers)` opens a request's root span (continuing a `traceparent` it was sent) and makes that
tracer the current one for the request's context; the module-level hooks on the request path act on the
current tracer and are a shared no-op context manager when there is none:

    with tracing.span("placement"):       # a child of whatever span is current
        ...
    headers = tracing.inject({...})        # + traceparent, when a span is current
    tracing.placed(req)                    # queue / cold_start spans from the request's record (`RequestInfo`)
    tracing.load_phases(result)            # an agent's /load phases, from the timings it reports

Config (`TracingConfig`, or a mapping with its fields; `tracing:` in conf/live/serve.yaml):
`exporter`: "off" | "console" | "otlp" (OTLP over HTTP at `endpoint`, needs opentelemetry-exporter-otlp-proto-http)
| "memory" (an `InMemorySpanExporter` at `Tracing.exporter`, for tests).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

EXPORTERS = ("off", "console", "otlp", "memory")
_NULL: contextlib.nullcontext[None] = contextlib.nullcontext()
_TRACER: ContextVar[Tracer | None] = ContextVar("tierlab_tracer", default=None)
# cold-start phases of a request's record, laid end to end in this order, ending when its instance was ready
REQUEST_PHASES = (("fetch", "fetch_s"), ("to_gpu", "to_gpu_s"), ("engine_init", "engine_init_s"))


@dataclass(frozen=True)
class TracingConfig:
    """Where spans go: `exporter` off (default), console, otlp (to `endpoint`, OTLP/HTTP) or memory (tests)."""

    exporter: str = "off"
    endpoint: str = ""  # otlp: e.g. http://127.0.0.1:4318/v1/traces ("" = the exporter's default / env)

    def __post_init__(self) -> None:
        if self.exporter not in EXPORTERS:
            raise ValueError(f"tracing.exporter must be one of {EXPORTERS}, got {self.exporter!r}")

    @classmethod
    def of(cls, value: TracingConfig | Mapping[str, Any] | None) -> TracingConfig:
        """`value` as a TracingConfig (None: off; a mapping: its known fields, others are an error)."""
        if value is None:
            return cls()
        if isinstance(value, TracingConfig):
            return value
        unknown = set(value) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"tracing: unknown key(s) {sorted(unknown)}")
        return cls(**{k: ("off" if k == "exporter" and v in (None, False) else v) for k, v in value.items()})


def _make_exporter(config: TracingConfig) -> Any:
    if config.exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter
        return ConsoleSpanExporter()
    if config.exporter == "memory":
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        return InMemorySpanExporter()
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as e:
        raise RuntimeError("tracing.exporter 'otlp' needs opentelemetry-exporter-otlp-proto-http "
                           "(pip install 'tierlab[otlp]')") from e
    return OTLPSpanExporter(endpoint=config.endpoint) if config.endpoint else OTLPSpanExporter()


class Tracing:
    """One service's tracer (gateway or agent); `enabled` False leaves every hook a no-op."""

    def __init__(self, config: TracingConfig | Mapping[str, Any] | None, service: str) -> None:
        self.config = TracingConfig.of(config)
        self.enabled = self.config.exporter != "off"
        self.exporter: Any = None
        self._provider: Any = None
        self._tracer: Tracer | None = None
        if not self.enabled:
            return
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        self.exporter = _make_exporter(self.config)
        self._provider = TracerProvider(resource=Resource.create({"service.name": service}))
        # memory / console: spans are there as soon as they end (tests read them); otlp: batched off the path
        processor = BatchSpanProcessor if self.config.exporter == "otlp" else SimpleSpanProcessor
        self._provider.add_span_processor(processor(self.exporter))
        self._tracer = self._provider.get_tracer("tierlab")

    def server(self, name: str, headers: Mapping[str, str] | None = None,
               **attributes: Any) -> contextlib.AbstractContextManager[Any]:
        """A request's span (SERVER kind), continuing the trace of a `traceparent` in `headers`; hooks inside
        use this tracer. A no-op when off."""
        if self._tracer is None:
            return _NULL
        return _serve(self._tracer, name, headers, attributes)

    def shutdown(self) -> None:
        """Flush and close the exporter (spans ended later are dropped)."""
        if self._provider is not None:
            self._provider.shutdown()


@contextlib.contextmanager
def _serve(tracer: Tracer, name: str, headers: Mapping[str, str] | None, attributes: Mapping[str, Any]
           ) -> Iterator[Span]:
    from opentelemetry.propagate import extract
    from opentelemetry.trace import SpanKind

    parent = extract(dict(headers)) if headers is not None else None
    token = _TRACER.set(tracer)
    try:
        with tracer.start_as_current_span(name, context=parent, kind=SpanKind.SERVER,
                                          attributes=dict(attributes) or None) as s:
            yield s
    finally:
        _TRACER.reset(token)


def active() -> bool:
    """True inside a traced request (a tracer is current)."""
    return _TRACER.get() is not None


def span(name: str, client: bool = False, **attributes: Any) -> contextlib.AbstractContextManager[Any]:
    """A child span of the current one (CLIENT kind with `client`); the shared no-op when no tracer is current."""
    tracer = _TRACER.get()
    if tracer is None:
        return _NULL
    from opentelemetry.trace import SpanKind
    return tracer.start_as_current_span(name, kind=SpanKind.CLIENT if client else SpanKind.INTERNAL,
                                        attributes=attributes or None)


def inject(headers: dict[str, str]) -> dict[str, str]:
    """`headers` with the current span's `traceparent` (W3C trace context) added, when a span is current."""
    if _TRACER.get() is not None:
        from opentelemetry.propagate import inject as otel_inject
        otel_inject(headers)
    return headers


def _ns(seconds_ago: float, now_ns: int) -> int:
    return now_ns - int(seconds_ago * 1e9)


def _record(tracer: Tracer, name: str, start_ns: int, end_ns: int, parent: Any = None,
            **attributes: Any) -> Span:
    """A span that already happened, [start_ns, end_ns] in unix nanoseconds, under `parent` (default: current)."""
    from opentelemetry.trace import set_span_in_context
    ctx = set_span_in_context(parent) if parent is not None else None
    s = tracer.start_span(name, context=ctx, start_time=start_ns, attributes=attributes or None)
    s.end(end_time=max(start_ns, end_ns))
    return s


def placed(req: Any) -> None:
    """Under the current (placement) span: `queue` (arrival at placement -> an instance chosen) and, for a cold
    request, `cold_start` (the wait for the instance) with its phases from the request's record (`fetch`,
    `to_gpu`, `engine_init`, as the agent reported them, laid end to end ending when the instance was ready)."""
    tracer = _TRACER.get()
    if tracer is None:
        return
    from opentelemetry.trace import get_current_span
    now_ns = time.time_ns()
    current = get_current_span()
    start = getattr(current, "start_time", None) or now_ns
    current.set_attributes({"tierlab.request_id": req.id, "tierlab.model": req.model, "tierlab.tenant": req.tenant,
                            "tierlab.node": req.node, "tierlab.instance": req.instance,
                            "tierlab.cold_start": bool(req.cold_start)})
    queue_end = start + int(req.queue_s * 1e9)
    _record(tracer, "queue", start, queue_end)
    if not req.cold_start:
        return
    wait_s = req.cold_start_s if not math.isnan(req.cold_start_s) else 0.0
    end = queue_end + int(wait_s * 1e9)
    cold = _record(tracer, "cold_start", queue_end, end, source_tier=req.source_tier)
    durations = [(name, getattr(req, col)) for name, col in REQUEST_PHASES]
    durations = [(name, d) for name, d in durations if not math.isnan(d)]
    t = end - int(sum(d for _, d in durations) * 1e9)
    for name, d in durations:
        _record(tracer, name, t, t + int(d * 1e9), parent=cold)
        t += int(d * 1e9)


def load_phases(result: Mapping[str, Any]) -> None:
    """Under the current (agent /load) span: one `fetch` span per hop the load reports (its own unix times),
    then `engine_init` (the engine's start until ready) with `engine_start` (the process start) inside."""
    tracer = _TRACER.get()
    timings = result.get("timings") if isinstance(result, Mapping) else None
    if tracer is None or not isinstance(timings, Mapping):
        return
    now_ns = time.time_ns()
    for hop in timings.get("fetch_s") or []:
        _record(tracer, "fetch", int(hop["time_s"] * 1e9), int(hop["end_s"] * 1e9), from_tier=hop["from_tier"],
                to_tier=hop["to_tier"], bytes=int(hop.get("bytes", 0)), kind=str(hop.get("kind", "")))
    ready_s = timings.get("ready_s")
    if isinstance(ready_s, int | float):
        init = _record(tracer, "engine_init", _ns(ready_s, now_ns), now_ns, engine_tier=str(timings.get(
            "engine_tier", "")))
        start_s = timings.get("engine_start_s")
        if isinstance(start_s, int | float):
            t0 = _ns(ready_s, now_ns)
            _record(tracer, "engine_start", t0, t0 + int(start_s * 1e9), parent=init)
