"""Cold-start load-time model: hops from the source tier to the GPU, engine init, progressive loading.

A cold start is a chain of hops (fetch from the source tier into host memory, copy host
to GPU) plus engine init (process start, KV-cache allocation, graph capture / compile).
The simulator runs each hop as a flow over shared links; `estimate_load_s` is the
closed-form time on idle links that policies use to rank options.

The node's `LoaderSpec` shapes the hops: its read efficiency and read cap bound the fetch,
its page-cache rate bounds a loader that reads through the OS page cache (DRAM included),
its host-to-GPU efficiency and GPU parallelism bound the copy, and a pipelined loader
streams the checkpoint through host memory in chunks (one hop over the source tier's read
link and PCIe at once) instead of staging it whole. The default loader changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from core.specs import EngineSpec, LoaderSpec, ModelSpec, NodeSpec, ObjectStoreSpec, TierSpec

PHASES: tuple[str, ...] = ("fetch", "to_gpu", "engine_init")


@dataclass(frozen=True, slots=True)
class Hop:
    """One transfer: `nbytes` over the named links, each flow capped at `cap_Bps`."""

    phase: str
    src: str
    dst: str
    links: tuple[str, ...]
    nbytes: float
    cap_Bps: float
    latency_s: float


def link_capacities(node: NodeSpec) -> dict[str, float]:
    """Bandwidth of every link on a node, bytes/s: NIC, host->GPU, and each tier's read and write."""
    caps = {"nic": node.nic_Bps, "pcie": node.gpu.h2d_Bps * node.n_gpus}
    for name, t in node.tiers.items():
        caps[f"{name}_r"] = t.read_bw_Bps
        caps[f"{name}_w"] = t.write_bw_Bps
    return caps


def link_streams(node: NodeSpec) -> dict[str, int]:
    """How many flows each link serves at once (the rest wait in line)."""
    out: dict[str, int] = {}
    for name, t in node.tiers.items():
        out[f"{name}_r"] = t.max_streams
        out[f"{name}_w"] = t.max_streams
    return out


def loader_read_Bps(loader: LoaderSpec, tier: TierSpec) -> float:
    """How fast `loader` reads a checkpoint out of `tier`.

    The loader's own cap (its I/O threads) bounds reads from storage devices only: a
    checkpoint already in host DRAM is copied to the GPUs by DMA, not read through files.
    A loader that reads through the page cache is also bounded by its CPU work on the pages
    (`page_cache_Bps`), from any tier: from a device that work overlaps the device read
    (kernel readahead), so the slower of the two sets the rate.
    """
    bw = min(tier.read_bw_Bps * loader.read_efficiency, loader.page_cache_Bps)
    return bw if tier.name == "dram" else min(bw, loader.max_read_Bps)


def loader_to_gpu_Bps(node: NodeSpec, n_gpus: int) -> float:
    """Host-to-GPU rate of the node's loader for an instance on `n_gpus` GPUs."""
    loader = node.loader
    return node.gpu.h2d_Bps * (n_gpus if loader.parallel_gpus else 1) * loader.to_gpu_efficiency


def fetch_hop(source_tier: str, model: ModelSpec, node: NodeSpec, store: ObjectStoreSpec) -> Hop | None:
    """The hop that brings the weights from `source_tier` into host memory (None if already there)."""
    nbytes = model.weights_bytes
    if source_tier == "cloud":
        return Hop("fetch", "cloud", "host", ("nic",), nbytes, store.streams * store.per_stream_Bps, store.ttfb_s)
    if source_tier == "dram":
        return None
    tier = node.tiers[source_tier]
    return Hop("fetch", source_tier, "host", (f"{source_tier}_r",), nbytes, loader_read_Bps(node.loader, tier),
               tier.latency_s)


def to_gpu_hop(model: ModelSpec, node: NodeSpec, n_gpus: int, from_dram: bool = False) -> Hop:
    """Host memory to the instance's GPUs (tensor-parallel shards move in parallel unless the loader
    copies one GPU at a time).

    Straight from the DRAM tier there is no fetch hop, so a page-cache loader's CPU work on the
    pages (`page_cache_Bps`) bounds this copy instead; after a fetch it was already paid there.
    """
    cap = loader_to_gpu_Bps(node, n_gpus)
    if from_dram:
        cap = min(cap, node.loader.page_cache_Bps)
    return Hop("to_gpu", "host", "gpu", ("pcie",), model.weights_bytes, cap, 0.0)


def pipelined_hops(source_tier: str, model: ModelSpec, node: NodeSpec, n_gpus: int) -> list[Hop]:
    """A chunked loader's hops from a local tier: read the first chunk, then stream the checkpoint
    over the tier's read link and PCIe at once, at the slower of the two.

    The stream hop carries every byte, so a layer's arrival on the GPU is where progressive
    loading expects it; the fill makes the total at most one chunk's read time longer than
    an exact two-stage pipeline. From DRAM there is nothing to fill. (The simulator keeps its read
    claim on the source tier until the last hop reading it, here the stream, ends.)
    """
    tier = node.tiers[source_tier]
    read = loader_read_Bps(node.loader, tier)
    stream_cap = min(read, loader_to_gpu_Bps(node, n_gpus))
    links = (f"{source_tier}_r", "pcie")
    nbytes = model.weights_bytes
    if source_tier == "dram":
        return [Hop("to_gpu", source_tier, "gpu", links, nbytes, stream_cap, tier.latency_s)]
    fill = min(node.loader.chunk_bytes, nbytes)
    return [Hop("fetch", source_tier, "host", (f"{source_tier}_r",), fill, read, tier.latency_s),
            Hop("to_gpu", source_tier, "gpu", links, nbytes, stream_cap, 0.0)]


