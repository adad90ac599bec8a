"""Local storage tiers of one node: real directories holding `<tier_dir>/<model>/` checkpoints.

Every copy into a tier goes through a hidden staging dir inside that tier, is fsynced, checked
against the registry manifest (sha256), and only then renamed to `<tier_dir>/<model>` (atomic on
one filesystem). Capacity is enforced with reservations, so concurrent copies cannot overshoot it.

A tier may emulate a device slower than the disk under it: a read and a write bandwidth and a
first-byte latency (`live.pacing`), shared through `<tier_dir>/.tierlab-pace` by the agent's copies
and the engines reading the tier. A copy books its bytes on the source's read link and the
destination's write link at once, so it runs at the slower of the two, as the simulator's hop does.

`HostStaging` is host memory outside the tiers: a cold start from the cloud lands there, one dir per
instance, kept while the instance runs and removed with it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from live.fsutil import fsync_dir
from live.manifest import Manifest, verify
from live.pacing import PACE_FILE, Device, Flow, PaceSpec, check_Bps, check_latency_s, state_path_in
from live.registry_versions import revision_of

_SIZE_RE = re.compile(r"^(\d+)([KMGT]?)i?B?$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
STAGING_PREFIX = ".tierlab-"  # staging / eviction dirs start with this; never listed as models
# inside a model dir: the registry revision it holds (hidden, so never a checkpoint file nor a manifest entry);
# a plain name's copy whose revision is no longer the alias's is stale (`Tier.holds`)
REVISION_FILE = ".tierlab-revision"
DEFAULT_COPY_CHUNK_BYTES = 8 << 20


class TierError(RuntimeError):
    """A tier operation failed; `status` and `code` say how the HTTP layer reports it."""

    def __init__(self, message: str, status: int = 500, code: str = "tier_error") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class TierFullError(TierError):
    """Not enough free bytes in a tier for a model (HTTP 507)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 507, "insufficient_storage")


@dataclass(frozen=True)
class TierConfig:
    """One local tier: a directory, how many bytes it may hold, and the device it emulates.

    `read_Bps` / `write_Bps`: bytes/s, None (or inf) = as fast as the disk under it; `latency_s`:
    first-byte latency of a read. Bad values raise ValueError naming the tier and the field.
    """

    name: str
    path: Path
    capacity_bytes: int
    read_Bps: float | None = None
    write_Bps: float | None = None
    latency_s: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.capacity_bytes, bool) or not isinstance(self.capacity_bytes, int) \
                or self.capacity_bytes < 0:
            raise ValueError(f"tier {self.name!r} capacity_bytes must be an integer >= 0, got {self.capacity_bytes!r}")
        # frozen: normalise through object.__setattr__ (inf -> None)
        object.__setattr__(self, "read_Bps", check_Bps(self.read_Bps, f"tier {self.name!r} read_Bps"))
        object.__setattr__(self, "write_Bps", check_Bps(self.write_Bps, f"tier {self.name!r} write_Bps"))
        object.__setattr__(self, "latency_s", check_latency_s(self.latency_s, f"tier {self.name!r} latency_s"))

    def pace_spec(self) -> PaceSpec:
        """The emulated device, its state file in the tier dir."""
        return PaceSpec(str(state_path_in(Path(self.path).absolute())), self.read_Bps, self.write_Bps,
                        self.latency_s, self.name)


