"""Long horizons: requests per wall-second and peak RSS of a streamed ServeGen m-small horizon
(`records.stream_dir`, sim/record_sink.py; workload `servegen_m_small_horizon`, core/workload/horizon.py).

Each run is `python -m experiments.simulate` in its own process, its peak RSS read from the kernel's rusage
of that child (`os.wait4`). The reference is measured in the same run: the same horizons simulated with every
record in memory (~1 KB a request). Doubling the horizon must grow the streamed run's peak RSS by less than 1.3x,
and by less than half of what it grows the in-memory run's: a test that fails if records are kept in memory.
(What the streamed run still grows by at these sizes is mostly reading the file back for the summary: pyarrow's
allocator keeps what it used, and the exact percentiles keep up to `sim.stream_summary.EXACT_CAP` values.)

Default: 30 minutes vs 1 hour of m-small at 10% of its rate (~140k / ~285k requests). TIERLAB_BENCH_SLOW=1 (as
.ci/run runs it): multi-day, one vs two days at 0.1% of the rate (~100k / ~200k requests, mostly idle instances:
many cold starts and busy spans). Each takes about two minutes here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from experiments.setup import REPO_ROOT, resolve_path

M_SMALL = resolve_path("../shared/data/traces/alibaba_servegen/language/m-small")
pytestmark = pytest.mark.skipif(not M_SMALL.is_dir(), reason=f"ServeGen m-small not at {M_SMALL}")
SLOW = os.environ.get("TIERLAB_BENCH_SLOW") == "1"
# (horizon_s, rate_scale): the horizon is run at 1x and 2x this length
QUICK = (1800.0, 0.1)
LONG = (86400.0, 0.001)
MAX_GROWTH = 1.3  # streamed peak RSS at 2x the requests / at 1x
MAX_SHARE_OF_IN_MEMORY_GROWTH = 1 / 2
RUN_TIMEOUT_S = 1800.0


@dataclass
class Run:
    requests: int
    completed: int
    rss_mb: float
    sim_wall_s: float
    req_per_wall_s: float
    total_wall_s: float  # the whole command's run: building, simulating, records and summary


# runs experiments.simulate and writes its own peak RSS (VmHWM, KiB) on the way out: ru_maxrss would not do, as
# Linux carries the parent's high-water mark (pytest's, hundreds of MB late in a suite) into the child at exec
_SIMULATE_AND_REPORT_PEAK = (
    "import atexit, re, runpy, sys\n"
    "out = sys.argv.pop(1)\n"
    "def peak():\n"
    "    status = open('/proc/self/status').read()\n"
    "    open(out, 'w').write(re.search(r'VmHWM:\\s+(\\d+)', status).group(1))\n"
    "atexit.register(peak)\n"
    "runpy.run_module('experiments.simulate', run_name='__main__', alter_sys=True)\n"
)


def _start(out: Path, end_s: float, rate: float, streamed: bool) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-c", _SIMULATE_AND_REPORT_PEAK, str(out / "peak_rss_kb"), "scenario=smoke",
            "workload=servegen_m_small_horizon",
            f"workload.options.end_s={end_s}", f"workload.options.rate_scale={rate}", "output.plots=false",
            "progress=false", f"hydra.run.dir={out}"]
    if streamed:
        args.append(f"records.stream_dir={out / 'stream'}")
    return subprocess.Popen(args, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, out: Path) -> Run:
    """Wait for `proc` alone and read its own peak RSS (VmHWM, written by the child) and its summary."""
    _, status, _usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = proc.stdout.read() if proc.stdout else ""
    assert proc.returncode == 0, text[-3000:]
    s = json.loads((out / "summary.json").read_text())
    return Run(s["requests"], s["completed"], int((out / "peak_rss_kb").read_text()) / 1024, s["wall_s"],
               s["requests_per_wall_s"], s["total_wall_s"])


def _pair(tmp: Path, end_s: float, rate: float) -> tuple[Run, Run]:
    """The streamed and the in-memory run of one horizon, side by side (one core each): same contention."""
    procs = {mode: _start(tmp / f"{mode}_{end_s:.0f}", end_s, rate, mode == "streamed")
             for mode in ("streamed", "memory")}
    try:
        runs = {mode: _finish(p, tmp / f"{mode}_{end_s:.0f}") for mode, p in procs.items()}
    finally:
        for p in procs.values():
            if p.returncode is None:
                p.kill()
                p.wait()
    return runs["streamed"], runs["memory"]


@pytest.mark.slow
def test_streamed_horizon_memory_stays_bounded(tmp_path: Path):
    horizon_s, rate = LONG if SLOW else QUICK
    (s1, m1), (s2, m2) = _pair(tmp_path, horizon_s, rate), _pair(tmp_path, 2 * horizon_s, rate)
    for s, m in ((s1, m1), (s2, m2)):
        print(f"\n{s.requests:,} requests: streamed {s.req_per_wall_s:,.0f} req/wall-s ({s.total_wall_s:.0f} s in"
              f" all), peak RSS {s.rss_mb:,.0f} MB; in memory {m.req_per_wall_s:,.0f} req/wall-s"
              f" ({m.total_wall_s:.0f} s in all, records and summary after the simulation's wall time), peak RSS"
              f" {m.rss_mb:,.0f} MB")
        assert (s.requests, s.completed) == (m.requests, m.completed)  # the same simulation
    growth, mem_growth = s2.rss_mb / s1.rss_mb, m2.rss_mb - m1.rss_mb
    print(f"2x the requests ({s1.requests:,} -> {s2.requests:,}): streamed peak RSS x{growth:.2f} "
          f"(+{s2.rss_mb - s1.rss_mb:,.0f} MB), in memory x{m2.rss_mb / m1.rss_mb:.2f} (+{mem_growth:,.0f} MB)")
    assert s2.requests > 1.8 * s1.requests
    assert mem_growth > 50.0, "the in-memory reference barely grew: the horizon is too small to tell"
    assert growth < MAX_GROWTH
    assert s2.rss_mb - s1.rss_mb < MAX_SHARE_OF_IN_MEMORY_GROWTH * mem_growth
