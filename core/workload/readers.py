"""Readers for real traces (Azure LLM 2023, Mooncake FAST'25, Alibaba ServeGen), each returning a `Workload`.

Malformed input raises `TraceFormatError` naming the file and the 1-based line. Rows that are merely out of
time order are sorted, not rejected.
"""

from __future__ import annotations

import calendar
import datetime as dt
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from core.errors import ConfigError, TraceFormatError
from core.workload.lengths import LognormalLengths, TokenSampler
from core.workload.models import zipf_weights
from core.workload.rng import streams
from core.workload.trace import Workload

PathLike = str | Path


def _existing(path: PathLike, *, allow_dir: bool = False) -> Path:
    """The path as a `Path`, or a clear `FileNotFoundError` (instead of a parser's own message)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"trace file not found: {p}")
    if p.is_dir() and not allow_dir:
        raise IsADirectoryError(f"trace path is a directory, expected a file: {p}")
    return p


def _tokens_workload(
    path: Path,
    arrival_s: np.ndarray,
    prompt: np.ndarray,
    output: np.ndarray,
    lines: np.ndarray,
    *,
    name: str,
    prompt_field: str,
    output_field: str,
    prefix_blocks: list[tuple[int, ...]] | None = None,
) -> Workload:
    """Shared tail of the request-level readers: positivity checks with line numbers, then sort and build."""
    for values, field in ((prompt, prompt_field), (output, output_field)):
        bad = np.flatnonzero(values < 1)
        if bad.size:
            i = bad[0]
            raise TraceFormatError(str(path), int(lines[i]), f"{field} must be a positive integer, got {values[i]}")
    return Workload.from_columns(arrival_s, prompt, output, name=name, prefix_blocks=prefix_blocks)


def _ns_to_relative_s(ns: np.ndarray) -> np.ndarray:
    """Integer nanoseconds -> float seconds since the earliest one (exact differences before the float cast)."""
    return (ns - ns.min()).astype(np.float64) / 1e9 if ns.size else ns.astype(np.float64)


# ----------------------------------------------------------------------------------------------- Azure LLM 2023
AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
_AZURE_TS_FORMAT = "%Y-%m-%d %H:%M:%S.%f"
_AZURE_TS = re.compile(r"(\d{4})-(\d{2})-(\d{2}) (\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?")


class _FastPathFailed(Exception):
    """The vectorised parser could not handle the file; rescan row by row to find the line."""


def _azure_fast(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """pandas C parser: (timestamp ns, context, generated). Any irregularity raises `_FastPathFailed`."""
    try:
        df = pd.read_csv(
            path,
            header=None,
            skiprows=1,
            names=list(AZURE_COLUMNS),
            dtype={"TIMESTAMP": str, "ContextTokens": np.int64, "GeneratedTokens": np.int64},
            # Keep blank lines as (failing) rows so that row i is always line i + 2.
            skip_blank_lines=False,
            engine="c",
        )
        ts = pd.to_datetime(df["TIMESTAMP"], format=_AZURE_TS_FORMAT)
        if ts.isna().any():
            raise _FastPathFailed
        ns = ts.to_numpy(dtype="datetime64[ns]").astype(np.int64)
    except (ValueError, OverflowError, TypeError, pd.errors.ParserError) as exc:
        raise _FastPathFailed from exc
    return ns, df["ContextTokens"].to_numpy(), df["GeneratedTokens"].to_numpy()


def _azure_timestamp_ns(text: str) -> int:
    """Parse ``YYYY-MM-DD HH:MM:SS[.fffffffff]`` to nanoseconds since the epoch (naive, as in the trace)."""
    m = _AZURE_TS.fullmatch(text)
    if m is None:
        raise ValueError(f"unparseable TIMESTAMP {text!r} (expected YYYY-MM-DD HH:MM:SS.fffffff)")
    y, mo, d, h, mi, s, frac = m.groups()
    stamp = dt.datetime(int(y), int(mo), int(d), int(h), int(mi), int(s))  # rejects impossible dates
    return calendar.timegm(stamp.timetuple()) * 10**9 + int((frac or "0").ljust(9, "0"))


def _int_field(text: str, field: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{field} is not an integer: {text!r}") from None


def _azure_scan(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Row-by-row parse, slow but exact about which line is bad; blank lines are skipped."""
    ns, ctx, gen, lines = [], [], [], []
    with path.open("rb") as f:
        next(f, None)  # header, checked by the caller
        for lineno, raw in enumerate(f, start=2):
            try:
                text = raw.decode("utf-8").strip()
                if not text:
                    continue
                fields = text.split(",")
                if len(fields) != len(AZURE_COLUMNS):
                    raise ValueError(f"expected {len(AZURE_COLUMNS)} columns {AZURE_COLUMNS}, got {len(fields)}")
                ns.append(_azure_timestamp_ns(fields[0].strip()))
                ctx.append(_int_field(fields[1], AZURE_COLUMNS[1]))
                gen.append(_int_field(fields[2], AZURE_COLUMNS[2]))
                lines.append(lineno)
            except (ValueError, UnicodeDecodeError) as exc:
                raise TraceFormatError(str(path), lineno, str(exc)) from None
    ns_a, ctx_a, gen_a, lines_a = (np.asarray(v, dtype=np.int64) for v in (ns, ctx, gen, lines))
    return ns_a, ctx_a, gen_a, lines_a


