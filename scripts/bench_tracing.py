"""Tracing overhead: requests/s and p50 / p99 latency through two gateways over one null engine, one with
OpenTelemetry tracing off (the default) and one with it on, same run, rounds alternating which goes first.

Each gateway is `scripts/bench_gateway_wire.py`'s gateway process (uvicorn, the engine adopted with
`Gateway.adopt_instance`, told the null engine has no batch limit); "on" exports every span to the SDK's
in-memory exporter through a SimpleSpanProcessor (export on the request path: an upper bound of what the OTLP
exporter, batched off the path, costs). The load is that script's compiled generator (wrk, else autocannon)
with 16 keep-alive connections posting non-streamed chat requests (`max_tokens` 4).

    python scripts/bench_tracing.py --rounds 4 --seconds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scripts.bench_gateway_wire import body, gateway_process, load_tool, null_engine, run_load  # noqa: E402

SIDES = {"off": "off", "on": "memory"}  # what the table says -> the gateway's --tracing


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--seconds", type=float, default=3.0, help="length of one run (one side)")
    a = p.parse_args(argv)
    tool = load_tool()
    if tool is None:
        p.error("no load generator: install wrk (apt-get install wrk) or autocannon (npm install -g autocannon)")
    payload = body("plain")
    path = "/v1/chat/completions"
    with null_engine() as engine, gateway_process(engine.url, "--tracing", SIDES["off"]) as (off_url, _), \
            gateway_process(engine.url, "--tracing", SIDES["on"]) as (on_url, _):
        urls = {"off": off_url + path, "on": on_url + path}
        for url in urls.values():  # warm both before anything counts
            run_load(tool, url, payload, 1.0)
        results: dict[str, list[tuple[float, float, float]]] = {s: [] for s in urls}
        for r in range(a.rounds):
            for side in ("off", "on") if r % 2 == 0 else ("on", "off"):
                res = run_load(tool, urls[side], payload, a.seconds)
                if res.failures:
                    raise RuntimeError(f"{res.failures} failed requests with tracing {side}: {res}")
                results[side].append((res.req_per_s, res.p50_ms, res.p99_ms))
                print(f"round {r} tracing {side:3}: {res.req_per_s:7.0f} req/s  p50 {res.p50_ms:6.2f} ms  "
                      f"p99 {res.p99_ms:6.2f} ms", flush=True)
    med = {s: [statistics.median(x[i] for x in rows) for i in range(3)] for s, rows in results.items()}
    print(f"\n{tool}, 16 connections, {a.rounds} rounds x {a.seconds:g} s a side (medians over rounds)")
    print("| tracing | req/s | p50 ms | p99 ms |\n|---|---:|---:|---:|")
    for side, (rps, p50, p99) in med.items():
        print(f"| {side} | {rps:,.0f} | {p50:.2f} | {p99:.2f} |")
    print(f"tracing on: {med['on'][0] / med['off'][0]:.2f}x the req/s, p50 {med['on'][1] - med['off'][1]:+.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
