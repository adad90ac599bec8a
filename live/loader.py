"""Parallel, progressive loader of a checkpoint's weights from a storage tier into host memory.

The weights are one `model.safetensors` or the shards named by `model.safetensors.index.json`
(`live.shards`). Every file is read into one preallocated, 4 KiB-aligned host buffer (each file at
an aligned offset, the files one after the other) by `n_threads` threads,
each issuing `os.preadv` of `chunk_bytes` (16 MiB) at a time, in file order, with O_DIRECT where
the filesystem allows it (it bypasses the page cache, whose single-threaded readahead is what
limits a plain sequential read) and buffered reads where it does not (tmpfs, some overlays).
Tensors are zero-copy views into that buffer.

Loading is progressive: the tensors form groups in forward-pass order (group 0 = embeddings +
layer 0, group i = layer i, group N = final norm + lm_head). Group i's `threading.Event` is set,
and `on_layer(i, tensors)` called, as soon as every byte up to the end of groups 0..i is resident,
so a consumer can compute layer i while later layers are still being read. On a file written in
layer order (as `live.checkpoint` writes it) that is as soon as group i itself has arrived. Sharded,
"every byte" is per shard: a group that spans shards is usable once its bytes in each are resident.

    ckpt = load("ckpt_dir")                          # blocking
    handle = start_load("ckpt_dir"); handle.wait_layer(0); ...; handle.result()   # progressive
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from live.hostbuf import ALIGN_BYTES, alloc_buffer, check_buffer, round_up
from live.manifest import Manifest, TensorRange, WeightLayout, sha256_file
from live.pacing import Flow
from live.page_cache import resident_fraction
from live.shards import ReadPlan, weights_location

DEFAULT_CHUNK_BYTES = 16 << 20
DEFAULT_THREADS = 8  # measured: 8 concurrent 16 MiB O_DIRECT reads saturate a virtio NVMe; more do not help
_HASH_STEP_BYTES = 64 << 20
_CACHED_FRACTION = 0.5  # above this much of the file in the page cache, buffered reads beat O_DIRECT

_TORCH_DTYPES: dict[str, torch.dtype] = {
    tag: getattr(torch, name) for tag, name in {
        "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
        "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "U16": "uint16", "U32": "uint32",
        "U64": "uint64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    }.items() if hasattr(torch, name)
}

OnLayer = Callable[[int, dict[str, torch.Tensor]], None]


class ChecksumError(ValueError):
    """A loaded file's sha256 differs from its manifest; the message names the file."""


@dataclass(frozen=True)
class LoadTiming:
    """Phases of one load, seconds from the start of the load (`start_load` / `load` call)."""

    total_s: float
    read_s: float  # until the last byte of the weights file was in host memory
    to_device_s: float  # summed host -> device copy time (0 on CPU)
    verify_s: float  # summed hashing time (overlaps the read; 0 without a manifest)
    bytes_read: int
    layer_ready_s: tuple[float, ...]  # group i (layer i; group 0 includes the embeddings) usable
    tail_ready_s: float  # final norm + lm_head usable
    n_threads: int
    chunk_bytes: int
    direct_io: bool  # every read used O_DIRECT
    device: str
    max_read_Bps: float | None = None  # the read-rate cap the load ran under (None: none)
    paced: bool = False  # the reads went through a shared `live.pacing.Flow` (an emulated tier)

    @property
    def read_bw_Bps(self) -> float:
        return self.bytes_read / self.read_s if self.read_s > 0 else float("inf")

    @property
    def load_bw_Bps(self) -> float:
        return self.bytes_read / self.total_s if self.total_s > 0 else float("inf")


@dataclass
class LoadedCheckpoint:
    """A loaded weights file: tensors by HF name (file order), its layout, config.json, timings."""

    path: Path
    layout: WeightLayout
    tensors: dict[str, torch.Tensor]
    config: dict | None
    timing: LoadTiming
    buffer: np.ndarray | None  # host memory the tensors view (None when they were moved to a device)

    @property
    def n_layers(self) -> int:
        return self.layout.n_layers

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        """Tensors of transformer layer i (without the embeddings)."""
        return {name: self.tensors[name] for name in self.layout.layers[i].names}


