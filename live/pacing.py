"""Bandwidth pacing of emulated storage devices, shared by every process that reads or writes them.

On one machine the "dram", "nvme" and "sata" tiers are directories on one disk, so they load at
the same speed. The simulator gives each tier a read and a write bandwidth (a link each), shares a
link max-min fairly among the flows crossing it, and adds a first-byte latency per hop. This
module makes the live runtime honour the same model:

- a `Device` is one emulated tier: a read link and a write link, each a virtual-time queue kept
  in a small state file inside the tier dir (`<tier>/.tierlab-pace`) and guarded by `fcntl.flock`,
  so the agent's copy threads and the engine processes reading the same tier share it.
  `time.monotonic()` is system-wide on Linux, hence comparable across processes.
- a `Flow` is one transfer (a tier-to-tier copy, a cloud fetch's writes, an engine's weight read):
  it books turns on every link it crosses (a link's turn: `QUANTUM_S` worth of its bytes, at most
  1 MiB), one turn per link at a time, so N concurrent flows on a link each get 1/N of it however
  many threads each flow uses (the simulator's per-flow fairness). A flow crossing two links
  (a copy: source read + destination write) books both at once, keeps neither more than a turn
  ahead of the other, and so runs at the slower one, leaving the rest of the faster to other flows.
- `PaceSpec` is a device's description; as JSON in `READ_PACE_ENV` it tells an engine process how
  to pace its read of the tier it loads from.

    dev = Device(PaceSpec("/nvme/t/.tierlab-pace", read_Bps=2e9, write_Bps=1e9, latency_s=1e-4, name="nvme"))
    flow = Flow(reads=[dev])
    for chunk in chunks:
        flow.acquire(len(chunk))   # returns once len(chunk) bytes may have been read
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

PACE_FILE = ".tierlab-pace"  # hidden like the ".tierlab-" staging dirs: never listed as a model
READ_PACE_ENV = "TIERLAB_READ_PACE"  # JSON PaceSpec of the tier an engine reads its weights from
QUANTUM_S = 0.02  # a flow's turn on a link: short enough that concurrent flows interleave finely
MIN_QUANTUM_BYTES = 4096
MAX_QUANTUM_BYTES = 1 << 20  # on fast links turns are shorter than QUANTUM_S, never coarser than this
SLACK_S = 0.005  # a flow woken this late keeps its schedule (sleep overshoot does not cost bandwidth)
_STATE = struct.Struct("<dd")  # next free time (monotonic s) of the read link, of the write link
READ, WRITE = 0, 1


class TransferCancelled(OSError):
    """A paced transfer was cancelled (its owner, e.g. the agent, is shutting down)."""


def check_Bps(value: Any, what: str) -> float | None:
    """A bandwidth in bytes/s: None or +inf means unpaced (None); 0, negative, NaN or not a number raise.

    `what` names the field in the message, e.g. "tier 'nvme' read_Bps".
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what} must be a number of bytes/s (or inf / null for unpaced), got {value!r}")
    value = float(value)
    if math.isnan(value) or value <= 0:
        raise ValueError(f"{what} must be > 0 bytes/s (or inf for unpaced), got {value!r}")
    return None if math.isinf(value) else value


def check_latency_s(value: Any, what: str) -> float:
    """A first-byte latency in seconds: finite and >= 0."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what} must be a number of seconds, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number of seconds >= 0, got {value!r}")
    return value


def sleep_until(deadline: float, stop: Callable[[], bool] | None = None) -> None:
    """Sleep until `time.monotonic()` reaches `deadline`; with `stop`, wake every QUANTUM_S to check it."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or (stop is not None and stop()):
            return
        time.sleep(min(left, QUANTUM_S) if stop is not None else left)


