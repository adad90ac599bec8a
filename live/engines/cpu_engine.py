"""The CPU engine's core: model loading (progressive or load-then-run), tokenizer, the batching scheduler
and the start-up timings `/stats` reports. The HTTP app around it is `live.engines.cpu_server`.

Importing this module does not import torch: the server listens first, the model loads in a thread.
"""

from __future__ import annotations

import time

# fallbacks for the process start, when the entry point does not pass its own (taken before heavy imports)
_MODULE_START_UNIX = time.time()
_MODULE_START_PERF = time.perf_counter()

import logging  # noqa: E402
import os  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from live.engines.batching import Scheduler, SeqRequest  # noqa: E402
from live.engines.cpu_api import ApiError  # noqa: E402

log = logging.getLogger("live.engines.cpu_engine")


def prepended_bos(model_dir: Path, config: Any) -> int | None:
    """The BOS id `Engine.encode` puts in front of a completion prompt that does not start with it, or None.

    A transformers tokenizer (`tokenizer_config.json` beside `tokenizer.json`) is used as transformers uses it:
    tokenizer.json's post-processor alone decides (Llama 2/3's and Mistral's add BOS, Qwen's and e.g. SmolLM's
    Llama-architecture ones add none although their configs name one), so nothing is prepended. Only a bare
    tokenizer.json (tierlab's own test checkpoints, written by `tokenizers`) gets the family's convention: the
    config's BOS for llama and mistral, none for qwen2/qwen3.
    """
    from live.chat_template import TOKENIZER_CONFIG_FILE

    if (model_dir / TOKENIZER_CONFIG_FILE).is_file():
        return None
    return config.bos_token_id if config.model_type in ("llama", "mistral") else None


