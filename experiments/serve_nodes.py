"""The emulated nodes of `experiments.serve`: the `tiers` / `cloud` / `node` config checked into options, and
one `python -m live.agent` process per node started, watched and stopped."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from core.errors import ConfigError
from core.specs import LOCAL_TIERS, ModelSpec
from live.agent import parse_bytes
from live.agent_config import is_wildcard, url_host
from live.engines.base import REPO_ROOT, free_port
from live.lifecycle import stop_process, wait_gone

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


# --------------------------------------------------------------------------- node description

MB = 1e6  # config bandwidths are in MB/s (decimal, as the reference file's), latencies in ms
_TIER_KEYS = ("capacity", "read_MBps", "write_MBps", "latency_ms")
_CLOUD_KEYS = ("streams", "stream_MBps", "latency_ms")
_NODE_KEYS = ("memory_budget", "max_num_seqs", "prefix_cache_blocks")


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
    prefix_cache_blocks: int = 0  # the cpu engines' prefix (KV) cache, in blocks; 0: off


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
    blocks = node_cfg.get("prefix_cache_blocks") or 0
    return NodeOptions(tiers, cloud,
                       None if budget is None else _size(budget, "node.memory_budget"),
                       None if seqs is None else _positive_int(seqs, "node.max_num_seqs"),
                       _positive_int(blocks, "node.prefix_cache_blocks") if blocks else 0)


def check_memory_budget(node: NodeOptions, models: Mapping[str, ModelSpec]) -> None:
    """A budget no catalog model fits in serves nothing: a ConfigError naming `node.memory_budget` and the bytes."""
    if node.memory_budget_bytes is None or not models:
        return
    smallest = min(models.values(), key=lambda m: m.resident_bytes)
    if node.memory_budget_bytes < smallest.resident_bytes:
        raise ConfigError(
            f"node.memory_budget: {node.memory_budget_bytes} bytes is smaller than every catalog model (the smallest, "
            f"{smallest.name}, holds {smallest.resident_bytes:.0f} bytes of weights in the engine's dtype)")
    too_big = sorted(m.name for m in models.values() if m.resident_bytes > node.memory_budget_bytes)
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
    if opts.prefix_cache_blocks:
        argv += ["--prefix-cache-blocks", str(opts.prefix_cache_blocks)]
    if engine.get("spec"):  # kind openai: the engine's spec (conf/live/engines/*.yaml), relative to the checkout
        argv += ["--engine-spec", str(REPO_ROOT / str(engine["spec"]))]
    argv += [f"--store={s}" for s in stores]
    if progressive:
        argv.append("--progressive")
    tracing = dict(cfg.get("tracing") or {})
    if tracing.get("exporter") not in (None, False, "off"):  # live.tracing: the agents continue the gateway's traces
        argv += ["--tracing-exporter", str(tracing["exporter"]), "--tracing-endpoint", str(tracing.get("endpoint", ""))]
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


def node_region_args(cfg: Mapping[str, Any], i: int) -> list[str]:
    """`--region R` for node i from `node_regions` (a list, used in turn; conf/regions names), else nothing."""
    regions = cfg.get("node_regions") or []
    if isinstance(regions, str) or not all(isinstance(r, str) and r for r in regions):
        raise ConfigError(f"node_regions: a list of region names is needed, got {regions!r}")
    return ["--region", regions[i % len(regions)]] if regions else []


def start_agents(cfg: Mapping[str, Any], workdir: Path, dram_root: Path, stores: Sequence[str], token: str,
                 progressive: bool, log_dir: Path, node: NodeOptions | None = None) -> list[AgentProcess]:
    """One `python -m live.agent` per node, each in its own session and watching this process."""
    n = cfg.get("nodes", 2)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"nodes: a positive integer is needed, got {n!r}")
    opts = node or node_options(cfg)
    host = str(cfg.get("host", "127.0.0.1"))
    # where the gateway reaches the agents and their engines: `advertise_host`, else the bind address, which for
    # a wildcard bind (host 0.0.0.0 exposes the gateway) means loopback: these agents run on this machine
    advertise = str(cfg.get("advertise_host") or ("127.0.0.1" if is_wildcard(host) else host))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p),
           "TIERLAB_AGENT_TOKEN": token, "PYTHONUNBUFFERED": "1"}
    log_dir.mkdir(parents=True, exist_ok=True)
    agents: list[AgentProcess] = []
    try:
        for i in tqdm(range(n), desc="agents", unit="node", disable=not cfg.get("progress", True)):
            name, port = f"n{i}", free_port(host)
            dirs = {t: (dram_root if t == "dram" else workdir) / name / t for t in opts.tiers}
            argv = agent_argv(name, host, port, dirs, opts, stores, cfg, progressive, os.getpid())
            argv += node_region_args(cfg, i)
            if advertise != host:
                argv += ["--advertise-host", advertise]
            log_path = log_dir / f"agent-{name}.log"
            with open(log_path, "wb") as f:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, env=env,
                                        cwd=REPO_ROOT, start_new_session=True)  # Ctrl-C reaches serve, not agents
            agents.append(AgentProcess(name, f"http://{url_host(advertise)}:{port}", proc, log_path, dirs))
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
