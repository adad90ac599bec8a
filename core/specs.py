"""Specifications of models, GPUs, storage tiers, nodes, object stores and the cluster.

Specs are frozen dataclasses with units in their field names. `*_from_dict` builders
turn plain config mappings (hydra / yaml) into specs and raise `ConfigError` naming the
offending field, so bad input fails before a run starts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from core.errors import ConfigError

#: Local storage tiers, fastest first. "gpu" (resident in a running engine) sits above
#: them and the cloud object store below them.
LOCAL_TIERS: tuple[str, ...] = ("dram", "nvme", "sata")
TIER_ORDER: tuple[str, ...] = ("gpu", *LOCAL_TIERS, "cloud")
TIER_RANK: dict[str, int] = {name: i for i, name in enumerate(TIER_ORDER)}

#: Node fault settings a cluster config may give once for all its node groups.
NODE_FAULT_FIELDS: tuple[str, ...] = (
    "preemption_rate_per_hour", "preemption_notice_s", "replacement_delay_s", "failure_rate_per_hour", "repair_s")
#: Keys a cluster config mapping may hold.
CLUSTER_KEYS: frozenset[str] = frozenset({"node_groups", "store", "stores", "failover_s", "spot_share",
                                          "tier_overrides", *NODE_FAULT_FIELDS})


@dataclass(frozen=True)
class ModelSpec:
    """One deployable model (a base architecture, possibly one of several fine-tunes)."""

    name: str
    params_b: float  # billions of parameters
    n_layers: int
    hidden_size: int
    n_kv_heads: int
    head_dim: int
    dtype_bytes: int = 2  # bf16, as stored and moved between tiers
    base: str = ""  # the architecture this deployment is a copy of
    resident_dtype_bytes: int | None = None  # bytes per parameter once loaded, if the engine converts (None: same)
    # the LM head (vocab_size x hidden_size): its logits are computed only for the tokens that sample (the last one
    # of a prefill, every sequence of a decode step); 0 = unknown, the head then counts as part of every token's FLOPs
    vocab_size: int = 0
    tied_embeddings: bool = False  # the input embedding is the LM head (one matrix counted in params_b, not two)

    @property
    def weights_bytes(self) -> float:
        """The checkpoint's size: what a tier holds and what a load moves."""
        return self.params_b * 1e9 * self.dtype_bytes

    @property
    def resident_bytes(self) -> float:
        """What the weights take in the engine's memory (a CPU engine computing in float32 doubles a bf16
        checkpoint; a quantized serving format shrinks it)."""
        return self.params_b * 1e9 * (self.resident_dtype_bytes or self.dtype_bytes)

    @property
    def layer_bytes(self) -> float:
        return self.weights_bytes / self.n_layers

    @property
    def kv_bytes_per_token(self) -> float:
        # K and V, every layer, every KV head.
        return 2.0 * self.n_layers * self.n_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def flops_per_token(self) -> float:
        """Dense FLOPs of one token through the whole model, LM head included (2 x parameters)."""
        return 2.0 * self.params_b * 1e9

    @property
    def head_params(self) -> float:
        """Parameters of the LM head (0 when `vocab_size` is unknown)."""
        return float(self.vocab_size * self.hidden_size)

    @property
    def layer_params(self) -> float:
        """Parameters of one transformer layer: params_b less the LM head and an untied input embedding (a lookup,
        no FLOPs), split evenly over the layers (norms are in there too: a rounding error)."""
        embeddings = self.head_params * (1 if self.tied_embeddings else 2)
        return (self.params_b * 1e9 - embeddings) / self.n_layers


@dataclass(frozen=True)
class GpuSpec:
    """One GPU type: memory, HBM bandwidth, dense bf16 FLOP/s, host-to-device copy bandwidth, and the all-reduce
    among the node's GPUs of this type (what tensor parallelism pays per layer).

    An all-reduce of B bytes over n GPUs takes `allreduce_latency_s + 2 (n-1)/n x B / allreduce_bus_Bps` (ring
    algorithm; `allreduce_bus_Bps` is NCCL's "bus bandwidth"). The defaults (inf, 0) make it free, as before.
    """

    name: str
    mem_bytes: float
    hbm_Bps: float
    flops: float
    h2d_Bps: float
    allreduce_bus_Bps: float = math.inf
    allreduce_latency_s: float = 0.0

    def allreduce_s(self, nbytes: float, n_gpus: int) -> float:
        """One all-reduce of `nbytes` (each GPU's buffer) over `n_gpus` GPUs; 0 on one GPU."""
        if n_gpus <= 1:
            return 0.0
        return self.allreduce_latency_s + 2.0 * (n_gpus - 1) / n_gpus * nbytes / self.allreduce_bus_Bps


