"""Measure a cold engine: spawn it, send one request at once, time the first token.

Used to compare progressive loading with load-then-run on the same checkpoint and tier
(`scripts/bench_progressive.py`). Every time is seconds from the spawn, as the engine's GET /stats
reports it, so the phases of one start (imports, ready, weights resident, first token, and per
layer group when it was resident and when the first forward pass had computed it) line up.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from live.engines.base import CpuEngineProcess, free_port


@dataclass(frozen=True)
class ColdStartSample:
    """One cold start: seconds from spawning the engine to each phase of the first request."""

    progressive: bool
    first_token_s: float  # spawn -> first token, as the engine measured it (/stats)
    response_s: float  # spawn -> complete response, as the client saw it
    weights_resident_s: float  # spawn -> every layer in memory, in the compute dtype
    cache_drop: str  # how the page cache was emptied before the start
    imports_done_s: float = 0.0  # spawn -> torch and the engine imported
    ready_s: float = 0.0  # spawn -> the engine may start a forward pass
    load_s: float = 0.0  # load start -> every group resident in the model
    read_s: float | None = None  # load start -> the loader had read every byte
    group_resident_s: tuple[float | None, ...] = ()  # per group (0 = embeddings .. N+1 = norm + lm_head)
    group_computed_s: tuple[float | None, ...] = ()  # when the first forward pass had computed it

    @property
    def forward_s(self) -> float:
        """Ready -> first token: the first forward pass, plus (progressive) waiting for layers."""
        return self.first_token_s - self.ready_s

    @property
    def after_imports_s(self) -> float:
        """Imports done -> first token: what the loading mode can change (imports are the same in both)."""
        return self.first_token_s - self.imports_done_s

    @classmethod
    def from_stats(cls, progressive: bool, stats: dict[str, Any], response_s: float,
                   cache_drop: str) -> ColdStartSample:
        """A sample from the engine's /stats after its first request."""
        return cls(
            progressive=progressive, first_token_s=float(stats["first_token_at_s"]), response_s=response_s,
            weights_resident_s=float(stats["weights_resident_at_s"]), cache_drop=cache_drop,
            imports_done_s=float(stats["imports_done_at_s"]), ready_s=float(stats["ready_at_s"]),
            load_s=float(stats["load_s"]), read_s=stats.get("read_s"),
            group_resident_s=tuple(stats.get("group_resident_at_s") or ()),
            group_computed_s=tuple(stats.get("group_computed_at_s") or ()),
        )  # fmt: skip


def measure_cold_start(model_dir: str | os.PathLike[str], progressive: bool, *, threads: int | None = None,
                       timeout_s: float = 120.0, max_read_MBps: float | None = None,
                       prompt_tokens: int | None = None) -> ColdStartSample:
    """Empty the page cache for the weights, start the engine and ask for one token right away.

    `max_read_MBps` caps the engine's weight read (an emulated slower tier; off by default).
    `prompt_tokens`: send that many token ids (byte tokens, valid in any vocab of >= 258) instead
    of the short text prompt "hello", so that the first forward pass does real prefill work.
    """
    if prompt_tokens is not None and prompt_tokens < 1:
        raise ValueError(f"prompt_tokens must be >= 1, got {prompt_tokens}")
    import httpx

    from live.page_cache import evict_page_cache
    from live.shards import weight_file_paths

    how = "+".join(sorted({evict_page_cache(p) for p in weight_file_paths(model_dir)}))  # every shard
    extra = [] if max_read_MBps is None else ["--max-read-MBps", repr(float(max_read_MBps))]
    engine = CpuEngineProcess(model_dir, free_port(), progressive=progressive, model_name="m", threads=threads,
                              extra_args=extra)
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
            prompt: str | list[int] = "hello" if prompt_tokens is None else [2 + i % 256 for i in range(prompt_tokens)]
            body = {"model": "m", "prompt": prompt, "max_tokens": 1, "temperature": 0}
            r = http.post("/v1/completions", json=body)
            r.raise_for_status()
            response_s = time.perf_counter() - t0
            deadline_stats = time.perf_counter() + timeout_s
            while True:  # in progressive mode the last layers may still be landing
                stats = http.get("/stats").json()
                if stats.get("weights_resident_at_s") is not None:
                    break
                if time.perf_counter() > deadline_stats or stats.get("state") == "failed":
                    raise TimeoutError(f"weights not resident after {timeout_s} s: {stats.get('error')}")
                time.sleep(0.01)
    finally:
        engine.close()
    return ColdStartSample.from_stats(progressive, stats, response_s, how)
