"""Object-store access for checkpoints through fsspec: `file://`, `s3://`, `az://` / `abfs://`, `gs://`.

A `Store` is a root URL (scheme, bucket or container, optional prefix) plus an fsspec filesystem;
keys are posix paths relative to that root. Uploads never expose a partial object to readers, and
downloads never leave a partial file at the target path: they go through a temp file that is
fsynced and renamed into place.

    store = open_store("s3://bucket/models", {"endpoint_url": "http://127.0.0.1:5000"})
    store.put_dir("ckpt/", "llama-tiny")
    store.get_file("llama-tiny/model.safetensors", "out/model.safetensors", streams=16)

Backends: `s3fs` for s3, `adlfs` for az/abfs, `gcsfs` for gs (each imported by fsspec on first use).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import fsspec

from live.fsutil import fsync_dir as _fsync_dir
from live.pacing import CloudPace, TransferCancelled, sleep_until

DEFAULT_CHUNK_BYTES = 8 << 20
DEFAULT_STREAMS = 8
TMP_PREFIX = ".tierlab-tmp-"  # temp keys and files start with this; `list` hides them
_COPY_BUF_BYTES = 4 << 20

# Timeouts, so that a store that is down costs a load about a second, not one 30-60 s try per request
# (`live.store_health` then skips it for a while). Each store gets two clients:
# - metadata (manifests, aliases, sizes, existence: small objects on every load's path): connect 1 s, read 1 s,
#   one attempt. A healthy store answers a small GET in milliseconds to ~100 ms, so 1 s of silence means it is
#   down or hung; retrying it would only delay the switch, and the next store is the retry.
# - data (ranged checkpoint reads, uploads, listings): connect 1 s, read 15 s, two attempts at each level
#   (botocore, s3fs). The read timeout bounds the wait for the *next bytes* on the socket (aiohttp's sock_read),
#   not a whole request, so a slow but flowing 8 MiB range never trips it; 15 s is s3fs's own default, long
#   enough for a loaded store's first byte or a large upload's commit, and a store that stalls mid-fetch
#   still fails over in under a minute.
# A connect timeout of 1 s is ~10x a cross-region TCP handshake; refused connections fail at once anyway.
# Options given for a store (s3 `config_kwargs`, az `connection_timeout` / `read_timeout`) override these.
CONNECT_TIMEOUT_S = 1.0
META_READ_TIMEOUT_S = 1.0
DATA_READ_TIMEOUT_S = 15.0
_META_ATTEMPTS = 1
_DATA_ATTEMPTS = 2

# Object stores whose single-object PUT is atomic (S3 PUT / multipart complete, Azure block-list
# commit, GCS upload finalize): readers see the old object or the whole new one, never a prefix.
# There, an extra temp key + server-side copy would only double the bytes written.
_ATOMIC_PUT = frozenset({"s3", "s3a", "az", "abfs", "abfss", "gs", "gcs"})
_PROTOCOLS = frozenset({"file", "local"}) | _ATOMIC_PUT


class StoreError(OSError):
    """A store operation failed; the message names the store URL and the key."""


@dataclass(frozen=True)
class ObjectInfo:
    """One object of a listing: its size and when it was last written (unix seconds; 0.0 if unknown)."""

    size_bytes: int
    modified_unix: float


def _modified_unix(info: Mapping[str, Any]) -> float:
    """An fsspec info dict's last-modified time: local `mtime`, s3fs `LastModified`, adlfs `last_modified`,
    gcsfs `updated` (each backend spells it its own way)."""
    for field_name in ("mtime", "LastModified", "last_modified", "updated"):
        value = info.get(field_name)
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, datetime.datetime):
            return value.timestamp()
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return 0.0


def _translate_options(protocol: str, options: Mapping[str, Any], meta: bool = False) -> dict[str, Any]:
    """fsspec constructor kwargs from our options (kept thin: unknown keys pass through to the backend), with
    the metadata (`meta`) or data client's timeouts unless the options set their own."""
    opts = dict(options)
    read_timeout = META_READ_TIMEOUT_S if meta else DATA_READ_TIMEOUT_S
    if protocol in ("s3", "s3a"):
        attempts = _META_ATTEMPTS if meta else _DATA_ATTEMPTS
        # botocore's default "legacy" retries take ~6 s on a refused connection: 1 (metadata) or 2 (data) attempts
        opts["config_kwargs"] = {"connect_timeout": CONNECT_TIMEOUT_S, "read_timeout": read_timeout,
                                 "retries": {"total_max_attempts": attempts, "mode": "standard"},
                                 **(opts.get("config_kwargs") or {})}
    elif protocol in ("az", "abfs", "abfss"):
        opts.setdefault("connection_timeout", CONNECT_TIMEOUT_S)
        opts.setdefault("read_timeout", read_timeout)
    if protocol in ("s3", "s3a") and "endpoint_url" in opts:
        # s3fs takes the endpoint inside client_kwargs; accept it top-level as the brief's tests do
        client_kwargs = dict(opts.pop("client_kwargs", {}) or {})
        client_kwargs["endpoint_url"] = opts.pop("endpoint_url")
        opts["client_kwargs"] = client_kwargs
    if protocol in ("file", "local"):
        opts.setdefault("auto_mkdir", True)
    # listings caches would hide objects changed behind our back (another writer, a repair)
    if protocol not in ("file", "local"):
        opts.setdefault("use_listings_cache", False)
    opts.setdefault("skip_instance_cache", True)
    return opts


