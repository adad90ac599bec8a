"""A burst of concurrent streaming chat requests against a running `python -m experiments.serve`.

    python scripts/burst.py --serve-json outputs/live/<date>/<time>_seed_tiered/serve.json \
        [--model small-a] [-n 40] [--max-tokens 32] [--warmup] [--no-ignore-eos] [--json OUT]

Reads the gateway's URL, the first tenant's API key and the admin token from serve.json, sends `-n` chat
completions at once (one asyncio task each over a shared httpx connection pool, SSE streaming; `ignore_eos`,
so that every answer is `--max-tokens` long and runs compare like for like), and prints the
TTFT quantiles (the client's clock: from sending the request to the first token's chunk, text or not), the total
time (first send to last byte), and how the gateway spread the requests over instances: each response's
`x-tierlab-request-id` joined with the `instance` column of GET /admin/records. `--json OUT` writes the same
numbers (and one row per request) as JSON. Exit status 1 if any request did not complete.

It needs only httpx, and reads nothing but serve.json's `openai_base_url`/`url`, `tenants` and `admin_token`,
so it also runs against older checkouts of the stack (`python -m live.serve`) for before / after comparisons.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

REQUEST_ID_HEADER = "x-tierlab-request-id"


@dataclass
class Result:
    index: int
    status: int = 0
    request_id: int | None = None
    ttft_s: float = math.nan  # send -> first token chunk (empty text included; not the role chunk)
    e2e_s: float = math.nan  # send -> end of stream
    chunks: int = 0  # content chunks received (about one per token)
    text_chars: int = 0
    completion_tokens: int | None = None  # from the usage chunk (stream_options.include_usage)
    finished: bool = False  # the stream ended with [DONE]
    error: str = ""
    instance: str = ""
    node: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error and self.finished


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default) of the finite values; NaN if there are none."""
    xs = sorted(v for v in values if math.isfinite(v))
    if not xs:
        return math.nan
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


async def one_request(client: httpx.AsyncClient, base_url: str, key: str, body: dict[str, Any], index: int,
                      start: asyncio.Event, t0: list[float]) -> Result:
    res = Result(index)
    await start.wait()
    sent = time.perf_counter()
    if not t0:
        t0.append(sent)
    try:
        async with client.stream("POST", base_url + "/chat/completions", json=body,
                                 headers={"Authorization": f"Bearer {key}"}) as r:
            res.status = r.status_code
            rid = r.headers.get(REQUEST_ID_HEADER)
            res.request_id = int(rid) if rid and rid.isdigit() else None
            if r.status_code != 200:
                res.error = (await r.aread()).decode(errors="replace")[:300]
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    res.finished = True
                    break
                event = json.loads(data)
                if "error" in event:
                    res.error = json.dumps(event["error"])[:300]
                    break
                if event.get("usage"):
                    res.completion_tokens = event["usage"].get("completion_tokens")
                for choice in event.get("choices") or []:
                    delta = choice.get("delta") or {}
                    content = delta.get("content")
                    # a chunk with a choice is a token even with "" (the engine holds its text back), but the
                    # opening role chunk is not (as `live.gateway_sse.token_choice`): TTFT times generation
                    role_only = "role" in delta and not content and choice.get("finish_reason") is None
                    if math.isnan(res.ttft_s) and not role_only:
                        res.ttft_s = time.perf_counter() - sent
                    if content:
                        res.chunks += 1
                        res.text_chars += len(content)
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"
    finally:
        res.e2e_s = time.perf_counter() - sent
    return res


