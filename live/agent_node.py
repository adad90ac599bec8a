"""The node agent's state and operations, independent of HTTP: tiers, host memory, copies, engines.

`live.agent` serves a `NodeAgent` over HTTP (and documents the API); every method here blocks, so
the HTTP layer calls them from worker threads. Byte movements follow the simulator's hops
(`core.loadtime`, `sim.world`): tier-to-tier copies at min(source read, destination write); cloud
fetches over paced streams and the node's NIC; a cold start from the cloud lands in host memory
(`HostStaging`, not a tier), where its engine reads it unpaced and copies made while it runs find it.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from live.agent_config import TIER_ORDER, AgentConfig, url_host
from live.agent_tiers import HostCopy, HostStaging, Tier, TierError, copy_flow, parallel_copy_files
from live.engines.base import EngineHandle, EngineStartError, free_port
from live.engines.factory import make_engine
from live.manifest import Manifest
from live.pacing import READ_PACE_ENV, CloudPace, Flow, TransferCancelled, local_device
from live.registry import Registry, RegistryError, check_model_name, revision_of

log = logging.getLogger(__name__)

HOST_MEMORY_TIER = "dram"  # an engine's read of it is no fetch hop (core.loadtime.fetch_hop): never paced
CLOUD = "cloud"
HOST = "host"  # host memory outside the tiers: a cloud load's staging (core.loadtime's fetch hop ends there)


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


# --------------------------------------------------------------------------- the agent


@dataclass
class Instance:
    """One engine process started by the agent."""

    id: str
    model: str
    source_tier: str  # where its weights came from: the local tier whose dir the engine reads, or "cloud"
    model_dir: str  # the dir the engine reads: in that tier, or its host copy
    engine: EngineHandle
    status: str = "loading"  # loading -> ready -> stopped (or failed: its engine died)
    started_at_unix: float = field(default_factory=time.time)
    host_copy: HostCopy | None = None  # a cloud load's checkpoint in host memory, removed with the instance
    advertise_host: str = ""  # the node's address as others reach it ("": the engine's own URL is reported)

    @property
    def url(self) -> str:
        """The engine's URL as the gateway and clients reach it: the engine listens on the agent's bind host (maybe
        0.0.0.0), so the URL reported names the node's advertised address instead."""
        if not self.advertise_host:
            return self.engine.url
        scheme = self.engine.url.split("://", 1)[0]
        return f"{scheme}://{url_host(self.advertise_host)}:{self.engine.port}"

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "model": self.model, "url": self.url, "port": self.engine.port,
                "pid": self.engine.pid, "status": self.status, "source_tier": self.source_tier,
                "engine_tier": HOST if self.host_copy is not None else self.source_tier,
                "model_dir": self.model_dir, "started_at_unix": self.started_at_unix,
                "engine": self.engine.kind, "streaming": self.engine.streaming, "chat": self.engine.chat,
                "max_context": self.engine.max_context}


