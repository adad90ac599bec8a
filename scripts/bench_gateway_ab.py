"""Two versions of the gateway against one null engine, same run: CPU per request and req/s, direct in between.

`scripts/bench_gateway_wire.py` compares the gateway with the engine it fronts; this compares two gateways,
for a change to the request path. Each `--tree` is a source tree of tierlab (the working tree, or an older
commit unpacked with `git archive REV | tar -x -C DIR`); each gets its own gateway process (the tree's own
`scripts/bench_gateway_wire.py gateway`) in front of the same null engine. Rounds run direct and every tree in
turn, the order reversed every other round, under wrk with 16 connections. CPU per request (from /proc) is the
steadier figure on a shared machine; req/s ratios to direct are printed per round.

    git archive fe61b40 | (mkdir -p /tmp/before && tar -x -C /tmp/before)
    python scripts/bench_gateway_ab.py --tree /tmp/before --tree . --kind plain --rounds 5 --seconds 3
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scripts.bench_gateway_wire import KINDS, body, cpu_s, gateway_process, null_engine, run_load  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", type=Path, action="append", required=True, help="a tierlab source tree (repeat)")
    p.add_argument("--kind", choices=KINDS, default="plain")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=int, default=3, help="length of one run (one side); wrk takes whole seconds")
    a = p.parse_args(argv)
    if a.seconds < 1 or a.rounds < 1:
        p.error(f"--seconds and --rounds must be at least 1, got {a.seconds} and {a.rounds}")
    for t in a.tree:
        if not (t / "scripts" / "bench_gateway_wire.py").is_file():
            p.error(f"--tree {t}: not a tierlab source tree (no scripts/bench_gateway_wire.py)")
    if not shutil.which("wrk"):
        p.error("wrk is not installed (apt-get install wrk)")
    trees = [t.resolve() for t in a.tree]
    names = [f"{i}:{t.name or t}" for i, t in enumerate(trees)]
    payload = body(a.kind)
    path = "/v1/chat/completions"
    with null_engine() as engine, contextlib.ExitStack() as stack:
        gateways = {n: stack.enter_context(gateway_process(engine.url, tree=t))
                    for n, t in zip(names, trees, strict=True)}
        for url, _ in gateways.values():  # warm each: connections, code paths
            run_load("wrk", url + path, payload, 1)
        sides = ["direct", *names]
        runs: dict[str, list[tuple[float, float, float]]] = {s: [] for s in sides}  # req/s, p50 ms, CPU ms/req
        for r in range(a.rounds):
            for side in sides if r % 2 == 0 else sides[::-1]:
                url, pid = (engine.url, engine.pid) if side == "direct" else gateways[side]
                before = cpu_s(pid)
                res = run_load("wrk", url + path, payload, a.seconds)
                runs[side].append((res.req_per_s, res.p50_ms, (cpu_s(pid) - before) / max(res.requests, 1) * 1e3))
                print(f"round {r + 1}/{a.rounds} {side}: {res.req_per_s:,.0f} req/s", file=sys.stderr, flush=True)
    med = statistics.median
    direct = runs["direct"]
    print(f"{a.kind}, wrk 16 connections, {a.rounds} rounds x {a.seconds} s a side (medians over rounds)")
    for side in sides:
        x = runs[side]
        ratios = [g[0] / d[0] for g, d in zip(x, direct, strict=True)]
        print(f"{side:>12}: {med(v[0] for v in x):8,.0f} req/s  p50 {med(v[1] for v in x):6.2f} ms  "
              f"CPU {med(v[2] for v in x):.3f} ms/req  req/s over direct {med(ratios):.3f} "
              f"(rounds {', '.join(f'{v:.2f}' for v in ratios)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
