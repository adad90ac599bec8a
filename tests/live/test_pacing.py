"""Emulated devices (`live.pacing`): real sleeps, real state files, real processes sharing a device."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from live.agent_tiers import Tier, TierConfig, copy_flow, parallel_copy_files
from live.pacing import (
    PACE_FILE,
    READ_PACE_ENV,
    CloudPace,
    Device,
    FifoLock,
    Flow,
    PaceSpec,
    TransferCancelled,
    local_device,
    state_path_in,
)
from live.registry import Registry

REPO = Path(__file__).resolve().parents[2]
BW = 4e6  # bytes/s: slow enough that the sleeps, not the machine, set every duration
N = 2_000_000  # bytes per flow: 0.5 s alone at BW
CHUNK = 256 << 10


def near(measured_s: float, expected_s: float, rel: float = 0.2) -> bool:
    return abs(measured_s - expected_s) <= rel * expected_s


def move(flow: Flow, nbytes: int = N, threads: int = 1, chunk: int = CHUNK) -> float:
    """Acquire `nbytes` through `flow` in chunks from `threads` threads; the elapsed seconds."""
    chunks = [min(chunk, nbytes - off) for off in range(0, nbytes, chunk)]
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if not chunks:
                    return
                n = chunks.pop()
            flow.acquire(n)

    t0 = time.monotonic()
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return time.monotonic() - t0


def timed(fn: Callable[[], object], out: dict[str, float], key: str, start_at: float) -> threading.Thread:
    """A thread that waits until `start_at` (monotonic), runs `fn` and stores its duration in out[key]."""
    def run() -> None:
        time.sleep(max(0.0, start_at - time.monotonic()))
        t0 = time.monotonic()
        fn()
        out[key] = time.monotonic() - t0
    t = threading.Thread(target=run)
    t.start()
    return t


# ------------------------------------------------------------------------------------------ spec


@pytest.mark.parametrize("field_name", ["read_Bps", "write_Bps"])
@pytest.mark.parametrize("bad", [0, -1.0, math.nan, "fast", True])
def test_bad_bandwidth_is_refused_naming_the_field(field_name: str, bad: object) -> None:
    with pytest.raises(ValueError, match=rf"'nvme' {field_name} must be"):
        PaceSpec(None, name="nvme", **{field_name: bad})


def test_spec_normalises_and_round_trips_through_the_environment(tmp_path: Path) -> None:
    spec = PaceSpec(str(tmp_path / PACE_FILE), read_Bps=math.inf, write_Bps=5e6, latency_s=0.01, name="sata")
    assert spec.read_Bps is None and spec.write_Bps == 5e6 and spec.paced  # inf = unpaced
    assert PaceSpec.from_json(spec.to_json()) == spec
    assert PaceSpec.from_env({READ_PACE_ENV: spec.to_json()}) == spec
    assert PaceSpec.from_env({READ_PACE_ENV: ""}) is None and PaceSpec.from_env({}) is None
    assert not PaceSpec().paced
    with pytest.raises(ValueError, match="latency_s"):
        PaceSpec(latency_s=-1)
    with pytest.raises(ValueError, match="unknown field"):
        PaceSpec.from_json(json.dumps({"read_Bps": 1, "speed": 2}))
    with pytest.raises(ValueError, match="not valid JSON"):
        PaceSpec.from_env({READ_PACE_ENV: "{oops"})


# ------------------------------------------------------------------------------------------ one flow


@pytest.mark.parametrize("threads", [1, 4])
def test_a_flow_moves_at_the_device_bandwidth_whatever_its_threads(tmp_path: Path, threads: int) -> None:
    dev = Device(PaceSpec(str(tmp_path / PACE_FILE), read_Bps=BW, name="t"))
    elapsed = move(Flow(reads=[dev]), threads=threads)
    assert near(elapsed, N / BW), elapsed


def test_unpaced_flow_does_not_wait_and_latency_is_paid_once() -> None:
    assert move(Flow(reads=[local_device()])) < 0.05
    dev = local_device(read_Bps=BW, latency_s=0.3)
    elapsed = move(Flow(reads=[dev]), threads=4)  # four threads, one flow: one first-byte latency
    assert near(elapsed, 0.3 + N / BW), elapsed


def test_cancelled_flow_raises_at_once() -> None:
    cancel = threading.Event()
    flow = Flow(reads=[local_device(read_Bps=1e5)], cancel=cancel)
    threading.Timer(0.2, cancel.set).start()
    t0 = time.monotonic()
    with pytest.raises(TransferCancelled):
        flow.acquire(10**7)  # 100 s of bytes
    assert time.monotonic() - t0 < 0.5


def test_fifo_lock_is_granted_in_the_order_it_was_asked_for() -> None:
    """The flow's booking lock: a thread that asked first books first (a plain Lock may pass one over
    for many turns, and the chunk it holds then arrives last)."""
    lock, order = FifoLock(), []
    threads = [threading.Thread(target=lambda i=i: (lock.__enter__(), order.append(i), lock.__exit__()))
               for i in range(12)]
    with lock:
        for i, t in enumerate(threads):
            t.start()
            deadline = time.monotonic() + 5
            while lock._next_ticket < i + 2 and time.monotonic() < deadline:  # thread i holds its ticket
                time.sleep(0.001)
    for t in threads:
        t.join(5)
    assert order == list(range(12))


# ------------------------------------------------------------------------------------------ sharing


def test_two_flows_share_a_device_fairly_per_flow() -> None:
    dev = local_device(read_Bps=BW)
    out: dict[str, float] = {}
    start = time.monotonic() + 0.05
    threads = [timed(lambda: move(Flow(reads=[dev]), threads=4), out, "four_threads", start),
               timed(lambda: move(Flow(reads=[dev]), threads=1), out, "one_thread", start)]
    for t in threads:
        t.join()
    # each gets half: 2N/BW, not N/BW, and the flow with more threads gets no more
    assert near(out["four_threads"], 2 * N / BW), out
    assert near(out["one_thread"], 2 * N / BW), out


def test_a_flow_bound_elsewhere_leaves_its_share_of_a_shared_link_to_others() -> None:
    """Max-min fairness: a copy limited to BW/4 by its destination's writes takes only BW/4 of the source's
    reads, and a read sharing that source gets the remaining 3/4 (not half)."""
    src, dst = local_device(read_Bps=BW, name="src"), local_device(write_Bps=BW / 4, name="dst")
    out: dict[str, float] = {}
    start = time.monotonic() + 0.05
    threads = [timed(lambda: move(Flow(reads=[src], writes=[dst]), nbytes=N // 2), out, "copy", start),
               timed(lambda: move(Flow(reads=[src])), out, "read", start)]
    for t in threads:
        t.join()
    assert near(out["copy"], (N // 2) / (BW / 4)), out
    assert near(out["read"], N / (BW * 3 / 4)), out


_CHILD = """
import sys, time
from live.pacing import Device, Flow, PaceSpec
spec = PaceSpec.from_json(sys.argv[1]); start_at = float(sys.argv[2]); nbytes = int(sys.argv[3])
flow = Flow(reads=[Device(spec)])
time.sleep(max(0.0, start_at - time.monotonic()))
t0 = time.monotonic()
for off in range(0, nbytes, 256 << 10):
    flow.acquire(min(256 << 10, nbytes - off))
