"""The gateway's configuration: the nodes it drives (agents), tenants, models and the request path's knobs."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from core.policies.base import PolicyBundle
from core.response_cache import CacheConfig
from core.specs import EngineSpec, GpuSpec, ModelSpec
from live.gateway_api import DEFAULT_MAX_TOKEN_BYTES, REFUSED_PARAMS, Tenant
from live.gateway_auth import Principal, load_keys_file, principal_from
from live.gateway_limits import EVERY_TENANT, TenantLimits
from live.tracing import TracingConfig

NOMINAL_GPU = GpuSpec("cpu-nominal", mem_bytes=80e9, hbm_Bps=100e9, flops=1e12, h2d_Bps=10e9)
NOMINAL_TIER_BW_BPS = 1e9
DEFAULT_MAX_BODY_BYTES = 4 << 20  # 4 MiB: far above any prompt a small-context model takes
# A live node stands for a one-GPU node: AWS g6.xlarge on demand (../shared/data/reference, id aws_g6_xl)
DEFAULT_NODE_PRICE_PER_HOUR = 0.8048


def default_bundle() -> PolicyBundle:
    """TierAware placement x NoCaching x KeepAlive(300 s)."""
    from core.policies.autoscaling import KeepAlive
    from core.policies.caching import NoCaching
    from core.policies.placement import TierAware

    return PolicyBundle(TierAware(), NoCaching(), KeepAlive(keep_alive_s=300), name="tier_aware")


def nominal_model(name: str) -> ModelSpec:
    """A 1B-parameter stand-in for a model given no spec: 2 GB of weights against a node's memory (the nominal
    GPU's 80 GB where its agent reports no budget). `live.serve` gives real specs built from the checkpoints."""
    return ModelSpec(name=name, params_b=1.0, n_layers=16, hidden_size=2048, n_kv_heads=8, head_dim=64)


@dataclass(frozen=True)
class AgentRef:
    """One node the gateway drives through its agent; `url=""` is a node without an agent, whose instances
    are only those handed over with `Gateway.adopt_instance` (never health-checked, never cold-started on)."""

    name: str
    url: str
    token: str


