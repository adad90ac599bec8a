"""Streaming a run's request records to parquet (`records.stream_dir`), for horizons too long to keep in memory.

`StreamingWorld` is the simulator's `World` fed from an iterator of workload chunks: every `chunk_rows` arrivals
it hands the requests resolved so far to a `RecordSink`, which writes them as a row group of records.parquet,
and keeps only the unresolved ones. Memory then follows the requests in flight (and the workload slice being
replayed), not the requests simulated. Each written request's busy span on its instance is folded into a
per-instance union, the one thing the memory-waste accounting (`sim.memory`) needs from the dropped requests.

Rows have the in-memory table's columns and dtypes, in the order they were written: batch by batch (each in
request-id order), so a request that ran long comes after later ones; sort by `request_id` for the in-memory
table's order. `cost_usd`, a share of its instance's whole-life GPU cost, is known only at the end, so
`RecordSink.finish` rewrites the file once, row group by row group, filling it (the same arithmetic as
`core.cost.request_cost_shares`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core.cost import HOUR_S
from core.records import REQUEST_SCHEMA, frame
from core.specs import ClusterSpec
from core.workload.trace import Workload
from sim.memory import _clipped_union
from sim.request import Request
from sim.stream_summary import merged_insert
from sim.world import World

RECORDS_FILE = "records.parquet"
#: busy spans kept before those of finished instances are folded into one each (`RecordSink.compact`)
COMPACT_SPANS = 20_000
#: workload rows turned into Python lists at a time
SLICE_ROWS = 50_000


class RecordSink:
    """Writes request rows to `<out_dir>/records.parquet` in row groups, keeping per-instance token totals
    (for the cost shares) and busy spans (for `sim.memory`)."""

    def __init__(self, out_dir: str | Path, chunk_rows: int = 50_000) -> None:
        if int(chunk_rows) < 1:
            raise ValueError(f"records.chunk_rows: must be >= 1, got {chunk_rows}")
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / RECORDS_FILE
        self.chunk_rows = int(chunk_rows)
        self._tmp = self.path.with_suffix(".parquet.part")
        self._writer: pq.ParquetWriter | None = None
        self._schema: pa.Schema | None = None
        self.rows = 0
        self.tokens_by_instance: dict[str, float] = defaultdict(float)
        self.busy: dict[str, list[list[float]]] = defaultdict(list)
        self.n_spans = 0

    def write(self, reqs: list[Request], columns: Mapping[str, Any]) -> None:
        """Append one batch of finished requests (their `sim.run.request_columns`)."""
        if not reqs:
            return
        tokens, busy = self.tokens_by_instance, self.busy
        spans = sorted((r.instance.state.id, r.placed_s, r.finish_s) for r in reqs if r.instance is not None)
        for r in reqs:
            if r.instance is not None and r.outcome == "completed":
                tokens[r.instance.state.id] += r.prompt_tokens + r.output_tokens
        for iid, a, b in spans:  # by instance, then start: mostly extends or follows the instance's last span
            if not (a == a and b == b and b > a):
                continue
            own = busy[iid]
            if own and own[-1][0] <= a <= own[-1][1]:
                own[-1][1] = max(own[-1][1], b)
            elif own and a > own[-1][1]:
                own.append([a, b])
                self.n_spans += 1
            else:  # starts before the last span: a general insert
                before = len(own)
                merged_insert(own, a, b)
                self.n_spans += len(own) - before
        table = self._table(frame(REQUEST_SCHEMA, columns))
        if self._writer is None:
            self._writer = pq.ParquetWriter(self._tmp, table.schema)
        self._writer.write_table(table, row_group_size=self.chunk_rows)
        self.rows += table.num_rows

    def compact(self, iid: str, lo_s: float, hi_s: float) -> None:
        """Instance `iid` is gone and every request it served is written: replace its busy spans by one,
        [lo_s, lo_s + X], X their union within [lo_s, hi_s] (all `sim.memory` takes of them), when the spans
        kept number over `COMPACT_SPANS`. Memory-waste parts then agree with the in-memory run to rounding
        (~1e-16 relative per instance) instead of exactly; below the threshold nothing changes."""
        spans = self.busy.get(iid)
        if self.n_spans <= COMPACT_SPANS or spans is None or len(spans) < 2:
            return
        kept = _clipped_union(spans, lo_s, hi_s)
        self.busy[iid] = [[lo_s, lo_s + kept]]
        self.n_spans -= len(spans) - 1

    def _table(self, df: pd.DataFrame) -> pa.Table:
        if self._schema is None:
            table = pa.Table.from_pandas(df, preserve_index=False)
            self._schema = table.schema
            return table
        return pa.Table.from_pandas(df, schema=self._schema, preserve_index=False)

    def finish(self, lifetimes: pd.DataFrame, cluster: ClusterSpec, scale: float) -> Path:
        """Close the file, filling every row's `cost_usd` (`core.cost.request_cost_shares`), and move it into
        place; an empty run still gets an (empty) table."""
        if self._writer is None:
            empty = self._table(frame(REQUEST_SCHEMA, {c: [] for c in REQUEST_SCHEMA}))
            self._writer = pq.ParquetWriter(self._tmp, empty.schema)
        self._writer.close()
        price = {n.name: n.usd_per_gpu_hour for n in cluster.nodes}
        inst_usd = {} if lifetimes.empty else dict(zip(
            lifetimes["instance"], lifetimes["gpus"] * (lifetimes["stop_s"] - lifetimes["start_s"]) / HOUR_S
            * lifetimes["node"].map(price).astype(float), strict=True))
        tmp = self.path.with_suffix(".parquet.tmp")
        src = pq.ParquetFile(self._tmp)
        with pq.ParquetWriter(tmp, src.schema_arrow) as out:
            for k in range(src.num_row_groups):
                out.write_table(self._with_costs(src.read_row_group(k, use_threads=False), inst_usd, scale),
                                row_group_size=self.chunk_rows)
        tmp.replace(self.path)
        self._tmp.unlink()
        return self.path

    def _with_costs(self, table: pa.Table, inst_usd: Mapping[str, float], scale: float) -> pa.Table:
        """`request_cost_shares`'s arithmetic, per row: usd(instance) * tokens / instance total * scale."""
        enc = pc.dictionary_encode(table.column("instance")).combine_chunks()
        names = enc.dictionary.to_pylist()
        idx = enc.indices.to_numpy(zero_copy_only=False)
        served = pc.equal(table.column("outcome"), "completed").to_numpy(zero_copy_only=False)
        tokens = np.where(served, table.column("prompt_tokens").to_numpy() + table.column("output_tokens").to_numpy(),
                          0).astype(float)
        totals = np.array([self.tokens_by_instance.get(n, 0.0) for n in names], dtype=float)[idx]
        usd = np.array([inst_usd.get(n, 0.0) for n in names], dtype=float)[idx]
        share = np.where(totals > 0, tokens / np.where(totals > 0, totals, 1.0), 0.0)
        cost = usd * share * scale if inst_usd else np.zeros(len(table))
        i = table.schema.get_field_index("cost_usd")
        return table.set_column(i, table.schema.field(i), pa.array(cost, type=table.schema.field(i).type))