def read_azure_llm(path: PathLike, *, name: str | None = None) -> Workload:
    """Azure LLM inference trace 2023 CSV (``TIMESTAMP,ContextTokens,GeneratedTokens``).

    ``arrival_s`` is seconds since the earliest timestamp; models are unassigned, tenant is ``"default"``.
    The default name is ``azure_<suffix>`` from the file name (``AzureLLMInferenceTrace_code`` -> ``azure_code``).
    """
    p = _existing(path)
    with p.open("rb") as f:
        header = f.readline().decode("utf-8", errors="replace").strip()
    if tuple(h.strip() for h in header.split(",")) != AZURE_COLUMNS:
        raise TraceFormatError(str(p), 1, f"expected header {','.join(AZURE_COLUMNS)!r}, got {header!r}")
    try:
        ns, ctx, gen = _azure_fast(p)
        lines = np.arange(2, ns.size + 2)
    except _FastPathFailed:
        ns, ctx, gen, lines = _azure_scan(p)
    stem = p.stem.split("_", 1)[1] if "_" in p.stem else p.stem
    return _tokens_workload(
        p,
        _ns_to_relative_s(ns),
        ctx,
        gen,
        lines,
        name=name or f"azure_{stem.lower()}",
        prompt_field=AZURE_COLUMNS[1],
        output_field=AZURE_COLUMNS[2],
    )


# ------------------------------------------------------------------------------------------- Mooncake FAST'25
def _json_number(rec: dict, key: str, *, integral: bool) -> float:
    if key not in rec:
        raise ValueError(f"missing field {key!r}")
    v = rec[key]
    # bool is an int subclass in Python but never a valid count or time.
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ValueError(f"field {key!r} is not a finite number: {v!r}")
    if integral and not float(v).is_integer():
        raise ValueError(f"field {key!r} is not an integer: {v!r}")
    return v


def _hash_ids(rec: dict) -> tuple[int, ...] | None:
    """A record's ``hash_ids`` as a tuple of non-negative ints; None when the field is absent."""
    if "hash_ids" not in rec:
        return None
    v = rec["hash_ids"]
    if not isinstance(v, list):
        raise ValueError(f"field 'hash_ids' must be a list of integers, got {type(v).__name__}")
    for i, h in enumerate(v):
        if isinstance(h, bool) or not isinstance(h, int) or h < 0:
            raise ValueError(f"field 'hash_ids' item {i} must be a non-negative integer, got {h!r}")
    return tuple(v)


