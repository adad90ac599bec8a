"""What the local tiers hold when a run starts, and what they held when it ended (`final_state.json`).

`sim.initial_state` is `empty` (the default: every tier starts empty), the path of a `final_state.json` that
an earlier run wrote (its tiers' contents, per node, with each copy's recency), or `policy` (the policy's own
pre-population: a caching or autoscaling hook named `initial_state(view) -> Sequence[Copy]`, none by default).
A state is checked against this run's cluster and catalog before the run: a model the catalog lacks (or that
is another architecture here), a node the cluster lacks, a tier the node lacks or a tier over its capacity is a
`ConfigError` naming `sim.initial_state` and the file.

Pure: the file is read and written by `experiments/`; here are only the mappings.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from core.decisions import Copy
from core.errors import ConfigError
from core.specs import LOCAL_TIERS, ClusterSpec, ModelSpec
from core.state import ClusterState

FORMAT = "tierlab.final_state/1"
FIELD = "sim.initial_state"
#: the values of `sim.initial_state` that are not a file
EMPTY, POLICY = "empty", "policy"


@dataclass(frozen=True)
class Held:
    """One copy a tier holds at the start. `last_access_s` <= 0: how long before the start it was last read
    (it keeps the previous run's LRU order)."""

    node: str
    tier: str
    model: str
    last_access_s: float = 0.0
    hits: int = 0


@dataclass(frozen=True)
class InitialState:
    """The copies every local tier holds at time 0, and where they come from (a file, or `policy`)."""

    held: tuple[Held, ...]
    source: str


def catalog_identity(models: Sequence[ModelSpec]) -> dict[str, Any]:
    """The catalog a state belongs to: its size and a digest of every deployment's name, base and size."""
    rows = sorted((m.name, m.base, round(m.weights_bytes)) for m in models)
    digest = hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]
    return {"deployments": len(rows), "digest": digest}


def final_state(state: ClusterState, end_s: float) -> dict[str, Any]:
    """`final_state.json`'s content: per node, per local tier, the models held at `end_s` (least recently used
    first, each with its last access and hits), the specs of those models and the catalog's identity."""
    nodes: dict[str, dict[str, list[dict[str, Any]]]] = {}
    held: set[str] = set()
    for name, ns in state.nodes.items():
        tiers: dict[str, list[dict[str, Any]]] = {}
        for tier_name, tier in ns.tiers.items():
            rows = []
            for model in tier.lru_order():
                e = tier.entries[model]
                rows.append({"model": model, "last_access_s": e.last_access_s, "hits": e.hits})
                held.add(model)
            tiers[tier_name] = rows
        nodes[name] = tiers
    models = state.models
    return {
        "format": FORMAT,
        "end_s": end_s,
        "catalog": catalog_identity(list(models.values())),
        "models": {m: {"base": models[m].base, "weights_bytes": models[m].weights_bytes} for m in sorted(held)},
        "nodes": nodes,
    }


def from_final_state(data: Any, cluster: ClusterSpec, models: Sequence[ModelSpec], source: str) -> InitialState:
    """The initial state a `final_state.json` mapping describes, checked against this run's cluster and catalog
    (`source`: the file, for the error messages). Recency is kept relative to the old run's end."""
    where = f"{FIELD}: {source}"
    if not isinstance(data, Mapping) or data.get("format") != FORMAT or not isinstance(data.get("nodes"), Mapping):
        raise ConfigError(f"{where}: not a tierlab final state (expected format {FORMAT!r} with a 'nodes' mapping)")
    end_s = _number(data.get("end_s", 0.0), f"{where}: end_s")
    specs = data.get("models") or {}
    catalog = {m.name: m for m in models}
    theirs, ours = (data.get("catalog") or {}).get("digest"), catalog_identity(models)["digest"]
    held: list[Held] = []
    for node, tiers in data["nodes"].items():
        if not isinstance(tiers, Mapping):
            raise ConfigError(f"{where}: node {node!r}: expected a mapping of tiers")
        for tier, rows in tiers.items():
            for row in rows or []:
                if not isinstance(row, Mapping) or not isinstance(row.get("model"), str):
                    raise ConfigError(f"{where}: node {node!r} tier {tier!r}: expected rows with a 'model'")
                model = row["model"]
                spec = catalog.get(model)
                if spec is None:
                    raise ConfigError(
                        f"{where}: model {model!r} (node {node!r}, tier {tier!r}) is not in this run's catalog "
                        f"({len(catalog)} deployments, digest {ours}; the file's run had digest {theirs}): "
                        "the state comes from a run with another catalog (models / workload)")
                old = specs.get(model) or {}
                if "weights_bytes" in old and not math.isclose(float(old["weights_bytes"]), spec.weights_bytes):
                    raise ConfigError(
                        f"{where}: model {model!r} has {float(old['weights_bytes']) / 1e9:.3g} GB of weights there "
                        f"({old.get('base')}) but {spec.weights_bytes / 1e9:.3g} GB here ({spec.base}): "
                        "another catalog")
                last = _number(row.get("last_access_s", end_s), f"{where}: {model} last_access_s")
                held.append(Held(str(node), str(tier), model, min(0.0, last - end_s), int(row.get("hits", 0))))
    return checked(held, cluster, models, source)


