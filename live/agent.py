"""The node agent: one process per node that moves checkpoints between tiers and runs engine processes.

Its HTTP API and entry point; the state and operations are `live.agent_node.NodeAgent`, the
configuration and command line `live.agent_config` (both re-exported here).

An ASGI app (starlette) served by uvicorn, on 127.0.0.1 by default (`--host`/`--bind-host`; its engines
listen on the same address, and the URLs it reports name `--advertise-host`, the address others reach the
node at). Every endpoint but /healthz needs `Authorization: Bearer <token>`. Tiers are real dirs
(`<tier_dir>/<model>/`); the "cloud" is the model registry (`live.registry.Registry`, stores in priority
order); "host" is host memory outside the tiers (`--host-dir`), where a cold start from the cloud lands.

    GET  /healthz                          {"ok": true, "node", "boot_id"}
    GET  /status                           {"node", "url", "boot_id",
                                            "tiers": {name: {path, capacity_bytes, used_bytes, models,
                                                             read_Bps, write_Bps, latency_s}},
                                            "host": {path, used_bytes, copies},
                                            "cloud": {stream_Bps, streams, latency_s, nic_Bps},
                                            "accelerator": {memory_bytes}, "engine": {kind, max_num_seqs},
                                            "instances": [...], "errors": [...],
                                            "transfers": [{model, from_tier, to_tier, since_unix}] (in flight)}
    GET  /moves                            {"node", "moves": [every tier movement, MOVE_SCHEMA columns, unix times]}
    GET  /metrics                          Prometheus text (`live.agent_metrics`): tier occupancy, bandwidth in
                                           use, instances, moves, loads and their phases
    POST /tiers/copy  {model, to_tier}     a movement record {model, node, from_tier, to_tier, kind, bytes, ...}
    POST /tiers/evict {model, tier}        {model, tier, freed_bytes}
    POST /load        {model, source_tier?} {instance: {...}, timings: {source_tier, engine_tier, fetch_s,
                                                                         engine_start_s, ready_s}}
    POST /unload      {instance}           {instance, stopped: true}

/load, as the simulator's cold start (`core.loadtime.load_hops`, `sim.world`):
- `source_tier: "cloud"`, or no `source_tier` while no local tier holds the model: the checkpoint is
  fetched from the registry into a dir of its own in host memory (paced by the cloud streams and the
  NIC only), and the engine reads it there unpaced. No tier changes. Timings: source_tier "cloud",
  engine_tier "host", one fetch_s hop cloud -> host. The host copy lives as long as the instance: a
  /tiers/copy of the model meanwhile, while no tier holds it, is taken from it (`from_tier: "host"`,
  paced at the destination's write only), as the simulator's copies right after a load are.
- `source_tier: <tier>`: the engine reads that tier (paced at its read bandwidth; DRAM unpaced), after
  a copy into it (a fetch_s hop) if it does not hold the model.
- no `source_tier` while a tier holds the model: the fastest tier holding it.

Errors are `{"error": {"message", "type", "code"}}` with 400 (bad JSON, missing field, unsafe name),
401, 404 (unknown model / instance / tier content), 409, 502 (fetch or checksum), 503 (shutting down:
a transfer in flight is cancelled and leaves nothing), 507 (tier full).

    python -m live.agent --node n0 --port 8700 --token T --tier dram=/dev/shm/t:2G --tier sata=/data/t:100G \\
        --store file:///models --tier-bw sata=500e6:400e6:1e-4 --cloud-streams 16 --cloud-stream-Bps 93e6

An agent on another host joins a gateway on its own (`GatewayLink`):

    python -m live.agent --node n7 --bind-host 0.0.0.0 --advertise-host 10.0.0.7 --port 8700 \\
        --tls-cert agent.pem --tls-key agent.key --gateway https://gw:8080 --gateway-ca ca.pem --token T ...

joins (POST /agents/join {node, url, boot_id}) once it listens, re-joins every `--join-interval-s` (the
heartbeat) and leaves (POST /agents/leave) on SIGTERM; see `live.gateway_agents` for the gateway's side and
docs/deployment.md for systemd units.

Emulated tiers (`live.pacing`): on one machine the tiers share a disk, so each may be given the read
and write bandwidth (bytes/s) and read latency of the device it stands for. Every byte movement
honours them as the simulator's hops do: a tier-to-tier copy runs at min(source read, destination
write), sharing each link with concurrent flows; a cloud fetch runs `--cloud-streams` streams of
`--cloud-stream-Bps` after `--cloud-latency-s`, through the node's `--nic-Bps` (shared by its
fetches) and, into a tier, at that tier's write bandwidth; an engine reading a disk tier (nvme, sata)
is paced at its read bandwidth (through $TIERLAB_READ_PACE), sharing it with copies from that tier.
DRAM and the host dir are host memory: as in `core.loadtime` an engine's read of them is not a fetch
hop and is not paced (copies out of the DRAM tier are).
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from live import tracing as trace

# re-exported: experiments.serve_nodes, the gateway's tests and the agent's tests import them from here
from live.agent_config import (
    DEFAULT_PORT,
    TIER_ORDER,
    AgentConfig,
    EngineSettings,
    config_from_args,
    default_dram_dir,
    default_host_dir,
)
from live.agent_metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from live.agent_metrics import AgentMetrics
from live.agent_node import CLOUD, HOST, HOST_MEMORY_TIER, AgentError, Instance, NodeAgent
from live.agent_tiers import TierConfig, parse_bytes, parse_tier, parse_tier_bw
from live.lifecycle import exit_with_parent

__all__ = [
    "CLOUD", "DEFAULT_PORT", "HOST", "HOST_MEMORY_TIER", "TIER_ORDER", "AgentConfig", "AgentError", "EngineSettings",
    "GatewayLink", "Instance", "NodeAgent", "TierConfig", "config_from_args", "create_app", "default_dram_dir",
    "default_host_dir", "main", "parse_bytes", "parse_tier", "parse_tier_bw", "serve",
]

log = logging.getLogger(__name__)


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


def create_app(agent: NodeAgent, tracing: trace.Tracing | None = None) -> Starlette:
    """The ASGI app over `agent`; its lifespan end stops every engine. Traces go to `tracing` (default: as
    `agent.config.tracing` says); `app.state.metrics` and `app.state.tracing` are the agent's."""
    token = agent.config.token
    tracing = tracing if tracing is not None else trace.Tracing(agent.config.tracing, "tierlab-agent")
    metrics = AgentMetrics(agent)

    def guarded(fn: Callable[[Request], Awaitable[Any]]) -> Handler:
        async def endpoint(request: Request) -> JSONResponse:
            if not _authorized(request, token):
                return _error(AgentError(401, "missing or wrong bearer token", "invalid_token"))
            with tracing.server(f"{request.method} {request.url.path}", request.headers):  # the caller's trace
                try:
                    return JSONResponse(await fn(request))
                except AgentError as e:
                    return _error(e)
        return endpoint

    def op(method: Callable[..., dict[str, Any]], required: Sequence[str], optional: Sequence[str] = (),
           done: Callable[[dict[str, Any]], None] | None = None) -> Handler:
        async def call(request: Request) -> dict[str, Any]:
            body = await _json_body(request, required)
            kwargs = {k: body[k] for k in (*required, *optional) if k in body}
            # copies and engine starts take seconds: a worker thread keeps /healthz and /status answering
            out = await run_in_threadpool(method, **kwargs)
            if done is not None:
                done(out)
            return out
        return guarded(call)

    def load_done(out: dict[str, Any]) -> None:
        metrics.load_done(out)
        trace.load_phases(out)  # spans of the load's phases under this request's span (when traced)

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True, "node": agent.config.node, "boot_id": agent.boot_id})

    async def status(request: Request) -> dict[str, Any]:
        return await run_in_threadpool(agent.status)

    async def metrics_text(request: Request) -> Response:
        if not _authorized(request, token):
            return _error(AgentError(401, "missing or wrong bearer token", "invalid_token"))
        return Response(await run_in_threadpool(metrics.exposition), media_type=METRICS_CONTENT_TYPE)

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
            tracing.shutdown()

    routes = [
        Route("/healthz", healthz),
        Route("/status", guarded(status)),
        Route("/metrics", metrics_text),
        Route("/moves", guarded(moves)),
        Route("/tiers/copy", op(agent.copy, ("model", "to_tier")), methods=["POST"]),
        Route("/tiers/evict", op(agent.evict, ("model", "tier")), methods=["POST"]),
        Route("/load", op(agent.load, ("model",), ("source_tier",), done=load_done), methods=["POST"]),
        Route("/unload", op(agent.unload, ("instance",)), methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})
    app.state.metrics, app.state.tracing = metrics, tracing
    return app