@dataclass
class GatewayConfig:
    """Agents, tenants (API key -> Tenant), models and the knobs of the request path.

    `node_price_per_hour` ($ per node-hour, one number for every node or one per node name) prices each
    request's `cost_usd` (see `live.gateway_records`). `health_interval_s = 0` turns the agent health loop off.

    Keys and roles (`live.gateway_auth`): `tenants` (API key -> Tenant) are tenant keys, `admin_token` an admin key
    named "admin" ("" for none), `principals` more keys of any role (entries `{name, role, models, key | sha256}`,
    hashed here), and `keys_file` a file of such entries the gateway re-reads when it changes. A key may be given
    pre-hashed as `sha256:<hex>`. The `Gateway` keeps hashes only: it replaces the plain keys of `tenants` and
    `admin_token` with their `sha256:<hex>` form. `audit_log`: the path of the hash-chained audit log
    (`live.audit`) of every /admin call and key change (None: no audit log).

    The gateway plans with each node as its agent describes it (`live.gateway_nodes`): tier pacing, the store,
    the memory budget (`accelerator.memory_bytes`) and the engine's batch limit. `nominal_gpu` stands in for a
    node that reports no budget, `engine.max_num_seqs` for one that reports no batch limit, and `models` should
    hold real `ModelSpec`s (their `resident_bytes` is what an instance takes of its node's budget: the mirror's
    engine spec has `gpu_mem_util = 1`, `kv_reserve_frac = 0`).
    """

    agents: list[AgentRef]
    tenants: dict[str, Tenant]
    models: dict[str, ModelSpec] = field(default_factory=dict)  # default: a nominal spec per tenant model
    # more fields of a model's GET /v1/models item, by model (`live.serve`: the catalog's chat template in use)
    model_details: dict[str, dict[str, Any]] = field(default_factory=dict)
    nominal_gpu: GpuSpec = NOMINAL_GPU
    engine: EngineSpec = field(default_factory=lambda: EngineSpec(name="cpu", max_num_seqs=8))
    queue_timeout_s: float = 10.0
    queue_poll_s: float = 0.1
    load_timeout_s: float = 180.0
    request_timeout_s: float = 300.0  # no request outlives this, whatever its engine does
    connect_timeout_s: float = 5.0
    stream_idle_timeout_s: float = 60.0  # longest silence between two chunks of a stream
    health_interval_s: float = 1.0
    health_failures: int = 3  # missed health checks in a row before a node is marked down
    health_timeout_s: float = 1.0
    admin_token: str = ""
    node_price_per_hour: float | Mapping[str, float] = DEFAULT_NODE_PRICE_PER_HOUR
    tick: bool = True  # run the bundle's on_tick (keep-alive stops) every `bundle.tick_s`
    migration_timeout_s: float = 60.0  # longest handover of a live migration before it gives up (victim serves on)
    tracing: TracingConfig | Mapping[str, Any] | None = None  # OpenTelemetry traces (`live.tracing`); None: off
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    context_tokens: dict[str, int] = field(default_factory=dict)  # model -> context window (tokens)
    max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES  # most UTF-8 bytes one token stands for (`check_context`)
    limits: dict[str, TenantLimits | Mapping[str, Any]] = field(default_factory=dict)  # tenant name or "*"
    honoured_params: tuple[str, ...] = ()
    principals: list[Principal | Mapping[str, Any]] = field(default_factory=list)
    keys_file: str | None = None
    audit_log: str | None = None
    # CA bundle (PEM) the gateway trusts for https:// agents (None: the system's CAs); an agent whose certificate
    # it does not trust is unreachable to it, so never used
    agent_ca: str | None = None
    # the edge response cache (`live.gateway_cache`, `core.response_cache`): {exact, semantic, threshold, ttl_s,
    # capacity}; None or {}: off
    response_cache: CacheConfig | Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if not self.agents:
            raise ValueError("GatewayConfig.agents needs at least one agent")
        if self.agent_ca is not None and not os.path.isfile(self.agent_ca):
            raise ValueError(f"GatewayConfig.agent_ca: no such file {self.agent_ca!r}")
        self.tracing = TracingConfig.of(self.tracing)
        if not isinstance(self.response_cache, CacheConfig):
            try:
                self.response_cache = CacheConfig.from_mapping(self.response_cache)
            except (TypeError, ValueError) as e:
                raise ValueError(f"GatewayConfig.response_cache: {e}") from None
        names = [a.name for a in self.agents]
        if len(set(names)) != len(names):
            raise ValueError(f"GatewayConfig.agents: node names repeat in {names}")
        for name in ("queue_timeout_s", "queue_poll_s", "load_timeout_s", "request_timeout_s", "connect_timeout_s",
                     "stream_idle_timeout_s", "health_timeout_s", "migration_timeout_s"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise ValueError(f"GatewayConfig.{name} must be a positive number of seconds, got {v!r}")
        if not (math.isfinite(self.health_interval_s) and self.health_interval_s >= 0):
            raise ValueError(f"GatewayConfig.health_interval_s must be >= 0, got {self.health_interval_s!r}")
        if not isinstance(self.health_failures, int) or self.health_failures < 1:
            raise ValueError(f"GatewayConfig.health_failures must be an integer >= 1, got {self.health_failures!r}")
        prices = self.node_price_per_hour
        per_node = dict(prices) if isinstance(prices, Mapping) else dict.fromkeys(names, prices)
        unknown = set(per_node) - set(names)
        if unknown:
            raise ValueError(f"GatewayConfig.node_price_per_hour names unknown nodes {sorted(unknown)}")
        for node, p in per_node.items():
            if not (isinstance(p, int | float) and math.isfinite(p) and p >= 0):
                raise ValueError(f"GatewayConfig.node_price_per_hour[{node!r}] must be >= 0, got {p!r}")
        self._check_principals()
        for tenant in self.tenant_list():
            for m in tenant.models:
                self.models.setdefault(m, nominal_model(m))
        unlisted = set(self.model_details) - set(self.models)
        if unlisted:
            raise ValueError(f"GatewayConfig.model_details names models not served {sorted(unlisted)}")
        self._check_limits()

    def _check_limits(self) -> None:
        """Validate (and normalize) the request limits; errors name the field."""
        for name in ("max_body_bytes", "max_token_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"GatewayConfig.{name} must be an integer >= 1, got {v!r}")
        self.context_tokens = dict(self.context_tokens)
        unlisted = set(self.context_tokens) - set(self.models)
        if unlisted:
            raise ValueError(f"GatewayConfig.context_tokens names models not served {sorted(unlisted)}")
        for m, v in self.context_tokens.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"GatewayConfig.context_tokens[{m!r}] must be an integer >= 1, got {v!r}")
        tenants = {t.name for t in self.tenant_list()}
        unknown = set(self.limits) - tenants - {EVERY_TENANT}
        if unknown:
            raise ValueError(f"GatewayConfig.limits names unknown tenants {sorted(unknown)}; known: {sorted(tenants)} "
                             f"(or {EVERY_TENANT!r} for every tenant)")
        self.limits = {k: TenantLimits.of(v, f"GatewayConfig.limits[{k!r}]") for k, v in self.limits.items()}
        self.honoured_params = tuple(self.honoured_params)
        bad = sorted(set(self.honoured_params) - set(REFUSED_PARAMS))
        if bad:
            raise ValueError(f"GatewayConfig.honoured_params: {bad} are never refused; the refused ones are "
                             f"{sorted(REFUSED_PARAMS)}")

    def _check_principals(self) -> None:
        """Hash the `principals` entries (errors name the entry, never its key) and read `keys_file` once: a bad
        file is an error at start (later, a bad version is reported and the previous keys stay)."""
        self.principals = [p if isinstance(p, Principal) else principal_from(p, f"GatewayConfig.principals[{i}]",
                                                                            "config")
                           for i, p in enumerate(self.principals)]
        self._file_principals: list[Principal] = []
        if self.keys_file is not None:
            self.keys_file = str(self.keys_file)
            try:
                self._file_principals = load_keys_file(self.keys_file)
            except OSError as e:
                raise ValueError(f"GatewayConfig.keys_file: cannot read {self.keys_file} ({e.strerror})") from None
        if self.audit_log is not None:
            self.audit_log = str(self.audit_log)

    def tenant_list(self) -> list[Tenant]:
        """The tenants configured at start: `tenants`, and the tenant entries of `principals` and `keys_file`."""
        more = [p.tenant for p in (*self.principals, *self._file_principals)
                if isinstance(p, Principal) and p.role == "tenant"]
        return [*self.tenants.values(), *more]

    @property
    def refused_params(self) -> tuple[str, ...]:
        """The parameters `validate` refuses (asking for something): REFUSED_PARAMS less `honoured_params`."""
        return tuple(p for p in REFUSED_PARAMS if p not in self.honoured_params)

    def price_per_hour(self, node: str) -> float:
        prices = self.node_price_per_hour
        if isinstance(prices, Mapping):
            return float(prices.get(node, DEFAULT_NODE_PRICE_PER_HOUR))
        return float(prices)