def dir_bytes(path: Path) -> int:
    """Total size of the regular files under `path` (0 if it does not exist)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            if name in (PACE_FILE, REVISION_FILE):  # the pacing state and revision mark are not content
                continue
            # a file may vanish while we walk (an eviction, a staging dir renamed into place)
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total



class Tier:
    """A tier directory with capacity accounting (bytes on disk + bytes reserved by copies in flight)."""

    def __init__(self, config: TierConfig) -> None:
        self.config = config
        self.name = config.name
        self.path = Path(config.path).absolute()
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._reserved_bytes = 0
        self.pace = config.pace_spec()
        self.device = Device(self.pace)
        self.device.reset()  # a fresh agent owns the tier: no reservation of an earlier run survives
        self.swept = self._sweep_staging()

    def _sweep_staging(self) -> list[str]:
        """Remove staging / eviction dirs an earlier agent left when it was killed mid-copy; their names.

        A fresh agent owns its tiers, so no copy of its own is in flight yet.
        """
        swept = []
        for entry in os.scandir(self.path):
            if entry.name.startswith(STAGING_PREFIX) and entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
                swept.append(entry.name)
        return sorted(swept)

    def pace_json(self) -> dict[str, float | None]:
        """The emulated device for /status: bandwidths in bytes/s and latency in s (null when unpaced)."""
        return {"read_Bps": self.pace.read_Bps, "write_Bps": self.pace.write_Bps,
                "latency_s": self.pace.latency_s if self.pace.paced else None}

    def model_dir(self, model: str) -> Path:
        return self.path / model

    def holds(self, model: str, revision: str | None = None) -> bool:
        """Whether the tier has a complete copy of `model` (of `revision`, if given).

        Staging dirs are renamed into place only when complete, so a present dir is a whole checkpoint. A
        copy placed before revision marks existed (no mark) is taken to be of any revision.
        """
        if not self.model_dir(model).is_dir():
            return False
        held = self.revision(model) if revision is not None else None
        return held is None or held == revision

    def revision(self, model: str) -> str | None:
        """The registry revision of the tier's copy of `model` (None: no copy, or one placed without a mark)."""
        try:
            return (self.model_dir(model) / REVISION_FILE).read_text().strip() or None
        except (FileNotFoundError, NotADirectoryError):
            return None

    def models(self) -> dict[str, int]:
        """Model name -> bytes on disk, for every complete checkpoint in the tier."""
        out = {}
        for entry in sorted(os.scandir(self.path), key=lambda e: e.name):
            if entry.is_dir() and not entry.name.startswith(STAGING_PREFIX):
                out[entry.name] = dir_bytes(Path(entry.path))
        return out

    def used_bytes(self) -> int:
        """Bytes on disk (staging dirs included) plus bytes reserved by copies not yet written."""
        with self._lock:
            reserved = self._reserved_bytes
        return dir_bytes(self.path) + reserved

    def reserve(self, model: str, need_bytes: int) -> None:
        """Reserve `need_bytes` for a copy of `model`, or raise TierFullError naming tier, need and free bytes."""
        with self._lock:
            used = dir_bytes(self.path) + self._reserved_bytes
            free = self.config.capacity_bytes - used
            if need_bytes > free:
                raise TierFullError(
                    f"tier {self.name!r} ({self.path}) cannot take model {model!r}: need {need_bytes} bytes, "
                    f"free {max(free, 0)} bytes (capacity {self.config.capacity_bytes}, used {used})")
            self._reserved_bytes += need_bytes

    def release(self, need_bytes: int) -> None:
        with self._lock:
            self._reserved_bytes -= need_bytes

    def staging_dir(self, model: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}copy-{model}-", dir=self.path))

    def place(self, staging: Path, model: str, manifest: Manifest) -> None:
        """Verify `staging` against `manifest`, then rename it to the model dir; TierError if it does not match."""
        try:
            problems = verify(staging, manifest)
        except FileNotFoundError as e:
            problems = [str(e)]
        if problems:
            raise TierError(f"model {model!r}: copy into tier {self.name!r} does not match the manifest: "
                            + "; ".join(problems), 502, "checksum_mismatch")
        self.install(staging, model, revision_of(manifest))

    def install(self, complete: Path, model: str, revision: str) -> None:
        """Mark the verified checkpoint dir `complete` (in this tier's filesystem) as `revision` and rename it to
        the model dir: readers see the whole marked copy or none."""
        (complete / REVISION_FILE).write_text(revision + "\n")
        os.rename(complete, self.model_dir(model))  # fails (rather than merges) if the model appeared meanwhile
        fsync_dir(self.path)

    def evict(self, model: str) -> int:
        """Remove the model's dir; returns the bytes freed. Renamed away first so readers never see half a dir."""
        src = self.model_dir(model)
        if not src.is_dir():
            raise TierError(f"model {model!r} is not in tier {self.name!r}", 404, "not_in_tier")
        freed = dir_bytes(src)
        doomed = self.path / f"{STAGING_PREFIX}evict-{model}-{uuid.uuid4().hex[:8]}"
        os.rename(src, doomed)
        fsync_dir(self.path)
        shutil.rmtree(doomed, ignore_errors=True)
        return freed


HOST_PREFIX = f"{STAGING_PREFIX}host-"  # a host copy's dir: `<host_dir>/.tierlab-host-<model>-<id>`