class GatewayLink:
    """The agent's membership of a gateway it joins on its own (`--gateway`): POST /agents/join once it listens
    and every `join_interval_s` after (the heartbeat: a gateway that restarted, or marked the node down, learns
    of it again), POST /agents/leave on the way out, so the gateway stops routing to it at once.

    Both carry the agent's bearer token, which the gateway checks against the token it drives that node with;
    over any network but loopback give the gateway a certificate (`--gateway https://...`, `--gateway-ca`).
    The gateway, for its part, health-checks the agent (`live.gateway_agents`), so an agent killed without a
    leave is marked gone after its health checks time out."""

    def __init__(self, config: AgentConfig, boot_id: str) -> None:
        self.config = config
        self.boot_id = boot_id
        verify: ssl.SSLContext | bool = (ssl.create_default_context(cafile=str(config.gateway_ca))
                                         if config.gateway_ca else True)
        # trust_env=False: the gateway is reached directly, never through a proxy from the environment
        self._http = httpx.Client(base_url=config.gateway, verify=verify, trust_env=False, timeout=10.0,
                                  headers={"Authorization": f"Bearer {config.token}"})
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.joined = False

    def _body(self) -> dict[str, Any]:
        return {"node": self.config.node, "url": self.config.url, "boot_id": self.boot_id}

    def join_once(self) -> bool:
        """One join (or heartbeat); True if the gateway accepted it. Failures are logged, never raised: the next
        heartbeat tries again."""
        try:
            r = self._http.post("/agents/join", json=self._body())
        except httpx.HTTPError as e:
            log.warning("join of gateway %s failed: %r", self.config.gateway, e)
            return False
        if r.status_code != 200:
            log.error("gateway %s refused the join of %s: %d %s", self.config.gateway, self.config.node,
                      r.status_code, r.text[:300])
            return False
        if not self.joined:
            log.info("joined gateway %s as %s at %s: %s", self.config.gateway, self.config.node, self.config.url,
                     r.text[:200])
        self.joined = True
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            self.join_once()
            self._stop.wait(self.config.join_interval_s)

    def start(self) -> None:
        """Join now and keep the heartbeat going in a daemon thread."""
        self._thread = threading.Thread(target=self._run, name="gateway-link", daemon=True)
        self._thread.start()

    def halt(self) -> None:
        """Stop the heartbeat (no more joins); does not wait."""
        self._stop.set()

    def close(self, leave: bool = True) -> None:
        """Stop the heartbeat and, if it joined, tell the gateway the node leaves (best effort, a few seconds).
        Once: a second call does nothing."""
        if self._http.is_closed:
            return
        self.halt()
        if self._thread is not None:
            self._thread.join(timeout=12.0)  # a join in flight ends within the client's 10 s timeout
        if leave and self.joined:
            try:
                self._http.post("/agents/leave", json=self._body(), timeout=3.0)
            except httpx.HTTPError as e:  # the gateway's health checks will notice instead
                log.warning("leave of gateway %s failed: %r", self.config.gateway, e)
        self._http.close()


