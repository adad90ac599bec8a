"""Decode throughput of the CPU engine's continuous batching: tokens/s at batch 1, 4 and 8, same run.

The engine's own scheduler (`live.engines.batching.Scheduler`: batched forward, per-position sampling,
detokenization; no HTTP) runs B equal requests at once on a generated checkpoint loaded in this process.
All B prompts are prefilled in the first step, so every later step decodes exactly B tokens; decode
throughput is B x (max_tokens - 1) / (time from the end of step 1 to the last token). Rounds alternate the
order of the batch sizes; medians over rounds are reported, and the median over rounds of each round's
ratio over batch 1 (what a slow or busy machine moves least). A real batching engine reads the weights once per
step, so its throughput grows with B; B separate forwards would stay at ~1x.

    python scripts/bench_batching.py                          # small preset (~100 MB), 5 rounds, 1 thread
    python scripts/bench_batching.py --preset medium --rounds 5 --threads 2 --dtype bfloat16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from live.checkpoint import PRESETS, generate_checkpoint

BATCH_SIZES = (1, 4, 8)
PROMPT_TOKENS = 16
DECODE_TOKENS = 32


@dataclass
class BatchingReport:
    """Decode tokens/s per batch size, one value per round."""

    model_dir: str
    dtype: str
    threads: int
    rounds: int
    decode_tokens: int
    tok_per_s: dict[int, list[float]]
    load_avg_1m: tuple[float, float]  # before and after

    def median(self, batch: int) -> float:
        return statistics.median(self.tok_per_s[batch])

    def ratio(self, batch: int) -> float:
        """Median over rounds of tokens/s at `batch` over tokens/s at batch 1 in the same round (measured
        seconds apart: a neighbour's burst of work moves one round's pair, not the median)."""
        return statistics.median(b / one for b, one in zip(self.tok_per_s[batch], self.tok_per_s[1], strict=True))

    def table(self) -> str:
        lines = [f"{'batch':>5}  {'tok/s (median)':>14}  {'min':>8}  {'max':>8}  {'x batch 1':>9}"]
        for b in sorted(self.tok_per_s):
            v = self.tok_per_s[b]
            lines.append(f"{b:>5}  {self.median(b):>14.1f}  {min(v):>8.1f}  {max(v):>8.1f}  {self.ratio(b):>9.2f}")
        return "\n".join(lines)


def decode_throughput(model: Any, tokenizer: Any, batch: int, decode_tokens: int = DECODE_TOKENS) -> float:
    """Decode tokens/s of `batch` equal greedy requests (ignore_eos) stepped together by the engine's scheduler."""
    from live.engines.batching import Scheduler, SeqRequest

    scheduler = Scheduler(max_num_seqs=batch, prefill_chunk_tokens=batch * PROMPT_TOKENS)
    scheduler.serve(model, lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
    done = threading.Semaphore(0)
    errors: list[Any] = []

    def emit(kind: str, payload: Any) -> None:
        if kind == "error":
            errors.append(payload)
        if kind in ("done", "error"):
            done.release()

    prompt = [model.config.bos_token_id or 0, *range(5, 5 + PROMPT_TOKENS - 1)]
    for i in range(batch):
        scheduler.submit(SeqRequest(f"bench-{i}", prompt, decode_tokens, 0.0, 1.0, 0, [], True, True, emit))
    scheduler.start()  # after the submissions: step 1 admits (and prefills) all of them
    try:
        for _ in range(batch):
            if not done.acquire(timeout=300):
                raise TimeoutError(f"batch {batch}: requests not done in 300 s")
        end = time.perf_counter()
    finally:
        scheduler.close()
    if errors:
        raise RuntimeError(f"batch {batch}: {errors[0]!r}")
    stats = scheduler.stats()
    if stats["max_batch_size"] != batch or stats["steps"] != decode_tokens:
        raise RuntimeError(f"batch {batch}: expected {decode_tokens} steps of {batch}, got {stats}")
    assert scheduler.first_token_perf is not None
    return batch * (decode_tokens - 1) / (end - scheduler.first_token_perf)


def measure_batching(model_dir: str | os.PathLike[str], rounds: int = 5, threads: int = 1,
                     batch_sizes: tuple[int, ...] = BATCH_SIZES, decode_tokens: int = DECODE_TOKENS,
                     dtype: str = "float32") -> BatchingReport:
    """Load the checkpoint once (computing in `dtype`, the engine's --dtype), then `rounds` rounds over
    `batch_sizes` in alternating order (torch threads set to `threads` meanwhile)."""
    import torch
    from tokenizers import Tokenizer

    from live.engines.llama import DTYPES, LlamaModel

    model = LlamaModel.from_dir(model_dir, DTYPES[dtype])
    tokenizer = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    before_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    load_before = os.getloadavg()[0]
    samples: dict[int, list[float]] = {b: [] for b in batch_sizes}
    try:
        decode_throughput(model, tokenizer, batch_sizes[0], 4)  # warm-up: first-call allocations
        for r in range(rounds):
            for b in batch_sizes if r % 2 == 0 else tuple(reversed(batch_sizes)):
                samples[b].append(decode_throughput(model, tokenizer, b, decode_tokens))
    finally:
        torch.set_num_threads(before_threads)
    load_after = os.getloadavg()[0]
    return BatchingReport(str(model_dir), dtype, threads, rounds, decode_tokens, samples, (load_before, load_after))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small", choices=sorted(PRESETS))
    ap.add_argument("--model-dir", type=Path, help="an existing checkpoint instead of a generated one")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="compute dtype (bfloat16 batches almost for free on CPUs with AMX)")
    ap.add_argument("--decode-tokens", type=int, default=DECODE_TOKENS)
    ap.add_argument("--json", type=Path, help="write the report here")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.threads < 1 or args.decode_tokens < 2:
        ap.error("--rounds and --threads must be >= 1, --decode-tokens >= 2")
    with tempfile.TemporaryDirectory(prefix="tierlab-bench-batching-") as tmp:
        model_dir = args.model_dir or generate_checkpoint(Path(tmp) / args.preset, args.preset, seed=0).path
        report = measure_batching(model_dir, args.rounds, args.threads, decode_tokens=args.decode_tokens,
                                  dtype=args.dtype)
    print(report.table())
    print(f"{report.dtype}, threads {report.threads}, {report.rounds} rounds, "
          f"load average {report.load_avg_1m[0]:.2f} -> {report.load_avg_1m[1]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