@dataclass(frozen=True)
class TierSpec:
    """A local storage tier on a node (host DRAM, NVMe, SATA)."""

    name: str
    capacity_bytes: float
    read_bw_Bps: float
    write_bw_Bps: float
    latency_s: float = 0.0
    max_streams: int = 64  # concurrent transfers the device serves; more wait in line
    price_usd_per_gb_month: float = 0.0


@dataclass(frozen=True)
class ObjectStoreSpec:
    """A cloud object store every model is published to (the tier of last resort).

    `egress_usd_per_gb` is charged on bytes fetched by a node in another cloud (transfers
    inside the store's cloud are free: aws_s3_to_ec2_same_region). Outages start as a
    Poisson process at `outage_rate_per_hour` and last `outage_duration_s` each.
    """

    name: str = "s3"
    per_stream_Bps: float = 93e6
    streams: int = 16
    ttfb_s: float = 0.02
    price_usd_per_gb_month: float = 0.023
    egress_usd_per_gb: float = 0.0
    cloud: str = "aws"
    region: str = "us-east-1"
    outage_rate_per_hour: float = 0.0
    outage_duration_s: float = 0.0


@dataclass(frozen=True)
class LoaderSpec:
    """How a node's checkpoint loader moves weights from a tier onto the GPUs.

    The defaults are the staged loader every run has always used: read the whole checkpoint
    into host memory at the tier's read bandwidth, then copy it to all of the instance's GPUs
    at once at the host-to-GPU bandwidth. Real loaders (ServerlessLLM's, safetensors via
    transformers) differ only in these parameters; see core/loadtime.py for how each is used.
    """

    name: str = "staged"
    pipelined: bool = False  # chunks are copied to the GPUs while later chunks are read
    chunk_bytes: float = 0.0  # pipeline unit: the first chunk is read before any copy starts
    read_efficiency: float = 1.0  # share of the source tier's read bandwidth the loader reaches
    max_read_Bps: float = math.inf  # the loader's own read throughput from a storage device (I/O threads)
    # loaders that read through the OS page cache (mmap, pageable copies, one tensor at a time) are
    # CPU-bound even when every page is in memory: this caps their reads from any local tier, DRAM included
    page_cache_Bps: float = math.inf
    to_gpu_efficiency: float = 1.0  # share of host-to-GPU bandwidth (1 = pinned-memory DMA)
    parallel_gpus: bool = True  # shards go to the instance's GPUs at once (False: one GPU at a time)
    fixed_overhead_s: float = 0.0  # per load, before the first byte moves


@dataclass(frozen=True)
class NodeSpec:
    """A machine: GPUs, NIC and local tiers, with its price and its checkpoint loader."""

    name: str
    gpu: GpuSpec
    n_gpus: int
    nic_Bps: float
    tiers: Mapping[str, TierSpec]
    region: str = "us-east-1"
    cloud: str = "aws"
    od_usd_per_hour: float = 0.0
    spot_usd_per_hour: float = 0.0
    spot: bool = False
    # spot nodes only: interruptions (Poisson), the notice before one, the wait for an (empty) replacement
    preemption_rate_per_hour: float = 0.0
    preemption_notice_s: float = 0.0
    replacement_delay_s: float = 0.0
    # any node: failures (Poisson); back after `repair_s` with its disk tiers, without its host memory
    failure_rate_per_hour: float = 0.0
    repair_s: float = 0.0
    loader: LoaderSpec = field(default_factory=LoaderSpec)

    @property
    def gpu_mem_bytes(self) -> float:
        return self.gpu.mem_bytes * self.n_gpus

    @property
    def usd_per_hour(self) -> float:
        """What the node costs per hour: its spot price if it is a spot node, else on-demand."""
        return self.spot_usd_per_hour if self.spot else self.od_usd_per_hour

    @property
    def usd_per_gpu_hour(self) -> float:
        return self.usd_per_hour / self.n_gpus


