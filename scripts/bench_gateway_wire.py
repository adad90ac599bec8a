"""The gateway at wire speed: the same load straight to tierlab's null engine and through the gateway, same run.

A compiled load generator drives both sides (`wrk`, C and epoll, latency kept in microseconds; `autocannon`
from npm where wrk is missing: it keeps latency in whole milliseconds and, in node, tops out near 3,000 req/s
on this machine, so it caps the direct side), 16 connections, a few seconds a side, rounds alternating which
side goes first. Plain and streamed chat requests (`max_tokens` 4) are measured apart: req/s, p50 and p99.
The engine (`live.engines.null_server`) and the gateway (uvicorn, the engine adopted with
`Gateway.adopt_instance`: no agent) each run in their own process; the generator is a third. CPU per request
of gateway and engine is read from /proc around the runs of each side.

Streaming relay: a second null engine sends a chunk every `--gap-ms`; an asyncio/httpx client, one request at
a time and alternating the two sides request by request, timestamps every piece it reads: time to first chunk
each way (the added TTFC), and whether each engine chunk reached the client on its own before the next was
produced (token events per read, and the gap between their arrivals).

    python scripts/bench_gateway_wire.py                                  # the table, 3 rounds x 3 s a side
    python scripts/bench_gateway_wire.py --rounds 5 --seconds 5 --json after.json --compare before.json

`gateway` is an internal sub-command: the gateway process the benchmark starts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
MODEL = "null"
KEY = "sk-bench"
ADMIN = "bench-admin"
CONNECTIONS = 16
MAX_TOKENS = 4
KINDS = ("plain", "stream")
START_TIMEOUT_S = 30.0
NULL_BATCH_LIMIT = 1024  # what the gateway is told the null engine runs at once (it has no limit)


def body(kind: str) -> bytes:
    """The chat request of a `kind` ("plain" or "stream") run."""
    doc: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": MAX_TOKENS}
    if kind == "stream":
        doc["stream"] = True
    return json.dumps(doc, separators=(",", ":")).encode()


# ------------------------------------------------------------------------------------------ load generators
@dataclass
class LoadResult:
    """One load generator run against one URL."""

    requests: int
    seconds: float
    req_per_s: float
    p50_ms: float
    p99_ms: float
    failures: int  # connection errors, timeouts and non-2xx answers


WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = [[%s]]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
done = function(s, latency, requests)
  local e = s.errors
  io.write(string.format('\\nWRKJSON {"requests":%%d,"duration_us":%%d,"failures":%%d,"p50_us":%%d,"p99_us":%%d}\\n',
    s.requests, s.duration, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def load_tool() -> str | None:
    """The load generator on PATH: "wrk", else "autocannon", else None."""
    return next((t for t in ("wrk", "autocannon") if shutil.which(t)), None)


def run_load(tool: str, url: str, payload: bytes, seconds: float, connections: int = CONNECTIONS) -> LoadResult:
    """`connections` keep-alive connections POSTing `payload` to `url` for `seconds`."""
    if tool == "wrk":
        with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
            f.write(WRK_SCRIPT % (payload.decode(), KEY))
        try:
            proc = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "10s", "-s",
                                   f.name, url], capture_output=True, text=True, timeout=seconds + 60)
        finally:
            os.unlink(f.name)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
        if proc.returncode != 0 or line is None:
            raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stdout[-1500:]}{proc.stderr[-1500:]}")
        d = json.loads(line[len("WRKJSON "):])
        secs = d["duration_us"] / 1e6
        return LoadResult(d["requests"], secs, d["requests"] / secs, d["p50_us"] / 1e3, d["p99_us"] / 1e3,
                          d["failures"])
    if tool == "autocannon":
        proc = subprocess.run(["autocannon", "-j", "-n", "-c", str(connections), "-d", f"{seconds:g}", "-m", "POST",
                               "-H", "content-type=application/json", "-H", f"authorization=Bearer {KEY}",
                               "-b", payload.decode(), url], capture_output=True, text=True, timeout=seconds + 60)
        if proc.returncode != 0:
            raise RuntimeError(f"autocannon failed ({proc.returncode}): {proc.stderr[-3000:]}")
        d = json.loads(proc.stdout)
        n = int(d["requests"]["total"])
        return LoadResult(n, float(d["duration"]), n / float(d["duration"]), float(d["latency"]["p50"]),
                          float(d["latency"]["p99"]), int(d["errors"]) + int(d["timeouts"]) + int(d["non2xx"]))
    raise ValueError(f"unknown load generator {tool!r}")


# ------------------------------------------------------------------------------------------ processes
def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process `pid` has used, from /proc (NaN where there is none)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _env(tree: Path = REPO) -> dict[str, str]:
    """The environment of a process that must import `tree`'s code first."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH")) if p)}


