"""ServerlessLLM (OSDI'24) loading times, published vs tierlab's load-time model.

`python -m experiments.serverlessllm [--doc PATH]` rebuilds the two published hardware
setups as specs, calibrates ONE parameter per loader (its read throughput, fitted on that
loader's NVMe rows), takes safetensors' page-cache rate from tierlab's own GPU measurement
(docs/results, not fitted), predicts every row through `core.loadtime.transfer_s` and, for each
row, through one isolated load in the simulator, then writes the comparison to
docs/serverlessllm.md and prints one summary line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from functools import cache
from pathlib import Path

import numpy as np

from core.catalog import architecture
from core.errors import ConfigError
from core.loadtime import transfer_s
from core.policies.autoscaling import KeepAlive
from core.policies.base import PolicyBundle
from core.policies.caching import NoCaching
from core.policies.placement import TierAware
from core.records import INSTANCE_SCHEMA
from core.specs import ClusterSpec, EngineSpec, GpuSpec, LoaderSpec, NodeSpec, ObjectStoreSpec, TierSpec
from core.units import GB, MB
from sim.world import World

REPO_ROOT = Path(__file__).resolve().parents[1]
DOC_PATH = REPO_ROOT / "docs" / "serverlessllm.md"
TARGET_ERROR = 0.10  # the bar: every loading figure within 10% after the calibration
# safetensors loads from a warm page cache onto one GPU, timed by scripts/bench_page_cache.py
PAGE_CACHE_MEASUREMENT = REPO_ROOT / "docs" / "results" / "safetensors_warm_cache_h200_2026-11-27.json"
PAGE_CACHE_KEY = "safetensors_cuda_warm"
MiB = 2**20

SOURCES: dict[str, str] = {
    "paper": "Fu et al., \"ServerlessLLM: Low-Latency Serverless Inference for Large Language Models\", OSDI'24 "
             "(arXiv:2401.14351), checkpoint-loading figure. Values as read off the figure in tierlab issue 4 "
             "(\"approximate from the paper's figure\"); the figure itself is not in the stored material and was "
             "not re-read here.",
    "repo-h100": "github.com/ServerlessLLM/ServerlessLLM, benchmarks/results/h100_2025/README.md (commit 9f50241b, "
                 "Dec 2025): 8x H100 SXM, \"NVMe SSD with 29.4 GB/s bandwidth\"; Avg of 30 random loads "
                 "(different copies) or 5 cached loads (same model).",
    "repo-a5000": "github.com/ServerlessLLM/ServerlessLLM, benchmarks/results/a5000_2024/server-specs.md and the raw "
                  "loads facebook_opt-6.7b_{phantom,safetensors}_30_random.json (mean of 30): 8x A5000 24 GB, "
                  "2x EPYC 7453, 1 TB DDR4-3200, 2x 3.84 TB Intel P5510 (PCIe 4.0) in RAID 0.",
    "repo-bench": "github.com/ServerlessLLM/ServerlessLLM benchmarks/run-benchmark.sh (sllm-store started with "
                  "--num-thread 4 --chunk-size 16MB) and benchmarks/benchmark_utils.py (both loaders timed with "
                  "device_map=\"auto\", torch_dtype=float16, i.e. the weights spread over all 8 GPUs).",
    "repo-store": "github.com/ServerlessLLM/ServerlessLLM sllm_store/csrc/sllm_store/model.cpp (ToHost: num_thread "
                  "threads, each a synchronous O_DIRECT pread of one chunk at a time into a pinned pool) and "
                  "checkpoint_store.cpp (LoadModelFromMem: a model already in the pinned pool is only DMA-copied "
                  "to the GPUs).",
    "p5510": "KX documentation (KxSystems/docs), \"Choosing the Right File System for kdb+: A Case Study with KX "
             "Nano\", test-setup table quoting the Solidigm/Intel D7-P5510 3.84 TB spec: sequential read 6500 MB/s, "
             "write 3400 MB/s. Not in ../shared/data/reference.",
    "h2d_gen4_measured": "../shared/data/reference/prices_and_bandwidths.yaml id h2d_gen4_measured: host-to-GPU "
                         "25.13 GB/s (A100, PCIe Gen4, nvbandwidth, 0.5-1 GiB buffers); used for the A5000, "
                         "also PCIe Gen4 x16.",
    "h2d_gen5_measured": "../shared/data/reference/prices_and_bandwidths.yaml id h2d_gen5_measured: host-to-GPU "
                         "35.2 GB/s (HGX H100, PCIe Gen5, nvbandwidth).",
    "dram_assumption": "host DRAM read 50 GB/s: tierlab's stated assumption (conf/cluster/*.yaml), not a "
                       "measurement of either host.",
    "repo-cached": "github.com/ServerlessLLM/ServerlessLLM benchmarks/test_loading.py (a cached run makes one "
                   "unmeasured warm-up load, then times 5 loads of the same copy) and benchmark_utils.py (after "
                   "each load: del model, gc.collect(), torch.cuda.empty_cache()); raw loads "
                   "results/h100_2025/cached/Qwen_Qwen3-32B_safetensors_5_cached.json (12.38-12.59 s).",
    "measured-page-cache": "tierlab's own measurement, docs/results/safetensors_warm_cache_h200_2026-11-27.json, "
                           "made by scripts/bench_page_cache.py on one NVIDIA H200 (a different host and CPU from "
                           "the repo-h100 machine): a 1.0 GB generated Llama checkpoint read once into the page "
                           "cache, then 4 timed safetensors.torch.load_file(device=\"cuda\") loads.",
}


@dataclass(frozen=True)
class Setup:
    """One published hardware setup, as a tierlab node spec."""

    key: str
    title: str
    node: NodeSpec
    sources: tuple[str, ...]


def _node(name: str, gpu: GpuSpec, nvme_read_Bps: float, nvme_write_Bps: float, nvme_bytes: float,
          dram_bytes: float) -> NodeSpec:
    # the NIC is never used (no row downloads from the cloud); DRAM is tierlab's stated 50 GB/s
    tiers = {
        "dram": TierSpec("dram", dram_bytes, 50 * GB, 50 * GB),
        "nvme": TierSpec("nvme", nvme_bytes, nvme_read_Bps, nvme_write_Bps, latency_s=1e-4),
    }
    return NodeSpec(name=name, gpu=gpu, n_gpus=8, nic_Bps=12.5 * GB, tiers=tiers)


# RTX A5000: 24 GB, 768 GB/s, ~111 TFLOP/s dense fp16 (vendor datasheet; only the simulator's one request uses them)
A5000 = Setup(
    "a5000", "paper testbed: 8x A5000, 2x P5510 RAID 0",
    _node("a5000", GpuSpec("RTX-A5000-24GB", 24 * GB, 768 * GB, 111e12, 25.13 * GB),
          nvme_read_Bps=2 * 6500 * MB, nvme_write_Bps=2 * 3400 * MB, nvme_bytes=2 * 3.84e12, dram_bytes=1e12),
    ("repo-a5000", "p5510", "h2d_gen4_measured", "dram_assumption"),
)
# H100 SXM as in conf/cluster/*.yaml; the host's DRAM size is not published (any size that holds a 32B model)
H100 = Setup(
    "h100", "repo table: 8x H100 SXM, 29.4 GB/s NVMe",
    _node("h100", GpuSpec("H100-80GB", 80 * GB, 3.35e12, 989e12, 35.2 * GB),
          nvme_read_Bps=29.4 * GB, nvme_write_Bps=29.4 * GB, nvme_bytes=8 * 3.84e12, dram_bytes=2e12),
    ("repo-h100", "h2d_gen5_measured", "dram_assumption"),
)
SETUPS: dict[str, Setup] = {s.key: s for s in (A5000, H100)}


@dataclass(frozen=True)
class PageCacheMeasurement:
    """Timed loads of one checkpoint from a warm page cache (a scripts/bench_page_cache.py result)."""

    size_bytes: float
    times_s: tuple[float, ...]  # the first is a warm-up

    @property
    def rate_Bps(self) -> float:
        """Bytes / mean time of the loads after the first: the first pays one-time costs, like the
        unmeasured warm-up load of ServerlessLLM's cached benchmark (source repo-cached), whose
        figure is the mean of the loads after it."""
        timed = self.times_s[1:]
        return self.size_bytes / (sum(timed) / len(timed))

    @property
    def fastest_Bps(self) -> float:
        return self.size_bytes / min(self.times_s)

    @property
    def all_loads_Bps(self) -> float:
        return self.size_bytes / (sum(self.times_s) / len(self.times_s))


@cache
def read_page_cache_measurement(path: Path = PAGE_CACHE_MEASUREMENT, key: str = PAGE_CACHE_KEY) -> PageCacheMeasurement:
    """The loads named `key` in a scripts/bench_page_cache.py result (read once per path and key)."""
    try:
        data = json.loads(path.read_text())
        size = float(data["size_bytes"])
        times = tuple(float(t) for t in data[key]["times_s"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: cannot read the page-cache measurement ({key}.times_s, size_bytes): {e!r}") from e
    if len(times) < 2 or size <= 0 or min(times) <= 0:
        raise ConfigError(f"{path}: {key}.times_s needs a warm-up load and at least one more, all > 0, "
                          "and size_bytes > 0")
    return PageCacheMeasurement(size, times)


@cache
def priors() -> dict[str, LoaderSpec]:
    """What each loader is known to do, before any fitting. Only CALIBRATED_PARAM is then fitted."""
    return {
        # chunked multi-tier pipeline (disk -> pinned DRAM -> GPU), every GPU fed at once, pinned-memory DMA
        "serverlessllm": LoaderSpec(name="serverlessllm", pipelined=True, chunk_bytes=16 * MiB),
        # transformers from_pretrained over safetensors: mmap reads, then one tensor at a time to its GPU;
        # its CPU work on the mapped pages is measured (never fitted)
        "safetensors": LoaderSpec(name="safetensors", pipelined=False, parallel_gpus=False,
                                  page_cache_Bps=read_page_cache_measurement().rate_Bps),
    }
# the loader's own read throughput from a storage device: 4 synchronous O_DIRECT reader threads for
# ServerlessLLM, one thread faulting mmap pages for safetensors; neither has a published number
CALIBRATED_PARAM: dict[str, str] = {"serverlessllm": "max_read_Bps", "safetensors": "max_read_Bps"}
SLLM_IO_THREADS = 4  # run-benchmark.sh --num-thread 4 (source repo-bench); only used to read the fitted cap
FIT_TIER = "nvme"  # each loader is fitted on its NVMe rows; its DRAM rows are predictions
FIT_BOUNDS_Bps = (0.1 * GB, 1000 * GB)


@dataclass(frozen=True)
class Row:
    """One published loading time: `model` loaded by `loader` on `setup` from `tier`."""

    model: str
    label: str
    setup: str
    loader: str
    tier: str
    published_s: float
    source: str

    @property
    def key(self) -> str:
        return f"{self.loader}/{self.setup}/{self.model}/{self.tier}"


def _rows(loader: str, entries: Sequence[tuple[str, str, str, str, float, str]]) -> list[Row]:
    return [Row(model, label, setup, loader, tier, s, src) for model, label, setup, tier, s, src in entries]


ROWS: list[Row] = [
    *_rows("serverlessllm", [
        ("opt-6.7b", "OPT-6.7B", "a5000", "nvme", 1.0, "paper"),
        ("opt-30b", "OPT-30B", "a5000", "nvme", 4.5, "paper"),
        ("opt-66b", "OPT-66B", "a5000", "nvme", 10.0, "paper"),
        ("llama-2-70b", "LLaMA-2-70B", "a5000", "nvme", 10.3, "paper"),
        ("falcon-40b", "Falcon-40B", "a5000", "nvme", 6.2, "paper"),
        ("llama-3.1-8b", "Llama-3.1-8B", "h100", "nvme", 0.678, "repo-h100"),
        ("qwen3-32b", "Qwen3-32B", "h100", "nvme", 3.216, "repo-h100"),
        ("qwen3-32b", "Qwen3-32B", "h100", "dram", 1.253, "repo-h100"),
    ]),
    *_rows("safetensors", [
        ("opt-6.7b", "OPT-6.7B", "a5000", "nvme", 4.0, "paper"),
        ("opt-30b", "OPT-30B", "a5000", "nvme", 18.5, "paper"),
        ("opt-66b", "OPT-66B", "a5000", "nvme", 45.0, "paper"),
        ("llama-2-70b", "LLaMA-2-70B", "a5000", "nvme", 48.0, "paper"),
        ("falcon-40b", "Falcon-40B", "a5000", "nvme", 25.0, "paper"),
        ("llama-3.1-8b", "Llama-3.1-8B", "h100", "nvme", 4.437, "repo-h100"),
        ("qwen3-32b", "Qwen3-32B", "h100", "nvme", 20.592, "repo-h100"),
        ("qwen3-32b", "Qwen3-32B", "h100", "dram", 12.466, "repo-h100"),
    ]),
]
# the same hardware measured again in the repository: predictions only, outside the target
CROSS_CHECK: list[Row] = [
    Row("opt-6.7b", "OPT-6.7B (repo JSON)", "a5000", "serverlessllm", "nvme", 1.175, "repo-a5000"),
    Row("opt-6.7b", "OPT-6.7B (repo JSON)", "a5000", "safetensors", "nvme", 5.095, "repo-a5000"),
    *_rows("serverlessllm", [
        ("qwen2.5-32b", "DeepSeek-R1-Distill-Qwen-32B", "h100", "nvme", 3.220, "repo-h100"),
        ("qwen2.5-32b", "DeepSeek-R1-Distill-Qwen-32B", "h100", "dram", 1.184, "repo-h100"),
    ]),
    *_rows("safetensors", [
        ("qwen2.5-32b", "DeepSeek-R1-Distill-Qwen-32B", "h100", "nvme", 19.090, "repo-h100"),
        ("qwen2.5-32b", "DeepSeek-R1-Distill-Qwen-32B", "h100", "dram", 10.165, "repo-h100"),
    ]),
]
# target rows this model does not bring within 10%, and why (tests check this list is exact)
EXPLAINED_MISSES: dict[str, str] = {}


def node_for(row: Row, loader: LoaderSpec, setups: dict[str, Setup] = SETUPS) -> NodeSpec:
    """The row's setup node running `loader`."""
    return replace(setups[row.setup].node, loader=loader)


