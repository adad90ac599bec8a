"""The node agent's configuration: its engine settings, its `AgentConfig`, and its command line.

Kept apart from `live.agent` (the agent's behaviour and HTTP API); every name here is re-exported
there, so `from live.agent import AgentConfig, config_from_args, parse_bytes` keeps working.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from live.agent_tiers import TierConfig, parse_bytes, parse_tier, parse_tier_bw
from live.engines.factory import ENGINE_KINDS
from live.engines.openai_compat import EngineSpecError, OpenAICompatSpec, load_spec
from live.pacing import check_Bps, check_latency_s
from live.tracing import EXPORTERS, TracingConfig

TIER_ORDER = ("dram", "nvme", "sata")  # fastest first; a model is read from the first tier holding it
DEFAULT_PORT = 8700
HOST_DIR_SUFFIX = "-host"  # the default host staging dir sits beside the dram tier dir, with this suffix
DESCRIPTION = "The node agent: one process per node that moves checkpoints between tiers and runs engine processes."


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
    prefix_cache_blocks: int = 0  # the CPU engine's prefix (KV) cache, in blocks of prefix_block_tokens; 0: off
    prefix_block_tokens: int = 16
    openai: OpenAICompatSpec | None = None  # kind "openai": the program, its readiness probe and capabilities

    def __post_init__(self) -> None:
        if self.kind not in ENGINE_KINDS:
            raise ValueError(f"EngineSettings.kind must be one of {ENGINE_KINDS}, got {self.kind!r}")
        if self.kind == "openai" and self.openai is None:
            raise ValueError("EngineSettings.openai: required for kind 'openai' (an engine spec, e.g. "
                             "--engine-spec conf/live/engines/vllm.yaml)")
        if self.gpus < 1:
            raise ValueError(f"EngineSettings.gpus must be >= 1, got {self.gpus}")
        if isinstance(self.max_num_seqs, bool) or not isinstance(self.max_num_seqs, int) or self.max_num_seqs < 1:
            raise ValueError(f"EngineSettings.max_num_seqs must be an integer >= 1, got {self.max_num_seqs!r}")
        if self.prefix_cache_blocks < 0 or self.prefix_block_tokens < 1:
            raise ValueError(f"EngineSettings.prefix_cache_blocks must be >= 0 and prefix_block_tokens >= 1, got "
                             f"{self.prefix_cache_blocks!r} and {self.prefix_block_tokens!r}")
        if self.prefix_cache_blocks and self.kind != "cpu":
            # Tokasaurus and OpenAI-compatible servers manage their own prefix caching
            raise ValueError(f"EngineSettings.prefix_cache_blocks: only the cpu engine takes it (engine kind "
                             f"{self.kind!r} caches prefixes its own way)")


def default_dram_dir(node: str, port: int) -> Path:
    """/dev/shm/tierlab-<node>-<port> where /dev/shm exists (memory-backed), else under the temp dir."""
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return base / f"tierlab-{node}-{port}"


def default_host_dir(node: str, port: int, tiers: Mapping[str, TierConfig]) -> Path:
    """Host-memory staging of cloud loads: beside the dram tier dir (`<dram dir>-host`, on the same
    memory-backed filesystem), or beside the default dram dir when the node has no dram tier."""
    dram = Path(tiers["dram"].path) if "dram" in tiers else default_dram_dir(node, port)
    dram = dram.absolute()
    return dram.with_name(dram.name + HOST_DIR_SUFFIX)


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


@dataclass
class AgentConfig:
    """One node agent: where it listens, its tiers, its registry and its engine settings."""

    node: str = "n0"
    region: str = ""  # the region the node is in (core/regions.py; reported in /status; "" = none)
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
    nic_Bps: float | None = None  # the node's NIC, shared by every cloud fetch (None or inf: unpaced)
    # host memory outside the tiers, where a cold start from the cloud lands (None: `default_host_dir`);
    # the agent owns its `.tierlab-*` entries and removes leftovers at start and shutdown
    host_dir: Path | None = None
    memory_budget_bytes: int | None = None  # the node's accelerator memory (reported; the gateway enforces it)
    max_errors: int = 50  # recent errors kept for /status
    parent_pid: int | None = None  # stop the engines and exit when this process is gone (None: never)
    tracing: TracingConfig = field(default_factory=TracingConfig)  # OpenTelemetry traces (`live.tracing`): off
    # HTTPS: the agent's certificate chain and private key (PEM); both or neither. The token still travels in
    # the Authorization header, so over any network but loopback give the agent a certificate.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # the address others reach this node at ("": `host`): the agent URL it joins the gateway with and the host of
    # every engine URL it reports; needed when `host` is a wildcard (0.0.0.0, ::) or a NAT'd address
    advertise_host: str = ""
    # a gateway to join on its own (`live.agent_join`): its base URL ("": none; the gateway lists the agent), the CA
    # bundle that signs an https gateway's certificate (None: the system's CAs) and the heartbeat period
    gateway: str = ""
    gateway_ca: Path | None = None
    join_interval_s: float = 5.0

    def __post_init__(self) -> None:
        if not self.token:
            raise ValueError("AgentConfig needs a bearer token (the control API is never open)")
        if not self.advertise_host:
            if is_wildcard(self.host):
                raise ValueError(f"AgentConfig.advertise_host: needed when host is the wildcard {self.host!r} "
                                 "(the address the gateway and clients reach this node at)")
            self.advertise_host = self.host
        elif is_wildcard(self.advertise_host):
            raise ValueError(f"AgentConfig.advertise_host: {self.advertise_host!r} is a wildcard, not an address "
                             "others can reach")
        if self.gateway and not self.gateway.startswith(("http://", "https://")):
            raise ValueError(f"AgentConfig.gateway: an http(s):// base URL is needed, got {self.gateway!r}")
        if self.gateway_ca is not None and not Path(self.gateway_ca).is_file():
            raise ValueError(f"AgentConfig.gateway_ca: no such file {str(self.gateway_ca)!r}")
        if not (isinstance(self.join_interval_s, int | float) and 0 < self.join_interval_s < float("inf")):
            raise ValueError(f"AgentConfig.join_interval_s must be a number > 0, got {self.join_interval_s!r}")
        if not self.stores:
            raise ValueError("AgentConfig needs at least one registry store URL")
        unknown = set(self.tiers) - set(TIER_ORDER)
        if unknown:
            raise ValueError(f"unknown tiers {sorted(unknown)}; tiers are {TIER_ORDER}")
        if not self.tiers:
            raise ValueError("AgentConfig needs at least one local tier")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("AgentConfig.tls_cert and tls_key go together (both PEM files) or not at all")
        for field_name in ("tls_cert", "tls_key"):
            path = getattr(self, field_name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"AgentConfig.{field_name}: no such file {str(path)!r}")
        for name, tier in self.tiers.items():
            if tier.name != name:
                raise ValueError(f"AgentConfig.tiers[{name!r}] is configured as tier {tier.name!r}")
        for field_name in ("copy_streams", "cloud_streams"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AgentConfig.{field_name} must be an integer >= 1, got {value!r}")
        self.cloud_stream_Bps = check_Bps(self.cloud_stream_Bps, "AgentConfig.cloud_stream_Bps")
        self.cloud_latency_s = check_latency_s(self.cloud_latency_s, "AgentConfig.cloud_latency_s")
        self.nic_Bps = check_Bps(self.nic_Bps, "AgentConfig.nic_Bps")
        budget = self.memory_budget_bytes
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0):
            raise ValueError(f"AgentConfig.memory_budget_bytes must be an integer > 0 (or None), got {budget!r}")
        host_dir = Path(self.host_dir) if self.host_dir is not None else default_host_dir(self.node, self.port,
                                                                                          self.tiers)
        self.host_dir = host_dir.absolute()
        for name, tier in self.tiers.items():
            # a host copy inside a tier would be listed as a model (or a tier inside it swept as a leftover)
            if _overlaps(self.host_dir, Path(tier.path).absolute()):
                raise ValueError(f"AgentConfig.host_dir {self.host_dir} overlaps tier {name!r} dir {tier.path}; "
                                 "give a dir outside every tier")


    @property
    def url(self) -> str:
        """The agent's own base URL as others reach it: scheme by `tls_cert`, host `advertise_host`."""
        return f"{'https' if self.tls_cert else 'http'}://{url_host(self.advertise_host)}:{self.port}"