def load_hops(source_tier: str, model: ModelSpec, node: NodeSpec, store: ObjectStoreSpec, n_gpus: int) -> list[Hop]:
    """All transfer hops of a cold start, in order; the loader's fixed overhead delays the first.

    A cloud download is staged even for a pipelined loader: it lands in host memory first.
    """
    loader = node.loader
    if loader.pipelined and source_tier != "cloud":
        hops = pipelined_hops(source_tier, model, node, n_gpus)
    else:
        hops = []
        first = fetch_hop(source_tier, model, node, store)
        if first is not None:
            hops.append(first)
        hops.append(to_gpu_hop(model, node, n_gpus, from_dram=first is None))
    if loader.fixed_overhead_s > 0:
        hops[0] = replace(hops[0], latency_s=hops[0].latency_s + loader.fixed_overhead_s)
    return hops


def copy_hop(src_tier: str, dst_tier: str, model: ModelSpec, node: NodeSpec, store: ObjectStoreSpec) -> Hop:
    """A tier movement: read from `src_tier` (a local tier, "gpu", "host" staging memory or "cloud"),
    write into `dst_tier`."""
    if src_tier == "host":
        links, cap, lat = (f"{dst_tier}_w",), float("inf"), 0.0
    elif src_tier == "cloud":
        links: tuple[str, ...] = ("nic", f"{dst_tier}_w")
        cap, lat = store.streams * store.per_stream_Bps, store.ttfb_s
    elif src_tier == "gpu":
        links, cap, lat = ("pcie", f"{dst_tier}_w"), node.gpu.h2d_Bps, 0.0
    else:
        links = (f"{src_tier}_r", f"{dst_tier}_w")
        cap, lat = float("inf"), node.tiers[src_tier].latency_s
    return Hop("copy", src_tier, dst_tier, links, model.weights_bytes, cap, lat)


def engine_start_s(engine: EngineSpec) -> float:
    """Process start and accelerator (CUDA) context creation: may overlap the weight fetch."""
    return engine.process_start_s + engine.cuda_context_s


def graph_capture_s(model: ModelSpec, engine: EngineSpec) -> float:
    """CUDA-graph capture for `model`: a fixed part plus a part per billion parameters."""
    return engine.graph_capture_s + engine.graph_capture_per_b_s * model.params_b


def compile_time_s(model: ModelSpec, engine: EngineSpec, cache_hit: bool = False) -> float:
    """torch.compile for `model` (0 below `compile_min_params_b`); a compile-cache hit loads the artefact."""
    if model.params_b < engine.compile_min_params_b:
        return 0.0
    if cache_hit:
        return engine.compile_cache_hit_s
    return engine.compile_s + engine.compile_per_b_s * model.params_b


def engine_after_weights_s(model: ModelSpec, engine: EngineSpec, kv_bytes: float, progressive: bool,
                           cache_hit: bool = False) -> float:
    """Work after the weights are resident: KV-cache allocation, then graph capture / compile.

    Progressive loading runs the first forward pass eagerly, so capture and compile are
    deferred past the first token and only KV allocation stays on the critical path.
    (The sums keep their old order, so the default engine's times stay the same to the bit.)
    """
    t = kv_bytes / engine.kv_alloc_Bps
    if not progressive:
        t += graph_capture_s(model, engine)
        if model.params_b >= engine.compile_min_params_b:
            t += compile_time_s(model, engine, cache_hit)
    return t


def progressive_first_token_s(layer_ready_s: Sequence[float], layer_compute_s: float, start_s: float) -> float:
    """Finish time of a forward pass whose layer i may start once layer i is resident.

    `layer_ready_s[i]` is when layer i's weights are on the GPU, `start_s` when the engine
    can begin computing. Compute of layer i overlaps the transfer of later layers.
    """
    t = start_s
    for ready in layer_ready_s:
        if ready > t:
            t = ready
        t += layer_compute_s
    return t


def hop_time_s(hop: Hop, link_bw: dict[str, float]) -> float:
    """Time for `hop` alone on idle links."""
    bw = min([hop.cap_Bps, *(link_bw[link] for link in hop.links)])
    return hop.latency_s + hop.nbytes / bw


def transfer_s(source_tier: str, model: ModelSpec, node: NodeSpec, store: ObjectStoreSpec, n_gpus: int) -> float:
    """Time until the weights are resident on the GPUs, on idle links (a loader's "load time")."""
    caps = link_capacities(node)
    return sum(hop_time_s(h, caps) for h in load_hops(source_tier, model, node, store, n_gpus))


def ready_time_s(weights_resident_s: float, start_done_s: float, after_weights_s: float, progressive: bool) -> float:
    """When an engine can serve: after its weights and its start-up work.

    Without progressive loading, KV allocation and capture follow both the weights and the
    process start; with it, KV allocation needs no weights and can finish before they do.
    """
    if progressive:
        return max(weights_resident_s, start_done_s + after_weights_s)
    return max(weights_resident_s, start_done_s) + after_weights_s


def estimate_load_s(
    source_tier: str, model: ModelSpec, node: NodeSpec, store: ObjectStoreSpec, engine: EngineSpec,
    n_gpus: int, kv_bytes: float, progressive: bool = False,
) -> float:
    """Closed-form cold-start time on idle links: hops in sequence, engine start overlapped if allowed."""
    transfer = transfer_s(source_tier, model, node, store, n_gpus)
    start = engine_start_s(engine)
    start_done = start if engine.overlap_start_with_fetch else transfer + start
    return ready_time_s(transfer, start_done, engine_after_weights_s(model, engine, kv_bytes, progressive), progressive)