def tierlab_s(row: Row, loader: LoaderSpec, setups: dict[str, Setup] = SETUPS) -> float:
    """tierlab's load time for `row`: weights from the row's tier onto all 8 GPUs on idle links.

    Both benchmarks spread the weights over all 8 GPUs (device_map="auto").
    """
    node = node_for(row, loader, setups)
    return transfer_s(row.tier, architecture(row.model), node, ObjectStoreSpec(), node.n_gpus)


def sim_load_s(row: Row, loader: LoaderSpec) -> tuple[float, int]:
    """One isolated cold start of `row` in the simulator: (weights-resident time, GPUs the sim gave it)."""
    model = architecture(row.model)
    node = node_for(row, loader)
    world = World(ClusterSpec(nodes=(node,)), [model], EngineSpec(),
                  PolicyBundle(TierAware(), NoCaching(), KeepAlive(), name="serverlessllm-check"))
    tier = world.state.nodes[node.name].tiers[row.tier]
    tier.reserve(model.name, model.weights_bytes)  # the checkpoint sits in the row's tier before the request
    tier.commit(model.name, 0.0)
    world.run(np.array([0.0]), [model.name], ["t"], np.array([16]), np.array([1]))
    ((inst_id, rec),) = world.loads.items()
    if rec.source_tier != row.tier:
        raise RuntimeError(f"{row.key}: the simulator loaded from {rec.source_tier!r}, not {row.tier!r}")
    loading = next(dict(zip(INSTANCE_SCHEMA, r, strict=True)) for r in world.instance_rows if r[1] == inst_id)
    return rec.weights_resident_s - rec.started_s, int(loading["gpus"])