def from_copies(copies: Iterable[Copy], cluster: ClusterSpec, models: Sequence[ModelSpec],
                source: str) -> InitialState:
    """The initial state a policy's `initial_state` hook asks for (each `Copy` lands at time 0, for free)."""
    held = []
    for c in copies:
        if not isinstance(c, Copy):
            raise ConfigError(f"{FIELD}: {source}: expected Copy actions, got {c!r}")
        if c.model not in {m.name for m in models}:
            raise ConfigError(f"{FIELD}: {source}: model {c.model!r} is not in this run's catalog")
        held.append(Held(c.node, c.to_tier, c.model))
    return checked(held, cluster, models, source)


def checked(held: Sequence[Held], cluster: ClusterSpec, models: Sequence[ModelSpec], source: str) -> InitialState:
    """`held` as an `InitialState`, once every node, tier and capacity is known to fit this cluster."""
    where = f"{FIELD}: {source}"
    nodes = {n.name: n for n in cluster.nodes}
    sizes = {m.name: m.weights_bytes for m in models}
    used: dict[tuple[str, str], float] = {}
    seen: set[tuple[str, str, str]] = set()
    for h in held:
        node = nodes.get(h.node)
        if node is None:
            raise ConfigError(f"{where}: node {h.node!r} is not in this cluster (nodes: {sorted(nodes)}): "
                              "the state comes from another cluster")
        if h.tier not in LOCAL_TIERS or h.tier not in node.tiers:
            raise ConfigError(f"{where}: node {h.node!r} has no tier {h.tier!r} here (tiers: {sorted(node.tiers)})")
        key = (h.node, h.tier, h.model)
        if key in seen:
            raise ConfigError(f"{where}: {h.model!r} is listed twice in {h.node}/{h.tier}")
        seen.add(key)
        used[(h.node, h.tier)] = used.get((h.node, h.tier), 0.0) + sizes[h.model]
    for (node, tier), nbytes in sorted(used.items()):
        cap = nodes[node].tiers[tier].capacity_bytes
        if nbytes > cap + 1e-6:
            raise ConfigError(f"{where}: {node}/{tier} would hold {nbytes / 1e9:.4g} GB, more than its "
                              f"{cap / 1e9:.4g} GB here (cluster / tiers changed since)")
    return InitialState(tuple(held), source)


def place(state: ClusterState, init: InitialState) -> list[tuple[str, str, str, float]]:
    """Put `init`'s copies into `state`'s tiers (at time 0, with their recency); returns (node, tier, model,
    bytes) per copy, in order, for the tier-movement table."""
    out = []
    for h in init.held:
        tier = state.nodes[h.node].tiers[h.tier]
        nbytes = state.models[h.model].weights_bytes
        tier.reserve(h.model, nbytes)
        tier.commit(h.model, h.last_access_s)  # added and last read then: the old run's LRU order
        tier.entries[h.model].hits = h.hits
        out.append((h.node, h.tier, h.model, nbytes))
    return out


def _number(value: Any, where: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: not a number: {value!r}") from None
    if not math.isfinite(v):
        raise ConfigError(f"{where}: not finite: {value!r}")
    return v
