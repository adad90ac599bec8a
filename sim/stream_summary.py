"""The summary's request statistics read back from a streamed records.parquet, in bounded memory.

`core.metrics.summarize` takes the whole request table; a streamed run (`sim.record_sink`) has it on disk only.
`StreamedRequests` reads the file in record batches, a few columns at a time, and gives the same numbers:

- counts and sums: exact (accumulated per batch);
- percentiles: exact, numpy's default ("linear") method. Each statistic keeps its values while they number at
  most `exact_cap` (then `np.quantile` on them, the very call `summarize` makes); past that it drops them and
  finds the order statistics it needs by radix selection on the float's bits: one pass over the file per 16 bits
  (all of a statistic's ranks in the same passes), until a rank's candidates fit in `exact_cap`, then a sort of
  them; numpy's interpolation between the two neighbours, term by term. Memory: O(exact_cap) per statistic.
- means: `np.mean` on the kept values in request-id order (identical to `summarize`'s); past `exact_cap`,
  `math.fsum` / count (correctly rounded; `np.mean`'s pairwise sum can differ from it in the last bits).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core.metrics import REQUEST_CAUSED_REASONS
from core.specs import TIER_ORDER

#: values a statistic keeps in memory before it switches to radix selection (8 bytes each)
EXACT_CAP = 100_000
_BATCH_ROWS = 1 << 16
_NUMERIC = ("request_id", "cold_start", "cold_start_s", "fetch_s", "to_gpu_s", "engine_init_s", "ttft_s",
            "tpot_s", "e2e_s", "prompt_tokens", "output_tokens", "cached_tokens")
_COLUMNS = ("outcome", "reason", "source_tier", *_NUMERIC)
_OWN = pa.array(sorted(REQUEST_CAUSED_REASONS), type=pa.string())

Batch = dict[str, np.ndarray]  # also "reasons": the batch's non-completed reasons, counted
Where = Callable[[Batch], np.ndarray]  # a batch -> the mask of the rows a statistic takes


def _mask(arr: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A pyarrow boolean result as a numpy bool array (nulls, which the schema never writes, as False)."""
    return np.asarray(pc.fill_null(arr, False).to_numpy(zero_copy_only=False), dtype=bool)


def _sort_keys(values: np.ndarray) -> np.ndarray:
    """float64 -> uint64 keys in the same order (negatives flipped whole, positives get the sign bit set)."""
    bits = np.ascontiguousarray(values, dtype=np.float64).view(np.uint64)
    return np.where(bits >> np.uint64(63), ~bits, bits | np.uint64(1 << 63))


def _from_key(key: int) -> float:
    bits = key & ~(1 << 63) if key >> 63 else ~key & ((1 << 64) - 1)
    return float(np.array([bits], dtype=np.uint64).view(np.float64)[0])


@dataclass
class _Stat:
    """One float statistic over the rows `select` picks (NaN dropped, as `core.metrics._q` / `_mean` do)."""

    column: str
    where: Where
    cap: int
    count: int = 0
    parts: list[np.ndarray] = field(default_factory=list)
    ids: list[np.ndarray] = field(default_factory=list)
    spilled: bool = False
    sums: list[float] = field(default_factory=list)
    top: np.ndarray = field(default_factory=lambda: np.zeros(1 << 16, dtype=np.int64))

    def add(self, batch: Batch) -> None:
        rows = self.where(batch)
        v = np.asarray(batch[self.column][rows], dtype=np.float64)
        keep = ~np.isnan(v)
        v = v[keep]
        if not v.size:
            return
        self.count += v.size
        self.sums.append(math.fsum(v))
        self.top += np.bincount((_sort_keys(v) >> np.uint64(48)).astype(np.int64), minlength=1 << 16)
        if not self.spilled:
            self.parts.append(v)
            self.ids.append(batch["request_id"][rows][keep])
            if self.count > self.cap:  # too many to keep: radix selection over the file later
                self.parts, self.ids, self.spilled = [], [], True

    def values(self) -> np.ndarray:
        """The kept values in request-id order (the in-memory table's), so that np.mean adds them alike."""
        if not self.parts:
            return np.empty(0)
        v, ids = np.concatenate(self.parts), np.concatenate(self.ids)
        return v[np.argsort(ids, kind="stable")]

    def mean(self) -> float | None:
        if not self.count:
            return None
        return float(self.values().mean()) if not self.spilled else math.fsum(self.sums) / self.count


