"""`python -m experiments.replay [overrides]` (or `tierlab-replay`): replay a trace against a running gateway.

The workload comes from the simulator's readers and generators (`conf/workload`, the same
`experiments.setup.load_workload`), models are assigned by the same seeded Zipf law over the
gateway's models, and each request is sent at its arrival time (`/v1/completions`, a seeded share
streamed). The client measures TTFT and end-to-end latency as a user sees them; with the admin
token, the gateway's own rows (`GET /admin/records`, joined on the `x-tierlab-request-id` header)
add the cold-start phases: source tier, fetch, engine init, queueing, node, instance and cost.

Writes records.parquet (the simulator's request schema, one row per trace request) and summary.json
(the simulator's keys, cold starts by source tier in `cold_start_by_tier`) into the output directory, and
ends with a one-line summary.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
from tqdm import tqdm

from core.errors import ConfigError
from core.records import REQUEST_SCHEMA, frame
from core.workload.models import assign_models
from core.workload.trace import Workload
from experiments.entry import hydra_command
from experiments.setup import load_workload
from live.gateway_records import tpot
from live.gateway_sse import token_choice
from live.outputs import live_summary, one_line, write_outputs

REQUEST_ID_HEADER = "x-tierlab-request-id"
# gateway columns that only the gateway knows (the client keeps its own arrival, TTFT, e2e and outcome)
GATEWAY_COLUMNS = ("queue_s", "cold_start", "source_tier", "fetch_s", "to_gpu_s", "engine_init_s", "cold_start_s",
                   "prefill_s", "tpot_s", "node", "instance", "cost_usd", "tenant", "cache")
_WORDS = ("the", "model", "loads", "its", "weights", "from", "a", "tier", "of", "storage", "and", "then", "serves",
          "tokens", "to", "every", "user", "who", "asks", "for", "them", "while", "cluster", "keeps", "hot", "models")


@dataclass
class Target:
    """Where to send: the gateway's base URL (no /v1), an API key and, optionally, the admin token."""

    url: str
    api_key: str
    admin_token: str | None = None
    policy: str | None = None


@dataclass
class ReplayOptions:
    """How requests are shaped and sent (the `replay` config block)."""

    max_prompt_tokens: int | None = 64
    max_output_tokens: int | None = 8
    ignore_eos: bool = True
    stream_fraction: float = 0.5
    max_in_flight: int = 64
    request_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        for name in ("max_prompt_tokens", "max_output_tokens"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ConfigError(f"replay.{name}: a positive integer or null, got {v!r}")
        if not 0.0 <= self.stream_fraction <= 1.0:
            raise ConfigError(f"replay.stream_fraction: must be in [0, 1], got {self.stream_fraction!r}")
        if self.max_in_flight < 1 or self.request_timeout_s <= 0:
            raise ConfigError("replay.max_in_flight must be >= 1 and replay.request_timeout_s > 0")


@dataclass
class ClientRow:
    """What the client saw of one request."""

    index: int
    model: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    stream: bool
    gateway_id: int | None = None
    woke_s: float = math.nan  # when the client's timer fired for it (trace clock): arrival_s + the timer's lateness
    sent_s: float = math.nan  # when it was sent: woke_s + the wait for a free client slot (max_in_flight)
    ttft_s: float = math.nan  # sent -> the first chunk standing for a token (empty text included)
    e2e_s: float = math.nan
    last_token_s: float = math.nan  # sent -> the last such chunk (streams)
    in_tokens: int = 0
    out_tokens: int = 0
    outcome: str = "failed"
    reason: str = ""


def resolve_target(cfg: Mapping[str, Any]) -> Target:
    """URL, key and admin token from `serve_json` (an experiments.serve run's file) or from the url/api_key keys."""
    info: dict[str, Any] = {}
    if cfg.get("serve_json"):
        path = Path(str(cfg["serve_json"])).expanduser()
        try:
            info = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"serve_json: cannot read {path}: {e}") from None
    url = cfg.get("url") or info.get("url")
    key = cfg.get("api_key") or next((t["api_key"] for t in (info.get("tenants") or {}).values()), None)
    if not url or not key:
        raise ConfigError("url and api_key: give both, or serve_json=<an experiments.serve run's serve.json>")
    return Target(str(url).rstrip("/").removesuffix("/v1"), str(key), cfg.get("admin_token") or info.get("admin_token"),
                  info.get("policy"))