@dataclass
class Stack:
    """A null engine and a gateway process in front of it."""

    engine_url: str
    gateway_url: str
    engine_pid: int
    gateway_pid: int


@contextlib.contextmanager
def gateway_process(engine_url: str, *gateway_args: str, tree: Path = REPO) -> Iterator[tuple[str, int]]:
    """A gateway process (`gateway` sub-command, with `gateway_args`, of the tierlab source tree `tree`) serving
    the engine at `engine_url`: (its URL, its pid); stopped at the end."""
    from live.engines.base import free_port

    port = free_port()
    gw = subprocess.Popen([sys.executable, "-m", "scripts.bench_gateway_wire", "gateway", "--engine", engine_url,
                           "--port", str(port), *gateway_args], cwd=tree, env=_env(tree), stdout=subprocess.PIPE)
    try:
        assert gw.stdout is not None
        line = gw.stdout.readline()  # the gateway prints one line once it serves the engine
        if not line.startswith(b"ready"):
            raise RuntimeError(f"gateway process did not start (exit {gw.poll()}): {line!r}")
        yield f"http://127.0.0.1:{port}", gw.pid
    finally:
        gw.terminate()
        try:
            gw.wait(timeout=15)
        except subprocess.TimeoutExpired:
            gw.kill()
            gw.wait()


@contextlib.contextmanager
def null_engine(engine_args: tuple[str, ...] = ()) -> Iterator[Any]:
    """A null engine process (with `engine_args`), ready; stopped at the end."""
    from live.engines.base import free_port
    from live.engines.null_server import NullEngineProcess

    engine = NullEngineProcess(free_port(), model_name=MODEL, extra_args=list(engine_args))
    engine.start()
    try:
        engine.wait_ready(START_TIMEOUT_S)
        yield engine
    finally:
        engine.close()


@contextlib.contextmanager
def stack(engine_args: tuple[str, ...] = ()) -> Iterator[Stack]:
    """Start a null engine (with `engine_args`) and a gateway process serving it; both stopped at the end."""
    with null_engine(engine_args) as engine, gateway_process(engine.url) as (gateway_url, gateway_pid):
        yield Stack(engine.url, gateway_url, engine.pid, gateway_pid)


