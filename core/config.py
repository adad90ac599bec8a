"""Turn a composed config (plain mappings, as hydra's `OmegaConf.to_container` gives it) into specs and
a policy bundle.

Pure: no files, no clock, no randomness of its own. The only side effect is importing the classes that
`_target_` keys name. `sim/`, `live/` and `experiments/` all build their policies here, so a bundle means
the same thing in every world. Errors are `ConfigError`s naming the config field.

    bundle = build_policy(cfg["policy"])            # PolicyBundle from `_target_` mappings
    specs = build_specs(cfg)                        # cluster, engine, measured tables, policy, sim knobs
    models, wl = models_for(cfg["models"], wl, seed)  # the catalog, and the workload's requests given models
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from core.catalog import catalog_from_dict, deployments_for
from core.errors import ConfigError
from core.inference import MeasuredTable, measured_from_dict
from core.policies.base import PolicyBundle
from core.spec_builders import cluster_from_dict, engine_from_dict, model_from_dict
from core.specs import ClusterSpec, EngineSpec, ModelSpec
from core.workload.models import assign_models
from core.workload.trace import UNASSIGNED, Workload


@dataclass(frozen=True)
class Specs:
    """What a composed config describes besides its workload and catalog, validated."""

    cluster: ClusterSpec
    engine: EngineSpec
    measured: tuple[MeasuredTable, ...]
    policy: PolicyBundle
    sim: dict[str, float]


def import_target(target: str, where: str) -> Any:
    """The object a dotted `_target_` path names (`pkg.module.Name`); ConfigError naming `where` otherwise."""
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
                cls = import_target(str(node["_target_"]), path)
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


def build_specs(cfg: Mapping[str, Any]) -> Specs:
    """Cluster, engine, measured inference tables, policy bundle and `sim` knobs of a composed config."""
    cluster = cluster_from_dict(cfg["cluster"])
    engine = engine_from_dict(cfg.get("engine") or {})
    measured = tuple(measured_from_dict(m, f"inference.measured[{i}]")
                     for i, m in enumerate((cfg.get("inference") or {}).get("measured") or []))
    policy = build_policy(cfg["policy"])
    # `initial_state` names a state (empty, a file, policy) and `steady_state` a mode (exact, fast), not numbers:
    # experiments.setup and sim.steady_state read them
    sim = {k: float(v) for k, v in (cfg.get("sim") or {}).items() if k not in ("initial_state", "steady_state")}
    for k, v in sim.items():
        if v <= 0:
            raise ConfigError(f"sim.{k} must be > 0, got {v}")
    return Specs(cluster, engine, measured, policy, sim)


def models_for(cfg: Mapping[str, Any], wl: Workload, seed: int) -> tuple[list[ModelSpec], Workload]:
    """The catalog (the `models` config group), and the workload with every request given a model of it.

    Workloads that name their own deployments (ServeGen clients) get one spec per deployment;
    the others get model ids from a seeded Zipf law over the catalog (the bases' deployments, then `extra`:
    explicit `core.spec_builders.model_from_dict` mappings).
    """
    named = sorted({m for m in [*wl.model.tolist(), *wl.catalog] if m != UNASSIGNED})
    models = deployments_for(named, list(cfg.get("bases") or []), cfg.get("base_weights"), seed) if named else []
    if (wl.model == UNASSIGNED).any():
        catalog = catalog_from_dict(cfg, seed)
        # explicit specs (e.g. experiments.calibrate's generated checkpoints), after the bases' deployments
        catalog += [model_from_dict(m, f"models.extra[{i}]") for i, m in enumerate(cfg.get("extra") or [])]
        models = [*models, *catalog]
        wl = assign_models(wl, [m.name for m in catalog], float(cfg.get("zipf_s", 1.0)), seed)
    return models, wl