def fit_rows(loader_name: str) -> list[Row]:
    """The rows a loader's parameter is fitted on."""
    return [r for r in ROWS if r.loader == loader_name and r.tier == FIT_TIER]


def calibrate(loader_name: str, prior: LoaderSpec | None = None, criterion: str = "log") -> LoaderSpec:
    """The prior with CALIBRATED_PARAM set by least squares over `fit_rows`.

    The default criterion is log(tierlab / published): load-time errors are multiplicative (a loader
    x% slower per byte is x% slower on every model). "relative" fits tierlab / published - 1 instead.
    A log-spaced scan finds the basin; golden-section search refines it.
    """
    prior = priors()[loader_name] if prior is None else prior
    param = CALIBRATED_PARAM[loader_name]
    rows = fit_rows(loader_name)
    if criterion not in ("log", "relative"):
        raise ValueError(f"criterion must be 'log' or 'relative', got {criterion!r}")

    def sse(log_x: float) -> float:
        spec = replace(prior, **{param: math.exp(log_x)})
        ratios = [tierlab_s(r, spec) / r.published_s for r in rows]
        return sum((math.log(q) if criterion == "log" else q - 1) ** 2 for q in ratios)

    lo, hi = (math.log(b) for b in FIT_BOUNDS_Bps)
    grid = np.linspace(lo, hi, 241)
    k = int(np.argmin([sse(x) for x in grid]))
    a, b = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
    inv_phi = (math.sqrt(5) - 1) / 2
    for _ in range(80):
        c, d = b - inv_phi * (b - a), a + inv_phi * (b - a)
        if sse(c) <= sse(d):
            b = d
        else:
            a = c
    return replace(prior, **{param: math.exp((a + b) / 2)})