def gateway_main(argv: list[str]) -> None:
    """The gateway process: uvicorn over a `Gateway` that adopted the engine at `--engine`; prints "ready"."""
    import uvicorn

    from core.specs import EngineSpec
    from live.gateway import AgentRef, Gateway, GatewayConfig, Tenant, create_app

    p = argparse.ArgumentParser(prog="bench_gateway_wire gateway")
    p.add_argument("--engine", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--tracing", choices=("off", "memory"), default="off",
                   help="memory: every span exported on the request path to the SDK's in-memory exporter")
    a = p.parse_args(argv)
    # the null engine has no batch limit: said so, the policy routes every request to it at once (with the
    # default limit of 8, requests 9-16 made the autoscaler ask for a second instance, which an agent-less node
    # cannot start, and waited in the gateway's 100 ms placement poll: a p99 of ~200 ms that was not relaying)
    config = GatewayConfig(agents=[AgentRef("s0", "", "")], tenants={KEY: Tenant("bench", (MODEL,))},
                           engine=EngineSpec(name="null", max_num_seqs=NULL_BATCH_LIMIT), health_interval_s=0,
                           tick=False, admin_token=ADMIN, tracing={"exporter": a.tracing})
    gateway = Gateway(config)
    # uvicorn's own choice of event loop and HTTP parser ("auto": uvloop and httptools where installed)
    server = uvicorn.Server(uvicorn.Config(create_app(gateway), host="127.0.0.1", port=a.port, log_level="warning",
                                           lifespan="on"))

    async def serve() -> None:
        task = asyncio.create_task(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.01)
        if server.started:
            gateway.adopt_instance(MODEL, "s0", a.engine)
            print("ready", flush=True)
        exporter = gateway.tracing.exporter
        while exporter is not None and not task.done():  # memory stays flat: drop finished spans now and then
            await asyncio.sleep(1.0)
            exporter.clear()
        await task

    with asyncio.Runner(loop_factory=server.config.get_loop_factory()) as runner:  # as `Server.run` picks it
        runner.run(serve())


# ------------------------------------------------------------------------------------------ paired load
@dataclass
class Paired:
    """Per kind, per side, one LoadResult per round; CPU ms per request by side."""

    tool: str
    rounds: dict[str, dict[str, list[LoadResult]]] = field(default_factory=dict)
    gateway_cpu_ms: dict[str, float] = field(default_factory=dict)  # gateway process, per gateway request
    engine_cpu_ms: dict[str, float] = field(default_factory=dict)  # engine process, per direct request

    def summary(self, kind: str) -> dict[str, float]:
        """Medians over rounds, each side; the per-round ratio and added latency medians."""
        d, g = self.rounds[kind]["direct"], self.rounds[kind]["gateway"]
        med = statistics.median
        return {"direct_req_per_s": med(r.req_per_s for r in d), "gateway_req_per_s": med(r.req_per_s for r in g),
                "direct_p50_ms": med(r.p50_ms for r in d), "gateway_p50_ms": med(r.p50_ms for r in g),
                "direct_p99_ms": med(r.p99_ms for r in d), "gateway_p99_ms": med(r.p99_ms for r in g),
                "req_per_s_ratio": med(y.req_per_s / x.req_per_s for x, y in zip(d, g, strict=True)),
                "added_p50_ms": med(y.p50_ms - x.p50_ms for x, y in zip(d, g, strict=True)),
                "added_p99_ms": med(y.p99_ms - x.p99_ms for x, y in zip(d, g, strict=True)),
                "gateway_cpu_ms_per_request": self.gateway_cpu_ms[kind],
                "engine_cpu_ms_per_request": self.engine_cpu_ms[kind]}


def paired(st: Stack, tool: str, rounds: int, seconds: float, kinds: tuple[str, ...] = KINDS) -> Paired:
    """`rounds` rounds per kind, each a run direct and a run through the gateway, the order alternating."""
    out = Paired(tool)
    path = "/v1/chat/completions"
    urls = {"direct": st.engine_url + path, "gateway": st.gateway_url + path}
    pids = {"direct": st.engine_pid, "gateway": st.gateway_pid}
    for kind in kinds:
        payload = body(kind)
        for side in ("direct", "gateway"):  # warm both (connections, caches) before anything counts
            run_load(tool, urls[side], payload, 1.0)
        runs: dict[str, list[LoadResult]] = {"direct": [], "gateway": []}
        cpu = {"direct": 0.0, "gateway": 0.0}
        for r in range(rounds):
            for side in ("direct", "gateway") if r % 2 == 0 else ("gateway", "direct"):  # machine drift cancels
                c0 = cpu_s(pids[side])
                res = run_load(tool, urls[side], payload, seconds)
                cpu[side] += cpu_s(pids[side]) - c0
                if res.failures:
                    raise RuntimeError(f"{res.failures} failed requests {side} ({kind}): {res}")
                runs[side].append(res)
        out.rounds[kind] = runs
        # gateway: its own process per request it relayed; engine: per request it answered directly
        out.gateway_cpu_ms[kind] = cpu["gateway"] / sum(r.requests for r in runs["gateway"]) * 1e3
        out.engine_cpu_ms[kind] = cpu["direct"] / sum(r.requests for r in runs["direct"]) * 1e3
    return out


