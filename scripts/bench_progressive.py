"""First-request TTFT of a cold CPU engine: progressive loading vs load-then-run, same checkpoint, same tier.

Every round starts the engine (`python -m live.engines.cpu_server`) twice on the same checkpoint
directory, once per mode, alternating which mode goes first, with the weights evicted from the page
cache before each start (drop_caches as root where allowed, else POSIX_FADV_DONTNEED), and sends
one 1-token request as soon as the server listens. TTFT is spawn -> first token as the engine
timed it (GET /stats). Medians over the rounds, their ratio progressive / load-then-run and the
median of the per-round ratios are reported, for TTFT and for TTFT after the imports (torch's import
takes seconds and varies by seconds on a shared machine, the same in both modes), with the phases
that explain them: imports, ready, weights resident (read + conversion to the compute dtype) and
the first forward pass.

    python scripts/bench_progressive.py                              # small preset (~100 MB), 5 rounds
    python scripts/bench_progressive.py --max-read-MBps 93 --prompt-tokens 512    # one S3 stream, long prompt
    python scripts/bench_progressive.py --tier-dir /mnt/nvme/tierlab --json out.json

`--max-read-MBps` caps the engine's read of the weights (both modes alike), emulating a slower
tier on a fast disk (reference: `sata_ssd_seq_read` 560 MB/s, `s3_per_stream` 93 MB/s in
../shared/data/reference/prices_and_bandwidths.yaml); it is off by default. Progressive loading can
save at most the part of the first forward pass that fits under the read: with the default
3-token prompt that is ~0.1 s; `--prompt-tokens` makes that pass heavier.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from live.checkpoint import PRESETS, generate_checkpoint
from live.engines.coldstart import ColdStartSample, measure_cold_start
from live.manifest import WEIGHTS_FILE

MODES = {"load-then-run": False, "progressive": True}
PHASES = ("first_token_s", "imports_done_s", "ready_s", "weights_resident_s", "load_s", "forward_s", "after_imports_s")


@dataclass
class ProgressiveReport:
    """Cold starts of both modes on one checkpoint, `rounds` each, in alternating order."""

    model_dir: Path
    size_bytes: int
    rounds: int
    threads: int | None
    max_read_MBps: float | None
    prompt_tokens: int | None
    samples: dict[str, list[ColdStartSample]]
    load_avg_1m: tuple[float, float]  # before and after the run

    def median(self, mode: str, phase: str = "first_token_s") -> float:
        """Median over the rounds of one phase (a ColdStartSample field or property) of one mode."""
        return statistics.median(getattr(s, phase) for s in self.samples[mode])

    def ratio(self, phase: str = "first_token_s") -> float:
        """Median of a phase, progressive over load-then-run (TTFT by default; < 1: progressive is faster)."""
        return self.median("progressive", phase) / self.median("load-then-run", phase)

    def paired_ratio(self, phase: str = "first_token_s") -> float:
        """Median over rounds of progressive / load-then-run within the round (back-to-back starts share
        the machine's state, so this moves less with the shared machine's load than the ratio of medians)."""
        pairs = zip(self.samples["progressive"], self.samples["load-then-run"], strict=True)
        return statistics.median(getattr(p, phase) / getattr(q, phase) for p, q in pairs)

    def table(self) -> str:
        cap = "no read cap" if self.max_read_MBps is None else f"read capped at {self.max_read_MBps:g} MB/s"
        prompt = '"hello"' if self.prompt_tokens is None else f"{self.prompt_tokens} tokens"
        cache = "+".join(sorted({s.cache_drop for ss in self.samples.values() for s in ss}))
        lines = [f"checkpoint: {self.model_dir} ({self.size_bytes / 1e6:.0f} MB); {self.rounds} rounds, alternating "
                 f"order; cold cache via {cache}; {cap}; prompt {prompt}; torch threads {self.threads or 'default'}; "
                 f"load avg (1 min) {self.load_avg_1m[0]:.2f} -> {self.load_avg_1m[1]:.2f}",
                 "medians; TTFT, imports, ready, resident: seconds from spawn; load, read, forward, after imports:"
                 " durations",
                 f"{'mode':<15}{'TTFT':>7}{'min':>7}{'max':>7}{'imports':>9}{'ready':>7}{'resident':>10}"
                 f"{'load':>7}{'read':>7}{'forward':>9}{'after imports':>15}"]
        for mode, samples in self.samples.items():
            ttft = [s.first_token_s for s in samples]
            reads = [s.read_s for s in samples if s.read_s is not None]
            read = f"{statistics.median(reads):>7.2f}" if reads else f"{'-':>7}"
            lines.append(f"{mode:<15}{self.median(mode):>7.2f}{min(ttft):>7.2f}{max(ttft):>7.2f}"
                         f"{self.median(mode, 'imports_done_s'):>9.2f}{self.median(mode, 'ready_s'):>7.2f}"
                         f"{self.median(mode, 'weights_resident_s'):>10.2f}{self.median(mode, 'load_s'):>7.2f}"
                         f"{read}{self.median(mode, 'forward_s'):>9.2f}{self.median(mode, 'after_imports_s'):>15.2f}")
        return "\n".join(lines)

    def summary(self) -> str:
        ratio = self.ratio()
        return (f"progressive {self.median('progressive'):.2f} s vs load-then-run {self.median('load-then-run'):.2f} s "
                f"median first-request TTFT over {self.rounds} rounds: ratio {ratio:.2f} "
                f"(progressive {abs(1 - ratio):.0%} {'faster' if ratio < 1 else 'slower'}; median paired ratio "
                f"{self.paired_ratio():.2f}); after the imports {self.median('progressive', 'after_imports_s'):.2f} s "
                f"vs {self.median('load-then-run', 'after_imports_s'):.2f} s, ratio {self.ratio('after_imports_s'):.2f}"
                f" (paired {self.paired_ratio('after_imports_s'):.2f})")

    def to_dict(self) -> dict:
        return {"model_dir": str(self.model_dir), "size_bytes": self.size_bytes, "rounds": self.rounds,
                "threads": self.threads, "max_read_MBps": self.max_read_MBps, "prompt_tokens": self.prompt_tokens,
                "load_avg_1m": self.load_avg_1m,
                "ratio": self.ratio(), "ratio_after_imports": self.ratio("after_imports_s"),
                "paired_ratio": self.paired_ratio(), "paired_ratio_after_imports": self.paired_ratio("after_imports_s"),
                "medians": {m: {p: self.median(m, p) for p in PHASES} for m in self.samples},
                "samples": {m: [asdict(s) for s in ss] for m, ss in self.samples.items()}}


def compare_progressive(model_dir: str | os.PathLike[str], rounds: int = 5, *, threads: int | None = None,
                        max_read_MBps: float | None = None, prompt_tokens: int | None = None,
                        timeout_s: float = 120.0) -> ProgressiveReport:
    """Cold-start the engine `rounds` times per mode on `model_dir`, alternating which mode goes first."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    model_dir = Path(model_dir)
    weights = model_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: no weights file (generate one with python -m live.checkpoint)")
    load_before = os.getloadavg()[0]
    samples: dict[str, list[ColdStartSample]] = {mode: [] for mode in MODES}
    order = list(MODES)
    for r in range(rounds):
        for mode in order if r % 2 == 0 else order[::-1]:
            samples[mode].append(measure_cold_start(model_dir, MODES[mode], threads=threads, timeout_s=timeout_s,
                                                    max_read_MBps=max_read_MBps, prompt_tokens=prompt_tokens))
    return ProgressiveReport(model_dir=model_dir, size_bytes=weights.stat().st_size, rounds=rounds, threads=threads,
                             max_read_MBps=max_read_MBps, prompt_tokens=prompt_tokens, samples=samples,
                             load_avg_1m=(load_before, os.getloadavg()[0]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small", choices=sorted(PRESETS), help="checkpoint size (small ~100 MB)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tier-dir", type=Path, default=Path("/tmp/tierlab_bench"),
                    help="the tier directory holding the checkpoint (generated there if missing)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads of the engine")
    ap.add_argument("--max-read-MBps", type=float, default=None,
                    help="cap the engine's weight read (emulates a slower tier; off by default)")
    ap.add_argument("--prompt-tokens", type=int, default=None,
                    help="prompt length in tokens (default: the text 'hello', 3 tokens); long prompts make the "
                         "first forward pass heavy enough for progressive loading to hide")
    ap.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    args = ap.parse_args(argv)
    if args.rounds < 1 or (args.max_read_MBps is not None and not args.max_read_MBps > 0) \
            or (args.prompt_tokens is not None and args.prompt_tokens < 1):
        ap.error("--rounds and --prompt-tokens must be >= 1, --max-read-MBps > 0")
    ckpt = args.tier_dir / f"{args.preset}-seed{args.seed}"
    if not (ckpt / WEIGHTS_FILE).is_file():
        t = time.perf_counter()
        info = generate_checkpoint(ckpt, args.preset, args.seed)
        print(f"generated {info.path} ({info.total_bytes / 1e6:.0f} MB) in {time.perf_counter() - t:.1f} s")
    report = compare_progressive(ckpt, args.rounds, threads=args.threads, max_read_MBps=args.max_read_MBps,
                                 prompt_tokens=args.prompt_tokens)
    print(report.table())
    print(report.summary())
    if args.json:
        args.json.write_text(json.dumps(report.to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