@dataclass(frozen=True)
class Result:
    """One row's tierlab time, closed form and simulated (with the GPU count the simulator chose)."""

    row: Row
    tierlab_s: float
    sim_s: float
    sim_n_gpus: int

    @property
    def error(self) -> float:
        return self.tierlab_s / self.row.published_s - 1.0

    @property
    def within_target(self) -> bool:
        return abs(self.error) <= TARGET_ERROR


def evaluate(loaders: dict[str, LoaderSpec], rows: Sequence[Row]) -> list[Result]:
    """Every row through the closed-form model and through one isolated simulated load."""
    out = []
    for r in rows:
        sim_s, n = sim_load_s(r, loaders[r.loader])
        out.append(Result(r, tierlab_s(r, loaders[r.loader]), sim_s, n))
    return out


def changed_fields(a: LoaderSpec, b: LoaderSpec) -> list[str]:
    """Names of the LoaderSpec fields on which `a` and `b` differ."""
    return [f.name for f in fields(LoaderSpec) if getattr(a, f.name) != getattr(b, f.name)]


# ------------------------------------------------------------------------------------ the doc
def _gbps(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x / GB:.4g} GB/s"


def _result_table(results: Sequence[Result]) -> list[str]:
    lines = ["| model | setup | loader | from | published s | tierlab s | sim s | error % | within 10% | source |",
             "|---|---|---|---|---:|---:|---:|---:|---|---|"]
    for x in results:
        r = x.row
        lines.append(f"| {r.label} | {r.setup} | {r.loader} | {r.tier} | {r.published_s:.3f} | {x.tierlab_s:.3f} "
                     f"| {x.sim_s:.3f} | {100 * x.error:+.1f} | {'yes' if x.within_target else 'no'} | {r.source} |")
    return lines


