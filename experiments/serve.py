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
   admin token, pids; mode 0600) into the output directory;
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
import math
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

from core.config import build_policy
from core.errors import ConfigError
from core.specs import LOCAL_TIERS, ModelSpec
from experiments.entry import hydra_command
from live.agent import parse_bytes
from live.checkpoint import PRESETS, generate_checkpoint
from live.engines.base import REPO_ROOT, free_port
from live.gateway import AgentRef, Gateway, GatewayConfig, Tenant, create_app
from live.lifecycle import stop_process, wait_gone
from live.llama_config import LlamaConfig, model_spec
from live.outputs import live_summary, moves_frame, one_line, write_outputs
from live.registry import Registry, check_model_name

log = logging.getLogger(__name__)
AGENT_START_TIMEOUT_S = 60.0


@dataclass
class AgentProcess:
    """A node agent started by `experiments.serve`."""

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


# --------------------------------------------------------------------------- node description

MB = 1e6  # config bandwidths are in MB/s (decimal, as the reference file's), latencies in ms
ENGINE_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_TIER_KEYS = ("capacity", "read_MBps", "write_MBps", "latency_ms")
_CLOUD_KEYS = ("streams", "stream_MBps", "latency_ms")
_NODE_KEYS = ("memory_budget", "max_num_seqs")


@dataclass(frozen=True)
class TierOptions:
    """One emulated local tier of every node: capacity and the pace its agent honours (inf: unpaced)."""

    capacity_bytes: int
    read_Bps: float = math.inf
    write_Bps: float = math.inf
    latency_s: float = 0.0

    @property
    def paced(self) -> bool:
        return math.isfinite(self.read_Bps) or math.isfinite(self.write_Bps) or self.latency_s > 0


@dataclass(frozen=True)
class CloudOptions:
    """How an agent fetches from the object store: parallel ranged reads, each paced (inf: unpaced)."""

    streams: int = 16
    stream_Bps: float = math.inf
    latency_s: float = 0.0


@dataclass(frozen=True)
class NodeOptions:
    """What every node agent is told about its emulated hardware (the `tiers`, `cloud` and `node` blocks)."""

    tiers: dict[str, TierOptions]
    cloud: CloudOptions | None = None  # None: the agent's defaults (no `cloud` block)
    memory_budget_bytes: int | None = None  # None: unbounded
    max_num_seqs: int | None = None  # None: the engine's default


def _size(value: Any, where: str) -> int:
    if isinstance(value, bool) or value is None:
        raise ConfigError(f"{where}: a size in bytes (K/M/G suffixes) is needed, got {value!r}")
    try:
        n = parse_bytes(str(value))
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    if n <= 0:
        raise ConfigError(f"{where}: must be > 0 bytes, got {value!r}")
    return n


def _rate_Bps(value: Any, where: str) -> float:
    """MB/s -> bytes/s; null (or .inf) -> inf, i.e. unpaced."""
    if value is None:
        return math.inf
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value) or value <= 0:
        raise ConfigError(f"{where}: a bandwidth in MB/s > 0 (or null: unpaced) is needed, got {value!r}")
    return float(value) * MB


def _latency_s(value: Any, where: str) -> float:
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{where}: a latency in ms >= 0 is needed, got {value!r}")
    return float(value) / 1e3


def _block(cfg: Mapping[str, Any], key: str, known: Sequence[str]) -> dict[str, Any]:
    block = cfg.get(key)
    if block is None:
        return {}
    if not isinstance(block, Mapping):
        raise ConfigError(f"{key}: a mapping with keys {list(known)} is needed, got {block!r}")
    unknown = sorted(set(block) - set(known))
    if unknown:
        raise ConfigError(f"{key}: unknown key(s) {unknown}; known: {list(known)}")
    return dict(block)


def _positive_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: a positive integer is needed, got {value!r}")
    return value