@dataclass
class HostCopy:
    """A checkpoint fetched from the cloud into host memory for one engine instance (not a tier).

    `readers`: tier copies reading it now; `dropped`: its instance is gone, so the dir is removed as
    soon as the last reader is done.
    """

    model: str
    path: Path
    nbytes: int
    revision: str | None = None  # the registry revision fetched (a tier copy from it must be of the same)
    readers: int = 0
    dropped: bool = False


class HostStaging:
    """Host memory outside the tiers (`core.loadtime`'s "host"): where a cold start from the cloud lands.

    Each cloud load gets its own dir, read by its engine unpaced and kept while the instance runs, so
    that a copy into a tier right after the load is taken from it rather than from the cloud again (the
    simulator's `staged` copy). The agent owns every `.tierlab-` entry of `path`: leftovers of an
    earlier agent are removed at start, and everything at shutdown; no other entry is touched.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path).absolute()
        self._made = not self.path.exists()  # made by the agent: removed again at close (no litter in /dev/shm)
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._copies: dict[Path, HostCopy] = {}
        self.swept = self.clear()

    def close(self) -> None:
        """Remove every host copy (their engines are stopped), and the dir itself if the agent made it."""
        self.clear()
        if self._made:
            with contextlib.suppress(OSError):  # not empty (someone else's file) or gone already
                self.path.rmdir()

    def clear(self) -> list[str]:
        """Remove every entry the agent makes here (host copies, fetch staging dirs); their names."""
        with self._lock:
            self._copies.clear()
        if not self.path.is_dir():  # a second shutdown (server end, then serve()'s finally): already gone
            return []
        swept = []
        for entry in os.scandir(self.path):
            if entry.name.startswith(STAGING_PREFIX):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                swept.append(entry.name)
        return sorted(swept)

    def new_path(self, model: str) -> Path:
        """A fresh dir name for a host copy of `model` (not created: the registry renames its fetch there)."""
        return self.path / f"{HOST_PREFIX}{model}-{uuid.uuid4().hex[:12]}"

    def add(self, model: str, path: Path, nbytes: int, revision: str | None = None) -> HostCopy:
        """Register the complete, verified checkpoint at `path` (of registry `revision`)."""
        copy = HostCopy(model, Path(path), nbytes, revision)
        with self._lock:
            self._copies[copy.path] = copy
        return copy

    def acquire(self, model: str, revision: str | None = None) -> HostCopy | None:
        """A live host copy of `model` (of `revision`, if given), held for reading until `release` (None if
        there is none)."""
        with self._lock:
            copy = next((c for c in self._copies.values() if c.model == model and not c.dropped
                         and (revision is None or c.revision in (None, revision))), None)
            if copy is not None:
                copy.readers += 1
            return copy

    def release(self, copy: HostCopy) -> None:
        """A reader is done; the dir goes now if its instance is already gone."""
        with self._lock:
            copy.readers -= 1
            doomed = copy.dropped and copy.readers == 0
        if doomed:
            self._remove(copy)

    def drop(self, copy: HostCopy) -> None:
        """Its instance is gone (unloaded, failed): remove the dir, at once or after its last reader. Idempotent."""
        with self._lock:
            already = copy.dropped
            copy.dropped = True
            doomed = not already and copy.readers == 0
        if doomed:
            self._remove(copy)

    def discard(self, path: Path) -> None:
        """Remove `path` if it exists: a load that failed before its host copy was registered."""
        shutil.rmtree(path, ignore_errors=True)

    def _remove(self, copy: HostCopy) -> None:
        with self._lock:
            self._copies.pop(copy.path, None)
        shutil.rmtree(copy.path, ignore_errors=True)

    def used_bytes(self) -> int:
        """Bytes on disk under the host dir (host copies and fetches in flight)."""
        return dir_bytes(self.path)

    def copies(self) -> dict[str, int]:
        """Live host copies: dir name -> model bytes."""
        with self._lock:
            return {c.path.name: c.nbytes for c in self._copies.values() if not c.dropped}


def copy_flow(src: Tier, dst: Tier, cancel: threading.Event | None = None) -> Flow:
    """The flow of a tier-to-tier copy: the source's read link and the destination's write link at once."""
    return Flow(reads=[src.device], writes=[dst.device], cancel=cancel)


def parallel_copy_files(src_dir: Path, dst_dir: Path, names: list[str], streams: int,
                        chunk_bytes: int = DEFAULT_COPY_CHUNK_BYTES, pace: Flow | None = None) -> int:
    """Copy `names` from `src_dir` to `dst_dir` with `streams` threads doing chunked pread/pwrite; returns bytes.

    Each destination file is preallocated to its size and fsynced; chunks of all files share one pool,
    so a single large weights file still uses every stream. `pace` (e.g. `copy_flow(src, dst)`) books
    each chunk on the emulated devices before it moves.
    """
    if streams < 1 or chunk_bytes < 1:
        raise ValueError(f"streams and chunk_bytes must be >= 1, got {streams}, {chunk_bytes}")
    fds: list[tuple[int, int]] = []
    jobs: list[tuple[int, int, int, int]] = []  # (src fd, dst fd, offset, length)
    total = 0
    try:
        for name in names:
            src_fd = os.open(src_dir / name, os.O_RDONLY)
            try:
                (dst_dir / name).parent.mkdir(parents=True, exist_ok=True)
                dst_fd = os.open(dst_dir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except BaseException:
                os.close(src_fd)
                raise
            fds.append((src_fd, dst_fd))
            size = os.fstat(src_fd).st_size
            os.ftruncate(dst_fd, size)
            total += size
            jobs += [(src_fd, dst_fd, off, min(chunk_bytes, size - off)) for off in range(0, size, chunk_bytes)]

        def copy_chunk(job: tuple[int, int, int, int]) -> None:
            src_fd, dst_fd, off, length = job
            if pace is not None:
                pace.acquire(length, stop=failed.is_set)
                if failed.is_set():
                    return
            done = 0
            while done < length:  # pread may return fewer bytes than asked
                data = os.pread(src_fd, length - done, off + done)
                if not data:
                    raise OSError(f"short read at offset {off + done} (source shrank while copying)")
                os.pwrite(dst_fd, data, off + done)
                done += len(data)

        failed = threading.Event()  # one chunk failed: the others stop waiting for their pacing

        def guarded(job: tuple[int, int, int, int]) -> None:
            try:
                copy_chunk(job)
            except BaseException:
                failed.set()
                raise

        with ThreadPoolExecutor(max_workers=max(1, min(streams, len(jobs)))) as pool:
            for _ in pool.map(guarded, jobs):  # re-raises the first failure
                pass
        for _src_fd, dst_fd in fds:
            os.fsync(dst_fd)
    finally:
        for src_fd, dst_fd in fds:
            os.close(src_fd)
            os.close(dst_fd)
    return total


# --------------------------------------------------------------------------- command-line values


def parse_bytes(text: str) -> int:
    """'1048576', '512M', '2G', '1GiB' -> bytes (binary units)."""
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise ValueError(f"bad size {text!r}: use an integer with an optional K/M/G/T suffix")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]


def parse_tier_bw(spec: str) -> tuple[str, float | None, float | None, float]:
    """'name=READ_BPS:WRITE_BPS[:LATENCY_S]' -> (name, read_Bps, write_Bps, latency_s); 'inf' = unpaced (None).

    Bad values raise ValueError naming the tier and the field.
    """
    name, sep, rest = spec.partition("=")
    name = name.strip()
    parts = rest.split(":")
    if not sep or not name or len(parts) not in (2, 3):
        raise ValueError(f"bad --tier-bw {spec!r}: use NAME=READ_BPS:WRITE_BPS[:LATENCY_S], e.g. sata=5e8:4e8:1e-4")
    values = []
    for field_name, text in zip(("read_Bps", "write_Bps", "latency_s"), parts, strict=False):
        try:
            values.append(float(text))
        except ValueError:
            raise ValueError(f"bad --tier-bw {spec!r}: tier {name!r} {field_name} {text!r} is not a number") from None
    read_Bps = check_Bps(values[0], f"tier {name!r} read_Bps")
    write_Bps = check_Bps(values[1], f"tier {name!r} write_Bps")
    latency_s = check_latency_s(values[2] if len(values) == 3 else 0.0, f"tier {name!r} latency_s")
    return name, read_Bps, write_Bps, latency_s


def parse_tier(spec: str) -> TierConfig:
    """'name=DIR:BYTES' -> TierConfig (DIR may itself contain ':'; the size is after the last one)."""
    name, sep, rest = spec.partition("=")
    path, sep2, size = rest.rpartition(":")
    if not sep or not sep2 or not path:
        raise ValueError(f"bad tier {spec!r}: use name=DIR:BYTES, e.g. sata=/data/tierlab:100G")
    return TierConfig(name.strip(), Path(path), parse_bytes(size))