def render_doc(loaders: dict[str, LoaderSpec], results: Sequence[Result], cross: Sequence[Result],
               sensitivity: Sequence[str]) -> str:
    """The comparison as markdown: setups, loaders, the calibration, one line per row, misses, sources."""
    misses = [x for x in results if not x.within_target]
    worst = max(results, key=lambda x: abs(x.error))
    sllm = loaders["serverlessllm"]
    per_thread_Bps = sllm.max_read_Bps / SLLM_IO_THREADS
    out = [
        "# ServerlessLLM loading times: published vs tierlab",
        "",
        "Generated by `python -m experiments.serverlessllm`; do not edit by hand. Load time here is what both",
        "benchmarks time: from the call to the loader until the weights are on the GPUs (no engine start).",
        "tierlab's number is `core.loadtime.transfer_s` on idle links; `sim s` is one isolated cold start of",
        "the same row in the simulator (`sim.world.World`), which must agree with it.",
        "",
        f"**{len(results) - len(misses)} of {len(results)} rows within ±10%** after one calibrated parameter per "
        f"loader (and one measured one for safetensors); largest error {100 * worst.error:+.1f}% ({worst.row.key}).",
        "",
        "## Setups",
        "",
        "| setup | GPUs | host-to-GPU per GPU | NVMe read | DRAM read | sources |",
        "|---|---|---:|---:|---:|---|",
    ]
    for s in SETUPS.values():
        n = s.node
        out.append(f"| {s.key}: {s.title} | {n.n_gpus} x {n.gpu.name} | {_gbps(n.gpu.h2d_Bps)} "
                   f"| {_gbps(n.tiers['nvme'].read_bw_Bps)} | {_gbps(n.tiers['dram'].read_bw_Bps)} "
                   f"| {', '.join(s.sources)} |")
    out += [
        "",
        "Every row loads onto all 8 GPUs, as both benchmarks do (`device_map=\"auto\"`, source repo-bench).",
        _gpu_count_note([*results, *cross]),
        "",
        "## Loaders and the calibration",
        "",
        "A loader is a `core.specs.LoaderSpec`; the two differ only in its fields. Everything but the one",
        "calibrated field is set from what the loader does (sources repo-store, repo-bench) or measured",
        "(source measured-page-cache), not fitted:",
        "",
        "| loader | pipelined | chunk | read efficiency | GPUs fed at once | host-to-GPU efficiency "
        "| fixed overhead s | page-cache rate (measured) | calibrated field | fitted value |",
        "|---|---|---:|---:|---|---:|---:|---:|---|---:|",
    ]
    for name, spec in loaders.items():
        param = CALIBRATED_PARAM[name]
        chunk = f"{spec.chunk_bytes / MiB:g} MiB" if spec.pipelined else "-"
        page_cache = "-" if math.isinf(spec.page_cache_Bps) else _gbps(spec.page_cache_Bps)
        out.append(f"| {name} | {spec.pipelined} | {chunk} | {spec.read_efficiency:g} "
                   f"| {'all' if spec.parallel_gpus else 'one at a time'} | {spec.to_gpu_efficiency:g} "
                   f"| {spec.fixed_overhead_s:g} | {page_cache} | `{param}` | {_gbps(getattr(spec, param))} |")
    st = loaders["safetensors"]
    measured = read_page_cache_measurement()
    out += [
        "",
        "- **serverlessllm**: 4 I/O threads read 16 MiB chunks with O_DIRECT into a pinned pool while the",
        "  chunks already read are DMA-copied to every GPU; tierlab models this as the first chunk's read,",
        "  then one stream over the NVMe read link and PCIe at once. A model already in the pinned pool",
        "  (the `cached` rows) is only DMA-copied, so the loader's read cap does not apply there.",
        "- **safetensors** (transformers `from_pretrained`): reads through mmap, then copies tensor by tensor",
        "  to its GPU: staged, one GPU at a time. Every byte passes through the page cache and is copied by",
        "  the CPU (page mapping, pageable copies), so even from DRAM the load is CPU-bound: the `page_cache_Bps`",
        f"  cap, {_gbps(st.page_cache_Bps)}, is measured, not fitted: {measured.size_bytes / GB:.2f} GB loaded by "
        f"`load_file(device=\"cuda\")` from a warm page cache in {', '.join(f'{t:.3f}' for t in measured.times_s)} s; "
        "the first load",
        "  is a warm-up, as in the published cached benchmark (source repo-cached), and the rate is the bytes",
        f"  over the mean of the other {len(measured.times_s) - 1}. From NVMe this CPU work overlaps the device read "
        "(kernel readahead) and the",
        "  fitted read cap below it binds; from DRAM it is the whole load.",
        "- **The calibration**: one field per loader, `max_read_Bps` (the loader's own read throughput from a",
        "  storage device), fitted by least squares on log(tierlab / published) over that loader's",
        f"  {len(fit_rows('serverlessllm'))} NVMe rows (both setups). The DRAM rows and the cross-check rows are",
        "  predictions: serverlessllm's from the setup's PCIe bandwidth alone, safetensors' from the measured",
        "  page-cache rate alone. For serverlessllm the A5000 rows do not constrain the fit (their RAID 0, "
        f"{_gbps(A5000.node.tiers['nvme'].read_bw_Bps)}, is",
        "  slower than the fitted cap), so it rests on the two H100 NVMe rows; the five A5000 rows are",
        "  predicted from the drives' datasheet bandwidth alone.",
        f"- The fitted serverlessllm cap is {SLLM_IO_THREADS} I/O threads x {_gbps(per_thread_Bps)}: each thread",
        f"  completes one synchronous {sllm.chunk_bytes / MiB:g} MiB direct read every "
        f"{1e3 * sllm.chunk_bytes / per_thread_Bps:.1f} ms. The safetensors cap, "
        f"{_gbps(loaders['safetensors'].max_read_Bps)}, is one thread faulting in mmap pages.",
        "",
        "## Results",
        "",
        *_result_table(results),
        "",
        "## Rows outside ±10%",
        "",
    ]
    if misses:
        for x in misses:
            out.append(f"- **{x.row.key}** ({100 * x.error:+.1f}%): {EXPLAINED_MISSES.get(x.row.key, 'unexplained')}")
    else:
        out.append("None.")
    out += [
        "",
        "## Sensitivity",
        "",
        *sensitivity,
        "",
        "## Cross-check (same hardware, other published runs; not part of the target)",
        "",
        *_result_table(cross),
        "",
        *_rerun_note(results, cross),
        "",
        "## Sources",
        "",
        *[f"- **{k}**: {v}" for k, v in SOURCES.items()],
        "- Model sizes: `core.catalog.ARCHITECTURES` (parameters from each model's config.json), fp16/bf16",
        "  weights (2 bytes per parameter); DeepSeek-R1-Distill-Qwen-32B has the Qwen2.5-32B architecture.",
        "- Context, not modelled: reference entry `serverlessllm_examples` (S33) quotes the paper's motivation,",
        "  OPT-30B 34 s and LLaMA-2-70B 84 s with existing (PyTorch) loaders.",
        "",
    ]
    return "\n".join(out)