def read_mooncake(path: PathLike, *, name: str | None = None) -> Workload:
    """Mooncake JSON-lines trace: ``timestamp`` (ms, relative), ``input_length``, ``output_length``, and
    optionally ``hash_ids``.

    ``arrival_s = timestamp / 1000`` (kept relative to the trace's own origin, not re-based). ``hash_ids``
    (prefix-cache block ids, `core.prefix_cache.MOONCAKE_BLOCK_TOKENS` tokens each) become the workload's
    ``prefix_blocks`` when every record has them (a record without them then has an empty tuple, no prefix
    to share); a trace without any keeps ``prefix_blocks=None``. Models are unassigned.
    """
    p = _existing(path)
    ts, inp, out, lines = [], [], [], []
    blocks: list[tuple[int, ...] | None] = []
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8").strip()
                if not text:
                    continue
                rec = json.loads(text)
                if not isinstance(rec, dict):
                    raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
                t = _json_number(rec, "timestamp", integral=False)
                if t < 0:
                    raise ValueError(f"field 'timestamp' must be >= 0, got {t}")
                ts.append(t)
                inp.append(int(_json_number(rec, "input_length", integral=True)))
                out.append(int(_json_number(rec, "output_length", integral=True)))
                blocks.append(_hash_ids(rec))
                lines.append(lineno)
            except json.JSONDecodeError as exc:
                raise TraceFormatError(str(p), lineno, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
            except (ValueError, UnicodeDecodeError) as exc:
                raise TraceFormatError(str(p), lineno, str(exc)) from None
    stem = p.stem.removesuffix("_trace")
    has_blocks = any(b is not None for b in blocks)
    return _tokens_workload(
        p,
        np.asarray(ts, dtype=np.float64) / 1e3,
        np.asarray(inp, dtype=np.int64),
        np.asarray(out, dtype=np.int64),
        np.asarray(lines, dtype=np.int64),
        name=name or f"mooncake_{stem}",
        prompt_field="input_length",
        output_field="output_length",
        prefix_blocks=[b if b is not None else () for b in blocks] if has_blocks else None,
    )


# ---------------------------------------------------------------------------------------- Alibaba ServeGen
SERVEGEN_WINDOW_S = 600.0  # ServeGen's aggregation window
SERVEGEN_PATTERNS = {"": 0, "Gamma": 1, "Weibull": 2}  # "" = no traffic in the window
_SERVEGEN_FILE = re.compile(r"chunk-(\d+)-trace\.csv")


@dataclass(frozen=True)
class _Windows:
    """All (client, window) rows of a ServeGen group as flat arrays."""

    client: np.ndarray  # index into the client list
    start: np.ndarray
    size: np.ndarray
    rate: np.ndarray
    pattern: np.ndarray
    shape: np.ndarray
    scale: np.ndarray


def _servegen_files(path: Path) -> tuple[str, list[tuple[int, Path]]]:
    """(group name, [(client id, file)] sorted by client id) for a directory or a single file."""
    candidates = sorted(path.glob("chunk-*-trace.csv")) if path.is_dir() else [path]
    files = []
    for f in candidates:
        m = _SERVEGEN_FILE.fullmatch(f.name)
        if m is None:
            raise ConfigError(f"path: ServeGen trace files must be named chunk-<client_id>-trace.csv, got {f}")
        files.append((int(m.group(1)), f))
    if not files:
        raise ConfigError(f"path: no chunk-<client_id>-trace.csv files in {path}")
    return servegen_group(path.name if path.is_dir() else path.parent.name), sorted(files)


def servegen_group(dirname: str) -> str:
    """Group name for model ids from a directory name, in ServeGen's hyphenated spelling.

    ``deepseek-r1`` stays as is; the embedded copy ``servegen_deepseek_r1`` maps to ``deepseek-r1`` too, so
    both copies of a trace yield the same model ids.
    """
    return dirname.removeprefix("servegen_").replace("_", "-")


def _servegen_float(text: str, field: str, *, positive: bool = False) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"{field} is not a number: {text!r}") from None
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise ValueError(f"{field} must be finite and {'>' if positive else '>='} 0, got {text!r}")
    return v


