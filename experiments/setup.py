"""Turn a composed config (plain mappings) into a runnable simulation: specs and policy bundle (built by the
pure `core.config`, re-exported here), and the workload, which this module reads from files.

Every check runs here, before a run starts, and errors name the config field or the
trace file and line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.config import build_policy, build_specs, import_target
from core.config import models_for as load_models
from core.errors import ConfigError
from core.inference import MeasuredTable
from core.initial_state import EMPTY, FIELD, POLICY, InitialState, from_final_state
from core.policies.base import PolicyBundle
from core.spec_builders import validate_fit
from core.specs import ClusterSpec, EngineSpec, ModelSpec
from core.variants import apply_variants
from core.warmup import check_warmup
from core.workload import generators
from core.workload.embedded import embedded_path
from core.workload.lengths import TraceLengths
from core.workload.readers import READERS, read_trace
from core.workload.trace import Workload

REPO_ROOT = Path(__file__).resolve().parents[1]
# kept importable from here (notebooks and tests use experiments.setup.build_policy, load_models, ...)
_import = import_target
__all__ = ["FROM_FILE_GROUPS", "GENERATORS", "REPO_ROOT", "Setup", "build", "build_policy", "load_models",
           "load_workload", "resolve_from_file", "resolve_path"]
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
    warmup_s: float = 0.0  # metrics.warmup_s, checked against the workload
    initial_state: InitialState | str | None = None  # sim.initial_state: a checked file's state, "policy" or None


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
        if kind in ("servegen", "servegen_horizon"):
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


#: config groups whose block may say `from_file: PATH` (e.g. `cluster=calibrated`: experiments.calibrate's output)
FROM_FILE_GROUPS: tuple[str, ...] = ("cluster", "engine", "inference", "models")


def resolve_from_file(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """`cfg` with every `FROM_FILE_GROUPS` block that says `from_file: PATH` replaced by the block of the same
    name in that yaml file; the block's other keys (e.g. the `tiers` group's `tier_overrides`) are laid over it."""
    import yaml

    out = dict(cfg)
    for group in FROM_FILE_GROUPS:
        block = out.get(group)
        if not isinstance(block, Mapping) or "from_file" not in block:
            continue
        source = block["from_file"]
        if not source:
            raise ConfigError(f"{group}.from_file: a yaml file is needed (e.g. +calibration=OUT/calibrated.yaml)")
        path = resolve_path(str(source))
        try:
            loaded = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{group}.from_file: cannot read {path} ({exc})") from None
        if not isinstance(loaded, Mapping) or not isinstance(loaded.get(group), Mapping):
            raise ConfigError(f"{group}.from_file: {path} has no {group!r} block")
        out[group] = {**loaded[group], **{k: v for k, v in block.items() if k != "from_file"}}
    return out


def build(cfg: Mapping[str, Any]) -> Setup:
    """Validate and build a whole simulation from the composed config (specs: `core.config`; workload: here)."""
    cfg = resolve_from_file(cfg)
    seed = int(cfg.get("seed", 0))
    specs = build_specs(cfg)
    wl = load_workload(cfg["workload"], seed)
    models_cfg = dict(cfg["models"])
    models_cfg.setdefault("zipf_s", cfg["workload"].get("zipf_s", 1.0))
    models, wl = load_models(models_cfg, wl, seed)
    models = apply_variants(models, cfg.get("variants"))  # +variants=...: weight formats, KV dtype, speculation
    validate_fit(specs.cluster, models, specs.engine)
    warmup_s = check_warmup((cfg.get("metrics") or {}).get("warmup_s", 0.0), wl)
    initial = load_initial_state((cfg.get("sim") or {}).get("initial_state"), specs.cluster, models)
    return Setup(specs.cluster, models, specs.engine, specs.policy, wl, specs.measured, specs.sim, warmup_s, initial)


def load_initial_state(value: Any, cluster: ClusterSpec, models: list[ModelSpec]) -> InitialState | str | None:
    """`sim.initial_state`: None for `empty`, "policy" as is, or the state in that `final_state.json`, checked
    against this run's cluster and catalog (a `ConfigError` naming the field and the file otherwise)."""
    if value is None or value == EMPTY:
        return None
    if value == POLICY:
        return POLICY
    import json

    path = resolve_path(str(value))
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{FIELD}: cannot read {path} ({exc}); expected {EMPTY!r}, {POLICY!r} or the "
                          "final_state.json of an earlier run") from None
    return from_final_state(data, cluster, models, str(path))