def prompt_text(n_tokens: int, seed: int) -> str:
    """About `n_tokens` tokens of English-like text (common words are ~1 token each); seeded."""
    rng = np.random.default_rng(seed)
    return " ".join(_WORDS[i] for i in rng.integers(0, len(_WORDS), size=max(1, n_tokens)))


def clip_lengths(wl: Workload, opts: ReplayOptions) -> Workload:
    """The workload with prompt and output lengths clipped (at least 1 token each): the scaling to what CPU
    engines serve, used by `plan` and by the twin's simulator side (`experiments.twin`)."""
    prompt, out = np.asarray(wl.prompt_tokens), np.asarray(wl.output_tokens)
    if opts.max_prompt_tokens is not None:
        prompt = np.minimum(prompt, opts.max_prompt_tokens)
    if opts.max_output_tokens is not None:
        out = np.minimum(out, opts.max_output_tokens)
    return wl.with_columns(prompt_tokens=np.maximum(prompt, 1), output_tokens=np.maximum(out, 1))


def plan(wl: Workload, opts: ReplayOptions, seed: int) -> list[ClientRow]:
    """One row per trace request: its model, arrival, clipped token counts and whether it streams."""
    rng = np.random.default_rng(seed)
    streams = rng.random(len(wl)) < opts.stream_fraction
    clipped = clip_lengths(wl, opts)
    prompt, out = clipped.prompt_tokens, clipped.output_tokens
    return [ClientRow(i, str(wl.model[i]), float(wl.arrival_s[i]), int(prompt[i]), int(out[i]), bool(streams[i]))
            for i in range(len(wl))]


def _error_reason(r: httpx.Response) -> str:
    try:
        err = r.json().get("error") or {}
        return str(err.get("code") or err.get("type") or f"http_{r.status_code}")
    except (ValueError, AttributeError):
        return f"http_{r.status_code}"


async def _send(client: httpx.AsyncClient, target: Target, row: ClientRow, opts: ReplayOptions, seed: int) -> None:
    body: dict[str, Any] = {"model": row.model, "prompt": prompt_text(row.prompt_tokens, seed + row.index),
                            "max_tokens": row.output_tokens, "temperature": 0.0, "stream": row.stream}
    if opts.ignore_eos:
        body["ignore_eos"] = True
    if row.stream:
        body["stream_options"] = {"include_usage": True}
    headers = {"Authorization": f"Bearer {target.api_key}"}
    t0 = time.monotonic()
    try:
        async with client.stream("POST", target.url + "/v1/completions", json=body, headers=headers) as r:
            rid = r.headers.get(REQUEST_ID_HEADER)
            row.gateway_id = int(rid) if rid and rid.isdigit() else None
            if r.status_code != 200:
                await r.aread()
                # a client error (the request's own fault, or a limit) or a refusal for want of capacity
                row.outcome = "rejected" if 400 <= r.status_code < 500 or r.status_code == 503 else "failed"
                row.reason = _error_reason(r)
            elif not row.stream:
                msg = json.loads(await r.aread())
                row.ttft_s = time.monotonic() - t0  # non-stream: the first token comes with the rest
                usage = msg.get("usage") or {}
                row.in_tokens = int(usage.get("prompt_tokens", 0))
                row.out_tokens = int(usage.get("completion_tokens", 0))
                row.outcome = "completed"
            else:
                await _read_stream(r, row, t0)
    except httpx.TimeoutException:
        row.outcome, row.reason = "failed", "client_timeout"
    except (httpx.HTTPError, ValueError) as e:
        row.outcome, row.reason = "failed", f"client_error: {type(e).__name__}"
    row.e2e_s = time.monotonic() - t0