@dataclass(frozen=True)
class EngineSpec:
    """An inference engine's start-up costs and efficiency factors for the roofline."""

    name: str = "tokasaurus"
    process_start_s: float = 4.0
    kv_alloc_Bps: float = 400e9
    graph_capture_s: float = 2.0
    compile_s: float = 0.0
    compile_min_params_b: float = 7.0  # torch_compile only for models at least this large
    # start-up phases by model size (core/engine_start.py; every default 0 / false: the simulator as before)
    cuda_context_s: float = 0.0  # accelerator context creation, after process start (both may overlap the fetch)
    compile_per_b_s: float = 0.0  # compile time per billion parameters, on top of compile_s
    graph_capture_per_b_s: float = 0.0  # graph capture per billion parameters, on top of graph_capture_s
    compile_cache: bool = False  # a per-node compile cache: a base's first compile on a node misses, later ones hit
    compile_cache_hit_s: float = 0.0  # a hit: load the cached artefact instead of compiling
    gpu_mem_util: float = 0.9
    kv_reserve_frac: float = 0.5  # KV cache reserved per instance, as a fraction of weights
    max_num_seqs: int = 256
    # roofline efficiencies (core/inference.py): matmul FLOP/s share (prefill, compute-bound decode, attention,
    # logits), and the HBM bandwidth share reached reading weights and reading the KV cache
    prefill_mfu: float = 0.5
    weight_read_eff: float = 0.7
    kv_read_eff: float = 0.7
    # per transformer layer and forward pass: small kernels' floor (norms, rotary, activation, adds run ~5-10 us
    # each however few the tokens) and the activation traffic of those elementwise kernels, in passes of
    # tokens x hidden_size x dtype_bytes over HBM (0: ignored, the simulator as before)
    layer_overhead_s: float = 0.0
    elementwise_passes: float = 0.0
    overlap_start_with_fetch: bool = True
    # fixed costs the roofline / measured table leave out (0: the simulator as before, bit for bit)
    step_overhead_s: float = 0.0  # per forward pass, every prefill and batched decode step (scheduling, sampling)
    request_overhead_s: float = 0.0  # per request, added to its time to first token outside the batch (HTTP, tokenizer)
    stop_s: float = 0.0  # engine stop (process teardown): a stopping instance keeps its memory this long (sim.stopping)
    demote_before_stop: bool = False  # a stop with demote_to keeps the memory until its demote copy is done
    # a prefill runs in the same forward passes as the running sequences' decode tokens (mixed batches, as the CPU
    # engine and vLLM-style schedulers do), so decoding stalls while an instance prefills (False: they overlap)
    prefill_stalls_decode: bool = False


@dataclass(frozen=True)
class ClusterSpec:
    """The fleet: nodes and the object stores.

    `store` is the primary store; `backup_stores` take over, in order, when the store serving
    cloud fetches is out, `failover_s` (detection + switch) after it went out.
    """

    nodes: tuple[NodeSpec, ...]
    store: ObjectStoreSpec = field(default_factory=ObjectStoreSpec)
    backup_stores: tuple[ObjectStoreSpec, ...] = ()
    failover_s: float = 0.0

    @property
    def stores(self) -> tuple[ObjectStoreSpec, ...]:
        """Every store, primary first (the failover order); each holds the whole catalog."""
        return (self.store, *self.backup_stores)

    def node(self, name: str) -> NodeSpec:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)


# --------------------------------------------------------------------------- builders