def node_options(cfg: Mapping[str, Any]) -> NodeOptions:
    """Validate the `tiers`, `cloud` and `node` blocks (errors name the field).

    A tier is a size (`dram: 256M`, unpaced) or `{capacity, read_MBps, write_MBps, latency_ms}` (null MB/s:
    unpaced).
    """
    tiers_cfg = cfg.get("tiers") or {}
    if not isinstance(tiers_cfg, Mapping):
        raise ConfigError(f"tiers: a mapping of local tiers is needed, got {tiers_cfg!r}")
    unknown = sorted(set(tiers_cfg) - set(LOCAL_TIERS))
    if unknown or not tiers_cfg:
        raise ConfigError(f"tiers: {unknown or 'none given'}; local tiers are {list(LOCAL_TIERS)}")
    tiers: dict[str, TierOptions] = {}
    for name, spec in tiers_cfg.items():
        where = f"tiers.{name}"
        if not isinstance(spec, Mapping):  # the short form: a capacity, unpaced
            tiers[name] = TierOptions(_size(spec, where))
            continue
        bad = sorted(set(spec) - set(_TIER_KEYS))
        if bad:
            raise ConfigError(f"{where}: unknown key(s) {bad}; known: {list(_TIER_KEYS)}")
        if "capacity" not in spec:
            raise ConfigError(f"{where}.capacity: required")
        tiers[name] = TierOptions(_size(spec["capacity"], f"{where}.capacity"),
                                  _rate_Bps(spec.get("read_MBps"), f"{where}.read_MBps"),
                                  _rate_Bps(spec.get("write_MBps"), f"{where}.write_MBps"),
                                  _latency_s(spec.get("latency_ms"), f"{where}.latency_ms"))
    cloud_cfg = _block(cfg, "cloud", _CLOUD_KEYS)
    cloud = None
    if cloud_cfg:
        cloud = CloudOptions(_positive_int(cloud_cfg.get("streams", 16), "cloud.streams"),
                             _rate_Bps(cloud_cfg.get("stream_MBps"), "cloud.stream_MBps"),
                             _latency_s(cloud_cfg.get("latency_ms"), "cloud.latency_ms"))
    node_cfg = _block(cfg, "node", _NODE_KEYS)
    budget = node_cfg.get("memory_budget")
    seqs = node_cfg.get("max_num_seqs")
    return NodeOptions(tiers, cloud,
                       None if budget is None else _size(budget, "node.memory_budget"),
                       None if seqs is None else _positive_int(seqs, "node.max_num_seqs"))


def engine_dtype_bytes(cfg: Mapping[str, Any]) -> int:
    """Bytes per parameter of the engines' compute dtype (`engine.dtype`): what a loaded model occupies."""
    dtype = str((cfg.get("engine") or {}).get("dtype", "float32"))
    if dtype not in ENGINE_DTYPE_BYTES:
        raise ConfigError(f"engine.dtype: unknown {dtype!r}; known: {sorted(ENGINE_DTYPE_BYTES)}")
    return ENGINE_DTYPE_BYTES[dtype]


def catalog_model_specs(entries: Sequence[CatalogEntry], dtype_bytes: int) -> dict[str, ModelSpec]:
    """One ModelSpec per catalog checkpoint, from its config.json, sized in the engine's dtype."""
    specs = {}
    for e in entries:
        try:
            specs[e.name] = model_spec(e.name, LlamaConfig.from_dir(e.path), dtype_bytes)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"catalog.{e.name}: {exc}") from None
    return specs


def check_memory_budget(node: NodeOptions, models: Mapping[str, ModelSpec]) -> None:
    """A budget no catalog model fits in serves nothing: a ConfigError naming `node.memory_budget` and the bytes."""
    if node.memory_budget_bytes is None or not models:
        return
    smallest = min(models.values(), key=lambda m: m.weights_bytes)
    if node.memory_budget_bytes < smallest.weights_bytes:
        raise ConfigError(
            f"node.memory_budget: {node.memory_budget_bytes} bytes is smaller than every catalog model (the smallest, "
            f"{smallest.name}, holds {smallest.weights_bytes:.0f} bytes of weights in the engine's dtype)")
    too_big = sorted(m.name for m in models.values() if m.weights_bytes > node.memory_budget_bytes)
    if too_big:
        log.warning("node.memory_budget: %d bytes cannot hold %s; requests for them will fail",
                    node.memory_budget_bytes, too_big)


def _num(x: float) -> str:
    return "inf" if math.isinf(x) else repr(float(x))


