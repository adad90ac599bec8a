"""Specifications of models, GPUs, storage tiers, nodes, object stores and the cluster.

Specs are frozen dataclasses with units in their field names; `core.spec_builders` turns
plain config mappings (hydra / yaml) into them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

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
    dtype_bytes: float = 2  # bf16, as stored and moved between tiers (a quantised variant: 1 fp8/int8, 0.5 int4)
    base: str = ""  # the architecture this deployment is a copy of
    resident_dtype_bytes: int | None = None  # bytes per parameter once loaded, if the engine converts (None: same)
    # the LM head (vocab_size x hidden_size): its logits are computed only for the tokens that sample (the last one
    # of a prefill, every sequence of a decode step); 0 = unknown, the head then counts as part of every token's FLOPs
    vocab_size: int = 0
    tied_embeddings: bool = False  # the input embedding is the LM head (one matrix counted in params_b, not two)
    # weight / KV variants and speculative decoding (core/variants.py builds them; every default: as before)
    variant: str = ""  # the weight format served ("" = the catalog's own, bf16), recorded per request
    embed_dtype_bytes: float | None = None  # bytes per embedding / LM-head parameter (quantised checkpoints keep bf16)
    kv_dtype_bytes: float | None = None  # bytes per KV-cache element (None: dtype_bytes; fp8 KV cache: 1)
    kv_reserve_basis_bytes: float | None = None  # what engine.kv_reserve_frac applies to (None: resident_bytes)
    roofline_dtype_bytes: float | None = None  # bytes per parameter the roofline is timed at (None: dtype_bytes)
    prefill_time_mult: float = 1.0  # measured prefill-time ratio of this variant to its base (core/variants.py)
    decode_time_mult: float = 1.0  # measured decode-step-time ratio of this variant to its base
    draft_resident_bytes: float = 0.0  # a speculative-decoding draft model's weights, resident next to this one
    spec_draft_tokens: int = 0  # speculative decoding: tokens the draft proposes per step (0: off)
    spec_acceptance: float = 0.0  # per-token acceptance rate alpha of the draft's proposals
    spec_draft_cost: float = 0.0  # one draft step's time over one target step's (c)
    spec_max_batch: int = 0  # speculation is off for decode batches of at least this many sequences (0: never)

    @property
    def embed_params(self) -> float:
        """Parameters of the input embedding and LM head (one matrix when tied; 0 when vocab_size is unknown)."""
        return self.head_params * (1 if self.tied_embeddings else 2)

    @property
    def weights_bytes(self) -> float:
        """The checkpoint's size: what a tier holds and what a load moves."""
        if self.embed_dtype_bytes is None:
            return self.params_b * 1e9 * self.dtype_bytes
        emb = self.embed_params
        return (self.params_b * 1e9 - emb) * self.dtype_bytes + emb * self.embed_dtype_bytes

    @property
    def resident_bytes(self) -> float:
        """What the weights take in the engine's memory (a CPU engine computing in float32 doubles a bf16
        checkpoint; a quantized serving format shrinks it), a speculative-decoding draft model included."""
        if self.embed_dtype_bytes is None or self.resident_dtype_bytes is not None:
            own = self.params_b * 1e9 * (self.resident_dtype_bytes or self.dtype_bytes)
        else:
            own = self.weights_bytes
        return own + self.draft_resident_bytes if self.draft_resident_bytes else own

    @property
    def layer_bytes(self) -> float:
        return self.weights_bytes / self.n_layers

    @property
    def kv_bytes_per_token(self) -> float:
        # K and V, every layer, every KV head.
        kv_dtype = self.dtype_bytes if self.kv_dtype_bytes is None else self.kv_dtype_bytes
        return 2.0 * self.n_layers * self.n_kv_heads * self.head_dim * kv_dtype

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
        return (self.params_b * 1e9 - self.embed_params) / self.n_layers


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
    # prefix (KV) caching (core/prefix_cache.py; False: the simulator as before, bit for bit): each instance keeps
    # the KV of prompt blocks it computed in `prefix_cache_frac` of its KV budget (LRU by block), and a prefill
    # computes only the tokens past the request's cached prefix. Needs a workload with block ids (Mooncake).
    prefix_cache: bool = False
    prefix_cache_frac: float = 0.5
    prefix_block_tokens: int = 512  # tokens per block id (Mooncake's hash_ids: 512)
    # GPU memory placement (core/state.py, docs/results/memory_waste.md; every default: the simulator as before).
    # gpu_pool: an instance's weights are sharded over its tensor-parallel GPUs, its KV cache may take bytes on any
    # GPU of its node (memory pooled over the node's GPU interconnect; engines that can attend over remote KV only).
    # kv_elastic: KV cache is mapped on demand in pages of kv_page_bytes, up to the static reservation as a cap,
    # and released when sequences end (kvcached-style virtual KV); kv_elastic_min_frac of the cap is kept mapped.
    gpu_pool: bool = False
    kv_elastic: bool = False
    kv_page_bytes: float = 32 * 2**20
    kv_elastic_min_frac: float = 0.0
    kv_elastic_fit_frac: float = 0.0  # placement asks for this share of the KV cap free besides (not mapped)
    prefix_cache_blocks: int = 0  # > 0: a fixed capacity per instance in blocks (e.g. a host-memory KV store), not frac


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