def admin_rows(url: str, token: str, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """GET /admin/records as a list of dicts ([] without a token or on an error: the join is then skipped)."""
    if not token:
        return []
    try:
        r = httpx.get(url + "/admin/records", headers={"Authorization": f"Bearer {token}"}, timeout=timeout_s)
        r.raise_for_status()
    except httpx.HTTPError as e:
        print(f"burst: GET /admin/records failed ({e}); requests per instance unknown", file=sys.stderr)
        return []
    data = r.json()
    return [dict(zip(data["columns"], row, strict=True)) for row in data["rows"]]


async def burst(info: dict[str, Any], model: str, n: int, max_tokens: int, prompt: str,
                timeout_s: float, warmup: bool = False, ignore_eos: bool = True) -> tuple[list[Result], float]:
    """Send `n` streaming chat requests at once (after one request alone, if `warmup`: the model is then
    served warm by one instance when the burst arrives); their results (in order) and the burst's wall time.
    `ignore_eos` (vLLM's extension, which tierlab's CPU engine honours): every answer is max_tokens long, so
    that runs compare like for like (a generated model may otherwise end an answer at its first token)."""
    base_url = info.get("openai_base_url") or info["url"] + "/v1"
    key = next(iter(info["tenants"].values()))["api_key"]
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    timeout = httpx.Timeout(timeout_s, connect=10.0)
    start, t0 = asyncio.Event(), []
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        if warmup:
            go, first = asyncio.Event(), []
            go.set()
            w = await one_request(client, base_url, key, body, -1, go, first)
            if not w.ok:
                raise SystemExit(f"burst: the warm-up request failed: status {w.status} {w.error}")
            print(f"warm-up: TTFT {w.ttft_s:.2f} s, {w.e2e_s:.2f} s", flush=True)
        tasks = [asyncio.create_task(one_request(client, base_url, key, body, i, start, t0)) for i in range(n)]
        await asyncio.sleep(0)  # every task is waiting on the event: they all send together
        start.set()
        results = await asyncio.gather(*tasks)
    total_s = time.perf_counter() - t0[0] if t0 else math.nan
    return list(results), total_s


def summarize(results: list[Result], total_s: float, rows: list[dict[str, Any]], model: str,
              max_tokens: int, warmup: bool = False) -> dict[str, Any]:
    by_id = {int(r["request_id"]): r for r in rows if r.get("request_id") is not None}
    for res in results:
        row = by_id.get(res.request_id) if res.request_id is not None else None
        if row is not None:
            res.instance, res.node = str(row.get("instance") or ""), str(row.get("node") or "")
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft_s for r in ok]
    per_instance = Counter(r.instance or "?" for r in ok)
    gateway_rows = [by_id[r.request_id] for r in results if r.request_id in by_id]
    return {
        "model": model, "requests": len(results), "max_tokens": max_tokens, "warmup": warmup, "completed": len(ok),
        "failed": len(results) - len(ok),
        "ttft_p50_s": quantile(ttfts, 0.5), "ttft_p90_s": quantile(ttfts, 0.9), "ttft_max_s": quantile(ttfts, 1.0),
        "e2e_p50_s": quantile([r.e2e_s for r in ok], 0.5), "total_s": total_s,
        "completion_tokens": sum(r.completion_tokens or 0 for r in ok),
        "requests_per_instance": dict(sorted(per_instance.items())),
        "instances": len([i for i in per_instance if i != "?"]),
        "cold_starts": sum(1 for g in gateway_rows if g.get("cold_start")),
        "gateway_ttft_p50_s": quantile([float(g.get("ttft_s") or math.nan) for g in gateway_rows], 0.5),
        "gateway_queue_p50_s": quantile([float(g.get("queue_s") or math.nan) for g in gateway_rows], 0.5),
        "results": [asdict(r) for r in results],
    }


def report(s: dict[str, Any]) -> str:
    per = ", ".join(f"{k}: {v}" for k, v in s["requests_per_instance"].items()) or "unknown"
    lines = [f"{s['requests']} x {s['model']} (max_tokens {s['max_tokens']}, streaming): "
             f"{s['completed']} completed, {s['failed']} failed",
             f"TTFT p50 {s['ttft_p50_s']:.2f} s, p90 {s['ttft_p90_s']:.2f} s, max {s['ttft_max_s']:.2f} s; "
             f"total {s['total_s']:.2f} s",
             f"instances {s['instances']} ({per}); cold starts {s['cold_starts']}"]
    failed = [r for r in s["results"] if not (r["status"] == 200 and not r["error"] and r["finished"])]
    lines += [f"  request {r['index']}: status {r['status']} {r['error'][:200]}" for r in failed[:5]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--serve-json", required=True, type=Path, help="serve.json written by experiments.serve")
    p.add_argument("--model", default="small-a")
    p.add_argument("-n", "--requests", type=int, default=40, help="concurrent requests (all sent at once)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt", default="Tell me a story about a cold start.")
    p.add_argument("--warmup", action="store_true",
                   help="send one request first and wait for it (the burst then meets a warm instance)")
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let answers end at EOS (default: ignore_eos, every answer max_tokens long)")
    p.add_argument("--timeout-s", type=float, default=300.0, help="per request")
    p.add_argument("--json", type=Path, help="write the numbers (and one row per request) here")
    args = p.parse_args(argv)
    if args.requests < 1 or args.max_tokens < 1:
        p.error("--requests and --max-tokens must be >= 1")
    info = json.loads(args.serve_json.read_text())
    results, total_s = asyncio.run(burst(info, args.model, args.requests, args.max_tokens, args.prompt,
                                         args.timeout_s, args.warmup, args.ignore_eos))
    rows = admin_rows(info["url"], str(info.get("admin_token") or ""))
    s = summarize(results, total_s, rows, args.model, args.max_tokens, args.warmup)
    print(report(s))
    if args.json:
        args.json.write_text(json.dumps(s, indent=2, default=str) + "\n")
    return 0 if s["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