async def _read_stream(r: httpx.Response, row: ClientRow, t0: float) -> None:
    done = False
    async for line in r.aiter_lines():
        if not line.startswith("data: "):
            continue
        data = line[6:].strip()
        if data == "[DONE]":
            done = True
            break
        msg = json.loads(data)
        if msg.get("error"):
            row.outcome, row.reason = "failed", str(msg["error"].get("code") or "stream_error")
            return
        if msg.get("usage"):
            row.in_tokens = int(msg["usage"].get("prompt_tokens", 0))
            row.out_tokens = int(msg["usage"].get("completion_tokens", 0))
        # a chunk with a choice is a token even when its text is "" (held back by the engine's detokenizer):
        # timing chunks with text would time text arrival, not generation (`live.gateway_sse.token_choice`)
        if token_choice(msg) is not None:
            row.last_token_s = time.monotonic() - t0
            if math.isnan(row.ttft_s):
                row.ttft_s = row.last_token_s
    row.outcome, row.reason = ("completed", "") if done else ("failed", "stream_ended_without_done")


async def send_all(target: Target, rows: Sequence[ClientRow], opts: ReplayOptions, seed: int,
                   progress: bool = True) -> float:
    """Send every row at its arrival time (at most `max_in_flight` outstanding); the wall time taken."""
    limits = httpx.Limits(max_connections=opts.max_in_flight, max_keepalive_connections=opts.max_in_flight)
    timeout = httpx.Timeout(opts.request_timeout_s, connect=10.0)
    gate = asyncio.Semaphore(opts.max_in_flight)
    bar = tqdm(total=len(rows), desc="replay", unit="req", disable=not progress)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        start = time.monotonic()

        async def one(row: ClientRow) -> None:
            await asyncio.sleep(max(0.0, start + row.arrival_s - time.monotonic()))
            row.woke_s = time.monotonic() - start
            async with gate:
                row.sent_s = time.monotonic() - start
                await _send(client, target, row, opts, seed)
            bar.update(1)

        await asyncio.gather(*(one(r) for r in rows))
    bar.close()
    return time.monotonic() - start


def fetch_gateway_records(target: Target) -> pd.DataFrame | None:
    """The gateway's rows (GET /admin/records), or None without an admin token."""
    if not target.admin_token:
        return None
    r = httpx.get(target.url + "/admin/records", headers={"Authorization": f"Bearer {target.admin_token}"},
                  timeout=60)
    r.raise_for_status()
    data = r.json()
    return pd.DataFrame(data["rows"], columns=data["columns"])


def client_wait_s(row: ClientRow) -> float:
    """The client-side queue of `row`: its wait for a free slot (`max_in_flight`), from its timer to its send.

    The timer's own lateness (woke_s - arrival_s: the event loop waking this task late, a few ms on a loaded
    machine, more when a burst of arrivals wakes at once) is the replayer's error in issuing the trace, not a queue
    of the system under test; the simulator issues every arrival exactly, so it is left out of queue_s, TTFT and e2e
    alike (the summary reports it as `send_late_s`). Rows without a timer reading count from arrival_s, as before.
    """
    if math.isnan(row.sent_s):
        return 0.0
    since = row.arrival_s if math.isnan(row.woke_s) else row.woke_s
    return max(0.0, row.sent_s - since)


def send_lateness(rows: Sequence[ClientRow]) -> dict[str, float | None]:
    """{p50, max} of the client timer's lateness (woke_s - arrival_s) over the rows that were sent; None if none."""
    late = [max(0.0, r.woke_s - r.arrival_s) for r in rows if not math.isnan(r.woke_s)]
    if not late:
        return {"p50": None, "max": None}
    return {"p50": float(np.median(late)), "max": float(max(late))}