def default_device() -> str:
    """"cuda" when a GPU is usable, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _groups(layout: WeightLayout) -> list[tuple[TensorRange, ...]]:
    """Dispatch groups: embeddings + layer 0, layers 1..N-1, then the tail."""
    if not layout.layers:
        return [layout.head.tensors, layout.tail.tensors]
    first = tuple(sorted(layout.head.tensors + layout.layers[0].tensors, key=layout.position))
    return [first, *(g.tensors for g in layout.layers[1:]), layout.tail.tensors]


class ProgressiveLoad:
    """A load in progress: per-group readiness events, waits, and the final result.

    `ready[i]` is set when group i is usable (i < n_layers: layer i, group 0 also holding the
    embeddings; i == n_layers: final norm + lm_head). With a manifest, groups become usable as their
    bytes arrive, before the files' sha256 are known; `result()` returns only after the check passed
    and raises ChecksumError otherwise, as does every wait once the check has failed. `path` is the
    weights file, or the checkpoint dir of a sharded one.
    """

    def __init__(self, path: Path, *, on_layer: OnLayer | None, device: str | torch.device | None,
                 manifest: Manifest | None, n_threads: int, chunk_bytes: int, direct_io: bool | None,
                 buffer: np.ndarray | None = None, max_read_Bps: float | None = None,
                 pace: Flow | None = None) -> None:
        self._t0 = time.perf_counter()
        if n_threads < 1 or chunk_bytes < 1:
            raise ValueError(f"n_threads ({n_threads}) and chunk_bytes ({chunk_bytes}) must be >= 1")
        if max_read_Bps is not None and not max_read_Bps > 0:
            raise ValueError(f"max_read_Bps must be > 0 (or None for no cap), got {max_read_Bps}")
        self._max_read_Bps = max_read_Bps
        self._pace = pace if pace is not None and pace.paced else None
        directory, self.layout = weights_location(path)
        files = self.layout.weight_files
        self.path = directory / files[0].name if not self.layout.shards else directory
        self._paths = [directory / f.name for f in files]
        self._file_index = {f.name: k for k, f in enumerate(files)}
        self.n_layers = self.layout.n_layers
        self._groups = _groups(self.layout)
        self.ready: tuple[threading.Event, ...] = tuple(threading.Event() for _ in self._groups)
        self._on_layer = on_layer
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self._manifest = manifest
        self._expected_sha256 = self._check_manifest(manifest) if manifest is not None else None
        self._n_threads = n_threads
        self._chunk_bytes = chunk_bytes
        self._plan = ReadPlan([f.size_bytes for f in files], chunk_bytes, ALIGN_BYTES)
        self._size = self._plan.total_bytes
        self._n_chunks = self._plan.n_chunks

        # the host buffer and one uint8 tensor over it; every tensor is a view of a slice of it
        if buffer is None:
            self._buf: np.ndarray | None = alloc_buffer(self._plan.buffer_bytes, pinned=self._device.type == "cuda")
        else:
            self._buf = check_buffer(buffer, self._plan.buffer_bytes, self.path)
        self._mv = memoryview(self._buf)
        self._host = torch.from_numpy(self._buf[:self._plan.buffer_bytes])

        self._fds: list[int] = []
        self._direct_fds: list[int] | None = None  # None once direct reads are off, for this load
        self._opened_direct_fds: list[int] = []  # closed at the end even if reads fell back
        try:
            self._open_files(direct_io, chunk_bytes)
        except BaseException:
            self._close_files()
            raise
        self._all_direct = self._direct_fds is not None

        # shared state, guarded by _cond
        self._cond = threading.Condition()
        self._next_chunk = 0
        self.bytes_resident = 0  # bytes of the weights in the buffer (per file, a prefix of it)
        self._read_end_s: float | None = None
        self._error: BaseException | None = None
        self._verified = manifest is None
        self._verify_s = 0.0
        self._to_device_s = 0.0
        self._group_ready_s: list[float] = []
        self._tensors: dict[str, torch.Tensor] = {}
        self._result: LoadedCheckpoint | None = None
        self._finished = threading.Event()

        self._workers = [threading.Thread(target=self._worker, name=f"tierlab-read-{k}", daemon=True)
                         for k in range(min(n_threads, max(self._n_chunks, 1)))]
        self._hasher = threading.Thread(target=self._hash, name="tierlab-hash", daemon=True) if manifest else None
        self._dispatcher = threading.Thread(target=self._dispatch, name="tierlab-dispatch", daemon=True)
        for t in self._workers:
            t.start()
        if self._hasher:
            self._hasher.start()
        self._dispatcher.start()

    # ------------------------------------------------------------ public

    def wait_layer(self, i: int, timeout: float | None = None) -> dict[str, torch.Tensor]:
        """Block until layer i is usable; its tensors (for i == 0 also the embeddings)."""
        if not 0 <= i < len(self._groups) - 1:
            raise IndexError(f"layer {i} out of range: {self.path} has {self.n_layers} layers")
        return self._wait_group(i, timeout)

    def wait_tail(self, timeout: float | None = None) -> dict[str, torch.Tensor]:
        """Block until the final norm and lm_head are usable; their tensors."""
        return self._wait_group(len(self._groups) - 1, timeout)

    def result(self, timeout: float | None = None) -> LoadedCheckpoint:
        """Block until the load finished (and verified); raises the load's error, if any."""
        if not self._finished.wait(timeout):
            raise TimeoutError(f"{self.path}: load not finished after {timeout} s")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def done(self) -> bool:
        return self._finished.is_set()

    # ------------------------------------------------------------ internals

    def _open_files(self, direct_io: bool | None, chunk_bytes: int) -> None:
        """Open every weights file; also with O_DIRECT where asked (or, auto, the files are mostly uncached)."""
        self._fds = [os.open(p, os.O_RDONLY) for p in self._paths]
        if direct_io is None:  # auto: bypass the page cache unless the files are mostly in it already
            cached = sum(resident_fraction(p) * max(n, 1) for p, n in zip(self._paths, self._plan.sizes, strict=True))
            direct_io = cached / sum(max(n, 1) for n in self._plan.sizes) < _CACHED_FRACTION
        if direct_io and chunk_bytes % ALIGN_BYTES == 0 and self._buf.ctypes.data % ALIGN_BYTES == 0 \
                and hasattr(os, "O_DIRECT"):
            try:
                for p in self._paths:
                    self._opened_direct_fds.append(os.open(p, os.O_RDONLY | os.O_DIRECT))
                self._direct_fds = list(self._opened_direct_fds)
            except OSError:  # EINVAL on tmpfs and friends: buffered reads it is
                self._direct_fds = None

    def _close_files(self) -> None:
        for fd in self._fds + self._opened_direct_fds:
            os.close(fd)
        self._fds, self._opened_direct_fds = [], []

    def _check_manifest(self, manifest: Manifest) -> dict[str, str]:
        """Expected sha256 per weights file; a file not listed or of another size raises, naming it."""
        expected = {}
        for path, f in zip(self._paths, self.layout.weight_files, strict=True):
            try:
                entry = manifest.file(f.name)
            except KeyError as e:
                raise ValueError(f"{path}: not listed in the manifest of {manifest.model}") from e
            if entry.size_bytes != f.size_bytes:
                raise ChecksumError(f"{path}: size {f.size_bytes} bytes, manifest of {manifest.model} "
                                    f"says {entry.size_bytes}")
            expected[f.name] = entry.sha256
        return expected

    def _wait_group(self, i: int, timeout: float | None) -> dict[str, torch.Tensor]:
        if not self.ready[i].wait(timeout):
            raise TimeoutError(f"{self.path}: group {i} not ready after {timeout} s")
        if self._error is not None:
            raise self._error
        return {t.name: self._tensors[t.name] for t in self._groups[i]}

    def _fail(self, exc: BaseException) -> None:
        with self._cond:
            if self._error is None:
                self._error = exc
            self._cond.notify_all()

    def _worker(self) -> None:
        while True:
            with self._cond:
                if self._error is not None or self._next_chunk >= self._n_chunks:
                    return
                k = self._next_chunk
                self._next_chunk += 1
            try:
                if self._pace is not None:
                    # an emulated tier shared with other readers and copies (other processes too):
                    # the chunk's bytes are booked on the tier's read link before they are read
                    _f, a, b = self._plan.chunks[k]
                    self._pace.acquire(b - a, stop=lambda: self._error is not None)
                self._read_chunk(k)
                if self._max_read_Bps is not None:
                    # an emulated slower tier: chunk k may not complete before its last byte is due
                    # (a wait, not a sleep, so that another reader's failure ends it at once)
                    due_s = self._plan.global_end(k) / self._max_read_Bps
                    with self._cond:
                        self._cond.wait_for(lambda: self._error is not None,
                                            timeout=max(0.0, self._t0 + due_s - time.perf_counter()))
            except BaseException as e:
                self._fail(e)
                return
            with self._cond:
                if self._plan.complete(k):
                    self.bytes_resident = self._plan.resident_bytes
                    if self._plan.all_done():
                        self._read_end_s = time.perf_counter() - self._t0
                    self._cond.notify_all()

    def _read_chunk(self, k: int) -> None:
        f, pos, end = self._plan.chunks[k]
        base = self._plan.bases[f]
        while pos < end:
            direct_fds = self._direct_fds
            if direct_fds is not None and pos % ALIGN_BYTES == 0:
                # the file's slot extends to the next alignment boundary, so the last read may ask past EOF
                try:
                    n = os.preadv(direct_fds[f], [self._mv[base + pos:base + round_up(end, ALIGN_BYTES)]], pos)
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    self._direct_fds = None  # opened, but the filesystem refuses direct reads: stay buffered
                    self._all_direct = False
                    continue
            else:
                self._all_direct = False
                n = os.preadv(self._fds[f], [self._mv[base + pos:base + end]], pos)
            if n == 0:
                raise OSError(errno.EIO, f"file ended at byte {pos} of {self._plan.sizes[f]} (truncated while "
                              "loading?)", str(self._paths[f]))
            pos += n

    def _hash_file(self, f: int) -> str | None:
        """sha256 of weights file f, hashed as its prefix becomes resident; None if the load failed meanwhile."""
        h = hashlib.sha256()
        hashed, size, base = 0, self._plan.sizes[f], self._plan.bases[f]
        while hashed < size:
            with self._cond:
                self._cond.wait_for(lambda h=hashed: self._plan.resident[f] > h or self._error is not None)
                if self._error is not None:
                    return None
                upto = self._plan.resident[f]
            t = time.perf_counter()
            while hashed < upto:  # hashlib releases the GIL on large updates: this overlaps the reads
                step = min(upto, hashed + _HASH_STEP_BYTES)
                h.update(self._mv[base + hashed:base + step])
                hashed = step
            self._verify_s += time.perf_counter() - t
        return h.hexdigest()

    def _hash(self) -> None:
        try:
            for f, (path, entry) in enumerate(zip(self._paths, self.layout.weight_files, strict=True)):
                digest = self._hash_file(f)
                if digest is None:
                    return
                if digest != self._expected_sha256[entry.name]:
                    raise ChecksumError(f"{path}: sha256 {digest} does not match the manifest of "
                                        f"{self._manifest.model} ({self._expected_sha256[entry.name]})")
            t = time.perf_counter()
            directory = self._paths[0].parent
            for entry in self._manifest.files:  # the small files beside the weights: config, tokenizer, index
                if entry.name in self._file_index:
                    continue
                other = directory / entry.name
                if not other.is_file():
                    raise FileNotFoundError(f"{other}: listed in the manifest of {self._manifest.model} but missing")
                if other.stat().st_size != entry.size_bytes or sha256_file(other) != entry.sha256:
                    raise ChecksumError(f"{other}: size or sha256 does not match the manifest of "
                                        f"{self._manifest.model}")
            self._verify_s += time.perf_counter() - t
        except BaseException as e:
            self._fail(e)
            return
        with self._cond:
            self._verified = True
            self._cond.notify_all()

    def _views(self, tensors: tuple[TensorRange, ...]) -> dict[str, torch.Tensor]:
        out = {}
        for t in tensors:
            dtype = _TORCH_DTYPES.get(t.dtype)
            if dtype is None:
                raise ValueError(f"{self.path}: tensor {t.name} has unsupported dtype {t.dtype}")
            base = self._plan.bases[self._file_index[t.file]]
            raw = self._host[base + t.start_byte:base + t.end_byte]
            itemsize = torch.empty((), dtype=dtype).element_size()
            if t.start_byte % itemsize == 0:
                out[t.name] = raw.view(dtype).reshape(t.shape)
            else:  # misaligned for its dtype (not in files we write): copy rather than fail
                x = torch.empty(t.shape, dtype=dtype)
                x.view(-1).view(torch.uint8).copy_(raw)
                out[t.name] = x
        return out

    def _dispatch(self) -> None:
        try:
            for i, group in enumerate(self._groups):
                # every byte of the group, in each file it spans (earlier groups were released before it)
                need = [(self._file_index[t.file], t.end_byte) for t in group]
                with self._cond:
                    self._cond.wait_for(lambda need=need: self._plan.holds(need) or self._error is not None)
                    if self._error is not None:
                        break
                tensors = self._views(group)
                if self._device.type != "cpu":
                    t = time.perf_counter()
                    tensors = {k: v.to(self._device, non_blocking=True) for k, v in tensors.items()}
                    if self._device.type == "cuda":
                        torch.cuda.synchronize(self._device)
                    self._to_device_s += time.perf_counter() - t
                self._tensors.update(tensors)
                self._group_ready_s.append(time.perf_counter() - self._t0)
                self.ready[i].set()
                if self._on_layer is not None:
                    self._on_layer(i, tensors)
            with self._cond:
                self._cond.wait_for(lambda: (self._read_end_s is not None and self._verified)
                                    or self._error is not None)
        except BaseException as e:
            self._fail(e)
        for w in self._workers:
            w.join()
        if self._hasher:
            self._hasher.join()
        self._close_files()
        if self._error is None:
            self._result = self._build_result()
        else:  # nothing of a failed load is handed out; free the buffer
            self._tensors = {}
        self._buf = self._mv = self._host = None  # type: ignore[assignment]
        for e in self.ready:
            e.set()  # wake waiters; they see the error
        self._finished.set()

    def _build_result(self) -> LoadedCheckpoint:
        config_path = self._paths[0].parent / "config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else None
        ready = self._group_ready_s
        timing = LoadTiming(
            total_s=time.perf_counter() - self._t0, read_s=self._read_end_s or 0.0, to_device_s=self._to_device_s,
            verify_s=self._verify_s, bytes_read=self._size, layer_ready_s=tuple(ready[:-1]), tail_ready_s=ready[-1],
            n_threads=self._n_threads, chunk_bytes=self._chunk_bytes, direct_io=self._all_direct,
            device=str(self._device), max_read_Bps=self._max_read_Bps, paced=self._pace is not None)
        order = {t.name: self.layout.position(t) for t in self.layout.tensors()}
        tensors = dict(sorted(self._tensors.items(), key=lambda kv: order[kv[0]]))
        return LoadedCheckpoint(path=self.path, layout=self.layout, tensors=tensors, config=config, timing=timing,
                                buffer=self._buf if self._device.type == "cpu" else None)


