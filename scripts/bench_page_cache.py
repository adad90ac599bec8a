"""Loads of one checkpoint from a warm page cache onto a device: safetensors vs tierlab's loader.

    python scripts/bench_page_cache.py                       # on a GPU machine (what produced the
                                                             # docs/results/safetensors_warm_cache_* file)
    python scripts/bench_page_cache.py --device cpu --preset tiny --out /tmp/pc   # a smoke run here

Generates (or reuses) a checkpoint of `--preset` under `--dir`, reads it once so every page is in
the page cache, then times `--repeats` loads each of `safetensors.torch.load_file(device=...)`,
`load_file` to CPU (mmap only) and `live.loader.load(device=...)`, plus pageable and pinned
host-to-device copies of a buffer of the same size. The first load of each kind pays one-time
costs (the device allocator's first blocks, the driver's staging buffers), as the unmeasured
warm-up load of ServerlessLLM's cached benchmark does; `experiments.serverlessllm` drops it.
Writes `page_cache.json` into `--out` (default $OUT or /tmp) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from safetensors.torch import load_file

from live.checkpoint import generate_checkpoint
from live.loader import load


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_loads(fn: Callable[[], object], device: str, repeats: int) -> list[float]:
    """Wall time of `repeats` calls of `fn`, the device synchronised before and after each."""
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        x = fn()
        _sync(device)
        times.append(time.perf_counter() - t)
        del x
    return times


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="large", help="live.checkpoint preset (large: about 1 GB)")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/stc"))
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp")))
    args = ap.parse_args(argv)
    if args.repeats < 2:
        ap.error("--repeats must be at least 2 (the first load is a warm-up)")
    ckpt = args.dir / args.preset
    if not ckpt.is_dir():
        generate_checkpoint(ckpt, args.preset, 0)
    f = ckpt / "model.safetensors"
    size = f.stat().st_size
    f.read_bytes()  # warm the page cache
    _sync(args.device)  # device context created outside the timed loads
    res: dict = {"size_bytes": size, "device": args.device}
    kinds = {f"safetensors_{args.device}_warm": lambda: load_file(f, device=args.device),
             "safetensors_cpu_warm": lambda: load_file(f),  # the same call when --device is cpu
             f"tierlab_{args.device}_warm": lambda: load(f, device=args.device)}
    for name, fn in kinds.items():
        ts = time_loads(fn, args.device, args.repeats)
        res[name] = {"times_s": ts, "best_GBps": size / min(ts) / 1e9}
    buf = torch.empty(size, dtype=torch.uint8)
    copies = [("h2d_pageable", buf)]
    if args.device.startswith("cuda"):
        copies.append(("h2d_pinned", torch.empty(size, dtype=torch.uint8).pin_memory()))
    for name, b in copies:
        ts = time_loads(lambda b=b: b.to(args.device), args.device, args.repeats)
        res[name] = {"best_GBps": size / min(ts) / 1e9}
    print(json.dumps(res, indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "page_cache.json").write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
