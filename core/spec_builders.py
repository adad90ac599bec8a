"""Builders of the specs (`core.specs`) from plain config mappings (hydra / yaml).

Each `*_from_dict` validates one mapping and raises `ConfigError` naming the offending field, so bad input
fails before a run starts; `validate_fit` rejects a catalog that can never run on a cluster.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import fields, replace
from typing import Any

from core.errors import ConfigError
from core.specs import (
    CLUSTER_KEYS,
    LOCAL_TIERS,
    NODE_FAULT_FIELDS,
    ClusterSpec,
    EngineSpec,
    GpuSpec,
    LoaderSpec,
    ModelSpec,
    NodeSpec,
    ObjectStoreSpec,
    TierSpec,
)


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
    _prefix_cache_fields(e, where)
    return e


def _prefix_cache_fields(e: EngineSpec, where: str) -> None:
    """The prefix-cache options (core/prefix_cache.py): a share of the KV budget, whole blocks."""
    if not 0.0 <= e.prefix_cache_frac <= 1.0:
        raise ConfigError(f"{where}.prefix_cache_frac must be in [0, 1], got {e.prefix_cache_frac}")
    for f, low in (("prefix_cache_blocks", 0), ("prefix_block_tokens", 1)):
        v = getattr(e, f)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ConfigError(f"{where}.{f} must be an integer >= {low}, got {v!r}")


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