class NodeAgent:
    """The agent's state and operations, independent of HTTP (every method blocks; call them from threads)."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.boot_id = uuid.uuid4().hex  # this run of the agent: a gateway tells a restart from a heartbeat by it
        # fastest first, whatever order the config lists them in
        self.tiers: dict[str, Tier] = {n: Tier(config.tiers[n]) for n in TIER_ORDER if n in config.tiers}
        assert config.host_dir is not None  # AgentConfig resolves the default
        self.host = HostStaging(config.host_dir)
        # the NIC is the agent's alone (engines never fetch): an in-process device all its fetches share
        self.nic = local_device(write_Bps=config.nic_Bps, name="nic") if config.nic_Bps is not None else None
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
        # the copies / fetches in flight, guarded by _idle: shutdown waits for them; /status lists them (an
        # eviction does not reach a copy still landing)
        self._moving: dict[int, dict[str, Any]] = {}
        self._transfer_ids = itertools.count(1)
        self._idle = threading.Condition()
        for tier in self.tiers.values():
            if tier.swept:
                log.warning("tier %s: removed staging dirs left by an earlier agent: %s", tier.name, tier.swept)
        if self.host.swept:
            log.warning("host dir %s: removed host copies left by an earlier agent: %s", self.host.path,
                        self.host.swept)

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

    def fastest_holder(self, model: str, exclude: str | None = None, revision: str | None = None) -> str | None:
        """The fastest local tier holding `model` (of `revision`, if given; None if only the cloud has it)."""
        return next((n for n, t in self.tiers.items() if n != exclude and t.holds(model, revision)), None)

    def _drop_stale(self, model: str, tier: Tier, revision: str) -> None:
        """Evict `tier`'s copy of `model` if it is of another revision than `revision` (the alias moved since it
        was placed: a publish or a rollback); instances already running from it keep their weights."""
        held = tier.revision(model)
        if tier.holds(model) and not tier.holds(model, revision):
            log.info("tier %s holds %s@%s, the registry's is %s: evicting the stale copy", tier.name, model, held,
                     revision)
            self.evict(model, tier.name)

    def _record_error(self, op: str, model: str, err: AgentError) -> None:
        log.warning("%s %s failed: %s", op, model, err.message)
        with self._lock:
            self.errors.append({"time_unix": time.time(), "op": op, "model": model, "code": err.code,
                                "message": err.message})

    # -- tier movements

    def copy(self, model: Any, to_tier: Any) -> dict[str, Any]:
        """Bring `model` into `to_tier`; a movement record.

        The source is the fastest tier holding the model; if none does, a running instance's host
        copy (the weights are in host memory already: the simulator's copies right after a load,
        `sim.world`'s `staged`); else the cloud.
        """
        model = self._model(model)
        dest = self._tier(to_tier, "to_tier")
        manifest = self._manifest(model)
        try:
            return self._copy(model, dest, manifest)
        except AgentError as e:
            self._record_error("copy", model, e)
            raise

    def _copy(self, model: str, dest: Tier, manifest: Manifest) -> dict[str, Any]:
        revision = revision_of(manifest)
        with self._copy_locks[(dest.name, model)]:  # one copy per (tier, model): a second waits and finds it there
            start_unix, start = time.time(), time.perf_counter()
            self._drop_stale(model, dest, revision)
            if dest.holds(model):
                return self._move(model, dest.name, dest.name, "cached", 0, start_unix, 0.0)
            self._reap()  # a dead engine's host copy is gone, not a source
            need = manifest.total_bytes
            try:
                dest.reserve(model, need)
            except TierError as e:
                raise AgentError(e.status, str(e), e.code) from None
            holder = self.fastest_holder(model, exclude=dest.name, revision=revision)
            # held (not removed by an unload) until the copy ends
            host_copy = self.host.acquire(model, revision) if holder is None else None
            source = holder or (HOST if host_copy is not None else CLOUD)
            try:
                with self._transfer(model, source, dest.name):
                    if host_copy is not None:
                        # read from host memory: only the destination's write link is paced (core.loadtime.copy_hop)
                        nbytes = self._copy_files(model, host_copy.path, HOST, dest, manifest,
                                                  Flow(writes=[dest.device], cancel=self._cancel))
                    elif source == CLOUD:
                        nbytes = self._fetch_cloud(model, dest, manifest)
                    else:
                        src = self.tiers[source]
                        nbytes = self._copy_files(model, src.model_dir(model), src.name, dest, manifest,
                                                  copy_flow(src, dest, self._cancel))
            finally:
                dest.release(need)
                if host_copy is not None:
                    self.host.release(host_copy)
            return self._move(model, source, dest.name, "fetch" if source == CLOUD else "copy", nbytes, start_unix,
                              time.perf_counter() - start)

    @contextlib.contextmanager
    def _transfer(self, model: str, from_tier: str, to_tier: str) -> Iterator[None]:
        """Count a copy / fetch of `model` in flight (shutdown waits for its cleanup; /status lists it);
        refused once closing."""
        with self._idle:
            if self._cancel.is_set():
                raise AgentError(503, "agent is shutting down", "shutting_down")
            key = next(self._transfer_ids)
            self._moving[key] = {"model": model, "from_tier": from_tier, "to_tier": to_tier,
                                 "since_unix": time.time()}
        try:
            yield
        except TransferCancelled:
            raise AgentError(503, "agent is shutting down: the transfer was cancelled and nothing was placed",
                             "shutting_down") from None
        finally:
            with self._idle:
                self._moving.pop(key, None)
                self._idle.notify_all()

    def cloud_pace(self, dest: Tier | None) -> CloudPace:
        """The emulated cloud link of a fetch into `dest` (None: host memory): per-stream bandwidth,
        latency, the node's NIC, and dest's write link."""
        return CloudPace(self.config.cloud_stream_Bps, self.config.cloud_latency_s,
                         dest.device if dest is not None else None, self._cancel, self.nic)

    def _fetch_cloud(self, model: str, dest: Tier, manifest: Manifest) -> int:
        # fetched beside the model dir, then marked with its revision and renamed into place
        staging = dest.staging_dir(model)
        try:
            got = self.registry.fetch(model, staging / "checkpoint", streams=self.config.cloud_streams,
                                      manifest=manifest, pace=self.cloud_pace(dest))
            dest.install(got.path, model, revision_of(manifest))
        except RegistryError as e:  # every store failed (missing object, sha256 mismatch): nothing was placed
            raise AgentError(502, f"fetch of {model!r} from the cloud into tier {dest.name!r} failed: {e}",
                             "fetch_failed") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # empty after the rename; leftovers only after a failure
        return manifest.total_bytes

    def _copy_files(self, model: str, src_dir: Path, src_name: str, dest: Tier, manifest: Manifest,
                    pace: Flow) -> int:
        """Copy the checkpoint in `src_dir` (a tier's or a host copy) into `dest` through a staging dir."""
        staging = dest.staging_dir(model)
        try:
            nbytes = parallel_copy_files(src_dir, staging, [f.name for f in manifest.files],
                                         self.config.copy_streams, pace=pace)
            dest.place(staging, model, manifest)
            return nbytes
        except TierError as e:
            raise AgentError(e.status, str(e), e.code) from None
        except TransferCancelled:
            raise
        except OSError as e:
            raise AgentError(500, f"copy of {model!r} from {src_name!r} to tier {dest.name!r} failed: {e}",
                             "copy_failed") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone after a rename; leftovers only after a failure

    def _move(self, model: str, from_tier: str, to_tier: str, kind: str, nbytes: int, start_unix: float,
              duration_s: float, record: bool = True) -> dict[str, Any]:
        """A movement record with the columns of `core.records.MOVE_SCHEMA` (times in unix seconds); kept in
        /moves if `record` and it moved something (a load's fetch into host memory is no tier movement)."""
        rec = {"time_s": start_unix, "end_s": start_unix + duration_s, "model": model, "node": self.config.node,
               "from_tier": from_tier, "to_tier": to_tier, "kind": kind, "bytes": nbytes, "duration_s": duration_s}
        if record and kind != "cached":
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
        """Start an engine on `model` and wait until it is ready; instance + timings.

        `source_tier` "cloud" (or None while no tier holds the model): fetch into host memory, no tier
        touched; a tier name: read that tier, copying the model into it first if needed; None: the
        fastest tier holding the model.
        """
        model = self._model(model)
        if source_tier is not None and source_tier != CLOUD and (not isinstance(source_tier, str)
                                                                 or source_tier not in self.tiers):
            raise AgentError(400, f"'source_tier' must be {CLOUD!r} or one of this node's tiers {list(self.tiers)}, "
                                  f"got {source_tier!r}", "unknown_tier")
        manifest = self._manifest(model)
        try:
            revision = revision_of(manifest)
            if source_tier is not None and source_tier != CLOUD:
                self._drop_stale(model, self.tiers[source_tier], revision)
            if source_tier == CLOUD or (source_tier is None and self.fastest_holder(model, revision=revision) is None):
                return self._load_cloud(model, manifest)
            return self._load_tier(model, self.tiers[source_tier] if source_tier is not None else None, manifest)
        except AgentError as e:
            self._record_error("load", model, e)
            raise

    def _load_cloud(self, model: str, manifest: Manifest) -> dict[str, Any]:
        """core.loadtime's cloud cold start: one fetch hop cloud -> host memory, then the engine reads it there."""
        path = self.host.new_path(model)
        start_unix, start = time.time(), time.perf_counter()
        try:
            with self._transfer(model, CLOUD, HOST):
                try:
                    self.registry.fetch(model, path, streams=self.config.cloud_streams, manifest=manifest,
                                        pace=self.cloud_pace(None))
                except RegistryError as e:  # every store failed: the registry placed nothing
                    raise AgentError(502, f"fetch of {model!r} from the cloud into host memory failed: {e}",
                                     "fetch_failed") from None
        except BaseException:
            self.host.discard(path)
            raise
        hop = self._move(model, CLOUD, HOST, "fetch", manifest.total_bytes, start_unix,
                         time.perf_counter() - start, record=False)
        host_copy = self.host.add(model, path, manifest.total_bytes, revision_of(manifest))
        try:
            # host memory: the engine's read is no hop of its own, unpaced (as from the DRAM tier)
            inst, engine_start_s, ready_s = self._start_engine(model, CLOUD, path, {READ_PACE_ENV: ""}, host_copy)
        except BaseException:
            self.host.drop(host_copy)  # nothing of a failed load stays behind
            raise
        timings = {"source_tier": CLOUD, "engine_tier": HOST, "fetch_s": [hop], "engine_start_s": engine_start_s,
                   "ready_s": ready_s}
        return {"instance": inst.to_json(), "timings": timings}

    def _load_tier(self, model: str, named: Tier | None, manifest: Manifest) -> dict[str, Any]:
        """A cold start from a local tier: `named` (copied there first if it lacks the model) or the fastest."""
        hops = [self._copy(model, named, manifest)] if named is not None and not named.holds(model) else []
        tier = named if named is not None else self.tiers.get(
            self.fastest_holder(model, revision=revision_of(manifest)) or "")
        if tier is None:  # evicted from every tier since `load` looked
            raise AgentError(409, f"model {model!r} left every tier before its engine started", "evicted")
        inst, engine_start_s, ready_s = self._start_engine(model, tier.name, tier.model_dir(model),
                                                           self.engine_env(tier))
        origin = CLOUD if hops and hops[0]["from_tier"] == CLOUD else tier.name
        timings = {"source_tier": origin, "engine_tier": tier.name, "fetch_s": hops,
                   "engine_start_s": engine_start_s, "ready_s": ready_s}
        return {"instance": inst.to_json(), "timings": timings}

    def _start_engine(self, model: str, source: str, model_dir: Path, env: dict[str, str],
                      host_copy: HostCopy | None = None) -> tuple[Instance, float, float]:
        """Start an engine on `model_dir` and wait until it is ready: (instance, engine_start_s, ready_s).

        The dir is checked and the instance registered under the lock /tiers/evict takes, so a tier dir
        cannot be evicted between the check and the engine's start (409 if it went before).
        """
        settings = self.config.engine
        with self._lock:
            if self._closed:
                raise AgentError(503, "agent is shutting down", "shutting_down")
            if not model_dir.is_dir():
                raise AgentError(409, f"model {model!r} left {source!r} before its engine started", "evicted")
            engine = make_engine(settings.kind, model_dir, free_port(self.config.host),
                                 host=self.config.host, model_name=model, dtype=settings.dtype,
                                 threads=settings.threads, progressive=settings.progressive,
                                 toka_executable=settings.toka_executable, n_gpus=settings.gpus,
                                 max_num_seqs=settings.max_num_seqs, env=env, spec=settings.openai,
                                 prefix_cache_blocks=settings.prefix_cache_blocks,
                                 prefix_block_tokens=settings.prefix_block_tokens)
            inst = Instance(f"{self.config.node}-{model}-{next(self._ids)}", model, source, str(model_dir), engine,
                            host_copy=host_copy, advertise_host=self.config.advertise_host)
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
        return inst, engine_start_s, ready_s

    def engine_env(self, tier: Tier) -> dict[str, str]:
        """The environment an engine reading `tier` gets: the tier's read pacing, or none (set empty, so
        that a value inherited from the agent's own environment cannot leak in)."""
        paced = tier.name != HOST_MEMORY_TIER and (tier.pace.read_Bps is not None or tier.pace.latency_s > 0)
        return {READ_PACE_ENV: tier.pace.to_json() if paced else ""}

    def unload(self, instance: Any) -> dict[str, Any]:
        """Stop an instance's engine and remove its host copy, if it has one."""
        if not isinstance(instance, str):
            raise AgentError(400, "'instance' must be a string", "invalid_instance")
        with self._lock:
            inst = self.instances.pop(instance, None)
        if inst is None:
            raise AgentError(404, f"no instance {instance!r} on node {self.config.node!r}", "instance_not_found")
        try:
            inst.engine.stop()  # the whole process group, SIGTERM then SIGKILL
        finally:
            if inst.host_copy is not None:
                self.host.drop(inst.host_copy)
        inst.status = "stopped"
        return {"instance": instance, "stopped": True}

    def _reap(self) -> None:
        """Mark ready instances whose engine died "failed" and remove their host copies (a crashed engine
        must not keep host memory until someone unloads it)."""
        with self._lock:
            dead = [i for i in self.instances.values()
                    if i.status == "ready" and i.host_copy is not None and not i.engine.alive()]
            for inst in dead:
                inst.status = "failed"
        for inst in dead:
            assert inst.host_copy is not None
            log.warning("instance %s: engine exited; its host copy is removed", inst.id)
            self.host.drop(inst.host_copy)

    def status(self) -> dict[str, Any]:
        """The node's description (tiers with their emulated devices, cloud link, accelerator, engine) and state."""
        self._reap()
        cfg = self.config
        tiers = {n: {"path": str(t.path), "capacity_bytes": t.config.capacity_bytes, "used_bytes": t.used_bytes(),
                     "models": t.models(), **t.pace_json()} for n, t in self.tiers.items()}
        with self._lock:
            instances = [i.to_json() for i in self.instances.values()]
            errors = list(self.errors)
        return {"node": cfg.node, "region": cfg.region, "url": cfg.url, "boot_id": self.boot_id, "tiers": tiers,
                "host": {"path": str(self.host.path), "used_bytes": self.host.used_bytes(),
                         "copies": self.host.copies()},
                "cloud": {"stream_Bps": cfg.cloud_stream_Bps, "streams": cfg.cloud_streams,
                          "latency_s": cfg.cloud_latency_s, "nic_Bps": cfg.nic_Bps},
                "accelerator": {"memory_bytes": cfg.memory_budget_bytes},
                "engine": {"kind": cfg.engine.kind, "max_num_seqs": cfg.engine.max_num_seqs,
                           "prefix_cache_blocks": cfg.engine.prefix_cache_blocks},
                "instances": instances, "transfers": self.transfers_in_flight(), "errors": errors}

    def transfers_in_flight(self) -> list[dict[str, Any]]:
        """The copies / fetches under way: model, from_tier, to_tier ("host" for a cloud load's fetch), since_unix."""
        with self._idle:
            return [dict(t) for t in self._moving.values()]

    def begin_shutdown(self) -> None:
        """Cancel the copies and fetches in flight (each removes its staging dir) and refuse new ones."""
        self._cancel.set()

    def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        """Cancel transfers and wait for their cleanup, then stop every engine (no orphans) and empty the
        host dir; later loads are refused."""
        self.begin_shutdown()
        with self._idle:
            if not self._idle.wait_for(lambda: not self._moving, timeout=drain_timeout_s):
                log.warning("%d transfer(s) still running after %.0f s of shutdown", len(self._moving),
                            drain_timeout_s)
        with self._lock:
            self._closed = True
            instances = list(self.instances.values())
            self.instances.clear()
        for inst in instances:
            with contextlib.suppress(Exception):  # one failed stop must not leave the others running
                inst.engine.stop()
                inst.status = "stopped"
        self.host.close()  # every host copy (their engines are stopped) and any fetch staging left