def _gpu_count_note(results: Sequence[Result]) -> str:
    """Whether the rows depend on the GPU count: the simulator gives each model the fewest GPUs that hold it."""
    agree = all(math.isclose(x.sim_s, x.tierlab_s, rel_tol=1e-9) for x in results)
    counts = sorted({x.sim_n_gpus for x in results})
    if agree:
        return (f"No row depends on that count: the simulator, which gives each model the fewest GPUs that hold "
                f"it ({'-'.join(map(str, (counts[0], counts[-1])))} here), agrees with it on every row.")
    return "**The simulator disagrees with the closed-form time on some rows (see the sim column).**"


def _rerun_note(results: Sequence[Result], cross: Sequence[Result]) -> list[str]:
    """How far the same hardware's published numbers move between the paper and the repository's rerun."""
    paper = {(x.row.loader, x.row.setup, x.row.model, x.row.tier): x.row.published_s for x in results}
    parts = []
    for x in cross:
        r = x.row
        before = paper.get((r.loader, r.setup, r.model, r.tier))
        if before is not None:
            parts.append(f"{r.loader} {r.label}: {before:g} s in the paper figure, {r.published_s:g} s in the "
                         f"repository's 30 loads ({100 * (r.published_s / before - 1):+.0f}%)")
    if not parts:
        return []
    return [f"Same hardware, two publications: {'; '.join(parts)}. The published numbers themselves move by "
            "this much between runs and software versions."]