def _build(cls: type, data: Mapping[str, Any], where: str, **extra: Any) -> Any:
    """Build dataclass `cls` from `data`, naming `where.field` in every error."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known - set(extra)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
    kwargs = {k: v for k, v in data.items() if k in known}
    kwargs.update(extra)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _positive(where: str, value: float) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{where} must be a positive number, got {value!r}")


def _non_negative(where: str, value: float) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{where} must be a non-negative number, got {value!r}")


def model_from_dict(data: Mapping[str, Any], where: str = "models") -> ModelSpec:
    m = _build(ModelSpec, data, where)
    for f in ("params_b", "n_layers", "hidden_size", "n_kv_heads", "head_dim", "dtype_bytes"):
        _positive(f"{where}.{f}", getattr(m, f))
    _non_negative(f"{where}.vocab_size", m.vocab_size)
    if m.layer_params <= 0:
        raise ConfigError(f"{where}: vocab_size x hidden_size ({m.head_params:.3g} parameters) leaves nothing of"
                          f" params_b ({m.params_b}e9) for the layers")
    return m


def gpu_from_dict(data: Mapping[str, Any], where: str) -> GpuSpec:
    g = _build(GpuSpec, data, where)
    for f in ("mem_bytes", "hbm_Bps", "flops", "h2d_Bps"):
        _positive(f"{where}.{f}", getattr(g, f))
    if g.allreduce_bus_Bps != math.inf:  # inf: no all-reduce cost (one GPU per instance, or not modelled)
        _positive(f"{where}.allreduce_bus_Bps", g.allreduce_bus_Bps)
    _non_negative(f"{where}.allreduce_latency_s", g.allreduce_latency_s)
    return g


def tier_from_dict(name: str, data: Mapping[str, Any], where: str) -> TierSpec:
    if name not in LOCAL_TIERS:
        raise ConfigError(f"{where}: unknown tier {name!r}; local tiers are {list(LOCAL_TIERS)}")
    t = _build(TierSpec, data, where, name=name)
    for f in ("capacity_bytes", "read_bw_Bps", "write_bw_Bps", "max_streams"):
        _positive(f"{where}.{f}", getattr(t, f))
    _non_negative(f"{where}.latency_s", t.latency_s)
    _non_negative(f"{where}.price_usd_per_gb_month", t.price_usd_per_gb_month)
    return t


def loader_from_dict(data: Mapping[str, Any], where: str) -> LoaderSpec:
    """A loader from its config mapping; efficiencies must lie in (0, 1], the rate caps may be inf."""
    ld = _build(LoaderSpec, data, where)
    for f in ("pipelined", "parallel_gpus"):
        if not isinstance(getattr(ld, f), bool):
            raise ConfigError(f"{where}.{f} must be true or false, got {getattr(ld, f)!r}")
    for f in ("read_efficiency", "to_gpu_efficiency"):
        _positive(f"{where}.{f}", getattr(ld, f))
        if getattr(ld, f) > 1:
            raise ConfigError(f"{where}.{f} must be <= 1, got {getattr(ld, f)!r}")
    for f in ("max_read_Bps", "page_cache_Bps"):
        cap = getattr(ld, f)
        if not isinstance(cap, int | float) or isinstance(cap, bool) or math.isnan(cap) or cap <= 0:
            raise ConfigError(f"{where}.{f} must be a positive number (or inf), got {cap!r}")
    for f in ("chunk_bytes", "fixed_overhead_s"):
        _non_negative(f"{where}.{f}", getattr(ld, f))
    return ld


def store_from_dict(data: Mapping[str, Any], where: str = "cluster.store") -> ObjectStoreSpec:
    s = _build(ObjectStoreSpec, data, where)
    for f in ("per_stream_Bps", "streams"):
        _positive(f"{where}.{f}", getattr(s, f))
    for f in ("ttfb_s", "price_usd_per_gb_month", "egress_usd_per_gb", "outage_rate_per_hour", "outage_duration_s"):
        _non_negative(f"{where}.{f}", getattr(s, f))
    if s.outage_rate_per_hour > 0 and s.outage_duration_s <= 0:
        raise ConfigError(f"{where}.outage_duration_s must be > 0 when outage_rate_per_hour > 0")
    return s


#: Efficiencies of an EngineSpec: shares of a peak, in (0, 1].
EFFICIENCIES: tuple[str, ...] = ("gpu_mem_util", "prefill_mfu", "weight_read_eff", "kv_read_eff")


def engine_from_dict(data: Mapping[str, Any], where: str = "engine") -> EngineSpec:
    """An engine from its config mapping. `decode_hbm_eff` (before weight and KV reads had their own factors)
    is read as both `weight_read_eff` and `kv_read_eff` unless they are given."""
    data = dict(data)
    if "decode_hbm_eff" in data:
        legacy = data.pop("decode_hbm_eff")
        data.setdefault("weight_read_eff", legacy)
        data.setdefault("kv_read_eff", legacy)
    e = _build(EngineSpec, data, where)
    for f in ("kv_alloc_Bps", "max_num_seqs", *EFFICIENCIES):
        _positive(f"{where}.{f}", getattr(e, f))
    for f in ("process_start_s", "graph_capture_s", "compile_s", "kv_reserve_frac", "step_overhead_s",
              "request_overhead_s", "layer_overhead_s", "elementwise_passes", "stop_s", "cuda_context_s",
              "compile_per_b_s", "graph_capture_per_b_s", "compile_cache_hit_s"):
        _non_negative(f"{where}.{f}", getattr(e, f))
    over = [f for f in EFFICIENCIES if getattr(e, f) > 1]
    if over:
        raise ConfigError(f"{where}: {', '.join(over)} must be <= 1 (a share of the peak)")
    return e


def cluster_from_dict(data: Mapping[str, Any], where: str = "cluster") -> ClusterSpec:
    """Build a cluster from `{store: {...}, node_groups: [{name, count, gpu, n_gpus, ...}]}`.

    A node group expands into `count` identical nodes named `<name>-<i>`. Cluster-level
    `spot_share` and fault keys (`NODE_FAULT_FIELDS`) are defaults every group may override;
    the first round(count x spot_share) nodes of a group are spot. `stores: [...]` (primary
    first) replaces `store: {...}` for failover across stores. `tier_overrides: {tier: {field:
    value} | null}` changes (or adds) that tier's fields in every group, or removes the tier
    (null): the `tiers` config group sweeps tier configurations over any cluster preset this way.
    """
    unknown = set(data) - CLUSTER_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(CLUSTER_KEYS)}")
    cluster_share = _spot_share(data.get("spot_share", 0.0), f"{where}.spot_share")
    for key in NODE_FAULT_FIELDS:
        if key in data:
            _non_negative(f"{where}.{key}", data[key])
    tier_overrides = _tier_overrides(data.get("tier_overrides"), f"{where}.tier_overrides")
    groups = data.get("node_groups")
    if not groups:
        raise ConfigError(f"{where}.node_groups: at least one node group is required")
    nodes: list[NodeSpec] = []
    for gi, group in enumerate(groups):
        gw = f"{where}.node_groups[{gi}]"
        if not isinstance(group, Mapping):
            raise ConfigError(f"{gw}: expected a mapping")
        group = dict(group)
        share = _spot_share(group.pop("spot_share", cluster_share), f"{gw}.spot_share")
        for key in NODE_FAULT_FIELDS:
            if key in data:
                group.setdefault(key, data[key])
        count = group.pop("count", 1)
        if not isinstance(count, int) or count < 1:
            raise ConfigError(f"{gw}.count must be a positive integer, got {count!r}")
        gpu = gpu_from_dict(group.pop("gpu", None) or {}, f"{gw}.gpu")
        tiers: dict[str, TierSpec] = {}
        for name, t in _with_tier_overrides(group.pop("tiers", None) or {}, tier_overrides).items():
            tw = f"{gw}.tiers.{name}" + (f" (with {where}.tier_overrides.{name})" if name in tier_overrides else "")
            tiers[name] = tier_from_dict(name, t, tw)
        loader = loader_from_dict(group.pop("loader", None) or {}, f"{gw}.loader")
        base = group.pop("name", f"node{gi}")
        for i in range(count):
            node = _build(NodeSpec, group, gw, name=f"{base}-{i}", gpu=gpu, tiers=tiers, loader=loader)
            nodes.append(node)
        _positive(f"{gw}.n_gpus", nodes[-1].n_gpus)
        _positive(f"{gw}.nic_Bps", nodes[-1].nic_Bps)
        _non_negative(f"{gw}.od_usd_per_hour", nodes[-1].od_usd_per_hour)
        _non_negative(f"{gw}.spot_usd_per_hour", nodes[-1].spot_usd_per_hour)
        nodes[-count:] = _with_spot(nodes[-count:], share, gw)
    names = [n.name for n in nodes]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}.node_groups: node names collide: {sorted(names)}")
    stores = _stores_from_dict(data, where)
    failover_s = data.get("failover_s", 0.0)
    _non_negative(f"{where}.failover_s", failover_s)
    return ClusterSpec(nodes=tuple(nodes), store=stores[0], backup_stores=stores[1:], failover_s=float(failover_s))


def _tier_overrides(data: Any, where: str) -> dict[str, Mapping[str, Any] | None]:
    """The cluster's `tier_overrides`, checked: local tier names, each a mapping of fields or null (remove)."""
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of tier name -> fields (or null to remove the tier)")
    for name, fields_ in data.items():
        if name not in LOCAL_TIERS:
            raise ConfigError(f"{where}.{name}: unknown tier; local tiers are {list(LOCAL_TIERS)}")
        if fields_ is not None and not isinstance(fields_, Mapping):
            raise ConfigError(f"{where}.{name}: expected a mapping of tier fields or null, got {fields_!r}")
    return dict(data)


