"""Loader throughput on a cold page cache: tierlab's loader vs a raw sequential read vs safetensors, one run.

Every round evicts the file from the page cache before each method (drop_caches as root where
allowed, else POSIX_FADV_DONTNEED on the file), rotating the order of the methods so none always
goes first, and times a full load into fresh host memory:

- raw_readinto: `f.readinto` of 16 MiB chunks into a preallocated buffer, one thread (the baseline);
- tierlab: `live.loader.load` (parallel chunked preadv, O_DIRECT where possible, tensors as views);
- safetensors: `safetensors.torch.load_file`.

With `--device cuda` every method ends with the weights on the GPU (the raw read copies its buffer
with one `.to(device)`; the loader and safetensors are given the device) and the timing includes
a device synchronize. Ratios are bytes/s over the baseline's. Usage:

    python scripts/bench_loader.py                         # ~1 GB `large` checkpoint under /tmp/tierlab_bench
    python scripts/bench_loader.py --preset small --rounds 5 --dir /mnt/nvme/bench
    python scripts/bench_loader.py --device cuda                 # to GPU memory
    python scripts/bench_loader.py --max-shard-mib 200           # the same weights as shards + index

A sharded checkpoint (shards + `model.safetensors.index.json`) is compared the same way: the raw
read reads every shard in turn into one buffer, safetensors loads each shard, tierlab loads the dir.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from live.checkpoint import PRESETS, generate_checkpoint, shard_checkpoint
from live.loader import DEFAULT_CHUNK_BYTES, DEFAULT_THREADS, load
from live.manifest import WEIGHTS_FILE
from live.page_cache import evict_page_cache, resident_fraction
from live.shards import weights_location

BASELINE = "raw_readinto"
METHODS = (BASELINE, "tierlab", "safetensors")


def raw_read(path: Path | list[Path], chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> np.ndarray:
    """The whole file (or each file in turn) via plain sequential `readinto` of `chunk_bytes` into one buffer."""
    paths = path if isinstance(path, list) else [path]
    buf = np.empty(sum(p.stat().st_size for p in paths), dtype=np.uint8)
    view = memoryview(buf)
    pos = 0
    for p in paths:
        end = pos + p.stat().st_size
        with open(p, "rb", buffering=0) as f:
            while pos < end:
                n = f.readinto(view[pos:min(pos + chunk_bytes, end)])
                if not n:
                    raise OSError(f"{p}: ended at byte {pos} of {end}")
                pos += n
    return buf


def safetensors_read(path: Path | list[Path], device: str = "cpu") -> dict:
    from safetensors.torch import load_file

    out: dict = {}
    for p in path if isinstance(path, list) else [path]:
        out.update(load_file(p, device=device))
    return out


@dataclass
class MethodResult:
    """Wall times of one method over the rounds, and how much of the file was cached before each."""

    name: str
    times_s: list[float] = field(default_factory=list)
    resident_before: list[float] = field(default_factory=list)
    detail: dict = field(default_factory=dict)

    @property
    def best_s(self) -> float:
        return min(self.times_s)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)


@dataclass
class BenchReport:
    """One benchmark run: every method on the same file, same cache treatment."""

    path: Path
    size_bytes: int
    cache_method: str
    rounds: int
    n_threads: int
    chunk_bytes: int
    fs_type: str
    results: dict[str, MethodResult]
    device: str = "cpu"

    def GBps(self, method: str, stat: str = "best") -> float:
        r = self.results[method]
        return self.size_bytes / (r.best_s if stat == "best" else r.median_s) / 1e9

    def ratio(self, method: str, stat: str = "best") -> float:
        """Throughput of `method` over the raw sequential read's."""
        return self.GBps(method, stat) / self.GBps(BASELINE, stat)

    def table(self) -> str:
        lines = [f"file: {self.path} ({self.size_bytes / 1e9:.3f} GB, fs {self.fs_type}); cold cache via "
                 f"{self.cache_method}; {self.rounds} rounds; tierlab {self.n_threads} threads x "
                 f"{self.chunk_bytes >> 20} MiB chunks; into {self.device}",
                 f"{'method':<14}{'best GB/s':>10}{'median GB/s':>13}{'ratio best':>12}{'ratio median':>14}"
                 f"{'cached before':>15}"]
        for name, r in self.results.items():
            lines.append(f"{name:<14}{self.GBps(name):>10.2f}{self.GBps(name, 'median'):>13.2f}"
                         f"{self.ratio(name):>12.2f}{self.ratio(name, 'median'):>14.2f}"
                         f"{max(r.resident_before):>14.0%}")
        detail = self.results["tierlab"].detail
        if detail:
            lines.append(f"tierlab: O_DIRECT {detail['direct_io']}, first layer ready after "
                         f"{detail['first_layer_ready_s'] * 1e3:.0f} ms (median), all read after "
                         f"{detail['read_s'] * 1e3:.0f} ms (median)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"path": str(self.path), "size_bytes": self.size_bytes, "cache_method": self.cache_method,
                "rounds": self.rounds, "n_threads": self.n_threads, "chunk_bytes": self.chunk_bytes,
                "fs_type": self.fs_type, "device": self.device,
                "methods": {n: {"times_s": r.times_s, "best_GBps": self.GBps(n), "median_GBps": self.GBps(n, "median"),
                                "ratio_best": self.ratio(n), "ratio_median": self.ratio(n, "median"),
                                "resident_before": r.resident_before, **r.detail}
                            for n, r in self.results.items()}}