print(time.monotonic() - t0)
"""


def test_two_processes_share_one_tier_through_its_state_file(tmp_path: Path) -> None:
    """An engine process and the agent's copy reading one tier: time.monotonic() is system-wide."""
    spec = PaceSpec(str(state_path_in(tmp_path)), read_Bps=BW, name="sata")
    Device(spec).reset()
    start = time.monotonic() + 1.0  # the child's interpreter start is not part of the race
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, spec.to_json(), repr(start), str(N)],
                             stdout=subprocess.PIPE, env=env, text=True)
    out: dict[str, float] = {}
    timed(lambda: move(Flow(reads=[Device(spec)])), out, "here", start).join()
    stdout, _ = child.communicate(timeout=30)
    there = float(stdout.strip())
    assert near(out["here"], 2 * N / BW) and near(there, 2 * N / BW), (out, there)


# ------------------------------------------------------------------------------------------ tier copies


def _tier(tmp_path: Path, name: str, read_Bps: float | None, write_Bps: float | None) -> Tier:
    return Tier(TierConfig(name, tmp_path / name, 1 << 30, read_Bps, write_Bps))


@pytest.mark.parametrize(("read_Bps", "write_Bps"), [(2 * BW, BW), (BW, 2 * BW)])
def test_copy_runs_at_the_slower_of_source_read_and_destination_write(
        tmp_path: Path, read_Bps: float, write_Bps: float) -> None:
    src, dst = _tier(tmp_path, "sata", read_Bps, None), _tier(tmp_path, "nvme", None, write_Bps)
    data = os.urandom(N)
    (src.path / "m").mkdir()
    (src.path / "m" / "w.bin").write_bytes(data)
    (dst.path / "m").mkdir()
    t0 = time.monotonic()
    assert parallel_copy_files(src.path / "m", dst.path / "m", ["w.bin"], 4, chunk_bytes=CHUNK,
                               pace=copy_flow(src, dst)) == N
    elapsed = time.monotonic() - t0
    assert near(elapsed, N / min(read_Bps, write_Bps)), elapsed
    assert (dst.path / "m" / "w.bin").read_bytes() == data
    # the state file is hidden and not counted as content
    assert sorted(os.listdir(src.path)) == [PACE_FILE, "m"] and src.models() == {"m": N} and src.used_bytes() == N


