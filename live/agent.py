"""The node agent: one process per node that moves checkpoints between tiers and runs engine processes.

An ASGI app (starlette) served by uvicorn, on 127.0.0.1 by default. Every endpoint but /healthz
needs `Authorization: Bearer <token>`. Tiers are real dirs (`<tier_dir>/<model>/`); the "cloud" is
the model registry (`live.registry.Registry`, stores in priority order).

    GET  /healthz                          {"ok": true, "node"}
    GET  /status                           {"node", "tiers": {name: {path, capacity_bytes, used_bytes, models,
                                                                      read_Bps, write_Bps, latency_s}},
                                            "cloud": {stream_Bps, streams, latency_s},
                                            "accelerator": {memory_bytes}, "engine": {kind, max_num_seqs},
                                            "instances": [...], "errors": [...]}
    GET  /moves                            {"node", "moves": [every tier movement, MOVE_SCHEMA columns, unix times]}
    POST /tiers/copy  {model, to_tier}     a movement record {model, node, from_tier, to_tier, kind, bytes, ...}
    POST /tiers/evict {model, tier}        {model, tier, freed_bytes}
    POST /load        {model, source_tier?} {instance: {...}, timings: {source_tier, fetch_s, engine_start_s, ready_s}}
    POST /unload      {instance}           {instance, stopped: true}

Errors are `{"error": {"message", "type", "code"}}` with 400 (bad JSON, missing field, unsafe name),
401, 404 (unknown model / instance / tier content), 409, 502 (fetch or checksum), 503 (shutting down:
a transfer in flight is cancelled and leaves nothing), 507 (tier full).

    python -m live.agent --node n0 --port 8700 --token T --tier dram=/dev/shm/t:2G --tier sata=/data/t:100G \\
        --store file:///models --tier-bw sata=500e6:400e6:1e-4 --cloud-streams 16 --cloud-stream-Bps 93e6

Emulated tiers (`live.pacing`): on one machine the tiers share a disk, so each may be given the read
and write bandwidth (bytes/s) and read latency of the device it stands for. Every byte movement
honours them as the simulator's hops do: a tier-to-tier copy runs at min(source read, destination
write), sharing each link with concurrent flows; a cloud fetch runs `--cloud-streams` streams of
`--cloud-stream-Bps` after `--cloud-latency-s`, writing at the destination's write bandwidth; an
engine reading a disk tier (nvme, sata) is paced at its read bandwidth (through $TIERLAB_READ_PACE),
sharing it with copies from that tier. DRAM is host memory: as in `core.loadtime` an engine's read
of it is not a fetch hop and is not paced (copies out of it are).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hmac
import itertools
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from live.agent_tiers import (  # the parsers are re-exported: live.serve imports parse_bytes from here
    Tier,
    TierConfig,
    TierError,
    copy_flow,
    parallel_copy_files,
    parse_bytes,
    parse_tier,
    parse_tier_bw,
)
from live.engines.base import EngineHandle, EngineStartError, free_port
from live.engines.factory import ENGINE_KINDS, make_engine
from live.lifecycle import exit_with_parent
from live.manifest import Manifest
from live.pacing import READ_PACE_ENV, CloudPace, TransferCancelled, check_Bps, check_latency_s
from live.registry import Registry, RegistryError, check_model_name

log = logging.getLogger(__name__)

TIER_ORDER = ("dram", "nvme", "sata")  # fastest first; a model is read from the first tier holding it
HOST_MEMORY_TIER = "dram"  # an engine's read of it is no fetch hop (core.loadtime.fetch_hop): never paced
CLOUD = "cloud"
DEFAULT_PORT = 8700


class AgentError(Exception):
    """A request failed; rendered as `{"error": {"message", "type", "code"}}` with HTTP `status`."""

    TYPES: ClassVar[dict[int, str]] = {
        400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
        409: "conflict_error", 502: "upstream_error", 503: "unavailable_error", 507: "insufficient_storage_error",
    }

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "code": self.code}}


# --------------------------------------------------------------------------- config


@dataclass
class EngineSettings:
    """How engine processes are started."""

    threads: int | None = 1
    dtype: str = "float32"
    progressive: bool = False
    ready_timeout_s: float = 120.0
    kind: str = "cpu"  # one of live.engines.factory.ENGINE_KINDS
    toka_executable: str = "toka"  # Tokasaurus's launcher: a name on PATH or a path
    gpus: int = 1  # GPUs a Tokasaurus engine may use (its profile picks tp_size from them)
    max_num_seqs: int = 8  # the engine's batch limit (the policy view's EngineSpec.max_num_seqs)

    def __post_init__(self) -> None:
        if self.kind not in ENGINE_KINDS:
            raise ValueError(f"EngineSettings.kind must be one of {ENGINE_KINDS}, got {self.kind!r}")
        if self.gpus < 1:
            raise ValueError(f"EngineSettings.gpus must be >= 1, got {self.gpus}")
        if isinstance(self.max_num_seqs, bool) or not isinstance(self.max_num_seqs, int) or self.max_num_seqs < 1:
            raise ValueError(f"EngineSettings.max_num_seqs must be an integer >= 1, got {self.max_num_seqs!r}")


def default_dram_dir(node: str, port: int) -> Path:
    """/dev/shm/tierlab-<node>-<port> where /dev/shm exists (memory-backed), else under the temp dir."""
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return base / f"tierlab-{node}-{port}"


@dataclass
class AgentConfig:
    """One node agent: where it listens, its tiers, its registry and its engine settings."""

    node: str = "n0"
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    token: str = ""
    tiers: dict[str, TierConfig] = field(default_factory=dict)
    stores: list[str] = field(default_factory=list)
    store_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    engine: EngineSettings = field(default_factory=EngineSettings)
    copy_streams: int = 4  # threads per local tier-to-tier copy
    cloud_streams: int = 16  # parallel ranged reads per cloud fetch
    cloud_stream_Bps: float | None = None  # bytes/s of each cloud stream (None or inf: unpaced)
    cloud_latency_s: float = 0.0  # first-byte latency of each cloud stream
    memory_budget_bytes: int | None = None  # the node's accelerator memory (reported; the gateway enforces it)
    max_errors: int = 50  # recent errors kept for /status
    parent_pid: int | None = None  # stop the engines and exit when this process is gone (None: never)

    def __post_init__(self) -> None:
        if not self.token:
            raise ValueError("AgentConfig needs a bearer token (the control API is never open)")
        if not self.stores:
            raise ValueError("AgentConfig needs at least one registry store URL")
        unknown = set(self.tiers) - set(TIER_ORDER)
        if unknown:
            raise ValueError(f"unknown tiers {sorted(unknown)}; tiers are {TIER_ORDER}")
        if not self.tiers:
            raise ValueError("AgentConfig needs at least one local tier")
        for name, tier in self.tiers.items():
            if tier.name != name:
                raise ValueError(f"AgentConfig.tiers[{name!r}] is configured as tier {tier.name!r}")
        for field_name in ("copy_streams", "cloud_streams"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AgentConfig.{field_name} must be an integer >= 1, got {value!r}")
        self.cloud_stream_Bps = check_Bps(self.cloud_stream_Bps, "AgentConfig.cloud_stream_Bps")
        self.cloud_latency_s = check_latency_s(self.cloud_latency_s, "AgentConfig.cloud_latency_s")
        budget = self.memory_budget_bytes
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0):
            raise ValueError(f"AgentConfig.memory_budget_bytes must be an integer > 0 (or None), got {budget!r}")


# --------------------------------------------------------------------------- the agent


@dataclass
class Instance:
    """One engine process started by the agent."""

    id: str
    model: str
    source_tier: str  # the local tier whose dir the engine reads
    model_dir: str
    engine: EngineHandle
    status: str = "loading"  # loading -> ready -> stopped
    started_at_unix: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "model": self.model, "url": self.engine.url, "port": self.engine.port,
                "pid": self.engine.pid, "status": self.status, "source_tier": self.source_tier,
                "model_dir": self.model_dir, "started_at_unix": self.started_at_unix,
                "engine": self.engine.kind, "streaming": self.engine.streaming}


class NodeAgent:
    """The agent's state and operations, independent of HTTP (every method blocks; call them from threads)."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        # fastest first, whatever order the config lists them in
        self.tiers: dict[str, Tier] = {n: Tier(config.tiers[n]) for n in TIER_ORDER if n in config.tiers}
        self.registry = Registry(config.stores, config.store_options)
        self.instances: dict[str, Instance] = {}
        self.moves: list[dict[str, Any]] = []
        self.errors: collections.deque[dict[str, Any]] = collections.deque(maxlen=config.max_errors)
        self._lock = threading.Lock()  # guards instances / moves / errors and load-vs-evict decisions
        self._copy_locks: dict[tuple[str, str], threading.Lock] = collections.defaultdict(threading.Lock)
        self._ids = itertools.count(1)
        self._closed = False
        # set at shutdown: paced transfers in flight stop at once and clean up (no partial dir is left)
        self._cancel = threading.Event()
        self._transfers = 0  # copies / fetches in flight, guarded by _idle
        self._idle = threading.Condition()
        for tier in self.tiers.values():
            if tier.swept:
                log.warning("tier %s: removed staging dirs left by an earlier agent: %s", tier.name, tier.swept)

    # -- lookups

    def _model(self, model: Any) -> str:
        """The model name if safe (400 otherwise); checked before any file is touched."""
        if not isinstance(model, str):
            raise AgentError(400, f"'model' must be a string, got {type(model).__name__}", "invalid_model")
        try:
            return check_model_name(model)
        except ValueError as e:
            raise AgentError(400, str(e), "unsafe_model_name") from None

    def _tier(self, name: Any, field_name: str) -> Tier:
        if not isinstance(name, str) or name not in self.tiers:
            raise AgentError(400, f"{field_name!r} must be one of this node's tiers {list(self.tiers)}, got {name!r}",
                             "unknown_tier")
        return self.tiers[name]

    def _manifest(self, model: str) -> Manifest:
        try:
            return self.registry.manifest(model)
        except RegistryError as e:
            raise AgentError(404, f"model {model!r} is not in the registry: {e}", "model_not_found") from None

    def fastest_holder(self, model: str, exclude: str | None = None) -> str | None:
        """The fastest local tier holding `model` (None if only the cloud has it)."""
        return next((n for n, t in self.tiers.items() if n != exclude and t.holds(model)), None)

    def _record_error(self, op: str, model: str, err: AgentError) -> None:
        log.warning("%s %s failed: %s", op, model, err.message)
        with self._lock:
            self.errors.append({"time_unix": time.time(), "op": op, "model": model, "code": err.code,
                                "message": err.message})

    # -- tier movements

    def copy(self, model: Any, to_tier: Any) -> dict[str, Any]:
        """Bring `model` into `to_tier` from the fastest tier holding it (or the cloud); a movement record."""
        model = self._model(model)
        dest = self._tier(to_tier, "to_tier")
        manifest = self._manifest(model)
        try:
            return self._copy(model, dest, manifest)
        except AgentError as e:
            self._record_error("copy", model, e)
            raise

    def _copy(self, model: str, dest: Tier, manifest: Manifest) -> dict[str, Any]:
        with self._copy_locks[(dest.name, model)]:  # one copy per (tier, model): a second waits and finds it there
            start_unix, start = time.time(), time.perf_counter()
            if dest.holds(model):
                return self._move(model, dest.name, dest.name, "cached", 0, start_unix, 0.0)
            source = self.fastest_holder(model, exclude=dest.name)
            need = manifest.total_bytes
            try:
                dest.reserve(model, need)
            except TierError as e:
                raise AgentError(e.status, str(e), e.code) from None
            try:
                with self._transfer():
                    if source is None:
                        nbytes = self._fetch_cloud(model, dest, manifest)
                    else:
                        nbytes = self._copy_local(model, self.tiers[source], dest, manifest)
            finally:
                dest.release(need)
            kind = "fetch" if source is None else "copy"
            return self._move(model, source or CLOUD, dest.name, kind, nbytes, start_unix,
                              time.perf_counter() - start)

    @contextlib.contextmanager
    def _transfer(self) -> Iterator[None]:
        """Count a copy / fetch in flight, so that shutdown can wait for its cleanup; refused once closing."""
        with self._idle:
            if self._cancel.is_set():
                raise AgentError(503, "agent is shutting down", "shutting_down")
            self._transfers += 1
        try:
            yield
        except TransferCancelled:
            raise AgentError(503, "agent is shutting down: the transfer was cancelled and nothing was placed",
                             "shutting_down") from None
        finally:
            with self._idle:
                self._transfers -= 1
                self._idle.notify_all()

    def cloud_pace(self, dest: Tier) -> CloudPace:
        """The emulated cloud link of a fetch into `dest`: per-stream bandwidth, latency, dest's write link."""
        return CloudPace(self.config.cloud_stream_Bps, self.config.cloud_latency_s, dest.device, self._cancel)

    def _fetch_cloud(self, model: str, dest: Tier, manifest: Manifest) -> int:
        try:
            self.registry.fetch(model, dest.model_dir(model), streams=self.config.cloud_streams, manifest=manifest,
                                pace=self.cloud_pace(dest))
        except RegistryError as e:  # every store failed (missing object, sha256 mismatch): nothing was placed
            raise AgentError(502, f"fetch of {model!r} from the cloud into tier {dest.name!r} failed: {e}",
                             "fetch_failed") from None
        return manifest.total_bytes

    def _copy_local(self, model: str, src: Tier, dest: Tier, manifest: Manifest) -> int:
        staging = dest.staging_dir(model)
        try:
            nbytes = parallel_copy_files(src.model_dir(model), staging, [f.name for f in manifest.files],
                                         self.config.copy_streams, pace=copy_flow(src, dest, self._cancel))
            dest.place(staging, model, manifest)
            return nbytes
        except TierError as e:
            raise AgentError(e.status, str(e), e.code) from None
        except TransferCancelled:
            raise
        except OSError as e:
            raise AgentError(500, f"copy of {model!r} from tier {src.name!r} to {dest.name!r} failed: {e}",
                             "copy_failed") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone after a rename; leftovers only after a failure

    def _move(self, model: str, from_tier: str, to_tier: str, kind: str, nbytes: int, start_unix: float,
              duration_s: float) -> dict[str, Any]:
        """A movement record with the columns of `core.records.MOVE_SCHEMA` (times in unix seconds)."""
        rec = {"time_s": start_unix, "end_s": start_unix + duration_s, "model": model, "node": self.config.node,
               "from_tier": from_tier, "to_tier": to_tier, "kind": kind, "bytes": nbytes, "duration_s": duration_s}
        if kind != "cached":
            with self._lock:
                self.moves.append(rec)
        return rec

    def evict(self, model: Any, tier: Any) -> dict[str, Any]:
        """Remove `model` from `tier`; 409 while an instance started from that dir is still loading."""
        model = self._model(model)
        t = self._tier(tier, "tier")
        with self._lock:  # the same lock /load holds while it picks a dir and registers the instance
            busy = [i.id for i in self.instances.values()
                    if i.model == model and i.source_tier == t.name and i.status == "loading"]
            if busy:
                raise AgentError(409, f"model {model!r} in tier {t.name!r} is being read by loading instance(s) "
                                      f"{busy}", "tier_in_use")
            try:
                freed = t.evict(model)
            except TierError as e:
                raise AgentError(e.status, str(e), e.code) from None
        return {"model": model, "tier": t.name, "freed_bytes": freed}

    # -- engines

    def load(self, model: Any, source_tier: Any = None) -> dict[str, Any]:
        """Make sure `model` is in a local tier, start an engine on it, wait until ready; instance + timings."""
        model = self._model(model)
        named = self._tier(source_tier, "source_tier") if source_tier is not None else None
        manifest = self._manifest(model)
        try:
            return self._load(model, named, manifest)
        except AgentError as e:
            self._record_error("load", model, e)
            raise

    def _load(self, model: str, named: Tier | None, manifest: Manifest) -> dict[str, Any]:
        hops: list[dict[str, Any]] = []
        origin: str | None = None
        if named is not None and not named.holds(model):
            hops.append(self._copy(model, named, manifest))
        elif named is None and self.fastest_holder(model) is None:
            # cold in every local tier: the cloud fetch lands in the slowest tier (sata), as a cache
            hops.append(self._copy(model, list(self.tiers.values())[-1], manifest))
        if hops and hops[0]["from_tier"] == CLOUD:
            origin = CLOUD
        with self._lock:
            if self._closed:
                raise AgentError(503, "agent is shutting down", "shutting_down")
            tier_name = named.name if named is not None else self.fastest_holder(model)
            if tier_name is None or not self.tiers[tier_name].holds(model):  # evicted between copy and start
                raise AgentError(409, f"model {model!r} left tier {tier_name!r} before its engine started",
                                 "evicted")
            tier = self.tiers[tier_name]
            settings = self.config.engine
            engine = make_engine(settings.kind, tier.model_dir(model), free_port(self.config.host),
                                 host=self.config.host, model_name=model, dtype=settings.dtype,
                                 threads=settings.threads, progressive=settings.progressive,
                                 toka_executable=settings.toka_executable, n_gpus=settings.gpus,
                                 max_num_seqs=settings.max_num_seqs, env=self.engine_env(tier))
            inst = Instance(f"{self.config.node}-{model}-{next(self._ids)}", model, tier_name,
                            str(tier.model_dir(model)), engine)
            t0 = time.perf_counter()
            try:
                engine.start()  # a missing executable or model file fails here, before any process runs
            except EngineStartError as e:
                raise AgentError(500, f"engine for {model!r} cannot start: {e}", "engine_start_failed") from None
            engine_start_s = time.perf_counter() - t0
            self.instances[inst.id] = inst
        try:
            ready_s = engine.wait_ready(self.config.engine.ready_timeout_s)
        except (EngineStartError, TimeoutError) as e:
            engine.stop()
            with self._lock:
                self.instances.pop(inst.id, None)
            raise AgentError(500, f"engine for {model!r} did not become ready: {e}", "engine_start_failed") from None
        with self._lock:
            inst.status = "ready"
        timings = {"source_tier": origin or tier_name, "engine_tier": tier_name, "fetch_s": hops,
                   "engine_start_s": engine_start_s, "ready_s": ready_s}
        return {"instance": inst.to_json(), "timings": timings}

    def engine_env(self, tier: Tier) -> dict[str, str]:
        """The environment an engine reading `tier` gets: the tier's read pacing, or none (set empty, so
        that a value inherited from the agent's own environment cannot leak in)."""
        paced = tier.name != HOST_MEMORY_TIER and (tier.pace.read_Bps is not None or tier.pace.latency_s > 0)
        return {READ_PACE_ENV: tier.pace.to_json() if paced else ""}

    def unload(self, instance: Any) -> dict[str, Any]:
        if not isinstance(instance, str):
            raise AgentError(400, "'instance' must be a string", "invalid_instance")
        with self._lock:
            inst = self.instances.pop(instance, None)
        if inst is None:
            raise AgentError(404, f"no instance {instance!r} on node {self.config.node!r}", "instance_not_found")
        inst.engine.stop()  # the whole process group, SIGTERM then SIGKILL
        inst.status = "stopped"
        return {"instance": instance, "stopped": True}

    def status(self) -> dict[str, Any]:
        """The node's description (tiers with their emulated devices, cloud link, accelerator, engine) and state."""
        cfg = self.config
        tiers = {n: {"path": str(t.path), "capacity_bytes": t.config.capacity_bytes, "used_bytes": t.used_bytes(),
                     "models": t.models(), **t.pace_json()} for n, t in self.tiers.items()}
        with self._lock:
            instances = [i.to_json() for i in self.instances.values()]
            errors = list(self.errors)
        return {"node": cfg.node, "tiers": tiers,
                "cloud": {"stream_Bps": cfg.cloud_stream_Bps, "streams": cfg.cloud_streams,
                          "latency_s": cfg.cloud_latency_s},
                "accelerator": {"memory_bytes": cfg.memory_budget_bytes},
                "engine": {"kind": cfg.engine.kind, "max_num_seqs": cfg.engine.max_num_seqs},
                "instances": instances, "errors": errors}

    def begin_shutdown(self) -> None:
        """Cancel the copies and fetches in flight (each removes its staging dir) and refuse new ones."""
        self._cancel.set()

    def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        """Cancel transfers and wait for their cleanup, then stop every engine (no orphans); later loads
        are refused."""
        self.begin_shutdown()
        with self._idle:
            if not self._idle.wait_for(lambda: self._transfers == 0, timeout=drain_timeout_s):
                log.warning("%d transfer(s) still running after %.0f s of shutdown", self._transfers,
                            drain_timeout_s)
        with self._lock:
            self._closed = True
            instances = list(self.instances.values())
            self.instances.clear()
        for inst in instances:
            with contextlib.suppress(Exception):  # one failed stop must not leave the others running
                inst.engine.stop()
                inst.status = "stopped"


