"""Turn a composed config (plain mappings) into specs, a workload and a policy bundle.

Every check runs here, before a run starts, and errors name the config field or the
trace file and line.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.catalog import catalog_from_dict, deployments_for
from core.errors import ConfigError
from core.inference import MeasuredTable, measured_from_dict
from core.policies.base import PolicyBundle
from core.specs import ClusterSpec, EngineSpec, ModelSpec, cluster_from_dict, engine_from_dict, validate_fit
from core.workload import generators
from core.workload.embedded import embedded_path
from core.workload.lengths import TraceLengths
from core.workload.models import assign_models
from core.workload.readers import READERS, read_trace
from core.workload.trace import UNASSIGNED, Workload

REPO_ROOT = Path(__file__).resolve().parents[1]
GENERATORS = {"poisson": generators.poisson, "gamma": generators.gamma, "diurnal": generators.diurnal}


@dataclass
class Setup:
    """Everything a simulation needs, validated."""

    cluster: ClusterSpec
    models: list[ModelSpec]
    engine: EngineSpec
    policy: PolicyBundle
    workload: Workload
    measured: tuple[MeasuredTable, ...]
    sim: dict[str, float]


def resolve_path(path: str) -> Path:
    """`embedded:<name>` -> the packaged trace; relative paths are tried from the cwd, then the repo root."""
    if path.startswith("embedded:"):
        return embedded_path(path.split(":", 1)[1])
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    alt = REPO_ROOT / p
    return alt if alt.exists() else p


def load_workload(cfg: Mapping[str, Any], seed: int) -> Workload:
    """Read or generate the workload named by `cfg` (the `workload` config group), then cut and scale it."""
    kind = cfg.get("kind")
    options = dict(cfg.get("options") or {})
    if kind in READERS:
        if not cfg.get("path"):
            raise ConfigError(f"workload.path: required for kind {kind!r}")
        if kind == "servegen":
            options.setdefault("seed", seed)
        wl = read_trace(kind, resolve_path(str(cfg["path"])), **options)
    elif kind in GENERATORS:
        if cfg.get("lengths_from"):
            src = load_workload({"kind": "azure_llm", "path": cfg["lengths_from"]}, seed)
            options["lengths"] = TraceLengths.from_workload(src)
        try:
            wl = GENERATORS[kind](seed=seed, **options)
        except TypeError as exc:
            raise ConfigError(f"workload.options: {exc}") from exc
    else:
        raise ConfigError(f"workload.kind: unknown {kind!r}; known: {sorted([*READERS, *GENERATORS])}")
    window = cfg.get("window")
    if window:
        if len(window) != 2:
            raise ConfigError(f"workload.window: expected [start_s, end_s], got {window!r}")
        wl = wl.window(float(window[0]), float(window[1]))
    scale = float(cfg.get("time_scale", 1.0))
    if scale != 1.0:
        wl = wl.time_scale(scale)
    frac = float(cfg.get("subsample", 1.0))
    if frac != 1.0:
        wl = wl.subsample(frac, seed)
    limit = cfg.get("max_requests")
    if limit is not None:
        wl = wl.head(int(limit))
    return wl


def load_models(cfg: Mapping[str, Any], wl: Workload, seed: int) -> tuple[list[ModelSpec], Workload]:
    """The catalog, and the workload with every request given a model of it.

    Workloads that name their own deployments (ServeGen clients) get one spec per deployment;
    the others get model ids from a seeded Zipf law over the catalog.
    """
    named = sorted({m for m in wl.model.tolist() if m != UNASSIGNED})
    models = deployments_for(named, list(cfg.get("bases") or []), cfg.get("base_weights"), seed) if named else []
    if (wl.model == UNASSIGNED).any():
        catalog = catalog_from_dict(cfg, seed)
        models = [*models, *catalog]
        wl = assign_models(wl, [m.name for m in catalog], float(cfg.get("zipf_s", 1.0)), seed)
    return models, wl


def _import(target: str, where: str) -> Any:
    module, _, name = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"{where}._target_: cannot import {target!r}") from None


def build_policy(cfg: Mapping[str, Any], where: str = "policy") -> PolicyBundle:
    """Instantiate a policy bundle from `_target_` mappings (hydra-style), naming the field on error."""

    def make(node: Any, path: str) -> Any:
        if isinstance(node, Mapping):
            if "_target_" in node:
                cls = _import(str(node["_target_"]), path)
                kwargs = {k: make(v, f"{path}.{k}") for k, v in node.items() if k != "_target_"}
                try:
                    return cls(**kwargs)
                except (TypeError, ValueError) as exc:
                    raise ConfigError(f"{path}: {exc}") from exc
            return {k: make(v, f"{path}.{k}") for k, v in node.items()}
        if isinstance(node, list):
            return [make(v, f"{path}[{i}]") for i, v in enumerate(node)]
        return node

    bundle = make(cfg, where)
    if not isinstance(bundle, PolicyBundle):
        got = type(bundle).__name__
        raise ConfigError(f"{where}._target_: must build a core.policies.base.PolicyBundle, got {got}")
    return bundle


def build(cfg: Mapping[str, Any]) -> Setup:
    """Validate and build a whole simulation from the composed config."""
    seed = int(cfg.get("seed", 0))
    cluster = cluster_from_dict(cfg["cluster"])
    engine = engine_from_dict(cfg.get("engine") or {})
    measured = tuple(measured_from_dict(m, f"inference.measured[{i}]")
                     for i, m in enumerate((cfg.get("inference") or {}).get("measured") or []))
    policy = build_policy(cfg["policy"])
    wl = load_workload(cfg["workload"], seed)
    models_cfg = dict(cfg["models"])
    models_cfg.setdefault("zipf_s", cfg["workload"].get("zipf_s", 1.0))
    models, wl = load_models(models_cfg, wl, seed)
    validate_fit(cluster, models, engine)
    sim = {k: float(v) for k, v in (cfg.get("sim") or {}).items()}
    for k, v in sim.items():
        if v <= 0:
            raise ConfigError(f"sim.{k} must be > 0, got {v}")
    return Setup(cluster, models, engine, policy, wl, measured, sim)
