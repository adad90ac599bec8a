"""Engine start-up as phases, and the two options real platforms use to skip them.

A full start is: process start, accelerator (CUDA) context (both may overlap the weight
fetch), then, once the weights are resident, KV-cache allocation, graph capture and
compile (`core.loadtime` times each phase; `EngineSpec` holds the per-phase costs, by
model size where the sources give one; docs/results/engine_startup_sources.md cites them).

Two options, chosen per policy bundle (`PolicyBundle(engine_start={...})`, or
`policy.engine_start` in hydra), are `EngineStartOptions`:

- an engine pool: `pool_size` pre-initialised engine processes per architecture (base) and
  node, each past process start, context, compile and graph capture, waiting only for
  weights (and its KV allocation). A start takes one; the pool refills in the background,
  paying a full start. The pooled processes hold `pool_gpu_bytes` of GPU memory each.
- GPU memory snapshots: after a model's first full start on a node, its initialised engine
  state (resident weights + `snapshot_extra_bytes` of graphs, context, kernels; the KV cache
  is released before the checkpoint, as engines that support it do) is written to
  `snapshot_tier`; a later start of that model on that node restores it at the tier's read
  bandwidth (PCIe bounds it if slower) and pays no init phase.

Pure: no clock, no I/O. `sim.engine_start` executes these in SimPy time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from core.errors import ConfigError
from core.loadtime import Hop, compile_time_s, engine_start_s, graph_capture_s
from core.specs import LOCAL_TIERS, EngineSpec, ModelSpec, NodeSpec

#: How an instance's engine came up.
MODES: tuple[str, ...] = ("full", "pool", "snapshot")

#: One row per engine start that reached ready (sim-only table, `engine_starts.parquet`). The phase
#: columns are each phase's duration; `overlapped_s` is the part of them hidden behind the weight
#: transfer, so that the phases less `overlapped_s` give `engine_init_s` (ready - weights resident).
ENGINE_START_SCHEMA: dict[str, str] = {
    "time_s": "float64",  # when the instance became ready
    "instance": "string",
    "model": "string",
    "base": "string",
    "node": "string",
    "mode": "string",  # full, pool, snapshot
    "compile_cache": "string",  # miss, hit, or "" (no compile on the critical path, or no cache)
    "process_start_s": "float64",
    "cuda_context_s": "float64",
    "kv_alloc_s": "float64",
    "compile_s": "float64",
    "graph_capture_s": "float64",
    "restore_s": "float64",  # snapshot restore (tier -> GPU); 0 otherwise
    "overlapped_s": "float64",
    "engine_init_s": "float64",
}


@dataclass(frozen=True)
class EngineStartOptions:
    """Which start-up shortcuts a policy bundle uses (all off by default: every start is full)."""

    pool_size: int = 0  # pre-initialised engine processes kept per (node, base architecture)
    # GPU memory one pooled process holds while it waits (CUDA context + allocator pools; ASSUMPTION,
    # see engine_startup_sources.md). Reserved on the node's GPUs for the whole run, refills included.
    pool_gpu_bytes: float = 0.0
    snapshot_tier: str = ""  # local tier that keeps GPU memory snapshots ("" = no snapshots)
    snapshot_extra_bytes: float = 0.0  # a snapshot's bytes beyond the resident weights (graphs, context)

    @property
    def pool(self) -> bool:
        return self.pool_size > 0

    @property
    def snapshots(self) -> bool:
        return bool(self.snapshot_tier)


def options_from(value: Any, where: str = "policy.engine_start") -> EngineStartOptions:
    """Options from None, a mapping (hydra) or options; ConfigError naming the field otherwise."""
    if value is None:
        return EngineStartOptions()
    if isinstance(value, EngineStartOptions):
        opts = value
    elif isinstance(value, Mapping):
        known = {f.name for f in fields(EngineStartOptions)}
        unknown = set(value) - known
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
        opts = EngineStartOptions(**dict(value))
    else:
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    if not isinstance(opts.pool_size, int) or isinstance(opts.pool_size, bool) or opts.pool_size < 0:
        raise ConfigError(f"{where}.pool_size must be a non-negative integer, got {opts.pool_size!r}")
    for f in ("pool_gpu_bytes", "snapshot_extra_bytes"):
        v = getattr(opts, f)
        if not isinstance(v, int | float) or isinstance(v, bool) or v < 0:
            raise ConfigError(f"{where}.{f} must be a non-negative number, got {v!r}")
    if opts.snapshot_tier and opts.snapshot_tier not in LOCAL_TIERS:
        raise ConfigError(f"{where}.snapshot_tier must be one of {list(LOCAL_TIERS)} or empty, "
                          f"got {opts.snapshot_tier!r}")
    return opts


def base_of(model: ModelSpec) -> str:
    """The architecture a compile artefact or a pooled engine serves (fine-tunes share their base's)."""
    return model.base or model.name


@dataclass(frozen=True)
class StartPhases:
    """One start's phase durations, s. `before_weights_s` may overlap the fetch; `after_weights_s`
    follows the weights (with progressive loading only KV allocation stays on the critical path)."""

    mode: str = "full"
    compile_cache: str = ""
    process_start_s: float = 0.0
    cuda_context_s: float = 0.0
    kv_alloc_s: float = 0.0
    compile_s: float = 0.0
    graph_capture_s: float = 0.0
    before_weights_s: float = 0.0
    after_weights_s: float = 0.0

    @property
    def total_s(self) -> float:
        return (self.process_start_s + self.cuda_context_s + self.kv_alloc_s + self.compile_s
                + self.graph_capture_s)


def start_phases(model: ModelSpec, engine: EngineSpec, kv_bytes: float, progressive: bool, *,
                 mode: str = "full", cache_hit: bool = False) -> StartPhases:
    """The phases of one engine start.

    `before_weights_s` / `after_weights_s` are summed exactly as `core.loadtime` sums them, so a full
    start with the default engine times the same to the bit as before phases existed.
    """
    if mode == "snapshot":
        return StartPhases(mode=mode)  # the restore is a transfer (snapshot_hop), no init phase
    kv = kv_bytes / engine.kv_alloc_Bps
    deferred = progressive  # capture and compile run after the first token
    has_compile = model.params_b >= engine.compile_min_params_b and not deferred
    if mode == "pool":  # process, context, graphs and compiled code exist already: weights + KV only
        return StartPhases(mode=mode, kv_alloc_s=kv, after_weights_s=kv)
    after = kv
    graphs = comp = 0.0
    if not deferred:
        graphs = graph_capture_s(model, engine)
        after += graphs
        if has_compile:
            comp = compile_time_s(model, engine, cache_hit)
            after += comp
    cache = ("hit" if cache_hit else "miss") if has_compile and engine.compile_cache else ""
    return StartPhases(mode=mode, compile_cache=cache, process_start_s=engine.process_start_s,
                       cuda_context_s=engine.cuda_context_s, kv_alloc_s=kv, compile_s=comp, graph_capture_s=graphs,
                       before_weights_s=engine_start_s(engine), after_weights_s=after)


def refill_s(model: ModelSpec, engine: EngineSpec, cache_hit: bool) -> float:
    """A pooled engine's own start in the background: process, context, compile, graph capture (no weights,
    no KV: it waits for those like any pooled engine)."""
    comp = compile_time_s(model, engine, cache_hit)
    return engine_start_s(engine) + comp + graph_capture_s(model, engine)


def snapshot_bytes(model: ModelSpec, opts: EngineStartOptions) -> float:
    """A GPU memory snapshot's size: the resident weights plus graphs / context (the KV cache is not kept)."""
    return model.resident_bytes + opts.snapshot_extra_bytes


def snapshot_hop(model: ModelSpec, node: NodeSpec, opts: EngineStartOptions) -> Hop:
    """Restore: the snapshot read from its tier straight into GPU memory (tier read link and PCIe)."""
    tier = node.tiers[opts.snapshot_tier]
    links = (f"{tier.name}_r", "pcie")
    return Hop("to_gpu", tier.name, "gpu", links, snapshot_bytes(model, opts), float("inf"), tier.latency_s)
