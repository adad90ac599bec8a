"""The live catalog: checkpoints (generated, local or from the Hub) published to the cloud store, their model
specs for the gateway, and the tenants (API keys) that may use them.

Every checkpoint is checked before it is published (`live.checkpoint_check`): an architecture the CPU engine
computes exactly, weights that match config.json, a chat template that compiles. A refused one stops the
catalog with an error naming the model, the file and the field or tensor; nothing of it reaches a store.
The chat template each checkpoint will be served with (its own, or the CPU engine's built-in one) is worked out
here too, so that the gateway's GET /v1/models shows it before any instance runs (`catalog_model_details`).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from core.errors import ConfigError
from core.specs import ModelSpec
from live.checkpoint import PRESETS, generate_checkpoint
from live.checkpoint_check import check_checkpoint
from live.engines.cpu_chat import ChatPrompts
from live.gateway import Tenant
from live.llama_config import LlamaConfig, model_spec
from live.registry import Registry, check_model_name


@dataclass
class CatalogEntry:
    """A model of the live catalog and the checkpoint directory it is published from."""

    name: str
    path: Path
    # the chat template in use, as the CPU engine's /v1/models shows it: {source: "checkpoint", file, sha256} or
    # {source: "built-in", format}; None for an entry made without `build_catalog` (nothing shown)
    chat_template: dict[str, Any] | None = field(default=None, compare=False)


# --------------------------------------------------------------------------- catalog


def _generated_dir(cache: Path, preset: str, seed: int, dtype: str) -> Path:
    return cache / f"{preset}-s{seed}-{dtype}"


def build_catalog(catalog: Mapping[str, Any], cache_dir: str | os.PathLike[str],
                  progress: bool = True) -> list[CatalogEntry]:
    """Resolve every catalog entry to a local checkpoint dir, generating the missing ones (cached), and check
    each one (`check_checkpoint`): a checkpoint the CPU engine would not compute exactly is a ConfigError."""
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
        try:
            check_checkpoint(path)
            template = ChatPrompts.for_checkpoint(path).describe()  # the engine's own choice, from the same files
        except (OSError, ValueError) as e:
            raise ConfigError(f"{where}: {e}") from None
        entries.append(CatalogEntry(str(name), path, template))
    return entries


def catalog_model_details(entries: Sequence[CatalogEntry]) -> dict[str, dict[str, Any]]:
    """The fields the gateway adds to each model's GET /v1/models item (`GatewayConfig.model_details`): the chat
    template in use, in the shape of the CPU engine's own /v1/models."""
    return {e.name: {"chat_template": e.chat_template} for e in entries if e.chat_template is not None}


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


ENGINE_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def engine_dtype_bytes(cfg: Mapping[str, Any]) -> int:
    """Bytes per parameter of the engines' compute dtype (`engine.dtype`): what a loaded model occupies."""
    dtype = str((cfg.get("engine") or {}).get("dtype", "float32"))
    if dtype not in ENGINE_DTYPE_BYTES:
        raise ConfigError(f"engine.dtype: unknown {dtype!r}; known: {sorted(ENGINE_DTYPE_BYTES)}")
    return ENGINE_DTYPE_BYTES[dtype]


def catalog_model_specs(entries: Sequence[CatalogEntry], dtype_bytes: int) -> dict[str, ModelSpec]:
    """One ModelSpec per catalog checkpoint, from its config.json: stored in its own dtype (what tiers hold and
    loads move), resident in the engine's (what a node's memory budget holds)."""
    specs = {}
    for e in entries:
        try:
            specs[e.name] = model_spec(e.name, LlamaConfig.from_dir(e.path), dtype_bytes)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"catalog.{e.name}: {exc}") from None
    return specs