def dram_rate_window_Bps(row: Row) -> tuple[float, float]:
    """The page-cache rates that put a safetensors DRAM row within ±10% (its time is bytes / rate)."""
    nbytes = architecture(row.model).weights_bytes
    return nbytes / (row.published_s * (1 + TARGET_ERROR)), nbytes / (row.published_s * (1 - TARGET_ERROR))


def _sizes_gb(rows: Sequence[Row]) -> str:
    sizes = sorted({f"{architecture(r.model).weights_bytes / GB:.1f} GB" for r in rows})
    return " and ".join(sizes) if len(sizes) > 1 else f"{sizes[0]} each"


def page_cache_sensitivity_lines(loaders: dict[str, LoaderSpec]) -> list[str]:
    """How the safetensors DRAM rows move with the statistic taken from the page-cache measurement,
    and what the two published DRAM rows allow at all."""
    st = loaders["safetensors"]
    measured = read_page_cache_measurement()
    dram = [r for r in [*ROWS, *CROSS_CHECK] if r.loader == "safetensors" and r.tier == "dram"]
    variants = [("the fastest load", measured.fastest_Bps),
                (f"all {len(measured.times_s)} loads, warm-up included", measured.all_loads_Bps)]
    parts = []
    for label, rate in variants:
        spec = replace(st, page_cache_Bps=rate)
        errs = ", ".join(f"{r.label} {100 * (tierlab_s(r, spec) / r.published_s - 1):+.1f}%" for r in dram)
        parts.append(f"{label} ({_gbps(rate)}): {errs}")
    windows = "; ".join(f"{r.label} {_gbps(lo)}-{_gbps(hi)}" for r, (lo, hi) in
                        ((r, dram_rate_window_Bps(r)) for r in dram))
    return [
        "- The page-cache rate is the mean of the timed loads after the warm-up (the published statistic). "
        f"Taken instead from {'; from '.join(parts)}.",
        f"- The rates that put each published safetensors DRAM row within ±10% are {windows}. The two 32B "
        f"models weigh {_sizes_gb(dram)}, yet their published times differ by "
        f"{100 * (max(r.published_s for r in dram) / min(r.published_s for r in dram) - 1):.0f}%, so no single "
        "rate fits both; tierlab's target row (the issue's Qwen3-32B) is met by the measurement, its cross-check "
        "twin is not.",
        "- What the measurement leaves out: it ran on an H200 host, not the repository's H100 host (a different "
        "CPU and memory system); it loads a 1 GB file with `safetensors.torch.load_file`, not a 65.6 GB model "
        "with `from_pretrained`, which also casts the bf16 checkpoint to the benchmark's float16 on the CPU. "
        "The agreement within 10% is a prediction under these differences, not a like-for-like rerun.",
    ]