# ------------------------------------------------------------------------------------------ streaming relay
@dataclass
class StreamTiming:
    """Per side: time to first chunk of each request, and how the token events arrived."""

    ttfc_ms: list[float] = field(default_factory=list)
    token_gaps_ms: list[float] = field(default_factory=list)  # between the arrivals of consecutive token events
    reads_with_several_tokens: int = 0  # reads that brought more than one token event (buffered somewhere)
    token_events: int = 0


async def _one_stream(client: httpx.AsyncClient, url: str, payload: bytes, out: StreamTiming) -> None:
    t0 = time.perf_counter()
    last: float | None = None
    first = True
    async with client.stream("POST", url, content=payload, headers={"Authorization": f"Bearer {KEY}",
                                                                      "Content-Type": "application/json"}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}")
        async for piece in r.aiter_raw():
            now = time.perf_counter()
            if first:
                out.ttfc_ms.append((now - t0) * 1e3)
                first = False
            # token events: chunks with text (not the role chunk's "", the finish chunk, usage or [DONE])
            tokens = piece.count(b'"content":"') - piece.count(b'"content":""')
            if tokens:
                out.token_events += tokens
                out.reads_with_several_tokens += tokens > 1
                if last is not None:
                    out.token_gaps_ms.append((now - last) * 1e3)
                last = now


async def stream_timing(st: Stack, n: int) -> dict[str, StreamTiming]:
    """`n` streamed requests each way, one at a time, alternating sides request by request."""
    path = "/v1/chat/completions"
    urls = {"direct": st.engine_url + path, "gateway": st.gateway_url + path}
    payload = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True,
                          "max_tokens": 8}).encode()
    out = {side: StreamTiming() for side in urls}
    async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
        for side in urls:  # warm-up: connections open, code paths hot
            await _one_stream(client, urls[side], payload, StreamTiming())
        for i in range(n):
            for side in ("direct", "gateway") if i % 2 == 0 else ("gateway", "direct"):
                await _one_stream(client, urls[side], payload, out[side])
    return out


def stream_summary(timing: dict[str, StreamTiming], gap_ms: float) -> dict[str, float]:
    med = statistics.median
    d, g = timing["direct"], timing["gateway"]

    def p99(xs: list[float]) -> float:
        return sorted(xs)[min(len(xs) - 1, math.ceil(0.99 * len(xs)) - 1)]

    return {"gap_ms": gap_ms, "requests": len(g.ttfc_ms),
            "direct_ttfc_p50_ms": med(d.ttfc_ms), "gateway_ttfc_p50_ms": med(g.ttfc_ms),
            "direct_ttfc_p99_ms": p99(d.ttfc_ms), "gateway_ttfc_p99_ms": p99(g.ttfc_ms),
            "added_ttfc_p50_ms": med(g.ttfc_ms) - med(d.ttfc_ms),
            "gateway_min_token_gap_ms": min(g.token_gaps_ms), "gateway_median_token_gap_ms": med(g.token_gaps_ms),
            "direct_min_token_gap_ms": min(d.token_gaps_ms),
            "gateway_reads_with_several_tokens": g.reads_with_several_tokens,
            "gateway_token_events": g.token_events, "direct_token_events": d.token_events}