def _with_tier_overrides(tiers: Mapping[str, Any], overrides: Mapping[str, Mapping[str, Any] | None]
                         ) -> dict[str, Any]:
    """A group's tier mappings with the cluster-wide overrides applied (null removes a tier)."""
    out = dict(tiers)
    for name, fields_ in overrides.items():
        if fields_ is None:
            out.pop(name, None)
        else:
            # a tier the group lacks is added; tier_from_dict then names any missing field
            base = out.get(name) or {}
            if not isinstance(base, Mapping):
                continue  # tier_from_dict reports the group's malformed tier
            out[name] = {**base, **fields_}
    return out


def _spot_share(share: Any, where: str) -> float:
    if not isinstance(share, int | float) or isinstance(share, bool) or not 0.0 <= share <= 1.0:
        raise ConfigError(f"{where} must be a number in [0, 1], got {share!r}")
    return float(share)


def _with_spot(group: list[NodeSpec], share: float, where: str) -> list[NodeSpec]:
    """The group's nodes with the first round(count x `share`) made spot (halves round up), fault fields checked."""
    n_spot = math.floor(len(group) * share + 0.5)
    out = [replace(n, spot=True) if i < n_spot else n for i, n in enumerate(group)]
    for f in NODE_FAULT_FIELDS:
        _non_negative(f"{where}.{f}", getattr(out[0], f))
    if any(n.spot for n in out) and out[0].spot_usd_per_hour <= 0:
        raise ConfigError(f"{where}.spot_usd_per_hour: spot nodes need a spot price (spot: true or spot_share > 0)")
    return out