class Engine:
    """Model, tokenizer, the inference worker and the start-up timings."""

    def __init__(
        self,
        model_dir: Path,
        model_name: str,
        progressive: bool = False,
        dtype: str = "float32",
        threads: int | None = None,
        launched_at_unix: float | None = None,
        default_chat_max_tokens: int = 256,
        layer_delay_s: float = 0.0,
        max_read_Bps: float | None = None,
        max_num_seqs: int = 8,
        prefill_chunk_tokens: int = 256,
        step_delay_s: float = 0.0,
        process_started: tuple[float, float] | None = None,
        prefix_cache_blocks: int = 0,
        prefix_block_tokens: int = 16,
    ) -> None:
        """`process_started`: (time.time(), time.perf_counter()) at interpreter start, for the stats' t0
        arithmetic (default: this module's import); `step_delay_s` pads every batch step (a slower device);
        `prefix_cache_blocks` > 0 keeps a prefix (KV) cache of that many blocks of `prefix_block_tokens`."""
        self.model_dir = model_dir
        self.model_name = model_name
        self.progressive = progressive
        self.dtype_name = dtype
        self.threads = threads
        self.default_chat_max_tokens = default_chat_max_tokens
        self.layer_delay_s = layer_delay_s
        self.max_read_Bps = max_read_Bps
        self.created_unix = int(time.time())
        self.start_unix, self.start_perf = process_started or (_MODULE_START_UNIX, _MODULE_START_PERF)
        # every *_at_s is measured from t0: the parent's launch time when it passed one, else module start
        self.t0_unix = launched_at_unix if launched_at_unix is not None else self.start_unix
        self.state = "loading"  # loading -> ready -> (failed)
        self.error: str | None = None
        self.ready = threading.Event()
        self.on_fatal: Callable[[], None] = lambda: None
        self.model: Any = None
        self.tokenizer: Any = None
        self.bos_token_id: int | None = None
        self.scheduler = Scheduler(max_num_seqs, prefill_chunk_tokens, step_delay_s, prefix_cache_blocks,
                                   prefix_block_tokens)
        self.timings: dict[str, float | None] = {
            "process_started_at_s": self.start_unix - self.t0_unix,
            "listening_at_s": None,
            "imports_done_at_s": None,
            "weights_resident_at_s": None,
            "ready_at_s": None,
            "load_s": None,  # load start -> every group resident in the model, in the compute dtype
            "read_s": None,  # load start -> the source (the loader) had read every group
            "first_token_at_s": None,  # the first request's first token: the cold start's TTFT
        }

    def since_t0_s(self) -> float:
        return time.time() - self.t0_unix

    def perf_to_at_s(self, perf: float) -> float:
        """A perf_counter() reading as seconds since t0 (perf_counter is monotonic, time.time() is not)."""
        return perf - self.start_perf + (self.start_unix - self.t0_unix)

    def start(self) -> None:
        self.timings["listening_at_s"] = self.since_t0_s()
        threading.Thread(target=self._load, name="model-loader", daemon=True).start()
        self.scheduler.start()

    def _fail(self, what: str, exc: BaseException) -> None:
        self.state = "failed"
        self.error = f"{what}: {exc!r}"
        log.error("%s\n%s", self.error, "".join(traceback.format_exception(exc)))
        self.ready.set()  # wake requests waiting for the tokenizer: they answer with the error
        self.scheduler.fail(self.error)  # and every queued or running sequence
        self.on_fatal()

    def _load(self) -> None:
        try:
            import torch
            from tokenizers import Tokenizer

            from live.engines.llama import DTYPES, LlamaModel

            if self.threads:
                torch.set_num_threads(self.threads)
            self.timings["imports_done_at_s"] = self.since_t0_s()
            start = time.perf_counter()
            # both modes read through the same source with the same settings: they differ only in
            # whether the first forward pass may begin before the last group is resident
            source = self._layer_source()
            self.tokenizer = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))  # while the read runs
            self.model = LlamaModel.from_dir(self.model_dir, DTYPES[self.dtype_name], layer_source=source)
            if not self.progressive:
                self.model.materialize()
                self._weights_resident(source, start)
            self.bos_token_id = prepended_bos(self.model_dir, self.model.config)
            self.state = "ready"
            self.timings["ready_at_s"] = self.since_t0_s()
            self.scheduler.serve(self.model, self.decode)
            self.ready.set()
            log.info(
                "model %s ready at %.3f s (progressive=%s)",
                self.model_name,
                self.timings["ready_at_s"],
                self.progressive,
            )
            if self.progressive:
                # take (and convert to the compute dtype) each group as soon as it is resident, in this
                # thread: the first forward pass then finds layer i ready instead of converting it itself,
                # so conversion overlaps compute rather than adding to it
                self.model.materialize()
                self._weights_resident(source, start)
        except BaseException as exc:  # any load failure is fatal for the process
            self._fail("loading the model failed", exc)

    def _layer_source(self) -> Any:
        """The weights' source: tierlab's parallel, layer-ordered loader, or the artificial slow tier."""
        from live.manifest import WEIGHTS_FILE
        from live.shards import INDEX_FILE

        # the loader reads one model.safetensors or the shards an index names, across shard boundaries;
        # only a dir of unindexed *.safetensors files (or the experiment's sleep per group) reads file by file
        has_weights = (self.model_dir / WEIGHTS_FILE).is_file() or (self.model_dir / INDEX_FILE).is_file()
        if self.layer_delay_s > 0 or not has_weights:
            from live.engines.layer_sources import BackgroundSafetensorsLayerSource

            if self.max_read_Bps is not None:
                log.warning("--max-read-MBps applies to the loader only; ignored for %s", self.model_dir)
            # layer_delay_s: an experiment knob, a sleep per group standing in for a slow tier
            return BackgroundSafetensorsLayerSource(self.model_dir, self.layer_delay_s).start()
        from live.engines.loader_source import LoaderLayerSource

        return LoaderLayerSource(self.model_dir, max_read_Bps=self.max_read_Bps)

    def _weights_resident(self, source: Any, start_perf: float) -> None:
        """Record when the model held every group; a late source error (a failed checksum) is fatal."""
        source.done.wait()
        if source.error is not None:
            raise source.error
        # the last group's time, not this call's: the forward pass may have taken the last group itself
        resident_perf = max(self.model.group_resident_at.values())
        self.timings["load_s"] = resident_perf - start_perf
        self.timings["read_s"] = source.load_s
        self.timings["weights_resident_at_s"] = self.perf_to_at_s(resident_perf)

    # -- requests

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt as transformers' tokenizer gives them (BOS as `prepended_bos` says)."""
        self.ready.wait()  # the tokenizer loads with the model
        if self.tokenizer is None:
            raise ApiError(503, f"the model is not available: {self.error}", None, "model_unavailable", "server_error")
        ids = list(self.tokenizer.encode(text).ids)
        if self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: list[int]) -> str:
        """The text of generated ids (special tokens dropped)."""
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def context_tokens(self) -> int:
        return int(self.model.config.max_position_embeddings)

    def submit(self, req: SeqRequest) -> None:
        """Queue a request for the batching worker (it waits there while the model loads)."""
        self.scheduler.submit(req)

    def _group_times(self, perf_by_group: dict[int, float]) -> list[float | None]:
        times = dict(perf_by_group)  # a snapshot: the inference thread may add to it meanwhile
        return [self.perf_to_at_s(times[g]) if g in times else None for g in range(self.model.n_groups)]

    def stats(self) -> dict[str, Any]:
        """Start-up timings, the batching counters and the last finished request."""
        model = self.model
        batching = self.scheduler.stats()
        first_perf = self.scheduler.first_token_perf
        timings = dict(self.timings)
        timings["first_token_at_s"] = None if first_perf is None else self.perf_to_at_s(first_perf)
        last = batching["last_request"]
        return {
            "model": self.model_name,
            "state": self.state,
            "error": self.error,
            "progressive": self.progressive,
            "dtype": self.dtype_name,
            # the served weight variant (`live.quantize`: "int8" / "fp8", held quantised); None: plain weights
            "weight_format": None if model is None else model.weight_format,
            "weight_bytes": None if model is None else model.weight_bytes(),
            "pid": os.getpid(),
            "t0_unix": self.t0_unix,
            **timings,
            "weights_resident": bool(model is not None and model.resident),
            # per layer group (0 = embeddings .. N+1 = norm + lm_head): when the model took it, and when
            # the first forward pass had computed it; with --progressive the two interleave
            "group_resident_at_s": None if model is None else self._group_times(model.group_resident_at),
            "group_computed_at_s": None if model is None else self._group_times(model.group_computed_at),
            **batching,
            "requests_queued": batching["waiting"],
            "first_token_s": None if last is None else last["first_token_s"],
        }