def _parse_servegen_file(path: Path, window_s: float) -> np.ndarray:
    """Rows as a float array (start, size, rate, pattern code, shape, scale); one line per window."""
    rows, lines = [], []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8").strip()
                if not text:
                    continue
                fields = [s.strip() for s in text.split(",")]
                if len(fields) != 6:
                    raise ValueError(f"expected 6 columns (timestamp,rate,cv,pattern,shape,scale), got {len(fields)}")
                start = _servegen_float(fields[0], "timestamp")
                rate = _servegen_float(fields[1], "rate")
                _servegen_float(fields[2], "cv")  # not needed for generation (shape fixes it) but must be valid
                if fields[3] not in SERVEGEN_PATTERNS:
                    raise ValueError(f"pattern must be one of {sorted(SERVEGEN_PATTERNS)}, got {fields[3]!r}")
                pattern = SERVEGEN_PATTERNS[fields[3]]
                active = pattern != 0 and rate > 0
                shape = _servegen_float(fields[4], "shape", positive=active)
                scale = _servegen_float(fields[5], "scale", positive=active)
                if rows and start <= rows[-1][0]:
                    raise ValueError(f"timestamp {start:g} is not after the previous window's {rows[-1][0]:g}")
                rows.append((start, window_s, rate, pattern, shape, scale))
                lines.append(lineno)
            except (ValueError, UnicodeDecodeError) as exc:
                raise TraceFormatError(str(path), lineno, str(exc)) from None
    table = np.asarray(rows, dtype=np.float64).reshape(-1, 6)
    # A window ends at the next row's start if that comes sooner, so windows never overlap.
    table[:-1, 1] = np.minimum(window_s, np.diff(table[:, 0]))
    return table


def _load_servegen(files: list[tuple[int, Path]], window_s: float) -> _Windows:
    tables = [_parse_servegen_file(f, window_s) for _, f in files]
    client = np.repeat(np.arange(len(tables)), [len(t) for t in tables])
    t = np.concatenate(tables) if tables else np.empty((0, 6))
    return _Windows(client, t[:, 0], t[:, 1], t[:, 2], t[:, 3].astype(np.int64), t[:, 4], t[:, 5])


