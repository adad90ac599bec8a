"""`python -m live.serve [overrides]` (or `tierlab-serve`): a gateway and N node agents on loopback.

What it does, in order:

1. builds the catalog: generated Llama checkpoints (cached under `checkpoint_cache`), local HF dirs
   or Hugging Face repos, and publishes each to the "cloud" object store(s);
2. starts one node agent process per node (`python -m live.agent`, its own session, exits if this
   process dies), each with its dram (tmpfs) / nvme / sata tier directories;
3. runs the gateway in this process (uvicorn) with the policy bundle built from `conf/policy` exactly
   as the simulator builds it, prints the URL and an API key, and writes `serve.json` (URL, keys,
   admin token, pids; mode 0600) into the output directory;
4. on Ctrl-C (or SIGTERM): stops the gateway, writes records.parquet, tier_moves.parquet (the agents'
   movements), instances.parquet (instance lifecycle) and summary.json, stops the
   agents (each stops its engines), and checks that no engine or agent process is left.

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
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from core.errors import ConfigError
from core.specs import LOCAL_TIERS
from experiments.entry import hydra_command
from experiments.setup import build_policy
from live.agent import parse_bytes
from live.checkpoint import PRESETS, generate_checkpoint
from live.engines.base import REPO_ROOT, free_port
from live.gateway import AgentRef, Gateway, GatewayConfig, Tenant, create_app
from live.lifecycle import stop_process, wait_gone
from live.outputs import live_summary, moves_frame, one_line, write_outputs
from live.registry import Registry, check_model_name

log = logging.getLogger(__name__)
AGENT_START_TIMEOUT_S = 60.0


@dataclass
class AgentProcess:
    """A node agent started by `live.serve`."""

    node: str
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    tier_dirs: dict[str, Path]


@dataclass
class CatalogEntry:
    """A model of the live catalog and the checkpoint directory it is published from."""

    name: str
    path: Path


# --------------------------------------------------------------------------- catalog


def _generated_dir(cache: Path, preset: str, seed: int, dtype: str) -> Path:
    return cache / f"{preset}-s{seed}-{dtype}"


def build_catalog(catalog: Mapping[str, Any], cache_dir: str | os.PathLike[str],
                  progress: bool = True) -> list[CatalogEntry]:
    """Resolve every catalog entry to a local checkpoint dir, generating the missing ones (cached)."""
    if not catalog:
        raise ConfigError("catalog: at least one model is needed")
    cache = Path(cache_dir).expanduser()
    entries = []
    for name, spec in tqdm(list(catalog.items()), desc="catalog", unit="model", disable=not progress):
        where = f"catalog.{name}"
        try:
            check_model_name(str(name))
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
        spec = dict(spec or {})
        kinds = [k for k in ("preset", "local_dir", "hf_repo") if spec.get(k)]
        if len(kinds) != 1:
            raise ConfigError(f"{where}: give exactly one of preset, local_dir or hf_repo (got {kinds or 'none'})")
        if "preset" in spec:
            preset, seed, dtype = str(spec["preset"]), spec.get("seed", 0), str(spec.get("dtype", "bfloat16"))
            if preset not in PRESETS:
                raise ConfigError(f"{where}.preset: unknown {preset!r}; presets are {sorted(PRESETS)}")
            if not isinstance(seed, int) or seed < 0:
                raise ConfigError(f"{where}.seed: must be a non-negative integer, got {seed!r}")
            path = _generated_dir(cache, preset, seed, dtype)
            if not path.is_dir():
                generate_checkpoint(path, preset, seed, dtype=dtype)  # atomic: a killed run leaves no half dir
        elif "local_dir" in spec:
            path = Path(str(spec["local_dir"])).expanduser()
            if not (path / "config.json").is_file():
                raise ConfigError(f"{where}.local_dir: {path} has no config.json")
        else:
            registry = Registry([f"file://{cache / '_hf_probe'}"])
            registry.register(str(name), hf_repo=str(spec["hf_repo"]), hf_revision=str(spec.get("revision", "main")))
            path = registry.resolve(str(name))
        entries.append(CatalogEntry(str(name), path))
    return entries


def publish_catalog(entries: Sequence[CatalogEntry], stores: Sequence[str],
                    store_options: Mapping[str, Mapping[str, Any]], progress: bool = True) -> None:
    """Upload every checkpoint (and its sha256 manifest) to every store, primary first."""
    registry = Registry(list(stores), store_options={k: dict(v) for k, v in store_options.items()})
    for e in tqdm(entries, desc="publish", unit="model", disable=not progress):
        registry.publish(e.name, e.path)


# --------------------------------------------------------------------------- tenants


def build_tenants(tenants: Sequence[Mapping[str, Any]], models: Sequence[str]) -> dict[str, Tenant]:
    """API key -> Tenant; a null key is generated, models "*" means the whole catalog."""
    if not tenants:
        raise ConfigError("tenants: at least one tenant is needed")
    out: dict[str, Tenant] = {}
    for i, t in enumerate(tenants):
        where = f"tenants[{i}]"
        name = t.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}.name: a non-empty string is needed")
        allowed = t.get("models", "*")
        if allowed == "*":
            allowed = list(models)
        if not isinstance(allowed, list | tuple) or not allowed:
            raise ConfigError(f"{where}.models: '*' or a non-empty list of catalog names")
        unknown = sorted(set(allowed) - set(models))
        if unknown:
            raise ConfigError(f"{where}.models: {unknown} not in the catalog {sorted(models)}")
        key = t.get("key") or f"sk-{name}-{secrets.token_urlsafe(18)}"
        if key in out:
            raise ConfigError(f"{where}.key: used by another tenant")
        out[str(key)] = Tenant(name, tuple(allowed))
    return out


# --------------------------------------------------------------------------- agents


def _healthy(url: str, proc: subprocess.Popen[bytes], log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"agent at {url} exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(f"agent at {url} not healthy after {timeout_s:.0f} s; log {log_path}")


def start_agents(cfg: Mapping[str, Any], workdir: Path, dram_root: Path, stores: Sequence[str], token: str,
                 progressive: bool, log_dir: Path) -> list[AgentProcess]:
    """One `python -m live.agent` per node, each in its own session and watching this process."""
    n = cfg.get("nodes", 2)
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"nodes: a positive integer is needed, got {n!r}")
    tiers = dict(cfg.get("tiers") or {})
    unknown = sorted(set(tiers) - set(LOCAL_TIERS))
    if unknown or not tiers:
        raise ConfigError(f"tiers: {unknown or 'none given'}; local tiers are {list(LOCAL_TIERS)}")
    capacity = {}
    for name, size in tiers.items():
        try:
            capacity[name] = parse_bytes(str(size))
        except ValueError as e:
            raise ConfigError(f"tiers.{name}: {e}") from None
    engine = dict(cfg.get("engine") or {})
    host = str(cfg.get("host", "127.0.0.1"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p),
           "TIERLAB_AGENT_TOKEN": token, "PYTHONUNBUFFERED": "1"}
    log_dir.mkdir(parents=True, exist_ok=True)
    agents: list[AgentProcess] = []
    try:
        for i in tqdm(range(n), desc="agents", unit="node", disable=not cfg.get("progress", True)):
            node, port = f"n{i}", free_port(host)
            dirs = {t: (dram_root if t == "dram" else workdir) / node / t for t in tiers}
            argv = [sys.executable, "-m", "live.agent", "--node", node, "--host", host, "--port", str(port),
                    "--log-level", str(cfg.get("log_level", "warning")), "--exit-with-parent", str(os.getpid()),
                    "--threads", str(engine.get("threads", 1)), "--dtype", str(engine.get("dtype", "float32")),
                    "--engine", str(engine.get("kind", "cpu")),
                    "--store-options", json.dumps(dict(cfg.get("store_options") or {}))]
            argv += [f"--tier={t}={d}:{capacity[t]}" for t, d in dirs.items()]
            argv += [f"--store={s}" for s in stores]
            if progressive:
                argv.append("--progressive")
            log_path = log_dir / f"agent-{node}.log"
            with open(log_path, "wb") as f:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, env=env,
                                        cwd=REPO_ROOT, start_new_session=True)  # Ctrl-C reaches serve, not agents
            agents.append(AgentProcess(node, f"http://{host}:{port}", proc, log_path, dirs))
        for a in agents:
            _healthy(a.url, a.proc, a.log_path, AGENT_START_TIMEOUT_S)
    except BaseException:
        stop_agents(agents, token)
        raise
    return agents


def _engine_pids(agent: AgentProcess, token: str) -> list[int]:
    with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
        r = httpx.get(agent.url + "/status", headers={"Authorization": f"Bearer {token}"}, timeout=5)
        return [int(i["pid"]) for i in r.json().get("instances", []) if i.get("pid")]
    return []


def agent_moves(agents: Sequence[AgentProcess], token: str) -> list[dict[str, Any]]:
    """Every tier movement the running agents made (GET /moves), unix times."""
    out: list[dict[str, Any]] = []
    for a in agents:
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            r = httpx.get(a.url + "/moves", headers={"Authorization": f"Bearer {token}"}, timeout=10)
            out += r.json()["moves"]
    return out


def stop_agents(agents: Sequence[AgentProcess], token: str, grace_s: float = 20.0) -> list[int]:
    """SIGTERM each agent (it stops its engines), then make sure no engine is left; the pids still running."""
    engine_pids = [p for a in agents if a.proc.poll() is None for p in _engine_pids(a, token)]
    for a in agents:
        if a.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                a.proc.send_signal(signal.SIGTERM)
    for a in agents:
        stop_process(a.proc, grace_s)
    return wait_gone(engine_pids, timeout_s=10.0)


# --------------------------------------------------------------------------- gateway


def gateway_config(cfg: Mapping[str, Any], agents: Sequence[AgentRef], tenants: dict[str, Tenant],
                   admin_token: str) -> GatewayConfig:
    """GatewayConfig from the `gateway` block; unknown keys are errors naming the key."""
    extra = dict(cfg.get("gateway") or {})
    known = {f.name for f in dataclasses.fields(GatewayConfig)}
    bad = sorted(set(extra) - known)
    if bad:
        raise ConfigError(f"gateway: unknown key(s) {bad}; known: {sorted(known - {'agents', 'tenants', 'models'})}")
    try:
        return GatewayConfig(agents=list(agents), tenants=tenants, admin_token=admin_token, **extra)
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


async def _serve_gateway(gateway: Gateway, sock: socket.socket, log_level: str, on_ready: Any) -> None:
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(create_app(gateway), log_level=log_level, lifespan="on",
                                           timeout_graceful_shutdown=5))
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
    own_workdir = not cfg.get("workdir")
    workdir = (out_dir / "work") if own_workdir else Path(str(cfg["workdir"])).expanduser()
    shm = Path("/dev/shm")
    dram_root = Path(tempfile.mkdtemp(prefix="tierlab-live-", dir=shm if shm.is_dir() else None))
    stores = list(cfg.get("stores") or [f"file://{workdir / 'cloud'}"])
    entries = build_catalog(cfg.get("catalog") or {}, str(cfg.get("checkpoint_cache", "~/.cache/tierlab")), progress)
    publish_catalog(entries, stores, cfg.get("store_options") or {}, progress)
    models = [e.name for e in entries]
    tenants = build_tenants(cfg.get("tenants") or [], models)
    admin_token = str(cfg.get("admin_token") or secrets.token_urlsafe(24))
    agent_token = secrets.token_urlsafe(24)
    progressive = cfg.get("engine", {}).get("progressive")
    progressive = bool(bundle.progressive if progressive is None else progressive)
    host = str(cfg.get("host", "127.0.0.1"))
    sock = _listen_socket(host, int(cfg.get("port", 8080)))
    url = f"http://{host}:{sock.getsockname()[1]}"
    agents: list[AgentProcess] = []
    moves: list[dict[str, Any]] = []
    gateway: Gateway | None = None
    t0 = time.monotonic()
    try:
        agents = start_agents(cfg, workdir, dram_root, stores, agent_token, progressive, out_dir / "logs")
        refs = [AgentRef(a.node, a.url, agent_token) for a in agents]
        gateway = Gateway(gateway_config(cfg, refs, tenants, admin_token), bundle)

        def ready() -> None:
            _write_private(out_dir / "serve.json", {
                "url": url, "openai_base_url": url + "/v1", "pid": os.getpid(), "policy": bundle.name,
                "admin_token": admin_token, "models": models, "dram_root": str(dram_root),
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
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve_gateway(gateway, sock, str(cfg.get("log_level", "warning")), ready))
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
    summary = live_summary(records, wall_s=time.monotonic() - t0, ttft_slo_s=float(cfg.get("ttft_slo_s", 10.0)),
                           extra={"policy": bundle.name, "nodes": len(agents), "models": len(models),
                                  "tier_moves": len(moves)})
    write_outputs(out_dir, records, summary, moves_frame(moves, gateway.clock.t0_unix), gateway.instance_events())
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