def start_load(path: str | os.PathLike, *, on_layer: OnLayer | None = None, device: str | torch.device | None = None,
               manifest: Manifest | None = None, n_threads: int = DEFAULT_THREADS,
               chunk_bytes: int = DEFAULT_CHUNK_BYTES, direct_io: bool | None = None,
               buffer: np.ndarray | None = None, max_read_Bps: float | None = None,
               pace: Flow | None = None) -> ProgressiveLoad:
    """Start loading a checkpoint dir's weights (its `model.safetensors`, or its shards) in the background.

    `path`: a checkpoint dir, a .safetensors file, or a `model.safetensors.index.json`.
    `device`: None or "cpu" keeps the tensors in host memory; any other torch device gets each group
    copied there before its event fires. `direct_io`: None uses O_DIRECT unless the file is mostly in
    the page cache already, True always tries it; both fall back silently where the filesystem
    refuses it; False never uses it. `buffer`: host memory to load into (from `alloc_buffer`, reused
    across loads to skip page faults and pinning); the returned tensors view it. `max_read_Bps`: off
    (None) by default; a number caps the read so that byte b is not in memory before b / max_read_Bps
    seconds, emulating a slower tier (SATA, a cloud store) on a fast disk, at chunk granularity.
    `pace`: a `live.pacing.Flow` over the tier's read link, shared with every other reader and copy
    of that tier (other processes included); each chunk is booked on it before it is read.

    Errors found before reading (missing file or shard, bad header, truncated shard, index not matching
    the shards, size differing from the manifest) raise here; later ones from `result()` and the waits.
    """
    return ProgressiveLoad(Path(path), on_layer=on_layer, device=device, manifest=manifest,
                           n_threads=n_threads, chunk_bytes=chunk_bytes, direct_io=direct_io, buffer=buffer,
                           max_read_Bps=max_read_Bps, pace=pace)


def load(path: str | os.PathLike, *, on_layer: OnLayer | None = None, device: str | torch.device | None = None,
         manifest: Manifest | None = None, n_threads: int = DEFAULT_THREADS, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
         direct_io: bool | None = None, buffer: np.ndarray | None = None,
         max_read_Bps: float | None = None, pace: Flow | None = None) -> LoadedCheckpoint:
    """Load a checkpoint's weights, blocking; `on_layer(i, tensors)` is called per group in order as it arrives.

    With a manifest, the weights' sha256 (computed per file while reading) and the other listed files are
    checked; a mismatch raises ChecksumError naming the file and nothing is returned.
    """
    return start_load(path, on_layer=on_layer, device=device, manifest=manifest, n_threads=n_threads,
                      chunk_bytes=chunk_bytes, direct_io=direct_io, buffer=buffer, max_read_Bps=max_read_Bps,
                      pace=pace).result()