def fs_type(path: Path) -> str:
    """Filesystem type of the mount holding `path` (from /proc/mounts; "?" elsewhere)."""
    try:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return "?"
    path = path.resolve()
    best = ("", "?")
    for m in mounts:
        if len(m) >= 3 and (path == Path(m[1]) or Path(m[1]) in path.parents) and len(m[1]) > len(best[0]):
            best = (m[1], m[2])
    return best[1]


def compare_loaders(checkpoint: str | Path, rounds: int = 3, n_threads: int = DEFAULT_THREADS,
                    chunk_bytes: int = DEFAULT_CHUNK_BYTES, device: str = "cpu") -> BenchReport:
    """Time all METHODS on the checkpoint's weights, `rounds` times each, cold cache before every run.

    `device`: where the weights must end up ("cpu": host memory, "cuda": GPU memory).
    """
    path = Path(checkpoint)
    directory, layout = weights_location(path)
    files = [directory / f.name for f in layout.weight_files]
    path = path if layout.shards else files[0]  # tierlab loads a sharded checkpoint by its dir
    size = layout.size_bytes
    ready: list[float] = []
    read: list[float] = []
    direct: list[bool] = []

    def tierlab() -> object:
        c = load(path, n_threads=n_threads, chunk_bytes=chunk_bytes, device=None if device == "cpu" else device)
        ready.append(c.timing.layer_ready_s[0] if c.timing.layer_ready_s else c.timing.tail_ready_s)
        read.append(c.timing.read_s)
        direct.append(c.timing.direct_io)
        return c

    def raw() -> object:
        buf = raw_read(files, chunk_bytes)
        return buf if device == "cpu" else torch.from_numpy(buf).to(device)

    run: dict[str, Callable[[], object]] = {BASELINE: raw, "tierlab": tierlab,
                                            "safetensors": lambda: safetensors_read(files, device)}
    results = {name: MethodResult(name) for name in METHODS}
    cache_methods = set()
    for r in range(rounds):
        for name in METHODS[r % len(METHODS):] + METHODS[:r % len(METHODS)]:
            gc.collect()  # free the previous run's buffers outside the timed region
            cache_methods.update(evict_page_cache(f) for f in files)
            results[name].resident_before.append(sum(resident_fraction(f) * f.stat().st_size for f in files) / size)
            t = time.perf_counter()
            out = run[name]()
            if device != "cpu":
                torch.cuda.synchronize()  # every copy has landed before the clock stops
            results[name].times_s.append(time.perf_counter() - t)
            del out
    results["tierlab"].detail = {"direct_io": all(direct), "first_layer_ready_s": statistics.median(ready),
                                 "read_s": statistics.median(read)}
    return BenchReport(path=path, size_bytes=size, cache_method="+".join(sorted(cache_methods)), rounds=rounds,
                       n_threads=n_threads, chunk_bytes=chunk_bytes, fs_type=fs_type(path), results=results,
                       device=device)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="large", choices=sorted(PRESETS), help="checkpoint size (large ~1 GB)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", type=Path, default=None,
                    help="checkpoint dir (generated if missing; default /tmp/tierlab_bench/<preset>-seed<seed>)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    ap.add_argument("--chunk-mib", type=int, default=DEFAULT_CHUNK_BYTES >> 20)
    ap.add_argument("--device", default="cpu", help="where the weights go: cpu (host memory) or cuda")
    ap.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    ap.add_argument("--max-shard-mib", type=int, default=None,
                    help="benchmark a sharded copy (shards of at most this many MiB + index) instead")
    args = ap.parse_args(argv)
    ckpt = args.dir or Path("/tmp/tierlab_bench") / f"{args.preset}-seed{args.seed}"
    if not (ckpt / WEIGHTS_FILE).is_file():
        t = time.perf_counter()
        info = generate_checkpoint(ckpt, args.preset, args.seed)
        print(f"generated {info.path} ({info.total_bytes / 1e9:.3f} GB) in {time.perf_counter() - t:.1f} s")
    if args.max_shard_mib is not None:
        sharded = ckpt.with_name(f"{ckpt.name}-shards{args.max_shard_mib}M")
        if not sharded.is_dir():
            shard_checkpoint(ckpt, sharded, args.max_shard_mib << 20)
        ckpt = sharded
    report = compare_loaders(ckpt, rounds=args.rounds, n_threads=args.threads, chunk_bytes=args.chunk_mib << 20,
                             device=args.device)
    print(report.table())
    if args.json:
        args.json.write_text(json.dumps(report.to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