class StreamedRequests:
    """The request statistics `summarize`, `availability` and `prefix_cache_stats` need, from `path`."""

    def __init__(self, path: str | Path, *, ttft_slo_s: float, exact_cap: int = EXACT_CAP) -> None:
        self.path = Path(path)
        self.cap = int(exact_cap)
        self.n = self.completed = self.rejected = self.failed = self.cold_starts = 0
        self.own_rejected = self.slo_ok = self.tokens_done = self.prompt_done = 0
        self.cached_tokens = self.cached_requests = 0
        self.reasons: Counter[str] = Counter()

        def done(b: Batch) -> np.ndarray:
            return b["done"]

        def cold(b: Batch) -> np.ndarray:
            return b["cold_start"] & done(b)

        self.stats: dict[str, _Stat] = {
            "cold": _Stat("cold_start_s", cold, self.cap),
            "ttft": _Stat("ttft_s", done, self.cap),
            "tpot": _Stat("tpot_s", done, self.cap),
            "e2e": _Stat("e2e_s", done, self.cap),
        }
        self.tier_counts: Counter[str] = Counter()
        for tier in TIER_ORDER:
            def in_tier(b: Batch, tier: str = tier) -> np.ndarray:
                return cold(b) & b[f"tier:{tier}"]
            for c in ("cold_start_s", "fetch_s", "to_gpu_s", "engine_init_s"):
                self.stats[f"{tier}:{c}"] = _Stat(c, in_tier, self.cap)
        for batch in self._batches():
            self._count(batch, ttft_slo_s)
            for st in self.stats.values():
                st.add(batch)

    def _batches(self, numeric: tuple[str, ...] = _NUMERIC, *, counts: bool = True) -> Iterator[Batch]:
        """Record batches as numpy arrays; the string columns become masks (and, with `counts`, reason counts)
        through pyarrow, never Python strings. `numeric`: the number columns to read."""
        f = pq.ParquetFile(self.path, pre_buffer=False, buffer_size=1 << 20)  # read as it goes: less memory
        strings = ["outcome", "source_tier", *(["reason"] if counts else [])]
        for rb in f.iter_batches(batch_size=_BATCH_ROWS, columns=[*strings, *numeric], use_threads=False):
            outcome, tier = rb.column("outcome"), rb.column("source_tier")
            b: Batch = {c: rb.column(c).to_numpy(zero_copy_only=False) for c in numeric}
            b["done"] = _mask(pc.equal(outcome, "completed"))
            for t in TIER_ORDER:
                b[f"tier:{t}"] = _mask(pc.equal(tier, t))
            if counts:
                reason = rb.column("reason")
                rejected = pc.equal(outcome, "rejected")
                b["rejected"] = _mask(rejected)
                b["failed"] = _mask(pc.equal(outcome, "failed"))
                b["own_rejected"] = _mask(pc.and_(rejected, pc.is_in(reason, value_set=_OWN)))
                vc = pc.value_counts(pc.filter(reason, pc.invert(pc.equal(outcome, "completed"))))
                b["reasons"] = dict(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist(),
                                        strict=True))  # type: ignore[assignment]
            yield b

    def _count(self, b: Batch, ttft_slo_s: float) -> None:
        done = b["done"]
        self.n += done.size
        self.completed += int(done.sum())
        self.rejected += int(b["rejected"].sum())
        self.failed += int(b["failed"].sum())
        self.reasons.update(b["reasons"])  # type: ignore[arg-type]
        self.own_rejected += int(b["own_rejected"].sum())
        self.cold_starts += int(b["cold_start"].sum())
        cold = b["cold_start"] & done
        for tier in TIER_ORDER:
            self.tier_counts[tier] += int((cold & b[f"tier:{tier}"]).sum())
        self.slo_ok += int((b["ttft_s"][done] <= ttft_slo_s).sum())
        self.tokens_done += int(b["prompt_tokens"][done].sum() + b["output_tokens"][done].sum())
        cached = b["cached_tokens"][done]
        self.cached_tokens += int(cached.sum())
        self.cached_requests += int((cached > 0).sum())
        self.prompt_done += int(b["prompt_tokens"][done].sum())

    # ------------------------------------------------------------------ percentiles
    def quantile(self, name: str, q: float) -> float | None:
        """numpy's linear-method quantile of statistic `name` (exact; see the module docstring)."""
        return self.quantiles(name, (q,))[0]

    def quantiles(self, name: str, qs: tuple[float, ...]) -> list[float | None]:
        """`quantile` for each of `qs`, the order statistics they need found in the same passes over the file."""
        st = self.stats[name]
        if not st.count:
            return [None] * len(qs)
        if not st.spilled:
            v = st.values()
            return [float(np.quantile(v, q)) for q in qs]
        n = st.count
        hs = [(n - 1) * q for q in qs]
        ranks = {n - 1 if h >= n - 1 else r for h in hs for r in (math.floor(h), math.floor(h) + 1) if r < n}
        val = self._order_stats(st, sorted(ranks))
        out: list[float | None] = []
        for h in hs:
            if h >= n - 1:
                out.append(val[n - 1])
                continue
            lo = math.floor(h)
            a, b, t = val[lo], val[lo + 1], h - lo
            diff = b - a  # numpy's _lerp, term by term, so the result is the same float
            out.append(b - diff * (1 - t) if t >= 0.5 else a + diff * t)
        return out

    def _order_stats(self, st: _Stat, ranks: list[int]) -> dict[int, float]:
        """The values of the given 0-based ranks, by radix selection on the sort keys: per pass over the file,
        each rank's bucket narrows by 16 bits, or, once it holds at most `exact_cap` keys, is gathered and
        sorted. Every rank advances in the same passes."""
        out: dict[int, float] = {}
        todo = {r: (st.top, 0, 48, r) for r in ranks}  # rank -> (bucket counts, key prefix, its shift, rank left)
        while todo:
            gather: dict[int, tuple[int, int, int]] = {}
            refine: dict[int, tuple[int, int, int]] = {}
            for r, (counts, prefix, shift, left) in todo.items():
                cum = np.cumsum(counts)
                bucket = int(np.searchsorted(cum, left, side="right"))
                left -= int(cum[bucket - 1]) if bucket else 0
                prefix = (prefix << 16) | bucket
                if shift == 0:
                    out[r] = _from_key(prefix)
                elif counts[bucket] <= self.cap:
                    gather[r] = (prefix, shift, left)
                else:
                    refine[r] = (prefix, shift, left)
            if not gather and not refine:
                break
            parts: dict[tuple[int, int], list[np.ndarray]] = {(p, sh): [] for p, sh, _ in gather.values()}
            new = {r: np.zeros(1 << 16, dtype=np.int64) for r in refine}
            for k in self._keys(st):
                for (p, sh), got in parts.items():
                    got.append(k[(k >> np.uint64(sh)) == np.uint64(p)])
                for r, (p, sh, _) in refine.items():
                    sel = k[(k >> np.uint64(sh)) == np.uint64(p)]
                    new[r] += np.bincount(((sel >> np.uint64(sh - 16)) & np.uint64(0xFFFF)).astype(np.int64),
                                          minlength=1 << 16)
            for r, (p, sh, left) in gather.items():
                out[r] = _from_key(int(np.sort(np.concatenate(parts[(p, sh)]))[left]))
            todo = {r: (new[r], p, sh - 16, left) for r, (p, sh, left) in refine.items()}
        return out

    def _keys(self, st: _Stat) -> Iterator[np.ndarray]:
        for batch in self._batches(("cold_start", st.column), counts=False):
            v = np.asarray(batch[st.column][st.where(batch)], dtype=np.float64)
            yield _sort_keys(v[~np.isnan(v)])

    # ------------------------------------------------------------------ the summary's keys
    def summary_keys(self, cost_usd: float, wall_s: float, ttft_slo_s: float) -> dict[str, Any]:
        """The request-derived keys of `core.metrics.summarize`, with the same values."""
        n, s = self.n, self.stats
        wanted = {"cold": (0.5, 0.9, 0.99), "ttft": (0.5, 0.99), "tpot": (0.5, 0.99), "e2e": (0.5, 0.99),
                  **{f"{t}:cold_start_s": (0.99,) for t in TIER_ORDER if self.tier_counts.get(t)}}
        found = {name: dict(zip(qs, self.quantiles(name, qs), strict=True)) for name, qs in wanted.items()}

        def q(name: str, at: float) -> float | None:
            return found[name][at]

        by_tier: dict[str, dict[str, float | int | None]] = {}
        for tier in TIER_ORDER:
            if self.tier_counts.get(tier):
                by_tier[tier] = {"count": self.tier_counts[tier], "mean_s": s[f"{tier}:cold_start_s"].mean(),
                                 "p99_s": q(f"{tier}:cold_start_s", 0.99),
                                 "fetch_mean_s": s[f"{tier}:fetch_s"].mean(),
                                 "to_gpu_mean_s": s[f"{tier}:to_gpu_s"].mean(),
                                 "engine_init_mean_s": s[f"{tier}:engine_init_s"].mean()}
        reasons = sorted(self.reasons.items(), key=lambda kv: -kv[1])
        return {
            "requests": n, "completed": self.completed, "rejected": self.rejected, "failed": self.failed,
            "reasons": dict(reasons), "cold_starts": self.cold_starts,
            "cold_start_s": {"mean": s["cold"].mean(), "p50": q("cold", 0.5), "p90": q("cold", 0.9),
                             "p99": q("cold", 0.99)},
            "cold_start_by_tier": by_tier,
            "ttft_s": {"p50": q("ttft", 0.5), "p99": q("ttft", 0.99), "mean": s["ttft"].mean()},
            "tpot_s": {"p50": q("tpot", 0.5), "p99": q("tpot", 0.99)},
            "e2e_s": {"p50": q("e2e", 0.5), "p99": q("e2e", 0.99)},
            "slo_attainment": float(self.slo_ok / n) if n else None,
            "ttft_slo_s": ttft_slo_s,
            "cost_per_1k_tokens_usd": cost_usd / self.tokens_done * 1000 if self.completed else None,
            "requests_per_wall_s": n / wall_s if wall_s > 0 else None,
        }

    def availability(self) -> float | None:
        """`core.metrics.availability`'s headline share."""
        eligible = self.n - self.own_rejected
        return self.completed / eligible if eligible else None

    def prefix_cache_stats(self) -> dict[str, Any]:
        """`core.metrics.prefix_cache_stats` over the streamed rows."""
        prompt = self.prompt_done
        return {"prefix_hit_rate": self.cached_tokens / prompt if prompt else None,
                "prefix_hit_requests": float(self.cached_requests / self.completed) if self.completed else None,
                "cached_tokens": self.cached_tokens}


def merged_insert(spans: list[list[float]], a: float, b: float) -> None:
    """Add [a, b] to `spans` (sorted, disjoint, touching ones merged as `core.metrics.union_length_s` does)."""
    import bisect

    i = bisect.bisect_left(spans, [a, -math.inf])
    if i and spans[i - 1][1] >= a:
        i -= 1
    j = i
    lo, hi = a, b
    while j < len(spans) and spans[j][0] <= hi:
        lo, hi = min(lo, spans[j][0]), max(hi, spans[j][1])
        j += 1
    spans[i:j] = [[lo, hi]]