def serve(config: AgentConfig, log_level: str = "info") -> None:
    """Run the agent until SIGINT / SIGTERM; engines are stopped on the way out (lifespan end, then atexit-safe).

    With `config.parent_pid`, the agent also stops its engines and exits when that process dies
    (its launcher, e.g. `experiments.serve`, killed without a chance to stop it).
    """
    import uvicorn

    class AgentServer(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if link is not None and self.started and not self.should_exit:
                link.start()  # it listens now: the gateway can read its /status when the join arrives

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            await super().shutdown(sockets)  # the lifespan's end has stopped the engines
            if link is not None:
                # here, not in serve()'s `finally`: uvicorn re-raises the SIGTERM it caught once it returns, and
                # that ends the process before any `finally` runs
                await run_in_threadpool(link.close)

        def handle_exit(self, sig: int, frame: Any) -> None:
            if link is not None:
                link.halt()  # no heartbeat may re-join a node on its way out
            # before uvicorn waits for requests in flight: a paced copy would otherwise hold it for its
            # whole duration; cancelled, it cleans its staging dir and its request ends at once
            agent.begin_shutdown()
            super().handle_exit(sig, frame)

    agent = NodeAgent(config)
    link = GatewayLink(config, agent.boot_id) if config.gateway else None
    if config.parent_pid:
        exit_with_parent(config.parent_pid, on_exit=agent.shutdown)
    try:
        tls = {"ssl_certfile": str(config.tls_cert), "ssl_keyfile": str(config.tls_key)} if config.tls_cert else {}
        AgentServer(uvicorn.Config(create_app(agent), host=config.host, port=config.port, log_level=log_level,
                                   lifespan="on", timeout_graceful_shutdown=10, **tls)).run()
    finally:
        agent.shutdown()  # also when uvicorn failed before the lifespan ran (port taken, ...)
        if link is not None:
            link.close()  # after the engines stopped: the gateway hears the node left


def main(argv: Sequence[str] | None = None) -> int:
    config, log_level = config_from_args(argv)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log.info("agent %s on %s:%d (reached at %s), tiers %s", config.node, config.host, config.port, config.url,
             {n: asdict(t) | {"path": str(t.path)} for n, t in config.tiers.items()})
    serve(config, log_level)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