class Store:
    """One object-store root: a URL like `s3://bucket/prefix` and the fsspec filesystem that serves it."""

    def __init__(self, url: str, fs: fsspec.AbstractFileSystem, root: str, protocol: str,
                 meta_fs: fsspec.AbstractFileSystem | None = None) -> None:
        self.url = url
        self.fs = fs
        # small reads on a load's path (manifests, aliases, sizes) go through a client with short timeouts
        self.meta_fs = meta_fs if meta_fs is not None else fs
        self.root = root.rstrip("/")
        self.protocol = protocol

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    # --- keys -----------------------------------------------------------------------------------------------
    def path(self, key: str) -> str:
        """The backend path of `key`; keys are relative posix paths and may not climb out of the root."""
        parts = [p for p in key.split("/") if p not in ("", ".")]
        if not parts or ".." in parts or "\\" in key:
            raise ValueError(f"{self.url}: bad key {key!r}")
        return f"{self.root}/{'/'.join(parts)}"

    def url_of(self, key: str) -> str:
        """Full URL of `key`, for messages."""
        return f"{self.url.rstrip('/')}/{key.lstrip('/')}"

    # --- writes ---------------------------------------------------------------------------------------------
    def put_file(self, local_path: str | os.PathLike, key: str) -> None:
        """Upload one file to `key`; readers never see a partial object."""
        dst = self.path(key)
        try:
            if self.protocol in _ATOMIC_PUT:
                self.fs.put_file(os.fspath(local_path), dst)
            else:
                _local_atomic_copy(Path(local_path), Path(dst))
        except Exception as e:
            raise StoreError(f"{self.url_of(key)}: upload of {local_path} failed ({e})") from e

    def put_bytes(self, key: str, data: bytes) -> None:
        """Write `data` as `key`, atomically like `put_file`."""
        dst = self.path(key)
        try:
            if self.protocol in _ATOMIC_PUT:
                self.fs.pipe_file(dst, data)
            else:
                _local_atomic_write(Path(dst), data)
        except Exception as e:
            raise StoreError(f"{self.url_of(key)}: write failed ({e})") from e

    def put_dir(self, local_dir: str | os.PathLike, prefix: str) -> list[str]:
        """Upload every regular file under `local_dir` to `prefix/<relative path>`; returns the keys written."""
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise NotADirectoryError(f"{local_dir}: not a directory")
        keys = []
        for p in sorted(local_dir.rglob("*")):
            if p.is_file():
                key = f"{prefix.strip('/')}/{p.relative_to(local_dir).as_posix()}"
                self.put_file(p, key)
                keys.append(key)
        return keys

    def delete(self, key: str) -> None:
        """Remove `key` (a file or, recursively, a prefix); missing is not an error."""
        path = self.path(key)
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(path, recursive=True)

    # --- reads ----------------------------------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        try:
            self.meta_fs.info(self.path(key), refresh=True)
            return True
        except FileNotFoundError:
            return False

    def size(self, key: str) -> int:
        """Size of the object in bytes (FileNotFoundError if absent)."""
        info = self.meta_fs.info(self.path(key), refresh=True)
        return int(info["size"])

    def list(self, prefix: str = "") -> list[str]:
        """Keys of all objects under `prefix`, sorted, relative to the store root; temp keys hidden."""
        return sorted(self.list_detail(prefix))

    def list_detail(self, prefix: str = "", *, temps: bool = False) -> dict[str, ObjectInfo]:
        """Key -> size and last-modified time of every object under `prefix` (one listing); temp keys hidden,
        or with `temps` only the temp keys (the leftovers of interrupted atomic writes, for `gc`)."""
        base = self.path(prefix) if prefix.strip("/") else self.root
        try:
            found = self.fs.find(base, withdirs=False, detail=True)
        except FileNotFoundError:
            return {}
        root = self.fs._strip_protocol(self.root).rstrip("/") + "/"
        out = {}
        for p, info in found.items():
            p = self.fs._strip_protocol(p)
            rel = p[len(root):] if p.startswith(root) else p
            if any(part.startswith(TMP_PREFIX) for part in rel.split("/")) == temps:
                out[rel] = ObjectInfo(int(info.get("size") or 0), _modified_unix(info))
        return dict(sorted(out.items()))

    def get_bytes(self, key: str) -> bytes:
        """The whole object (a manifest, an alias: small): through the short-timeout metadata client."""
        return self.meta_fs.cat_file(self.path(key))

    def get_file(self, key: str, local_path: str | os.PathLike, streams: int = DEFAULT_STREAMS,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, size_bytes: int | None = None,
                 pace: CloudPace | None = None) -> int:
        """Download `key` to `local_path` with `streams` parallel ranged reads of `chunk_bytes`; returns bytes.

        Chunks land in a temp file beside `local_path`, which is fsynced and renamed into place; on any
        error the temp file is removed and `local_path` is untouched. `size_bytes` skips the size lookup.
        `pace`: see `get_files`.
        """
        return self.get_files([(key, local_path, size_bytes)], streams=streams, chunk_bytes=chunk_bytes, pace=pace)

    def get_files(self, items: Sequence[tuple[str, str | os.PathLike, int | None]], streams: int = DEFAULT_STREAMS,
                  chunk_bytes: int = DEFAULT_CHUNK_BYTES, pace: CloudPace | None = None) -> int:
        """Download several `(key, local_path, size_bytes or None)` with one pool of `streams` ranged readers.

        The ranges of every file share the pool (largest first), so small files ride along with a large
        one. Each file goes through a temp file, fsynced and renamed into place once every range of every
        file is in; on a download error every temp file is removed and no `local_path` is touched.
        Returns the total bytes.

        `pace` emulates the cloud link: each stream waits `latency_s` before its first byte and then moves
        at most `stream_Bps`; all writes share one flow on the NIC's and the destination tier's write links.
        """
        if streams < 1 or chunk_bytes < 1:
            raise ValueError(f"streams and chunk_bytes must be >= 1, got {streams}, {chunk_bytes}")
        plans: list[tuple[str, Path, Path]] = []  # (key, local path, temp path)
        fds: list[int] = []
        ranges: list[tuple[int, int, int]] = []  # (file index, start, end)
        current = "?"
        try:
            for key, local, size in items:
                current = key
                local_path = Path(local)
                local_path.parent.mkdir(parents=True, exist_ok=True)
                tmp = local_path.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}-{local_path.name}"
                total = self.size(key) if size is None else size
                plans.append((key, local_path, tmp))
                fds.append(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
                os.ftruncate(fds[-1], total)
                ranges += [(len(fds) - 1, a, min(a + chunk_bytes, total)) for a in range(0, total, chunk_bytes)]
            ranges.sort(key=lambda r: r[1] - r[2])  # largest first: the streams finish together
            self._fetch_ranges(plans, fds, ranges, streams, pace)
            for fd, (key, _local, _tmp) in zip(fds, plans, strict=True):
                current = key
                os.fsync(fd)
            for fd in fds:
                os.close(fd)
            fds.clear()
            for key, local_path, tmp in plans:
                current = key
                os.replace(tmp, local_path)
            for parent in {local_path.parent for _key, local_path, _tmp in plans}:
                _fsync_dir(parent)  # make the renames themselves durable
            return sum(b - a for _i, a, b in ranges)
        except (StoreError, TransferCancelled):
            raise
        except Exception as e:
            raise StoreError(f"{self.url_of(current)}: download failed ({type(e).__name__}: {e})") from e
        finally:
            for fd in fds:
                os.close(fd)
            for _key, _local, tmp in plans:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()

    def _fetch_ranges(self, plans: Sequence[tuple[str, Path, Path]], fds: Sequence[int],
                      ranges: Sequence[tuple[int, int, int]], streams: int, pace: CloudPace | None) -> None:
        """Run `ranges` on `streams` reader threads (each a paced stream under `pace`); re-raise the first error."""
        write_flow = pace.write_flow() if pace is not None else None
        stream_Bps = pace.stream_Bps if pace is not None else None
        latency_s = pace.latency_s if pace is not None else 0.0
        cancel = pace.cancel if pace is not None else None
        lock = threading.Lock()
        todo = iter(ranges)
        errors: list[BaseException] = []
        failed = threading.Event()

        def halted() -> bool:
            return failed.is_set() or (cancel is not None and cancel.is_set())

        def stream() -> None:
            free_at = time.monotonic() + latency_s  # this stream's first byte
            while not failed.is_set():
                with lock:
                    job = next(todo, None)
                if job is None:
                    return
                i, a, b = job
                key = plans[i][0]
                try:
                    start = max(time.monotonic(), free_at)
                    free_at = start + ((b - a) / stream_Bps if stream_Bps is not None else 0.0)
                    data = self.fs.cat_file(self.path(key), start=a, end=b)
                    if len(data) != b - a:  # a short read means the object changed or is shorter than expected
                        raise StoreError(f"{self.url_of(key)}: range [{a}, {b}) returned {len(data)} bytes")
                    if write_flow is not None:  # the write and the stream's own pace overlap (as data arrives)
                        write_flow.acquire(b - a, stop=failed.is_set)
                    sleep_until(free_at, halted)
                    if cancel is not None and cancel.is_set():
                        raise TransferCancelled(f"{self.url_of(key)}: download cancelled")
                    os.pwrite(fds[i], data, a)
                except BaseException as e:
                    failed.set()
                    err = e
                    if not isinstance(e, StoreError | TransferCancelled):
                        err = StoreError(f"{self.url_of(key)}: range [{a}, {b}) failed ({type(e).__name__}: {e})")
                        err.__cause__ = e  # kept: store health tells "down" (timeout, refused) from bad data
                    with lock:
                        errors.append(err)
                    return

        threads = [threading.Thread(target=stream, name=f"tierlab-fetch-{k}", daemon=True)
                   for k in range(max(1, min(streams, len(ranges))))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        cancelled = [e for e in errors if isinstance(e, TransferCancelled)]
        if cancelled or errors:
            raise (cancelled or errors)[0]

    def presign(self, key: str, expires_s: int = 3600) -> str | None:
        """A time-limited HTTP(S) URL for `key`, or None where the store cannot sign (local, no credentials)."""
        if self.protocol not in _ATOMIC_PUT:
            return None
        try:
            return self.fs.sign(self.path(key), expiration=int(expires_s))
        except (NotImplementedError, AttributeError, ValueError, TypeError):
            return None


def open_store(url: str, options: Mapping[str, Any] | None = None) -> Store:
    """A `Store` for `url` (`file:///dir`, `s3://bucket/prefix`, `az://container/prefix`, `gs://bucket`).

    `options` go to the fsspec backend: for s3 `key`, `secret`, `endpoint_url` (e.g. a local moto
    server); for az/abfs `connection_string` or `account_name` + `account_key`; for gs `token`, `project`.
    """
    parts = urlsplit(url)
    protocol = parts.scheme or "file"
    if protocol not in _PROTOCOLS:
        raise ValueError(f"{url}: unsupported store scheme {protocol!r} (want one of {sorted(_PROTOCOLS)})")
    if protocol in ("file", "local"):
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"{url}: file URLs must be file:///absolute/path")
        root = str(Path(parts.path or "/").absolute())
    else:
        if not parts.netloc:
            raise ValueError(f"{url}: missing bucket / container")
        root = f"{parts.netloc}{parts.path}".rstrip("/")
    try:
        fs = fsspec.filesystem(protocol, **_translate_options(protocol, options or {}))
        meta_fs = None if protocol in ("file", "local") else \
            fsspec.filesystem(protocol, **_translate_options(protocol, options or {}, meta=True))
    except ImportError as e:
        raise ImportError(f"{url}: the fsspec backend for {protocol!r} is not installed "
                          f"(s3: s3fs, az/abfs: adlfs, gs: gcsfs) ({e})") from e
    _limit_retries(fs, _DATA_ATTEMPTS)
    if meta_fs is not None:
        _limit_retries(meta_fs, _META_ATTEMPTS)
    return Store(url.rstrip("/"), fs, root, protocol, meta_fs)


def _limit_retries(fs: fsspec.AbstractFileSystem, attempts: int) -> None:
    """Cap the backend's own retry loop, which wraps the client's: s3fs tries 5 times with back-off by default
    (5 timeouts per request against a hung store); azure-core retries connection errors 3 times, 15 s apart."""
    if hasattr(type(fs), "retries") and isinstance(getattr(fs, "retries", None), int):  # s3fs
        fs.retries = attempts
    policy = getattr(getattr(getattr(fs, "service_client", None), "_config", None), "retry_policy", None)
    if policy is not None:  # adlfs: the client's pipeline holds this very policy object, so setting it takes
        for attr in ("total_retries", "connect_retries", "read_retries"):
            if isinstance(getattr(policy, attr, None), int):
                setattr(policy, attr, attempts - 1)



@contextlib.contextmanager
def _atomic_file(dst: Path) -> Iterator[BinaryIO]:
    """A file to write that appears at `dst` only whole: temp sibling, fsync, rename, fsync the directory."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}-{dst.name}"
    try:
        with open(tmp, "xb") as fout:
            yield fout
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(tmp, dst)
        _fsync_dir(dst.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _local_atomic_copy(src: Path, dst: Path) -> None:
    """Copy so that a reader of `dst` sees the old file or the whole new one."""
    with open(src, "rb") as fin, _atomic_file(dst) as fout:
        shutil.copyfileobj(fin, fout, _COPY_BUF_BYTES)


def _local_atomic_write(dst: Path, data: bytes) -> None:
    with _atomic_file(dst) as fout:
        fout.write(data)