# --------------------------------------------------------------------------- HTTP


def _error(err: AgentError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def _authorized(request: Request, token: str) -> bool:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


async def _json_body(request: Request, required: Sequence[str]) -> dict[str, Any]:
    try:
        body = json.loads(await request.body() or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AgentError(400, f"request body is not valid JSON ({e})", "invalid_json") from None
    if not isinstance(body, dict):
        raise AgentError(400, "request body must be a JSON object", "invalid_json")
    missing = [k for k in required if k not in body]
    if missing:
        raise AgentError(400, f"missing field(s) {missing}", "missing_field")
    return body


Handler = Callable[[Request], Awaitable[JSONResponse]]


def create_app(agent: NodeAgent) -> Starlette:
    """The ASGI app over `agent`; its lifespan end stops every engine."""
    token = agent.config.token

    def guarded(fn: Callable[[Request], Awaitable[Any]]) -> Handler:
        async def endpoint(request: Request) -> JSONResponse:
            if not _authorized(request, token):
                return _error(AgentError(401, "missing or wrong bearer token", "invalid_token"))
            try:
                return JSONResponse(await fn(request))
            except AgentError as e:
                return _error(e)
        return endpoint

    def op(method: Callable[..., dict[str, Any]], required: Sequence[str], optional: Sequence[str] = ()) -> Handler:
        async def call(request: Request) -> dict[str, Any]:
            body = await _json_body(request, required)
            kwargs = {k: body[k] for k in (*required, *optional) if k in body}
            # copies and engine starts take seconds: a worker thread keeps /healthz and /status answering
            return await run_in_threadpool(method, **kwargs)
        return guarded(call)

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True, "node": agent.config.node})

    async def status(request: Request) -> dict[str, Any]:
        return await run_in_threadpool(agent.status)

    async def moves(request: Request) -> dict[str, Any]:
        with agent._lock:
            return {"node": agent.config.node, "moves": list(agent.moves)}

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        code = getattr(exc, "status_code", 500)
        return _error(AgentError(code, str(getattr(exc, "detail", exc)), "http_error"))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await run_in_threadpool(agent.shutdown)

    routes = [
        Route("/healthz", healthz),
        Route("/status", guarded(status)),
        Route("/moves", guarded(moves)),
        Route("/tiers/copy", op(agent.copy, ("model", "to_tier")), methods=["POST"]),
        Route("/tiers/evict", op(agent.evict, ("model", "tier")), methods=["POST"]),
        Route("/load", op(agent.load, ("model",), ("source_tier",)), methods=["POST"]),
        Route("/unload", op(agent.unload, ("instance",)), methods=["POST"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})


def serve(config: AgentConfig, log_level: str = "info") -> None:
    """Run the agent until SIGINT / SIGTERM; engines are stopped on the way out (lifespan end, then atexit-safe).

    With `config.parent_pid`, the agent also stops its engines and exits when that process dies
    (its launcher, e.g. `live.serve`, killed without a chance to stop it).
    """
    import uvicorn

    class AgentServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # before uvicorn waits for requests in flight: a paced copy would otherwise hold it for its
            # whole duration; cancelled, it cleans its staging dir and its request ends at once
            agent.begin_shutdown()
            super().handle_exit(sig, frame)

    agent = NodeAgent(config)
    if config.parent_pid:
        exit_with_parent(config.parent_pid, on_exit=agent.shutdown)
    try:
        AgentServer(uvicorn.Config(create_app(agent), host=config.host, port=config.port, log_level=log_level,
                                   lifespan="on", timeout_graceful_shutdown=10)).run()
    finally:
        agent.shutdown()  # also when uvicorn failed before the lifespan ran (port taken, ...)


def config_from_args(argv: Sequence[str] | None = None) -> tuple[AgentConfig, str]:
    p = argparse.ArgumentParser(prog="python -m live.agent", description=__doc__.split("\n")[0])
    p.add_argument("--node", default="n0")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--token", default=os.environ.get("TIERLAB_AGENT_TOKEN", ""),
                   help="bearer token (default: $TIERLAB_AGENT_TOKEN)")
    p.add_argument("--tier", action="append", default=[], metavar="NAME=DIR:BYTES",
                   help=f"a local tier ({', '.join(TIER_ORDER)}); repeat. Default: dram under /dev/shm, 1 GiB")
    p.add_argument("--store", action="append", default=[], metavar="URL", help="registry store, in priority order")
    p.add_argument("--store-options", default="{}", help='JSON: {"s3://b/p": {"endpoint_url": ...}}')
    p.add_argument("--threads", type=int, default=1, help="torch threads per engine")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--progressive", action="store_true", help="engines serve while layers load")
    p.add_argument("--engine", default="cpu", choices=ENGINE_KINDS, help="engine kind the node runs")
    p.add_argument("--toka", default="toka", help="Tokasaurus launcher (--engine tokasaurus): a name on PATH or a path")
    p.add_argument("--gpus", type=int, default=1, help="GPUs one Tokasaurus engine may use")
    p.add_argument("--tier-bw", action="append", default=[], metavar="NAME=READ_BPS:WRITE_BPS[:LATENCY_S]",
                   help="emulated device of a tier: bytes/s ('inf' = unpaced) and read latency in s; repeat")
    p.add_argument("--copy-streams", type=int, default=4)
    p.add_argument("--cloud-streams", type=int, default=16, help="parallel ranged-read streams per cloud fetch")
    p.add_argument("--cloud-stream-Bps", type=float, default=None,
                   help="bytes/s of each cloud stream (default: unpaced)")
    p.add_argument("--cloud-latency-s", type=float, default=0.0, help="first-byte latency of each cloud stream, s")
    p.add_argument("--memory-budget", default=None, metavar="BYTES",
                   help="accelerator memory of the node (K/M/G/T suffixes), reported in /status")
    p.add_argument("--max-num-seqs", type=int, default=8, help="batch limit of the engines this node starts")
    p.add_argument("--log-level", default="info")
    p.add_argument("--exit-with-parent", type=int, metavar="PID", help="stop the engines and exit when PID is gone")
    args = p.parse_args(argv)
    try:
        tiers = [parse_tier(s) for s in args.tier]
        options: Mapping[str, Any] = json.loads(args.store_options)
        bandwidths = [parse_tier_bw(s) for s in args.tier_bw]
        memory_budget = parse_bytes(args.memory_budget) if args.memory_budget is not None else None
        if memory_budget is not None and memory_budget <= 0:
            raise ValueError(f"--memory-budget must be > 0 bytes, got {args.memory_budget!r}")
        check_Bps(args.cloud_stream_Bps, "--cloud-stream-Bps")
        check_latency_s(args.cloud_latency_s, "--cloud-latency-s")
        for flag, value in (("--max-num-seqs", args.max_num_seqs), ("--cloud-streams", args.cloud_streams),
                            ("--copy-streams", args.copy_streams)):
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
    except (ValueError, json.JSONDecodeError) as e:
        p.error(str(e))
    tier_map = {t.name: t for t in tiers} or {"dram": TierConfig("dram", default_dram_dir(args.node, args.port),
                                                                 1 << 30)}
    seen: set[str] = set()
    for name, read_Bps, write_Bps, latency_s in bandwidths:
        if name not in tier_map:
            p.error(f"--tier-bw {name}=...: no tier {name!r} on this node (tiers: {sorted(tier_map)})")
        if name in seen:
            p.error(f"--tier-bw: tier {name!r} given twice")
        seen.add(name)
        t = tier_map[name]
        tier_map[name] = TierConfig(t.name, t.path, t.capacity_bytes, read_Bps, write_Bps, latency_s)
    try:
        config = AgentConfig(node=args.node, host=args.host, port=args.port, token=args.token, tiers=tier_map,
                             stores=list(args.store), store_options={k: dict(v) for k, v in options.items()},
                             engine=EngineSettings(args.threads, args.dtype, args.progressive, kind=args.engine,
                                                   toka_executable=args.toka, gpus=args.gpus,
                                                   max_num_seqs=args.max_num_seqs),
                             copy_streams=args.copy_streams, cloud_streams=args.cloud_streams,
                             cloud_stream_Bps=args.cloud_stream_Bps, cloud_latency_s=args.cloud_latency_s,
                             memory_budget_bytes=memory_budget, parent_pid=args.exit_with_parent)
    except ValueError as e:
        p.error(str(e))
    return config, args.log_level


def main(argv: Sequence[str] | None = None) -> int:
    config, log_level = config_from_args(argv)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log.info("agent %s on %s:%d, tiers %s", config.node, config.host, config.port,
             {n: asdict(t) | {"path": str(t.path)} for n, t in config.tiers.items()})
    serve(config, log_level)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