class _Busy:
    """What `sim.memory`'s busy-interval scan reads from a request: its instance's id and a [placed, finish]."""

    __slots__ = ("finish_s", "instance", "placed_s")

    class _Inst:
        __slots__ = ("id", "state")

        def __init__(self, iid: str) -> None:
            self.id = iid
            self.state = self

    def __init__(self, iid: str, a: float, b: float) -> None:
        self.instance = _Busy._Inst(iid)
        self.placed_s, self.finish_s = a, b


def busy_stand_ins(sink: RecordSink) -> list[_Busy]:
    """One stand-in request per merged busy span: the memory ledger's union of them is the union of the
    dropped requests' spans (the spans were merged as `union_length_s` merges them)."""
    return [_Busy(iid, a, b) for iid, spans in sink.busy.items() for a, b in spans]


def _slices(chunks: Iterator[Workload], rows: int = SLICE_ROWS) -> Iterator[tuple[Workload, int, int]]:
    """(chunk, lo, hi) row ranges of at most `rows`: a chunk becomes Python objects a slice at a time."""
    for wl in chunks:
        for lo in range(0, len(wl), rows):
            yield wl, lo, min(len(wl), lo + rows)


class StreamingWorld(World):
    """A `World` whose arrivals come chunk by chunk and whose finished requests go to a `RecordSink`.

    Warm-up, regions and the response cache need every request at the end (or per-request arrays over the
    whole horizon): `sim.run.simulate_streamed` refuses them."""

    sink: RecordSink
    columns: Any  # sim.run.request_columns (passed in: sim.run imports this module)

    def run_chunks(self, chunks: Iterable[Workload], sink: RecordSink, columns: Any,
                   progress_every: int = 20_000) -> None:
        """Replay every chunk's arrivals (arrival times continuing across chunks), then drain, as `World.run`."""
        self.sink, self.columns = sink, columns
        self._closed_seen = 0
        self.requests = []
        stop = self.env.event()
        self.finished.callbacks.append(lambda _e: stop.triggered or stop.succeed())
        self.env.process(self._stream(iter(chunks), progress_every, stop))
        if self.policy.tick_s:
            self.env.process(self._ticks(self.policy.tick_s))
        self.faults.start()
        self.env.run(until=stop)
        self.end_s = self.env.now
        self._finalize()
        self.flush(everything=True)

    def _stream(self, chunks: Iterator[Workload], progress_every: int, stop: Any):
        env, timeout = self.env, self.request_timeout_s
        requests, arrive, on_progress = self.requests, self._arrive, self.on_progress
        i, last, flush_at = 0, 0.0, self.sink.chunk_rows
        for wl, lo, hi in _slices(chunks):
            blocks = None if wl.prefix_blocks is None else list(wl.prefix_blocks[lo:hi])
            # World._arrivals fed slice by slice, flushing resolved requests every chunk_rows arrivals
            for k, (t, model, tenant, p, o) in enumerate(zip(
                    wl.arrival_s[lo:hi].tolist(), wl.model[lo:hi].tolist(), wl.tenant[lo:hi].tolist(),
                    wl.prompt_tokens[lo:hi].tolist(), wl.output_tokens[lo:hi].tolist(), strict=True)):
                if t > env.now and (wait := self._clock_to(t)) is not None:
                    yield wait
                req = Request(i, model, tenant, p, o, t, t + timeout)
                if blocks is not None:
                    req.prefix_blocks = blocks[k]
                requests.append(req)
                last = t
                i += 1
                if i >= flush_at:
                    self.flush()
                    flush_at = i + self.sink.chunk_rows
                arrive(req)
                if on_progress is not None and (i - 1) % progress_every == 0:
                    on_progress(env.now, i - 1)
        self.arrivals_done = True
        # World.run's deadline: the last arrival plus the drain timeout
        env.timeout(max(0.0, last + self.drain_timeout_s - env.now)).callbacks.append(
            lambda _e: stop.triggered or stop.succeed())
        self._check_finished()

    def flush(self, *, everything: bool = False) -> None:
        """Hand every resolved request (all of them at the end) to the sink, keeping the unresolved ones in
        arrival order: what stays is what is in flight, however long the oldest of them takes."""
        reqs = self.requests
        done = reqs if everything else [r for r in reqs if r.outcome]
        if not done:
            return
        self.sink.write(done, self.columns(self, done))
        reqs[:] = [] if everything else [r for r in reqs if not r.outcome]
        self._open_from = 0  # World's scan for a lost engine's requests starts at the oldest kept one again
        # instances removed before the oldest request still held arrived served only written requests
        oldest_s = reqs[0].arrival_s if reqs else math.inf
        closed = self.memory.closed  # (id, start, ready, end, ...) in the order they were removed
        while self._closed_seen < len(closed) and closed[self._closed_seen][3] <= oldest_s:
            iid, t0, ready, t1 = closed[self._closed_seen][:4]
            r = t1 if math.isnan(ready) else min(max(ready, t0), t1)  # sim.memory.MemoryLedger.parts' clip
            self.sink.compact(iid, max(r, t0), t1)
            self._closed_seen += 1