def _servegen_arrivals(w: _Windows, rng: np.random.Generator, rate_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised over all windows: (arrival times, client index per arrival), unsorted.

    Like ServeGen's generator, IATs come from the window's fitted distribution and are rescaled so the
    window holds its target count. Deviation, to make the mean count exact instead of biased low by ~0.5 per
    window: the count is ``rate*size`` rounded stochastically, and ``count + 1`` IATs are rescaled to sum to
    the window size, so every arrival falls strictly inside it (ServeGen draws ``ceil`` IATs and drops the
    one that lands on the window end).
    """
    expected = w.rate * rate_scale * w.size * (w.pattern != 0)
    count = np.floor(expected).astype(np.int64)
    count += rng.random(count.size) < expected - count
    live = count > 0
    count, start, size = count[live], w.start[live], w.size[live]
    pattern, shape, scale, client = w.pattern[live], w.shape[live], w.scale[live], w.client[live]

    m = count + 1  # IATs per window
    seg = np.repeat(np.arange(m.size), m)
    iat = np.empty(seg.size)
    for code, draw in (
        (SERVEGEN_PATTERNS["Gamma"], lambda k, th, n: rng.gamma(k, th, size=n)),
        (SERVEGEN_PATTERNS["Weibull"], lambda k, th, n: th * rng.weibull(k, size=n)),
    ):
        sel = pattern[seg] == code
        iat[sel] = draw(shape[seg[sel]], scale[seg[sel]], int(sel.sum()))
    first = np.cumsum(m) - m
    total = np.add.reduceat(iat, first) if m.size else np.empty(0)
    # Fits with extreme shapes can underflow every IAT to 0 (or overflow one to inf); space such a window evenly.
    degenerate = ~((total > 0) & np.isfinite(total))
    if degenerate.any():
        iat[degenerate[seg]] = 1.0
        total[degenerate] = m[degenerate]
    # Work in fractions of the window: the global cumsum then stays small (<= number of windows), keeping the
    # per-window positions accurate to ~1e-12 of a window.
    frac = iat / total[seg]
    csum = np.cumsum(frac)
    offset = np.repeat(csum[first] - frac[first], m)  # cumulative sum before each window's first IAT
    keep = np.arange(seg.size) - first[seg] < count[seg]  # drop each window's closing IAT
    seg = seg[keep]
    arrival = start[seg] + (csum - offset)[keep] * size[seg]
    # Heavy-tailed fits put bursts of near-zero IATs at a window's end; rounding must not push them out of it.
    end = start[seg] + size[seg]
    arrival = np.clip(arrival, start[seg], np.nextafter(end, -np.inf))
    return arrival, client[seg]


def read_servegen(
    path: PathLike,
    seed: int,
    *,
    start_s: float = 0.0,
    end_s: float | None = None,
    rate_scale: float = 1.0,
    prompt_median: float = 1000.0,
    prompt_sigma: float = 1.0,
    output_median: float = 300.0,
    output_sigma: float = 1.0,
    max_tokens: int = 32768,
    lengths: TokenSampler | None = None,
    window_s: float = SERVEGEN_WINDOW_S,
    max_requests: int = 20_000_000,
    group: str | None = None,
    name: str | None = None,
    variants_per_client: int = 1,
    variant_zipf_s: float = 1.0,
) -> Workload:
    """Generate requests from ServeGen per-client window statistics (a directory of ``chunk-*-trace.csv`` or one).

    Each client is its own deployment: ``model = "<group>/client-<id>"`` (group defaults to the directory name,
    see `servegen_group`) and ``tenant = "client-<id>"``. Windows are clipped to ``[start_s, end_s)`` and
    arrivals re-based to ``start_s``; ``rate_scale`` multiplies every window's rate. ``max_requests`` guards
    memory: e.g. the 14-day language/m-small group holds ~1.4e9 requests, so a whole-trace read is refused.

    Token lengths: ServeGen's per-window length PDFs (``chunk-*-dataset.json``) are not shipped with the
    traces, so lengths come from a seeded lognormal (median/sigma per direction, clipped to
    ``[1, max_tokens]``) unless ``lengths`` supplies another sampler. Arrivals and lengths use separate
    streams of ``seed``, so changing the length model keeps the arrivals identical.

    ``variants_per_client`` > 1 spreads each client's requests over that many fine-tunes of its deployment
    (``model = "<group>/client-<id>/ft-<k>"``), drawn per request from a seeded Zipf(``variant_zipf_s``) law
    within the client (``ft-0`` the most used), on a third stream of ``seed``: the arrivals and lengths stay
    those of ``variants_per_client=1``. Every variant is declared in the workload's ``catalog``, requested or
    not, so that the deployments do not depend on the window or the rate.
    """
    p = _existing(path, allow_dir=True)
    if isinstance(variants_per_client, bool) or not isinstance(variants_per_client, int) or variants_per_client < 1:
        raise ConfigError(f"variants_per_client: must be an integer >= 1, got {variants_per_client!r}")
    if not (math.isfinite(rate_scale) and rate_scale > 0):
        raise ConfigError(f"rate_scale: must be finite and > 0, got {rate_scale}")
    if not window_s > 0:
        raise ConfigError(f"window_s: must be > 0, got {window_s}")
    dir_group, files = _servegen_files(p)
    group = group or dir_group
    w = _load_servegen(files, window_s)
    end = float((w.start + w.size).max(initial=start_s)) if end_s is None else end_s
    if not 0 <= start_s <= end:
        raise ConfigError(f"start_s/end_s: need 0 <= start_s <= end_s, got start_s={start_s}, end_s={end_s}")
    lo, hi = np.maximum(w.start, start_s), np.minimum(w.start + w.size, end)
    w = _Windows(w.client, lo, np.maximum(hi - lo, 0.0), w.rate, w.pattern, w.shape, w.scale)
    expected = float(np.sum(w.rate * rate_scale * w.size * (w.pattern != 0)))
    if expected > max_requests:
        raise ConfigError(
            f"max_requests: {p} would generate ~{expected:.3g} requests over [{start_s}, {end}) s, more than "
            f"max_requests={max_requests}; narrow start_s/end_s, lower rate_scale, or raise max_requests"
        )

    arrival_rng, length_rng = streams(seed, 2)
    arrival, client = _servegen_arrivals(w, arrival_rng, rate_scale)
    order = np.argsort(arrival, kind="stable")
    arrival, client = arrival[order] - start_s, client[order]
    ids = [cid for cid, _ in files]
    models = np.asarray([f"{group}/client-{cid}" for cid in ids], dtype=object)
    tenants = np.asarray([f"client-{cid}" for cid in ids], dtype=object)
    sampler = lengths or LognormalLengths(prompt_median, prompt_sigma, output_median, output_sigma, max_tokens)
    prompt, output = sampler.sample(arrival.size, length_rng)
    model = models[client]
    catalog: tuple[str, ...] = ()
    if variants_per_client > 1:
        model, catalog = _spread_variants(models, client, variants_per_client, variant_zipf_s, seed)
    return Workload(
        arrival_s=arrival,
        model=model,
        tenant=tenants[client],
        prompt_tokens=prompt,
        output_tokens=output,
        name=name or f"servegen_{group}",
        duration_s=end - start_s,
        catalog=catalog,
    )


def _spread_variants(models: np.ndarray, client: np.ndarray, k: int, zipf_s: float,
                     seed: int) -> tuple[np.ndarray, tuple[str, ...]]:
    """Each request of client c goes to ``<c's model>/ft-<j>``, j ~ Zipf(zipf_s) over k ranks; and every
    such id. A third stream of ``seed`` (SeedSequence children are fixed by index, so the first two, arrivals
    and lengths, are the ones `read_servegen` draws without variants)."""
    if not (math.isfinite(zipf_s) and zipf_s >= 0):
        raise ConfigError(f"variant_zipf_s: must be finite and >= 0, got {zipf_s}")
    rng = streams(seed, 3)[2]
    rank = rng.choice(k, size=client.size, p=zipf_weights(k, zipf_s))
    names = np.asarray([f"{m}/ft-{j}" for m in models for j in range(k)], dtype=object)
    catalog = tuple(names.tolist())
    return names[client * k + rank], catalog


# ------------------------------------------------------------------------------------------------ registry
def _read_servegen_horizon(path: PathLike, **kwargs: object) -> Workload:
    """`core.workload.horizon.read_servegen_horizon` (imported here: that module builds on this one)."""
    from core.workload.horizon import read_servegen_horizon

    if "seed" not in kwargs:
        raise ConfigError("workload.options.seed: kind servegen_horizon needs a seed (experiments.simulate passes "
                          "the run's)")
    return read_servegen_horizon(path, **kwargs)  # type: ignore[arg-type]


READERS: dict[str, Callable[..., Workload]] = {
    "azure_llm": read_azure_llm,
    "mooncake": read_mooncake,
    "servegen": read_servegen,
    "servegen_horizon": _read_servegen_horizon,  # chunked multi-day ServeGen (core/workload/horizon.py)
}


def read_trace(kind: str, path: PathLike, **kwargs: object) -> Workload:
    """Dispatch to ``READERS[kind]`` (extra keyword arguments go to the reader, e.g. ``seed`` for servegen)."""
    try:
        reader = READERS[kind]
    except KeyError:
        raise ConfigError(f"trace kind: unknown {kind!r}; known kinds: {sorted(READERS)}") from None
    return reader(path, **kwargs)