def is_wildcard(host: str) -> bool:
    """True for an address that means "every interface" (bindable, never reachable as a destination)."""
    try:
        return host == "" or ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False  # a DNS name


def url_host(host: str) -> str:
    """`host` as the host part of a URL (an IPv6 address in brackets)."""
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m live.agent", description=DESCRIPTION)
    p.add_argument("--node", default="n0")
    p.add_argument("--region", default="", help="the node's region (conf/regions; the gateway routes by it)")
    p.add_argument("--host", "--bind-host", dest="host", default="127.0.0.1",
                   help="the address the agent and its engines listen on (0.0.0.0: every interface)")
    p.add_argument("--advertise-host", default="",
                   help="the address others reach this node at: the host of its agent URL and of every engine URL "
                        "it reports (default: --host; needed when --host is 0.0.0.0)")
    p.add_argument("--gateway", default="", metavar="URL",
                   help="join this gateway on start (POST URL/agents/join with --token), heartbeat, leave on exit")
    p.add_argument("--gateway-ca", default=None, metavar="PEM",
                   help="CA bundle that signs an https --gateway's certificate (default: the system's CAs)")
    p.add_argument("--join-interval-s", type=float, default=5.0,
                   help="seconds between heartbeats (re-joins) to --gateway")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--token", default=os.environ.get("TIERLAB_AGENT_TOKEN", ""),
                   help="bearer token (default: $TIERLAB_AGENT_TOKEN)")
    p.add_argument("--tier", action="append", default=[], metavar="NAME=DIR:BYTES",
                   help=f"a local tier ({', '.join(TIER_ORDER)}); repeat. Default: dram under /dev/shm, 1 GiB")
    p.add_argument("--host-dir", default=None, metavar="DIR",
                   help="host-memory staging of cold starts from the cloud, not a tier "
                        f"(default: beside the dram tier dir, '<dram dir>{HOST_DIR_SUFFIX}')")
    p.add_argument("--store", action="append", default=[], metavar="URL", help="registry store, in priority order")
    p.add_argument("--store-options", default="{}", help='JSON: {"s3://b/p": {"endpoint_url": ...}}')
    p.add_argument("--threads", type=int, default=1, help="torch threads per engine")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--progressive", action="store_true", help="engines serve while layers load")
    p.add_argument("--engine", default="cpu", choices=ENGINE_KINDS, help="engine kind the node runs")
    p.add_argument("--engine-spec", default=None, metavar="FILE",
                   help="--engine openai: the engine's spec (YAML: command template, readiness probe, capabilities), "
                        "e.g. conf/live/engines/vllm.yaml")
    p.add_argument("--toka", default="toka", help="Tokasaurus launcher (--engine tokasaurus): a name on PATH or a path")
    p.add_argument("--gpus", type=int, default=1, help="GPUs one Tokasaurus engine may use")
    p.add_argument("--tier-bw", action="append", default=[], metavar="NAME=READ_BPS:WRITE_BPS[:LATENCY_S]",
                   help="emulated device of a tier: bytes/s ('inf' = unpaced) and read latency in s; repeat")
    p.add_argument("--copy-streams", type=int, default=4)
    p.add_argument("--cloud-streams", type=int, default=16, help="parallel ranged-read streams per cloud fetch")
    p.add_argument("--cloud-stream-Bps", type=float, default=None,
                   help="bytes/s of each cloud stream (default: unpaced)")
    p.add_argument("--cloud-latency-s", type=float, default=0.0, help="first-byte latency of each cloud stream, s")
    p.add_argument("--nic-Bps", type=float, default=None,
                   help="bytes/s of the node's NIC, shared by all its cloud fetches (default: unpaced)")
    p.add_argument("--memory-budget", default=None, metavar="BYTES",
                   help="accelerator memory of the node (K/M/G/T suffixes), reported in /status")
    p.add_argument("--max-num-seqs", type=int, default=8, help="batch limit of the engines this node starts")
    p.add_argument("--prefix-cache-blocks", type=int, default=0,
                   help="the cpu engines' prefix (KV) cache, in blocks (default 0: off)")
    p.add_argument("--prefix-block-tokens", type=int, default=16, help="tokens per prefix-cache block")
    p.add_argument("--log-level", default="info")
    p.add_argument("--exit-with-parent", type=int, metavar="PID", help="stop the engines and exit when PID is gone")
    p.add_argument("--tracing-exporter", choices=EXPORTERS, default="off", help="OpenTelemetry traces (default off)")
    p.add_argument("--tracing-endpoint", default="", help="OTLP/HTTP endpoint of --tracing-exporter otlp")
    p.add_argument("--tls-cert", default=None, metavar="PEM", help="serve HTTPS with this certificate (chain)")
    p.add_argument("--tls-key", default=None, metavar="PEM", help="the private key of --tls-cert")
    return p


