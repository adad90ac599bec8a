"""A node agent that speaks the real agent's HTTP contract (`live.agent`: GET /healthz, /status; POST /load,
/unload, /tiers/copy, /tiers/evict) over real HTTP, with tiers kept in memory and null engine processes as its
engines. Its /status carries the node description the gateway plans with (tier pacing, the cloud store, the
memory budget, the engine's kind and batch limit), and knobs slow its copies and loads down or make loads fail,
so that the gateway's execution of policy actions can be tested without torch or checkpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from core.policies.base import PolicyBundle
from core.specs import ModelSpec
from live.engines.base import free_port
from live.engines.null_server import NullEngineProcess
from live.gateway import Gateway, GatewayConfig, Tenant
from live.gateway_config import AgentRef
from tests.live_gateway.conftest import ADMIN_TOKEN, MODEL, GatewayServer, serving

T = TypeVar("T")
TOKEN = "fake-agent-token"
TIER_ORDER = ("dram", "nvme", "sata")


@dataclass
class FakeAgent:
    """One node. `tiers`: name -> capacity bytes; `held`: tier -> models in it at start; `model_bytes`: each
    model's size on disk. `engine_args` are the null engines' flags; `memory_bytes`, `max_num_seqs`, `cloud`
    and `tier_pacing` (name -> {read_Bps, write_Bps, latency_s}) are what /status reports."""

    node: str
    model_bytes: Mapping[str, int]
    tiers: dict[str, int] = field(default_factory=lambda: {"dram": 1 << 30, "sata": 1 << 32})
    held: dict[str, set[str]] = field(default_factory=dict)
    engine_args: tuple[str, ...] = ()
    memory_bytes: int | None = None
    max_num_seqs: int = 8
    cloud: dict[str, Any] | None = None
    tier_pacing: dict[str, dict[str, Any]] = field(default_factory=dict)
    copy_delay_s: float = 0.0
    load_delay_s: float = 0.0
    unload_delay_s: float = 0.0  # an engine stop that takes time (its memory is freed when /unload returns)
    fail_loads: set[str] = field(default_factory=set)
    dead_engines: bool = False  # its engines die right after they answer ready (a destination lost mid-handover)
    calls: list[tuple[str, str]] = field(default_factory=list)  # (endpoint, model or instance), in order
    engines: dict[str, NullEngineProcess] = field(default_factory=dict)
    url: str = ""

    def __post_init__(self) -> None:
        self.contents: dict[str, dict[str, int]] = {
            t: {m: self.model_bytes[m] for m in self.held.get(t, ())} for t in self.tiers}
        self.loading: dict[str, tuple[str, str]] = {}  # instance -> (model, tier) while it starts
        self._ids = iter(range(1, 1 << 30))
        self._lock = threading.Lock()

    @property
    def ref(self) -> AgentRef:
        return AgentRef(self.node, self.url, TOKEN)

    # ------------------------------------------------------------------ operations (worker threads)

    def _holder(self, model: str) -> str | None:
        return next((t for t in TIER_ORDER if t in self.contents and model in self.contents[t]), None)

    def copy(self, model: str, to_tier: str) -> tuple[int, dict[str, Any]]:
        time.sleep(self.copy_delay_s)
        with self._lock:
            dest = self.contents.get(to_tier)
            if dest is None:
                return 400, {"error": {"message": f"no tier {to_tier}", "code": "unknown_tier"}}
            src = self._holder(model) or "cloud"
            if model in dest:
                return 200, {"model": model, "from_tier": to_tier, "to_tier": to_tier, "kind": "cached"}
            if sum(dest.values()) + self.model_bytes[model] > self.tiers[to_tier]:
                return 507, {"error": {"message": f"tier {to_tier} full", "code": "tier_full"}}
            dest[model] = self.model_bytes[model]
        return 200, {"model": model, "node": self.node, "from_tier": src, "to_tier": to_tier,
                     "kind": "fetch" if src == "cloud" else "copy", "bytes": self.model_bytes[model]}

    def evict(self, model: str, tier: str) -> tuple[int, dict[str, Any]]:
        with self._lock:
            if any(v == (model, tier) for v in self.loading.values()):
                return 409, {"error": {"message": "tier in use", "code": "tier_in_use"}}
            if model not in self.contents.get(tier, {}):
                return 404, {"error": {"message": f"{model} not in {tier}", "code": "not_found"}}
            freed = self.contents[tier].pop(model)
        return 200, {"model": model, "tier": tier, "freed_bytes": freed}

    def load(self, model: str, source_tier: str | None) -> tuple[int, dict[str, Any]]:
        if model in self.fail_loads:
            time.sleep(self.load_delay_s)
            return 500, {"error": {"message": f"engine for {model!r} cannot start (test)", "code": "engine_failed"}}
        if source_tier is not None and model not in self.contents.get(source_tier, {}):
            self.copy(model, source_tier)
        tier = source_tier or self._holder(model)
        if tier is None:
            tier = list(self.contents)[-1]
            self.copy(model, tier)
        iid = f"{self.node}-{model}-{next(self._ids)}"
        self.loading[iid] = (model, tier)
        try:
            time.sleep(self.load_delay_s)
            engine = NullEngineProcess(free_port(), model_name=model, extra_args=list(self.engine_args))
            engine.start()
            engine.wait_ready(30)
            if self.dead_engines:
                engine.close()
        finally:
            self.loading.pop(iid, None)
        self.engines[iid] = engine
        return 200, {"instance": {"id": iid, "model": model, "url": engine.url, "port": engine.port,
                                  "pid": engine.pid, "status": "ready", "source_tier": tier, "streaming": True},
                     "timings": {"source_tier": tier, "engine_tier": tier, "fetch_s": [], "engine_start_s": 0.0,
                                 "ready_s": 0.0}}

    def unload(self, instance: str) -> tuple[int, dict[str, Any]]:
        time.sleep(self.unload_delay_s)
        engine = self.engines.pop(instance, None)
        if engine is None:
            return 404, {"error": {"message": f"no instance {instance}", "code": "instance_not_found"}}
        engine.close()
        return 200, {"instance": instance, "stopped": True}

    def status(self) -> dict[str, Any]:
        with self._lock:
            tiers = {t: {"path": "", "capacity_bytes": cap, "used_bytes": sum(self.contents[t].values()),
                         "models": dict(self.contents[t]), **self.tier_pacing.get(t, {})}
                     for t, cap in self.tiers.items()}
        out: dict[str, Any] = {"node": self.node, "tiers": tiers, "errors": [],
                               "instances": [{"id": i, "url": e.url, "pid": e.pid} for i, e in self.engines.items()],
                               "accelerator": {"memory_bytes": self.memory_bytes},
                               "engine": {"kind": "null", "max_num_seqs": self.max_num_seqs}}
        if self.cloud is not None:
            out["cloud"] = self.cloud
        return out

    def close(self) -> None:
        for engine in list(self.engines.values()):
            engine.close()
        self.engines.clear()

    # ------------------------------------------------------------------ HTTP

    def app(self) -> Starlette:
        def guarded(fn: Any, *fields: str) -> Any:
            async def endpoint(request: Request) -> JSONResponse:
                if request.headers.get("authorization") != f"Bearer {TOKEN}":
                    return JSONResponse({"error": {"message": "bad token", "code": "invalid_token"}}, 401)
                body = await request.json() if request.method == "POST" else {}
                self.calls.append((request.url.path, str(body.get(fields[0], "")) if fields else ""))
                status, out = await run_in_threadpool(fn, *(body.get(f) for f in fields))
                return JSONResponse(out, status)
            return endpoint

        async def healthz(request: Request) -> JSONResponse:
            return JSONResponse({"ok": True, "node": self.node})

        return Starlette(routes=[
            Route("/healthz", healthz),
            Route("/status", guarded(lambda: (200, self.status()))),
            Route("/tiers/copy", guarded(self.copy, "model", "to_tier"), methods=["POST"]),
            Route("/tiers/evict", guarded(self.evict, "model", "tier"), methods=["POST"]),
            Route("/load", guarded(self.load, "model", "source_tier"), methods=["POST"]),
            Route("/unload", guarded(self.unload, "instance"), methods=["POST"]),
        ])


@contextlib.contextmanager
def running(*agents: FakeAgent) -> Iterator[tuple[FakeAgent, ...]]:
    """Serve each fake agent with uvicorn in a thread on a free loopback port; engines stopped at the end."""
    servers = []
    try:
        for agent in agents:
            port = free_port()
            server = uvicorn.Server(uvicorn.Config(agent.app(), host="127.0.0.1", port=port, log_level="warning"))
            thread = threading.Thread(target=server.run, daemon=True)
            thread.start()
            servers.append((server, thread))
            agent.url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 15
            while not server.started and time.monotonic() < deadline:
                time.sleep(0.01)
        yield agents
    finally:
        for agent in agents:
            agent.close()
        for server, thread in servers:
            server.should_exit = True
            thread.join(timeout=10)


def tiny_model(name: str, nbytes: int = 2000) -> ModelSpec:
    """A model of `nbytes` weight bytes (bf16), for memory budgets of a few models."""
    return ModelSpec(name=name, params_b=nbytes / 2e9, n_layers=1, hidden_size=8, n_kv_heads=1, head_dim=8)


@contextlib.contextmanager
def fake_cluster(*agents: FakeAgent, bundle: PolicyBundle | None = None,
                 models: Mapping[str, ModelSpec] | None = None, **config: Any) -> Iterator[GatewayServer]:
    """Fake agents and a gateway over them (tenant alice, key sk-alice, may use every model in `models`)."""
    models = dict(models or {MODEL: tiny_model(MODEL)})
    tenants = {"sk-alice": Tenant("alice", tuple(models))}
    with running(*agents):
        gw = Gateway(GatewayConfig(agents=[a.ref for a in agents], tenants=tenants, models=models,
                                   admin_token=ADMIN_TOKEN, **config), bundle)
        with serving(gw) as gs:
            yield gs


def on_loop(gw: Gateway, fn: Callable[[], T]) -> T:
    """Run `fn` on the gateway's event loop (the mirror is only changed there) and return its result."""
    assert gw.loop is not None

    async def call() -> T:
        return fn()

    return asyncio.run_coroutine_threadsafe(call(), gw.loop).result(timeout=10)


def wait_for(cond: Callable[[], object], timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.02)
    return bool(cond())


def ask(gs: GatewayServer, model: str = MODEL, stream: bool = False, timeout_s: float = 60) -> httpx.Response:
    """One completion request through the gateway (the whole answer)."""
    return httpx.post(gs.url + "/v1/completions", headers={"Authorization": "Bearer sk-alice"}, timeout=timeout_s,
                      json={"model": model, "prompt": "x", "stream": stream})