def _stores_from_dict(data: Mapping[str, Any], where: str) -> tuple[ObjectStoreSpec, ...]:
    """`stores: [...]` (primary first) or the single `store: {...}`; not both."""
    many = data.get("stores")
    if not many:
        return (store_from_dict(data.get("store") or {}, f"{where}.store"),)
    if data.get("store"):
        raise ConfigError(f"{where}: give either store (one store) or stores (a failover list), not both")
    if not isinstance(many, Sequence) or isinstance(many, str):
        raise ConfigError(f"{where}.stores: expected a list of stores, primary first")
    stores = tuple(store_from_dict(s, f"{where}.stores[{i}]") for i, s in enumerate(many))
    names = [s.name for s in stores]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}.stores: store names repeat: {names}")
    return stores


def validate_fit(cluster: ClusterSpec, models: Sequence[ModelSpec], engine: EngineSpec) -> None:
    """Reject configurations in which a model can never run or a tier can never be used."""
    if not models:
        raise ConfigError("models: the catalog is empty")
    smallest = min(models, key=lambda m: m.weights_bytes)
    for node in cluster.nodes:
        for tier in node.tiers.values():
            if tier.capacity_bytes < smallest.weights_bytes:
                raise ConfigError(
                    f"cluster: tier {tier.name!r} on node {node.name!r} holds {tier.capacity_bytes / 1e9:.3g} GB,"
                    f" smaller than every model (smallest: {smallest.name}, {smallest.weights_bytes / 1e9:.3g} GB)"
                )
    biggest = max((n.gpu_mem_bytes * engine.gpu_mem_util for n in cluster.nodes), default=0.0)
    too_big = [m for m in models if m.resident_bytes > biggest]
    if too_big:
        m = max(too_big, key=lambda x: x.resident_bytes)
        bases = sorted({x.base or x.name for x in too_big})
        raise ConfigError(
            f"models.bases: {len(too_big)} of {len(models)} deployments fit on no node, e.g. {m.name!r} (base "
            f"{m.base or m.name}) needs {m.resident_bytes / 1e9:.3g} GB of GPU memory, larger than every node: the "
            f"largest offers {biggest / 1e9:.3g} GB (cluster.node_groups[*].n_gpus x gpu.mem_bytes x "
            f"engine.gpu_mem_util); drop {', '.join(bases)} from models.bases or choose a larger cluster"
        )