def config_from_args(argv: Sequence[str] | None = None) -> tuple[AgentConfig, str]:
    """The agent's config and log level from its command line; a bad value exits with a message naming the flag."""
    p = _parser()
    args = p.parse_args(argv)
    try:
        tiers = [parse_tier(s) for s in args.tier]
        options: Mapping[str, Any] = json.loads(args.store_options)
        bandwidths = [parse_tier_bw(s) for s in args.tier_bw]
        memory_budget = parse_bytes(args.memory_budget) if args.memory_budget is not None else None
        spec = load_spec(args.engine_spec) if args.engine_spec is not None else None
        if memory_budget is not None and memory_budget <= 0:
            raise ValueError(f"--memory-budget must be > 0 bytes, got {args.memory_budget!r}")
        check_Bps(args.cloud_stream_Bps, "--cloud-stream-Bps")
        check_Bps(args.nic_Bps, "--nic-Bps")
        check_latency_s(args.cloud_latency_s, "--cloud-latency-s")
        for flag, value in (("--max-num-seqs", args.max_num_seqs), ("--cloud-streams", args.cloud_streams),
                            ("--copy-streams", args.copy_streams)):
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
    except (ValueError, json.JSONDecodeError, EngineSpecError) as e:
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
                             region=args.region,
                             stores=list(args.store), store_options={k: dict(v) for k, v in options.items()},
                             engine=EngineSettings(args.threads, args.dtype, args.progressive, kind=args.engine,
                                                   toka_executable=args.toka, gpus=args.gpus,
                                                   max_num_seqs=args.max_num_seqs, openai=spec,
                                                   prefix_cache_blocks=args.prefix_cache_blocks,
                                                   prefix_block_tokens=args.prefix_block_tokens),
                             copy_streams=args.copy_streams, cloud_streams=args.cloud_streams,
                             cloud_stream_Bps=args.cloud_stream_Bps, cloud_latency_s=args.cloud_latency_s,
                             nic_Bps=args.nic_Bps,
                             host_dir=Path(args.host_dir) if args.host_dir is not None else None,
                             memory_budget_bytes=memory_budget, parent_pid=args.exit_with_parent,
                             tracing=TracingConfig(args.tracing_exporter, args.tracing_endpoint),
                             tls_cert=Path(args.tls_cert) if args.tls_cert else None,
                             tls_key=Path(args.tls_key) if args.tls_key else None,
                             advertise_host=args.advertise_host, gateway=args.gateway.rstrip("/"),
                             gateway_ca=Path(args.gateway_ca) if args.gateway_ca else None,
                             join_interval_s=args.join_interval_s)
    except ValueError as e:
        p.error(str(e))
    return config, args.log_level