def merge_records(rows: Sequence[ClientRow], gateway: pd.DataFrame | None) -> pd.DataFrame:
    """One row per trace request in REQUEST_SCHEMA: the client's arrival, TTFT, e2e, tokens and outcome,
    the gateway's phases where its row is known. Client-side waiting for a free slot counts as queueing (and in
    TTFT and e2e); the client timer's lateness does not (`client_wait_s`)."""
    by_id = gateway.set_index("request_id") if gateway is not None and len(gateway) else None
    cols: dict[str, list[Any]] = {c: [] for c in REQUEST_SCHEMA}
    for row in rows:
        g = by_id.loc[row.gateway_id] if by_id is not None and row.gateway_id in by_id.index else None
        wait_s = client_wait_s(row)
        values: dict[str, Any] = {
            "request_id": row.index, "tenant": "", "model": row.model, "arrival_s": row.arrival_s,
            "queue_s": wait_s, "cold_start": False, "source_tier": "", "fetch_s": math.nan,
            "to_gpu_s": math.nan, "engine_init_s": math.nan, "cold_start_s": math.nan, "prefill_s": math.nan,
            "ttft_s": row.ttft_s + wait_s, "tpot_s": math.nan, "e2e_s": row.e2e_s + wait_s,
            "prompt_tokens": row.in_tokens or row.prompt_tokens, "output_tokens": row.out_tokens,
            "node": "", "instance": "", "outcome": row.outcome, "reason": row.reason, "cost_usd": math.nan,
            "cache": "",
            "cached_tokens": 0,
            "variant": "",
            "client_region": "",
            "network_s": math.nan,
        }
        if g is not None:
            for c in GATEWAY_COLUMNS:
                values[c] = g[c]
            values["queue_s"] = wait_s + float(g["queue_s"])
            cached = g.get("cached_tokens", 0)  # the engine's prefix-cache hit (absent or NaN: none reported)
            values["cached_tokens"] = int(cached) if pd.notna(cached) else 0
            if not row.reason:
                values["reason"] = g["reason"] or ""
        if row.stream and (g is None or math.isnan(g["tpot_s"])):
            values["tpot_s"] = tpot(row.last_token_s, row.ttft_s, row.out_tokens)
        for c in REQUEST_SCHEMA:
            cols[c].append(values[c])
    return frame(REQUEST_SCHEMA, cols)


def gateway_models(target: Target) -> list[str]:
    """The models this API key may use (GET /v1/models)."""
    r = httpx.get(target.url + "/v1/models", headers={"Authorization": f"Bearer {target.api_key}"}, timeout=30)
    if r.status_code != 200:
        raise ConfigError(f"api_key: the gateway answered {r.status_code} to /v1/models: {r.text[:200]}")
    return [m["id"] for m in r.json()["data"]]


def run(cfg: Mapping[str, Any], out_dir: Path | None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Load the workload, replay it, merge the records; write them into `out_dir` if given."""
    seed = int(cfg.get("seed", 0))
    target = resolve_target(cfg)
    opts = ReplayOptions(**dict(cfg.get("replay") or {}))
    wl_cfg = dict(cfg["workload"])
    wl = load_workload(wl_cfg, seed)
    if len(wl) == 0:
        raise ConfigError("workload: no requests left after window / max_requests / subsample")
    models = list(cfg.get("models") or gateway_models(target))
    if not models:
        raise ConfigError("models: the API key may use no model")
    wl = assign_models(wl, models, float(wl_cfg.get("zipf_s", 1.0)), seed, only_unassigned=False)
    rows = plan(wl, opts, seed)
    wall_s = asyncio.run(send_all(target, rows, opts, seed, bool(cfg.get("progress", True))))
    records = merge_records(rows, fetch_gateway_records(target))
    summary = live_summary(records, wall_s=wall_s, ttft_slo_s=float(cfg.get("ttft_slo_s", 10.0)),
                           extra={"policy": target.policy, "workload": wl.name, "seed": seed, "models": len(models),
                                  "gateway_phases": target.admin_token is not None,
                                  "send_late_s": send_lateness(rows)})
    if out_dir is not None:
        write_outputs(out_dir, records, summary)
    return records, summary


def _command(cfg: dict[str, Any], out_dir: Path) -> str:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # hydra logs at INFO: one line per request otherwise
    try:
        _, summary = run(cfg, out_dir)
    except httpx.HTTPError as e:
        raise ConfigError(f"url: cannot reach the gateway: {e}") from None
    print(f"outputs in {out_dir}")
    return one_line(summary, "replayed")


def main() -> None:
    """Console-script entry point (`tierlab-replay`)."""
    hydra_command("live/replay", _command, prog="tierlab replay")


if __name__ == "__main__":
    main()