# ------------------------------------------------------------------------------------------ cloud fetch


@pytest.fixture
def published(tmp_path: Path) -> tuple[Registry, int]:
    model = tmp_path / "src"
    model.mkdir()
    save_file({"w": np.frombuffer(os.urandom(3 * N // 2), dtype=np.float32)}, model / "model.safetensors")
    (model / "config.json").write_text('{"x": 1}')
    reg = Registry([(tmp_path / "cloud").as_uri()])
    return reg, reg.publish("m", model).total_bytes


def test_cloud_fetch_takes_bytes_over_streams_times_stream_bandwidth_plus_latency(
        tmp_path: Path, published: tuple[Registry, int]) -> None:
    reg, total = published
    streams, stream_Bps, latency_s = 4, BW / 4, 0.25
    t0 = time.monotonic()
    reg.fetch("m", tmp_path / "dest", streams=streams, pace=CloudPace(stream_Bps, latency_s))
    elapsed = time.monotonic() - t0
    assert near(elapsed, total / (streams * stream_Bps) + latency_s), elapsed
    # one stream alone is streams times slower: the per-stream bandwidth is per stream
    t0 = time.monotonic()
    reg.fetch("m", tmp_path / "one", streams=1, pace=CloudPace(stream_Bps * 2, 0.0))
    assert near(time.monotonic() - t0, total / (stream_Bps * 2))


def test_cloud_fetch_writes_at_the_destination_write_bandwidth(
        tmp_path: Path, published: tuple[Registry, int]) -> None:
    reg, total = published
    sata = _tier(tmp_path, "sata", None, BW)
    t0 = time.monotonic()
    reg.fetch("m", sata.model_dir("m"), streams=8, pace=CloudPace(BW, 0.0, sata.device))  # 8 x BW of streams
    assert near(time.monotonic() - t0, total / BW)


def test_concurrent_fetches_share_the_nic_and_a_fetch_into_host_memory_writes_unpaced(
        tmp_path: Path, published: tuple[Registry, int]) -> None:
    reg, total = published
    nic = local_device(write_Bps=BW, name="nic")
    pace = CloudPace(None, 0.0, None, None, nic)  # streams unpaced, no destination tier: the NIC alone
    assert [(d.spec.name, link) for d, link in pace.write_flow().links] == [("nic", 1)]
    t0 = time.monotonic()
    reg.fetch("m", tmp_path / "alone", streams=8, pace=pace)
    assert near(time.monotonic() - t0, total / BW)
    out: dict[str, float] = {}
    start_at = time.monotonic() + 0.05
    threads = [timed(lambda k=k: reg.fetch("m", tmp_path / k, streams=8, pace=pace), out, k, start_at)
               for k in ("a", "b")]
    for t in threads:
        t.join()
    assert all(near(out[k], 2 * total / BW) for k in ("a", "b")), out  # one NIC: half each


def test_cancelled_fetch_leaves_nothing(tmp_path: Path, published: tuple[Registry, int]) -> None:
    reg, _total = published
    sata = _tier(tmp_path, "sata", None, None)
    cancel = threading.Event()
    threading.Timer(0.2, cancel.set).start()
    with pytest.raises(TransferCancelled):
        reg.fetch("m", sata.model_dir("m"), streams=2, pace=CloudPace(1e5, 0.0, sata.device, cancel))
    assert os.listdir(sata.path) == []