def sensitivity_lines(loaders: dict[str, LoaderSpec]) -> list[str]:
    """How the conclusions move with the choices made without data: the A5000 RAID bandwidth, the fit
    criterion and the statistic taken from the page-cache measurement."""
    slow = replace(A5000, node=replace(A5000.node, tiers={
        **A5000.node.tiers, "nvme": replace(A5000.node.tiers["nvme"], read_bw_Bps=12 * GB)}))
    a5000_sllm = [r for r in ROWS if r.setup == "a5000" and r.loader == "serverlessllm"]
    at12 = [tierlab_s(r, loaders["serverlessllm"], {**SETUPS, "a5000": slow}) / r.published_s - 1
            for r in a5000_sllm]
    implied_Bps = min(architecture(r.model).weights_bytes / r.published_s for r in a5000_sllm)
    st_rows = fit_rows("safetensors")
    by_rel = calibrate("safetensors", criterion="relative")
    lin = [tierlab_s(r, by_rel) / r.published_s - 1 for r in st_rows]
    worst = max(range(len(lin)), key=lambda i: abs(lin[i]))
    per_gb = [r.published_s / (architecture(r.model).weights_bytes / GB) for r in st_rows]
    return [
        f"- The issue quotes the A5000 RAID 0 as ~12 GB/s; at 12 GB/s the five A5000 serverlessllm rows would be "
        f"{100 * min(at12):+.1f}% to {100 * max(at12):+.1f}%. The paper figure's times imply at least "
        f"{_gbps(implied_Bps)} off the array, more than 12 GB/s, so tierlab uses the drives' datasheet "
        "2 x 6.5 GB/s (source p5510).",
        f"- Fitting safetensors by least squares on the relative error instead of its log gives "
        f"{_gbps(by_rel.max_read_Bps)} and puts {st_rows[worst].key} at {100 * lin[worst]:+.1f}%. "
        f"The published safetensors times per GB span {min(per_gb):.3f}-{max(per_gb):.3f} s/GB "
        f"(ratio {max(per_gb) / min(per_gb):.2f}, "
        "against 1.1/0.9 = 1.22 for ±10%), so any load time proportional to bytes sits at the edge of ±10% "
        "whatever the criterion; only the setups' different PCIe and NVMe speeds make it fit.",
        *page_cache_sensitivity_lines(loaders),
    ]


def write_doc(text: str, path: Path) -> None:
    """Write `text` to `path` whole or not at all (temp sibling, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def run(doc_path: Path | None = DOC_PATH) -> tuple[dict[str, LoaderSpec], list[Result], list[Result], str]:
    """Calibrate, evaluate every row, render the doc (and write it unless `doc_path` is None)."""
    loaders = {name: calibrate(name) for name in priors()}
    results = evaluate(loaders, ROWS)
    cross = evaluate(loaders, CROSS_CHECK)
    text = render_doc(loaders, results, cross, sensitivity_lines(loaders))
    if doc_path is not None:
        write_doc(text, doc_path)
    return loaders, results, cross, text


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--doc", type=Path, default=DOC_PATH, help="where to write the comparison (markdown)")
    args = parser.parse_args(argv)
    loaders, results, _, _ = run(args.doc)
    ok = sum(x.within_target for x in results)
    worst = max(results, key=lambda x: abs(x.error))
    fitted = ", ".join(f"{n} {p}={_gbps(getattr(loaders[n], p))}" for n, p in CALIBRATED_PARAM.items())
    print(f"serverlessllm: {ok}/{len(results)} rows within ±10% (worst {worst.row.key} {100 * worst.error:+.1f}%); "
          f"fitted {fitted}; wrote {args.doc}")


if __name__ == "__main__":
    main()