def agent_argv(node: str, host: str, port: int, tier_dirs: Mapping[str, Path], opts: NodeOptions,
               stores: Sequence[str], cfg: Mapping[str, Any], progressive: bool, parent_pid: int) -> list[str]:
    """The `python -m live.agent` command line of one node: its tiers (dirs, capacities, paces), the cloud
    fetch pace, memory budget and batch limit, engine and stores. Unpaced tiers and unset options add no flag
    (the agent's default is the same)."""
    engine = dict(cfg.get("engine") or {})
    argv = [sys.executable, "-m", "live.agent", "--node", node, "--host", host, "--port", str(port),
            "--log-level", str(cfg.get("log_level", "warning")), "--exit-with-parent", str(parent_pid),
            "--threads", str(engine.get("threads", 1)), "--dtype", str(engine.get("dtype", "float32")),
            "--engine", str(engine.get("kind", "cpu")),
            "--store-options", json.dumps(dict(cfg.get("store_options") or {}))]
    argv += [f"--tier={t}={d}:{opts.tiers[t].capacity_bytes}" for t, d in tier_dirs.items()]
    argv += [f"--tier-bw={t}={_num(o.read_Bps)}:{_num(o.write_Bps)}:{_num(o.latency_s)}"
             for t, o in opts.tiers.items() if o.paced]
    if opts.cloud is not None:
        argv += ["--cloud-streams", str(opts.cloud.streams), "--cloud-latency-s", _num(opts.cloud.latency_s)]
        if math.isfinite(opts.cloud.stream_Bps):  # absent: unpaced
            argv += ["--cloud-stream-Bps", _num(opts.cloud.stream_Bps)]
    if opts.memory_budget_bytes is not None:
        argv += ["--memory-budget", str(opts.memory_budget_bytes)]
    if opts.max_num_seqs is not None:
        argv += ["--max-num-seqs", str(opts.max_num_seqs)]
    argv += [f"--store={s}" for s in stores]
    if progressive:
        argv.append("--progressive")
    return argv


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
                 progressive: bool, log_dir: Path, node: NodeOptions | None = None) -> list[AgentProcess]:
    """One `python -m live.agent` per node, each in its own session and watching this process."""
    n = cfg.get("nodes", 2)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"nodes: a positive integer is needed, got {n!r}")
    opts = node or node_options(cfg)
    host = str(cfg.get("host", "127.0.0.1"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p),
           "TIERLAB_AGENT_TOKEN": token, "PYTHONUNBUFFERED": "1"}
    log_dir.mkdir(parents=True, exist_ok=True)
    agents: list[AgentProcess] = []
    try:
        for i in tqdm(range(n), desc="agents", unit="node", disable=not cfg.get("progress", True)):
            name, port = f"n{i}", free_port(host)
            dirs = {t: (dram_root if t == "dram" else workdir) / name / t for t in opts.tiers}
            argv = agent_argv(name, host, port, dirs, opts, stores, cfg, progressive, os.getpid())
            log_path = log_dir / f"agent-{name}.log"
            with open(log_path, "wb") as f:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, env=env,
                                        cwd=REPO_ROOT, start_new_session=True)  # Ctrl-C reaches serve, not agents
            agents.append(AgentProcess(name, f"http://{host}:{port}", proc, log_path, dirs))
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
                   admin_token: str, models: Mapping[str, ModelSpec] | None = None) -> GatewayConfig:
    """GatewayConfig from the `gateway` block; unknown keys are errors naming the key.

    `models` (the catalog's real specs, `catalog_model_specs`) replace the gateway's nominal stand-ins. The
    node description (tier paces, store, memory budget, batch limit) the gateway reads from the agents' /status,
    which report what `agent_argv` told them.
    """
    extra = dict(cfg.get("gateway") or {})
    known = {f.name for f in dataclasses.fields(GatewayConfig)}
    reserved = {"agents", "tenants", "models", "admin_token"}
    bad = sorted(set(extra) - (known - reserved))
    if bad:
        raise ConfigError(f"gateway: unknown key(s) {bad}; known: {sorted(known - reserved)}")
    derived: dict[str, Any] = {} if models is None else {"models": dict(models)}
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
    agent_token = secrets.token_urlsafe(24)
    progressive = cfg.get("engine", {}).get("progressive")
    progressive = bool(bundle.progressive if progressive is None else progressive)
    host = str(cfg.get("host", "127.0.0.1"))
    sock = _listen_socket(host, int(cfg.get("port", 8080)))
    url = f"http://{host}:{sock.getsockname()[1]}"
    shm = Path("/dev/shm")  # dram on tmpfs; created last, so that a config error leaves no memory behind
    dram_root = Path(tempfile.mkdtemp(prefix="tierlab-live-", dir=shm if shm.is_dir() else None))
    agents: list[AgentProcess] = []
    moves: list[dict[str, Any]] = []
    gateway: Gateway | None = None
    t0 = time.monotonic()
    try:
        agents = start_agents(cfg, workdir, dram_root, stores, agent_token, progressive, out_dir / "logs", node)
        refs = [AgentRef(a.node, a.url, agent_token) for a in agents]
        gateway = Gateway(gateway_config(cfg, refs, tenants, admin_token, specs), bundle)

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
