"""The probes of `experiments.calibrate`: each drives a real node agent (its HTTP API, `live.agent`) or a real
CPU engine it started, and returns raw samples; `experiments.calibrate_report` turns them into specs.

Every probe is bounded (HTTP timeouts, a fixed number of repeats) and leaves the tiers as it found them
(each copy it makes is evicted again).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx

from core.errors import ConfigError

HTTP_TIMEOUT_S = 300.0  # one paced copy or engine start; bounded so a stuck agent cannot hang the probe


@dataclass(frozen=True)
class Stat:
    """Mean, sample standard deviation and count of one measured quantity, with its raw samples."""

    mean: float
    sd: float
    n: int
    samples: tuple[float, ...] = ()

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stat:
        xs = [float(x) for x in samples if x is not None and math.isfinite(float(x))]
        if not xs:
            return cls(math.nan, math.nan, 0, ())
        sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
        return cls(statistics.fmean(xs), sd, len(xs), tuple(xs))

    def to_json(self) -> dict[str, Any]:
        return {"mean": self.mean, "sd": self.sd, "n": self.n, "samples": list(self.samples)}


class ProbeError(RuntimeError):
    """A probe could not measure what it was asked to (the message names the tier / model and the cause)."""


@dataclass
class AgentClient:
    """The calls the probes make to one node agent (bearer token, JSON in and out)."""

    url: str
    token: str
    tier_paths: dict[str, str] = field(default_factory=dict)  # for error messages: tier -> its directory

    def _post(self, path: str, body: dict[str, Any], what: str) -> dict[str, Any]:
        r = httpx.post(self.url + path, json=body, headers={"Authorization": f"Bearer {self.token}"},
                       timeout=HTTP_TIMEOUT_S)
        if r.status_code != 200:
            try:
                err = r.json()["error"]
                message, code = err["message"], err["code"]
            except (ValueError, KeyError, TypeError):
                message, code = r.text[:300], "?"
            tier = body.get("to_tier") or body.get("tier") or body.get("source_tier")
            where = f" (tier {tier!r} at {self.tier_paths[tier]})" if tier in self.tier_paths else ""
            if r.status_code == 507:
                raise ProbeError(f"{what}: tier full{where}: {message}")
            raise ProbeError(f"{what} failed{where}: HTTP {r.status_code} {code}: {message}")
        return dict(r.json())

    def status(self) -> dict[str, Any]:
        r = httpx.get(self.url + "/status", headers={"Authorization": f"Bearer {self.token}"}, timeout=30)
        r.raise_for_status()
        return dict(r.json())

    def copy(self, model: str, to_tier: str) -> dict[str, Any]:
        """A movement record {from_tier, to_tier, kind, bytes, duration_s, ...}."""
        return self._post("/tiers/copy", {"model": model, "to_tier": to_tier}, f"copy of {model} into {to_tier}")

    def evict(self, model: str, tier: str) -> None:
        self._post("/tiers/evict", {"model": model, "tier": tier}, f"evict of {model} from {tier}")

    def load(self, model: str, source_tier: str) -> dict[str, Any]:
        return self._post("/load", {"model": model, "source_tier": source_tier}, f"load of {model} from {source_tier}")

    def unload(self, instance: str) -> None:
        self._post("/unload", {"instance": instance}, f"unload of {instance}")

    def holders(self, model: str) -> list[str]:
        return [t for t, info in self.status()["tiers"].items() if model in info.get("models", [])]

    def evict_everywhere(self, model: str) -> None:
        for tier in self.holders(model):
            self.evict(model, tier)


def _rate(move: dict[str, Any]) -> float:
    return float(move["bytes"]) / max(float(move["duration_s"]), 1e-9)


# --------------------------------------------------------------------------- tiers and cloud


def probe_tiers(agent: AgentClient, model: str, tiers: Sequence[str], source: str) -> dict[str, dict[str, float]]:
    """One sample of each tier's write and read: {tier: {write_Bps, read_Bps, bytes, write_s, read_s}}.

    Needs a running instance of `model` loaded from the cloud and no tier holding the model, so that a copy
    into tier X is taken from the instance's host copy, paced by X's write alone (`live.agent_node.copy`).
    X's read is then a copy X -> `source` (the tier with the fastest write, normally dram), i.e. min(X read,
    `source` write). The read of `source` itself is not measured here (see `probe_engine`: the engine's read).
    """
    out: dict[str, dict[str, float]] = {}
    for tier in tiers:
        w = agent.copy(model, tier)
        if w["from_tier"] != "host":
            raise ProbeError(f"copy of {model} into {tier} came from {w['from_tier']!r}, not host memory")
        row = {"bytes": float(w["bytes"]), "write_s": float(w["duration_s"]), "write_Bps": _rate(w)}
        if tier != source:
            r = agent.copy(model, source)
            if r["from_tier"] != tier:
                raise ProbeError(f"copy of {model} into {source} came from {r['from_tier']!r}, not {tier!r}")
            row.update(read_s=float(r["duration_s"]), read_Bps=_rate(r))
            agent.evict(model, source)
        agent.evict(model, tier)
        out[tier] = row
    return out


def probe_cloud_fetch(agent: AgentClient, model: str, into_tier: str) -> dict[str, float]:
    """One cloud fetch of `model` into `into_tier` (from the store: no tier may hold it), evicted afterwards."""
    agent.evict_everywhere(model)
    move = agent.copy(model, into_tier)
    if move["from_tier"] != "cloud":
        raise ProbeError(f"fetch of {model} into {into_tier} came from {move['from_tier']!r}, not the cloud")
    agent.evict(model, into_tier)
    return {"bytes": float(move["bytes"]), "seconds": float(move["duration_s"])}


def stream_rate_and_ttfb(nbytes: float, t1_s: float, tn_s: float, streams: int) -> tuple[float, float]:
    """Per-stream rate and first-byte latency from one fetch with 1 stream and one with `streams`.

    t1 = L + S / r and tN = L + S / (N r)  =>  r = S (1 - 1/N) / (t1 - tN), L = t1 - S / r (clamped at 0).
    With N = 1 the two cannot be separated: r = S / t1 and L = 0.
    """
    if streams <= 1 or t1_s <= tn_s:
        return nbytes / t1_s, 0.0
    r = nbytes * (1.0 - 1.0 / streams) / (t1_s - tn_s)
    return r, max(0.0, t1_s - nbytes / r)


# --------------------------------------------------------------------------- engines


def _completion(engine_url: str, model: str, prompt_ids: list[int], max_tokens: int) -> dict[str, Any]:
    body = {"model": model, "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
    r = httpx.post(engine_url + "/v1/completions", json=body, timeout=HTTP_TIMEOUT_S)
    if r.status_code != 200:
        raise ProbeError(f"engine {engine_url}: completion failed: HTTP {r.status_code} {r.text[:300]}")
    return dict(r.json())


def _stats(engine_url: str) -> dict[str, Any]:
    r = httpx.get(engine_url + "/stats", timeout=30)
    r.raise_for_status()
    return dict(r.json())


def prompt_ids(n_tokens: int, vocab_size: int) -> list[int]:
    """A deterministic prompt of `n_tokens` ids (away from the special ids at the start of the vocabulary)."""
    span = max(1, vocab_size - 16)
    return [8 + (7 * i) % span for i in range(n_tokens)]


def probe_engine(agent: AgentClient, model: str, vocab_size: int,
                 steps: Callable[[str], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Load `model` from the cloud on `agent`, send one first request, and read the engine's start-up phases.

    Returns {fetch_s, fetch_bytes, stats (the engine's /stats start-up timings), first_ttft_s (engine-side:
    arrival -> first token of the first request), warm_ttft_s (the same request once warm), instance,
    engine_url, steps (what `steps(engine_url)` returned, if given)}. The instance is left running for
    `probe_tiers`; the caller unloads it (`instance`).
    """
    loaded = agent.load(model, "cloud")
    inst = loaded["instance"]
    url = str(inst["url"])
    out: dict[str, Any] = {"instance": inst["id"], "engine_url": url}
    hop = loaded["timings"]["fetch_s"][0]
    out.update(fetch_s=float(hop["duration_s"]), fetch_bytes=float(hop["bytes"]))
    first = prompt_ids(8, vocab_size)
    _completion(url, model, first, 1)
    stats = _stats(url)
    out["first_ttft_s"] = float(stats["last_request"]["first_token_s"])
    out["stats"] = {k: stats.get(k) for k in ("process_started_at_s", "listening_at_s", "imports_done_at_s",
                                              "weights_resident_at_s", "ready_at_s", "load_s", "read_s",
                                              "first_token_at_s")}
    _completion(url, model, first, 1)
    out["warm_ttft_s"] = float(_stats(url)["last_request"]["first_token_s"])
    if steps is not None:
        out["steps"] = steps(url)
    return out


def probe_steps(engine_url: str, model: str, vocab_size: int, prefill_lengths: Sequence[int],
                decode_batches: Sequence[int], decode_tokens: int, repeats: int) -> dict[str, Any]:
    """Prefill and decode step times of a warm engine.

    Prefill: a request of L prompt tokens and max_tokens 1; the engine's own arrival -> first token time
    (`/stats` last_request.first_token_s, no HTTP). Decode: B concurrent requests of an 8-token prompt and
    2 + `decode_tokens` output tokens (ignore_eos); one decode step at batch B is the engine's own mean loop
    period over its pure decode steps at batch B during them (`/stats` decode_steps, before / after). An engine
    without those counters is timed from the client instead: the same requests with 2 output tokens, the
    difference over `decode_tokens` (noisy: HTTP and the machine's load do not always cancel out).
    Each prefill request is also timed by the client (HTTP straight to the engine, no gateway): client - engine
    time is the per-request overhead outside the engine's batch (`request_overheads_s`).
    Returns {"prefill": {L: [seconds...]}, "decode": {B: [seconds per step...]},
    "prefill_client": {L: [client-side seconds...]}}.
    """
    prefill: dict[int, list[float]] = {int(n): [] for n in prefill_lengths}
    client: dict[int, list[float]] = {int(n): [] for n in prefill_lengths}
    decode: dict[int, list[float]] = {int(b): [] for b in decode_batches}
    short = prompt_ids(8, vocab_size)

    def batch_wall_s(batch: int, max_tokens: int) -> float:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(batch) as pool:
            for f in [pool.submit(_completion, engine_url, model, short, max_tokens) for _ in range(batch)]:
                f.result()
        return time.perf_counter() - t0

    for _ in range(repeats):
        for n in prefill:
            ids = prompt_ids(n, vocab_size)
            t0 = time.perf_counter()
            _completion(engine_url, model, ids, 1)  # max_tokens 1: the response is the first token
            client[n].append(time.perf_counter() - t0)
            prefill[n].append(float(_stats(engine_url)["last_request"]["first_token_s"]))
        for b in decode:
            before = _decode_steps(engine_url, b)
            longer = batch_wall_s(b, 2 + decode_tokens)
            after = _decode_steps(engine_url, b)
            if before is not None and after is not None and after[0] > before[0]:
                decode[b].append((after[1] - before[1]) / (after[0] - before[0]))
            else:
                base = batch_wall_s(b, 2)
                decode[b].append(max(longer - base, 1e-9) / decode_tokens)
    return {"prefill": prefill, "decode": decode, "prefill_client": client}


def _decode_steps(engine_url: str, batch: int) -> tuple[int, float] | None:
    """The engine's (steps, seconds) of pure decode steps at `batch` so far; None if it does not count them."""
    counters = _stats(engine_url).get("decode_steps")
    if counters is None:
        return None
    c = counters.get(str(batch)) or {"steps": 0, "seconds": 0.0}
    return int(c["steps"]), float(c["seconds"])


def request_overheads_s(steps: dict[str, Any]) -> list[float]:
    """Client-side TTFT minus the engine's own arrival -> first token, per prefill sample (seconds, >= 0).

    Empty for samples recorded before the client was timed (no "prefill_client").
    """
    client = steps.get("prefill_client") or {}
    out: list[float] = []
    for n, ts in steps["prefill"].items():
        for c, e in zip(client.get(n, client.get(str(n), [])), ts, strict=False):
            out.append(max(0.0, float(c) - float(e)))
    return out


def decode_intercept_s(decode: dict[int, list[float]]) -> tuple[float, float]:
    """Fixed per-step time: the intercept of decode step time vs batch size (least squares over every sample),
    and its standard error (seconds). (nan, nan) with fewer than two batch sizes or a slope <= 0.
    """
    pts = [(float(b), t) for b, ts in decode.items() for t in ts]
    xs = [p[0] for p in pts]
    if len(set(xs)) < 2:
        return math.nan, math.nan
    ys = [p[1] for p in pts]
    slope, intercept = statistics.linear_regression(xs, ys)
    if slope <= 0:  # noise swamped the batch dependence: the intercept means nothing
        return math.nan, math.nan
    if len(pts) < 3:
        return intercept, 0.0
    mx = statistics.fmean(xs)
    sxx = sum((x - mx) ** 2 for x in xs)
    resid = math.sqrt(sum((y - intercept - slope * x) ** 2 for x, y in pts) / (len(pts) - 2))
    return intercept, resid * math.sqrt(1.0 / len(pts) + mx * mx / sxx)


def prefill_rate(prefill: dict[int, list[float]]) -> tuple[float, float]:
    """Prefill tokens/s and fixed per-request time: least squares of t = a + L / rate over every sample.

    With one prompt length there is no slope: rate = L / mean(t), a = 0.
    """
    pts = [(float(n), t) for n, ts in prefill.items() for t in ts]
    if not pts:
        raise ConfigError("probe.prefill_lengths: at least one prompt length is needed")
    xs = [p[0] for p in pts]
    if len(set(xs)) < 2:
        return xs[0] / statistics.fmean(t for _, t in pts), 0.0
    slope, intercept = statistics.linear_regression(xs, [p[1] for p in pts])
    if slope <= 0:  # noise swamped the length dependence: fall back to the longest prompt's rate
        n = max(prefill)
        return n / statistics.fmean(prefill[n]), 0.0
    return 1.0 / slope, max(0.0, intercept)
