"""Measure a cold engine: spawn it, send one request at once, time the first token.

Used to compare progressive loading with load-then-run on the same checkpoint and tier.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from live.engines.base import CpuEngineProcess, free_port


@dataclass(frozen=True)
class ColdStartSample:
    """One cold start: seconds from spawning the engine to the first token of the first request."""

    progressive: bool
    first_token_s: float  # spawn -> first token, as the engine measured it (/stats)
    response_s: float  # spawn -> complete response, as the client saw it
    weights_resident_s: float  # spawn -> every layer in memory
    cache_drop: str  # how the page cache was emptied before the start


def measure_cold_start(model_dir: str | os.PathLike[str], progressive: bool, *, threads: int | None = None,
                       timeout_s: float = 120.0) -> ColdStartSample:
    """Empty the page cache for the weights, start the engine and ask for one token right away."""
    import httpx

    from live.loader import evict_page_cache

    weights = Path(model_dir) / "model.safetensors"
    how = evict_page_cache(weights)
    engine = CpuEngineProcess(model_dir, free_port(), progressive=progressive, model_name="m", threads=threads)
    t0 = time.perf_counter()
    engine.start()
    try:
        deadline = t0 + timeout_s
        with httpx.Client(base_url=engine.url, timeout=timeout_s) as http:
            while True:  # the server listens before it loads; a request sent while loading waits
                try:
                    http.get("/ping", timeout=1.0)
                    break
                except httpx.TransportError:
                    if time.perf_counter() > deadline or not engine.alive():
                        raise TimeoutError(f"engine did not listen: {engine.log_tail()}") from None
                    time.sleep(0.005)
            body = {"model": "m", "prompt": "hello", "max_tokens": 1, "temperature": 0}
            r = http.post("/v1/completions", json=body)
            r.raise_for_status()
            response_s = time.perf_counter() - t0
            deadline_stats = time.perf_counter() + timeout_s
            while True:  # in progressive mode the last layers may still be landing
                stats = http.get("/stats").json()
                if stats.get("weights_resident_at_s") is not None or time.perf_counter() > deadline_stats:
                    break
                time.sleep(0.01)
    finally:
        engine.close()
    return ColdStartSample(progressive, float(stats["first_token_at_s"]), response_s,
                           float(stats["weights_resident_at_s"]), how)
