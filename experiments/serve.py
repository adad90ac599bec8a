"""`python -m experiments.serve [overrides]` (or `tierlab-serve`): a gateway and N node agents on loopback.

What it does, in order:

1. checks the config: the policy bundle (built by `core.config` exactly as the simulator builds it), the
   emulated node (`tiers` with their capacities and read / write bandwidths and latencies, the `cloud` fetch
   pace, the `node` memory budget and batch limit: `node_options`);
2. builds the catalog: generated Llama checkpoints (cached under `checkpoint_cache`), local HF dirs
   or Hugging Face repos, one `core.specs.ModelSpec` per checkpoint from its config.json (weights sized in
   the engine's dtype), and publishes each to the "cloud" object store(s);
3. starts one node agent process per node (`python -m live.agent`, its own session, exits if this
   process dies), each with its dram (tmpfs) / nvme / sata tier directories and the paces it must honour
   (`agent_argv`);
4. runs the gateway in this process (uvicorn) with that bundle and those model specs (the agents report
   their node description on /status), prints the URL and an API key, and writes `serve.json` (URL, keys,
   admin and agent tokens, pids; mode 0600) into the output directory;
5. on Ctrl-C (or SIGTERM): stops the gateway, writes records.parquet, tier_moves.parquet (the agents'
   movements), instances.parquet (instance lifecycle) and summary.json (the simulator's keys, cold starts by
   source tier in `cold_start_by_tier`), stops the agents (each stops its engines), and checks that no engine
   or agent process is left.

Config: `conf/live/serve.yaml` (hydra; any key can be overridden, e.g. `policy=sllm nodes=3 port=0`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from core.config import build_policy
from core.errors import ConfigError
from core.specs import ModelSpec
from experiments.entry import hydra_command
from experiments.serve_catalog import (  # noqa: F401  (re-exported: tests and scripts import them from here)
    CatalogEntry,
    build_catalog,
    build_tenants,
    catalog_model_details,
    catalog_model_specs,
    engine_dtype_bytes,
    publish_catalog,
)
from experiments.serve_nodes import (  # noqa: F401
    AgentProcess,
    NodeOptions,
    agent_argv,
    agent_moves,
    check_memory_budget,
    node_options,
    start_agents,
    stop_agents,
)
from live.gateway import AgentRef, Gateway, GatewayConfig, Tenant, create_app
from live.lifecycle import pid_alive
from live.outputs import action_counts, live_summary, moves_frame, one_line, write_outputs

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- gateway


def gateway_config(cfg: Mapping[str, Any], agents: Sequence[AgentRef], tenants: dict[str, Tenant],
                   admin_token: str, models: Mapping[str, ModelSpec] | None = None,
                   model_details: Mapping[str, dict[str, Any]] | None = None,
                   audit_log: str | Path | None = None) -> GatewayConfig:
    """GatewayConfig from the `gateway` block; unknown keys are errors naming the key.

    Keys beyond the tenants and the admin token (`principals`, `keys_file`) and the audit log's path (`audit_log`)
    come from the block too; `audit_log` here is the default (the run's `audit.jsonl`), which the block's own
    `audit_log` (null: none) overrides.

    `models` (the catalog's real specs, `catalog_model_specs`) replace the gateway's nominal stand-ins;
    `model_details` (`catalog_model_details`: the chat template in use) go into its /v1/models items. The
    node description (tier paces, store, memory budget, batch limit) the gateway reads from the agents' /status,
    which report what `agent_argv` told them.
    """
    extra = dict(cfg.get("gateway") or {})
    known = {f.name for f in dataclasses.fields(GatewayConfig)}
    reserved = {"agents", "tenants", "models", "model_details", "admin_token"}
    bad = sorted(set(extra) - (known - reserved))
    if bad:
        raise ConfigError(f"gateway: unknown key(s) {bad}; known: {sorted(known - reserved)}")
    derived: dict[str, Any] = {} if models is None else {"models": dict(models)}
    if model_details is not None:
        derived["model_details"] = dict(model_details)
    if audit_log is not None and "audit_log" not in extra:
        derived["audit_log"] = str(audit_log)
    if cfg.get("tracing") is not None and "tracing" not in extra:  # the top-level block, shared with the agents
        derived["tracing"] = dict(cfg["tracing"])
    try:
        return GatewayConfig(agents=list(agents), tenants=tenants, admin_token=admin_token, **derived, **extra)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"gateway: {e}") from None


def _listen_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"port: cannot listen on {host}:{port} ({e.strerror}); port=0 takes any free one") from None
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock


def _event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where installed (what uvicorn's own `run` picks with loop="auto"), else asyncio's default loop."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


DRAM_PREFIX = "tierlab-live-"  # each run's dram tier: a fresh dir on tmpfs
DRAM_OWNER_FILE = ".owner-pid"  # the run's pid: a dir whose owner is gone was left by a killed run


def sweep_dead_dram_roots(parent: Path) -> list[str]:
    """Remove the dram tiers under `parent` left by runs that were killed (their `finally` never ran, and tmpfs
    is memory); the names removed. A dir without an owner file, or whose owner lives, is left alone."""
    removed = []
    for d in sorted(parent.glob(f"{DRAM_PREFIX}*")):
        try:
            owner = int((d / DRAM_OWNER_FILE).read_text().strip())
        except (OSError, ValueError):
            continue
        if not pid_alive(owner):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d.name)
    return removed


def _tls_files(cfg: Mapping[str, Any]) -> dict[str, str]:
    """uvicorn's ssl arguments from the `tls` block (`cert`, `key`: PEM files), {} without one; ConfigError
    naming the field otherwise."""
    tls = dict(cfg.get("tls") or {})
    unknown = sorted(set(tls) - {"cert", "key"})
    if unknown:
        raise ConfigError(f"tls: unknown key(s) {unknown}; known: ['cert', 'key']")
    cert, key = tls.get("cert"), tls.get("key")
    if (cert is None) != (key is None):
        raise ConfigError("tls: cert and key go together (PEM files), or neither")
    for name, path in (("cert", cert), ("key", key)):
        if path is not None and not os.path.isfile(str(path)):
            raise ConfigError(f"tls.{name}: no such file {str(path)!r}")
    return {"ssl_certfile": str(cert), "ssl_keyfile": str(key)} if cert else {}


async def _serve_gateway(gateway: Gateway, sock: socket.socket, log_level: str, on_ready: Any,
                         tls: Mapping[str, str] | None = None) -> None:
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(create_app(gateway), log_level=log_level, lifespan="on",
                                           timeout_graceful_shutdown=5, **dict(tls or {})))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.02)
    if server.started:
        on_ready()
    await task


def _write_private(path: Path, data: dict[str, Any]) -> None:
    """JSON readable by the owner only (it holds API keys)."""
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    tmp.replace(path)


def run(cfg: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Start everything, serve until SIGINT/SIGTERM, stop everything; the run's summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    progress = bool(cfg.get("progress", True))
    bundle = build_policy(cfg["policy"])
    node = node_options(cfg)  # checked before anything is generated or started
    dtype_bytes = engine_dtype_bytes(cfg)
    own_workdir = not cfg.get("workdir")
    workdir = (out_dir / "work") if own_workdir else Path(str(cfg["workdir"])).expanduser()
    stores = list(cfg.get("stores") or [f"file://{workdir / 'cloud'}"])
    entries = build_catalog(cfg.get("catalog") or {}, str(cfg.get("checkpoint_cache", "~/.cache/tierlab")), progress)
    specs = catalog_model_specs(entries, dtype_bytes)
    check_memory_budget(node, specs)
    models = [e.name for e in entries]
    tenants = build_tenants(cfg.get("tenants") or [], models)
    publish_catalog(entries, stores, cfg.get("store_options") or {}, progress)  # once the config is known good
    admin_token = str(cfg.get("admin_token") or secrets.token_urlsafe(24))
    # a fixed token (the agents' own default) lets agents on other hosts join (live.agent --gateway); else a new one
    agent_token = os.environ.get("TIERLAB_AGENT_TOKEN") or secrets.token_urlsafe(24)
    progressive = cfg.get("engine", {}).get("progressive")
    progressive = bool(bundle.progressive if progressive is None else progressive)
    host = str(cfg.get("host", "127.0.0.1"))
    tls = _tls_files(cfg)
    sock = _listen_socket(host, int(cfg.get("port", 8080)))
    url = f"{'https' if tls else 'http'}://{host}:{sock.getsockname()[1]}"
    shm = Path("/dev/shm")  # dram on tmpfs; created last, so that a config error leaves no memory behind
    dram_parent = shm if shm.is_dir() else Path(tempfile.gettempdir())
    swept = sweep_dead_dram_roots(dram_parent)
    if swept:
        log.warning("removed dram tiers of runs that were killed: %s", swept)
    dram_root = Path(tempfile.mkdtemp(prefix=DRAM_PREFIX, dir=dram_parent))
    (dram_root / DRAM_OWNER_FILE).write_text(f"{os.getpid()}\n")
    agents: list[AgentProcess] = []
    moves: list[dict[str, Any]] = []
    gateway: Gateway | None = None
    t0 = time.monotonic()
    try:
        agents = start_agents(cfg, workdir, dram_root, stores, agent_token, progressive, out_dir / "logs", node)
        refs = [AgentRef(a.node, a.url, agent_token) for a in agents]
        gateway = Gateway(gateway_config(cfg, refs, tenants, admin_token, specs, catalog_model_details(entries),
                                         out_dir / "audit.jsonl"), bundle)

        def ready() -> None:
            _write_private(out_dir / "serve.json", {
                "url": url, "openai_base_url": url + "/v1", "pid": os.getpid(), "policy": bundle.name,
                "admin_token": admin_token, "agent_token": agent_token, "models": models,
                "dram_root": str(dram_root),
                "tenants": {t.name: {"api_key": k, "models": list(t.models)} for k, t in tenants.items()},
                "agents": [{"node": a.node, "url": a.url, "pid": a.proc.pid} for a in agents]})
            key, tenant = next(iter(tenants.items()))
            print(f"tierlab live: {url}/v1  policy {bundle.name}, {len(agents)} nodes, models {', '.join(models)}")
            print(f"  api key ({tenant.name}): {key}")
            print(f"  try: curl {url}/v1/chat/completions -H 'Authorization: Bearer {key}' "
                  f"-H 'Content-Type: application/json' -d '{{\"model\": \"{models[0]}\", "
                  f"\"messages\": [{{\"role\": \"user\", \"content\": \"hello\"}}], \"max_tokens\": 16}}'")
            print(f"  Ctrl-C stops everything; records, logs and serve.json in {out_dir}", flush=True)

        t0 = time.monotonic()
        with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
            runner.run(_serve_gateway(gateway, sock, str(cfg.get("log_level", "warning")), ready, tls))
    finally:
        # a second Ctrl-C must not cut the clean-up short: that is what leaves orphans behind
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            sock.close()
            print("stopping agents and engines ...", flush=True)
            moves = agent_moves(agents, agent_token)
            left = stop_agents(agents, agent_token)
            if left:
                print(f"tierlab live: warning: engine pids {left} survived the stop", file=sys.stderr)
            shutil.rmtree(dram_root, ignore_errors=True)  # tmpfs is memory
            if own_workdir and not cfg.get("keep_workdir", False):
                shutil.rmtree(workdir, ignore_errors=True)
        finally:
            signal.signal(signal.SIGINT, previous)
    records = gateway.records() if gateway is not None else None
    if records is None:
        return {}
    actions = gateway.actions()
    summary = live_summary(records, wall_s=time.monotonic() - t0, ttft_slo_s=float(cfg.get("ttft_slo_s", 10.0)),
                           extra={"policy": bundle.name, "nodes": len(agents), "models": len(models),
                                  "tier_moves": len(moves), "actions": action_counts(actions)})
    write_outputs(out_dir, records, summary, moves_frame(moves, gateway.clock.t0_unix), gateway.instance_events(),
                  actions)
    return summary


def _command(cfg: dict[str, Any], out_dir: Path) -> str | None:
    # hydra configured the root logger at INFO; the gateway's own HTTP client would log every health check
    logging.getLogger().setLevel(str(cfg.get("log_level", "warning")).upper())
    summary = run(cfg, out_dir)
    return one_line(summary, "served") if summary else None


def main() -> None:
    """Console-script entry point (`tierlab-serve`)."""
    hydra_command("live/serve", _command, prog="tierlab live")


if __name__ == "__main__":
    main()