@dataclass(frozen=True)
class PaceSpec:
    """One emulated device: read and write bandwidth (bytes/s, None = unpaced) and first-byte latency.

    `state_path` is the shared state file (None: the state lives in this process only).
    `name` is for messages (the tier's name).
    """

    state_path: str | None = None
    read_Bps: float | None = None
    write_Bps: float | None = None
    latency_s: float = 0.0
    name: str = "device"

    def __post_init__(self) -> None:
        # frozen: normalise through object.__setattr__ (inf -> None, ints -> floats)
        object.__setattr__(self, "read_Bps", check_Bps(self.read_Bps, f"{self.name!r} read_Bps"))
        object.__setattr__(self, "write_Bps", check_Bps(self.write_Bps, f"{self.name!r} write_Bps"))
        object.__setattr__(self, "latency_s", check_latency_s(self.latency_s, f"{self.name!r} latency_s"))
        if self.state_path is not None:
            object.__setattr__(self, "state_path", os.fspath(self.state_path))

    @property
    def paced(self) -> bool:
        """True if any of the device's links is paced or it has a latency."""
        return self.read_Bps is not None or self.write_Bps is not None or self.latency_s > 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> PaceSpec:
        """Parse `to_json`'s output; ValueError naming the problem otherwise."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"pace spec is not valid JSON ({e}): {text[:200]!r}") from None
        if not isinstance(data, dict):
            raise ValueError(f"pace spec must be a JSON object, got {text[:200]!r}")
        unknown = set(data) - {"state_path", "read_Bps", "write_Bps", "latency_s", "name"}
        if unknown:
            raise ValueError(f"pace spec has unknown field(s) {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, var: str = READ_PACE_ENV) -> PaceSpec | None:
        """The spec in `var` of `environ` (default os.environ); None when it is unset or empty."""
        text = (os.environ if environ is None else environ).get(var, "").strip()
        return cls.from_json(text) if text else None


class Device:
    """The two links (read, write) of one emulated device, as virtual-time queues.

    `reserve(link, nbytes)` books the slot [max(now, next_free), + nbytes / bandwidth) on that link
    and returns its end; the caller sleeps until then. Across processes the next-free times live in
    `spec.state_path` (16 bytes, `flock`-guarded); within a process a lock serialises threads too
    (flock locks belong to the open file, which this process's threads share).
    """

    def __init__(self, spec: PaceSpec) -> None:
        self.spec = spec
        self._lock = threading.Lock()
        self._local = [0.0, 0.0]  # next free times when there is no state file
        self._fd: int | None = None

    def __repr__(self) -> str:
        return f"Device({self.spec!r})"

    def bandwidth_Bps(self, link: int) -> float | None:
        return self.spec.read_Bps if link == READ else self.spec.write_Bps

    def reset(self) -> None:
        """Forget every reservation (a fresh agent owns its tiers; stale times from an earlier boot go)."""
        with self._lock:
            self._local = [0.0, 0.0]
            if self.spec.state_path is not None and self.spec.paced:
                fd = self._state_fd()
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    os.pwrite(fd, _STATE.pack(0.0, 0.0), 0)
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)

    def reserve(self, link: int, nbytes: int) -> float:
        """Book `nbytes` on `link` (READ or WRITE); the monotonic time the slot ends (now when unpaced)."""
        now = time.monotonic()
        bw = self.bandwidth_Bps(link)
        if bw is None or nbytes <= 0:
            return now
        duration_s = nbytes / bw
        with self._lock:
            if self.spec.state_path is None:
                end = max(now - SLACK_S, self._local[link]) + duration_s
                self._local[link] = end
                return end
            fd = self._state_fd()
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                raw = os.pread(fd, _STATE.size, 0)
                state = list(_STATE.unpack(raw)) if len(raw) == _STATE.size else [0.0, 0.0]
                end = max(now - SLACK_S, state[link]) + duration_s
                state[link] = end
                os.pwrite(fd, _STATE.pack(*state), 0)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
            return end

    def next_free(self, link: int) -> float:
        """The monotonic time the bookings on `link` end (in the past while it is idle); the state file is read
        without its flock (a snapshot for metrics)."""
        with self._lock:
            if self.spec.state_path is None or not self.spec.paced:
                return self._local[link]
            raw = os.pread(self._state_fd(), _STATE.size, 0)
        return _STATE.unpack(raw)[link] if len(raw) == _STATE.size else 0.0

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _state_fd(self) -> int:
        if self._fd is None:
            assert self.spec.state_path is not None
            self._fd = os.open(self.spec.state_path, os.O_RDWR | os.O_CREAT, 0o644)
        return self._fd


class FifoLock:
    """A mutex granted in the order it was asked for (a ticket lock)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next_ticket = 0
        self._serving = 0

    def __enter__(self) -> FifoLock:
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._cond.wait_for(lambda: self._serving == ticket)
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()


def local_device(read_Bps: float | None = None, write_Bps: float | None = None, latency_s: float = 0.0,
                 name: str = "device") -> Device:
    """A device whose state lives in this process only (a cloud stream, a test)."""
    return Device(PaceSpec(None, read_Bps, write_Bps, latency_s, name))


def quantum_bytes(bw_Bps: float) -> int:
    """The booking unit of a link: QUANTUM_S worth of bytes, within [MIN_QUANTUM_BYTES, MAX_QUANTUM_BYTES].

    A property of the link alone, so that every flow on it (in any process) books equal turns.
    """
    return int(min(MAX_QUANTUM_BYTES, max(MIN_QUANTUM_BYTES, bw_Bps * QUANTUM_S)))


class Flow:
    """One transfer: reads from `reads`, writes to `writes`; `acquire(n)` returns once n more bytes may move.

    On each link the flow books turns of the link's quantum, one at a time (its next turn once the
    previous one ended), so concurrent flows on a link alternate: equal shares per flow, not per
    thread. A flow crossing several links books no link more than one quantum ahead of its slowest
    one, so it takes from a shared link only what its bottleneck lets it use and leaves the rest to
    the other flows there: max-min fair shares, as the simulator's links give. Thread-safe: the
    threads of one transfer share its flow.

    The flow pays `latency_s` (default: the largest read latency of its devices, as the simulator's
    hop latency is its source's) once, before its first byte. Once `cancel` is set, `acquire` raises
    TransferCancelled (paced or not).
    """

    def __init__(self, reads: Sequence[Device] = (), writes: Sequence[Device] = (),
                 latency_s: float | None = None, cancel: threading.Event | None = None) -> None:
        self.cancel = cancel
        links = [(d, READ) for d in reads if d.spec.read_Bps is not None]
        links += [(d, WRITE) for d in writes if d.spec.write_Bps is not None]
        self.links = links
        self._quanta = [quantum_bytes(d.bandwidth_Bps(link) or math.inf) for d, link in links]
        if latency_s is None:
            latency_s = max((d.spec.latency_s for d in reads), default=0.0)
        self.latency_s = check_latency_s(latency_s, "flow latency_s")
        self._lock = threading.Lock()
        # FIFO, not threading.Lock: an unfair lock can pass one thread over for many turns, so that
        # the chunk it holds (say, of layer 0) arrives last and the load is no longer progressive
        self._booking = FifoLock()
        self._first_byte_at: float | None = None
        self._goal = 0  # bytes asked for so far
        self._booked = [0] * len(links)  # bytes booked on each link
        self._busy_until = [0.0] * len(links)  # end of the latest turn on each link

    @property
    def paced(self) -> bool:
        return bool(self.links) or self.latency_s > 0

    @property
    def bytes_acquired(self) -> int:
        """Bytes booked on every link of the flow."""
        return min(self._booked, default=self._goal)

    def acquire(self, nbytes: int, stop: Callable[[], bool] | None = None) -> None:
        """Block until `nbytes` more bytes may have moved over every link of the flow.

        `stop`: checked while waiting; when it returns True the wait ends early (the caller is
        abandoning the transfer, e.g. another reader failed).
        """
        self._check_cancel()
        if not self.paced:
            return
        cancel = self.cancel

        def halt() -> bool:  # the caller gives up, or the flow is cancelled
            return (cancel is not None and cancel.is_set()) or (stop is not None and stop())

        with self._lock:
            if self._first_byte_at is None:
                self._first_byte_at = time.monotonic() + self.latency_s
            first_byte_at = self._first_byte_at
        sleep_until(first_byte_at, halt)
        with self._booking:  # held while booking: the flow's other threads queue behind this chunk, in order
            self._goal += nbytes
            self._book(halt)
            end = max(self._busy_until, default=0.0)
        sleep_until(end, halt)
        self._check_cancel()

    def _book(self, halt: Callable[[], bool]) -> None:
        """Book turns on the links until each holds `_goal` bytes (caller holds `_lock`)."""
        n = len(self.links)
        while not halt():
            pending = [i for i in range(n) if self._booked[i] < self._goal]
            if not pending:
                return
            now = time.monotonic()
            lead = min(self._booked)
            for i in pending:
                # the previous turn on this link is over, and the link is not ahead of the slowest one
                if self._busy_until[i] <= now and self._booked[i] - lead < self._quanta[i]:
                    q = min(self._quanta[i], self._goal - self._booked[i])
                    dev, link = self.links[i]
                    self._busy_until[i] = dev.reserve(link, q)
                    self._booked[i] += q
            # wake at the next turn's end on a link that may book then (a link held back by the
            # coupling moves only after the slowest one books, which is among these)
            lead = min(self._booked)
            waits = [self._busy_until[i] for i in pending
                     if self._booked[i] < self._goal and self._booked[i] - lead < self._quanta[i]]
            if waits:
                sleep_until(min(waits), halt)

    def _check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise TransferCancelled("transfer cancelled (its owner is shutting down)")


@dataclass(frozen=True)
class CloudPace:
    """How a cloud fetch is paced: each of its streams at `stream_Bps` after `latency_s` to its first
    byte, and the whole fetch's bytes through the write link of `nic_device` (the node's NIC, shared
    by all its fetches, as the simulator's "nic" link; None: unpaced) and of `write_device` (the
    destination tier; None: host memory, unpaced). Once `cancel` is set the fetch raises TransferCancelled."""

    stream_Bps: float | None = None
    latency_s: float = 0.0
    write_device: Device | None = None
    cancel: threading.Event | None = None
    nic_device: Device | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stream_Bps", check_Bps(self.stream_Bps, "cloud stream_Bps"))
        object.__setattr__(self, "latency_s", check_latency_s(self.latency_s, "cloud latency_s"))

    def write_flow(self) -> Flow:
        """One flow for all of a fetch's writes (the simulator's cloud hop is one flow)."""
        writes = [d for d in (self.nic_device, self.write_device) if d is not None]
        return Flow(writes=writes, latency_s=0.0, cancel=self.cancel)


def state_path_in(directory: str | os.PathLike[str]) -> Path:
    """The pacing state file of a tier dir."""
    return Path(directory) / PACE_FILE
