"""Tracing overhead: requests/s and p50 / p99 latency through two gateways over one null engine, one with
OpenTelemetry tracing off (the default) and one with it on, same run, rounds alternating which goes first.

Each gateway runs in its own process (uvicorn, the engine adopted with `Gateway.adopt_instance`); "on" exports
every span to the SDK's in-memory exporter through a SimpleSpanProcessor (export on the request path: an upper
bound of what the OTLP exporter, batched off the path, costs). The load is an asyncio/httpx loop with
`--concurrency` workers posting non-streamed chat requests (`max_tokens` 4).

    python scripts/bench_tracing.py --rounds 3 --requests 1500

`gateway` is an internal sub-command: a gateway process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MODEL = "tiny"
KEY = "sk-bench"
BODY = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()


def gateway_main(port: int, engine_url: str, exporter: str) -> None:
    import uvicorn

    from live.gateway import AgentRef, Gateway, GatewayConfig, Tenant, create_app

    gw = Gateway(GatewayConfig(agents=[AgentRef("s0", "", "")], tenants={KEY: Tenant("bench", (MODEL,))},
                               tracing={"exporter": exporter}, tick=False, health_interval_s=0))
    app = create_app(gw)

    async def run() -> None:
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                               lifespan="on"))
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        gw.adopt_instance(MODEL, "s0", engine_url)
        if gw.tracing.exporter is not None:  # keep memory flat: drop the finished spans now and then
            async def trim() -> None:
                while True:
                    await asyncio.sleep(1.0)
                    gw.tracing.exporter.clear()
            asyncio.create_task(trim())  # noqa: RUF006
        await task

    asyncio.run(run())


def _wait(url: str) -> None:
    from live.lifecycle import wait_healthy

    wait_healthy(url, 30.0)


async def load(url: str, n: int, concurrency: int) -> tuple[float, list[float]]:
    """(requests/s, latencies in s) of `n` chat requests by `concurrency` workers."""
    latencies: list[float] = []
    todo = iter(range(n))
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency), trust_env=False) as client:
        async def worker() -> None:
            for _ in todo:
                t0 = time.perf_counter()
                r = await client.post(url + "/v1/chat/completions", content=BODY, headers=headers)
                latencies.append(time.perf_counter() - t0)
                assert r.status_code == 200, r.text
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return n / wall, latencies


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=1500)
    p.add_argument("--concurrency", type=int, default=16)
    args = p.parse_args(argv)
    from live.engines.base import free_port
    from live.engines.null_server import NullEngineProcess

    engine = NullEngineProcess(free_port(), model_name=MODEL)
    engine.start()
    engine.wait_ready(30)
    procs, urls = [], {}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        for side in ("off", "memory"):
            port = free_port()
            procs.append(subprocess.Popen([sys.executable, __file__, "gateway", str(port), engine.url, side], env=env))
            urls[side] = f"http://127.0.0.1:{port}"
            _wait(urls[side])
        for side in urls:  # warm-up
            asyncio.run(load(urls[side], 200, args.concurrency))
        results: dict[str, list[tuple[float, float, float]]] = {s: [] for s in urls}
        for r in range(args.rounds):
            for side in (("off", "memory") if r % 2 == 0 else ("memory", "off")):
                rps, lat = asyncio.run(load(urls[side], args.requests, args.concurrency))
                q = statistics.quantiles(lat, n=100)
                results[side].append((rps, q[49] * 1e3, q[98] * 1e3))
                print(f"round {r} tracing {'on' if side == 'memory' else 'off':3}: {rps:7.0f} req/s  "
                      f"p50 {q[49] * 1e3:6.2f} ms  p99 {q[98] * 1e3:6.2f} ms", flush=True)
        print("\n| tracing | req/s (median) | p50 ms (median) | p99 ms (median) |\n|---|---|---|---|")
        for side, rows in results.items():
            print(f"| {'on' if side == 'memory' else 'off'} | {statistics.median(x[0] for x in rows):.0f} | "
                  f"{statistics.median(x[1] for x in rows):.2f} | {statistics.median(x[2] for x in rows):.2f} |")
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=15)
        engine.close()
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "gateway":
        gateway_main(int(sys.argv[2]), sys.argv[3], sys.argv[4])
    else:
        raise SystemExit(main())