# ------------------------------------------------------------------------------------------ report
def measure(tool: str, rounds: int, seconds: float, stream_requests: int, gap_ms: float) -> dict[str, Any]:
    """The whole measurement: paired load per kind, then the streaming relay against a gapped engine."""
    with stack() as st:
        p = paired(st, tool, rounds, seconds)
    with stack(("--token-delay-s", str(gap_ms / 1e3), "--reply-tokens", "8")) as st:
        timing = asyncio.run(stream_timing(st, stream_requests))
    return {"tool": tool, "connections": CONNECTIONS, "rounds": rounds, "seconds": seconds,
            "kinds": {k: p.summary(k) for k in KINDS},
            "runs": {k: {s: [asdict(r) for r in v] for s, v in p.rounds[k].items()} for k in KINDS},
            "stream": stream_summary(timing, gap_ms)}


def table(result: dict[str, Any], label: str = "") -> str:
    """The direct / gateway table of one measurement."""
    lines = [f"{label}load: {result['tool']}, {result['connections']} connections, {result['rounds']} rounds x "
             f"{result['seconds']:g} s a side (medians over rounds)",
             f"{'kind':7} {'direct req/s':>12} {'gw req/s':>9} {'ratio':>6} {'p50 d/gw ms':>12} {'p99 d/gw ms':>13}"
             f" {'+p50':>6} {'+p99':>6} {'gw CPU ms/req':>13}"]
    for kind, s in result["kinds"].items():
        lines.append(f"{kind:7} {s['direct_req_per_s']:12,.0f} {s['gateway_req_per_s']:9,.0f} "
                     f"{s['req_per_s_ratio']:6.2f} {s['direct_p50_ms']:5.2f}/{s['gateway_p50_ms']:<6.2f} "
                     f"{s['direct_p99_ms']:6.2f}/{s['gateway_p99_ms']:<6.2f} {s['added_p50_ms']:6.2f} "
                     f"{s['added_p99_ms']:6.2f} {s['gateway_cpu_ms_per_request']:13.3f}")
    t = result["stream"]
    lines.append(f"stream relay ({t['requests']} requests a side, a chunk every {t['gap_ms']:g} ms): time to first "
                 f"chunk p50 direct {t['direct_ttfc_p50_ms']:.2f} ms, gateway {t['gateway_ttfc_p50_ms']:.2f} ms "
                 f"(added {t['added_ttfc_p50_ms']:.2f}); p99 {t['direct_ttfc_p99_ms']:.2f} / "
                 f"{t['gateway_ttfc_p99_ms']:.2f} ms; token gaps through the gateway min "
                 f"{t['gateway_min_token_gap_ms']:.1f} ms, median {t['gateway_median_token_gap_ms']:.1f} ms; reads "
                 f"holding several tokens {t['gateway_reads_with_several_tokens']} of {t['gateway_token_events']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["gateway"]:
        gateway_main(argv[1:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=3.0, help="length of one run (one side, one kind)")
    p.add_argument("--stream-requests", type=int, default=100, help="streamed requests a side for the relay timing")
    p.add_argument("--gap-ms", type=float, default=20.0, help="the gapped engine's time between chunks")
    p.add_argument("--tool", choices=("wrk", "autocannon"), default=None, help="default: wrk, else autocannon")
    p.add_argument("--json", type=Path, help="write the measurement here")
    p.add_argument("--compare", type=Path, help="an earlier --json measurement to print above this one")
    a = p.parse_args(argv)
    tool = a.tool or load_tool()
    if tool is None:
        p.error("no load generator: install wrk (apt-get install wrk) or autocannon (npm install -g autocannon)")
    result = measure(tool, a.rounds, a.seconds, a.stream_requests, a.gap_ms)
    result["load_avg_1min"] = os.getloadavg()[0]
    if a.compare:
        print(table(json.loads(a.compare.read_text()), f"BEFORE ({a.compare.name}) "))
        print()
    print(table(result, "AFTER " if a.compare else ""))
    if a.json:
        a.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
