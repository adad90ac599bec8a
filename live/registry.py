"""The model registry: a catalog of model sources, published to and fetched from object stores in priority order.

A model is published as `<name>/<file>` objects plus `<name>/tierlab_manifest.json` (sizes and sha256
from `live.manifest.build_manifest`) to every configured store, manifest last, so a reader that finds
the manifest finds every file it lists. `fetch` tries the stores in order (e.g. Azure primary, S3
backup, GCS tertiary): it downloads into a staging dir beside `dest_dir`, checks every file against
the manifest, and only then renames the staging dir to `dest_dir`. A checkpoint that fails the check
is never placed at `dest_dir`; the problem is recorded with the store URL and file, and the next
store is tried.

    reg = Registry(["az://models", "s3://backup/models"], {"s3://backup/models": {"endpoint_url": ...}})
    reg.publish("llama-tiny", "ckpt/")
    result = reg.fetch("llama-tiny", "/nvme/llama-tiny", streams=16)
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from live.manifest import MANIFEST_FILE, Manifest, build_manifest, verify
from live.pacing import CloudPace, TransferCancelled
from live.stores import DEFAULT_CHUNK_BYTES, Store, open_store

log = logging.getLogger(__name__)

# letters, digits, '.', '_', '-'; starts with a letter or digit (so never '.', '..' or a hidden name)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_STAGING_PREFIX = ".tierlab-fetch-"
_MIN_RANGE_BYTES = 256 << 10  # a model smaller than streams x chunk is split finer, down to this


class RegistryError(RuntimeError):
    """A registry operation failed; the message names the model and, per store, what went wrong."""


class ModelSourceError(RegistryError):
    """A model's source (local dir or Hugging Face snapshot) is not available."""


def check_model_name(name: str) -> str:
    """`name` if it is safe as a single path component and object key; ValueError otherwise."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise ValueError(f"unsafe model name {name!r}: use 1-128 of [A-Za-z0-9._-], starting with a letter or "
                         "digit, with no path separator and no '..'")
    return name


@dataclass(frozen=True)
class ModelSource:
    """Where a model's checkpoint comes from: a local dir, or a Hugging Face repo id at a revision."""

    name: str
    local_dir: Path | None = None
    hf_repo: str | None = None
    hf_revision: str = "main"


@dataclass(frozen=True)
class StoreFailure:
    """Why one store could not serve a model: the store URL, the file (if one), and the problem."""

    store_url: str
    file: str | None
    problem: str

    def __str__(self) -> str:
        where = f"{self.store_url}/{self.file}" if self.file else self.store_url
        return f"{where}: {self.problem}"


@dataclass(frozen=True)
class FetchResult:
    """A verified checkpoint at `path`, from `store_url`; `failures` are the stores tried before it."""

    name: str
    path: Path
    store_url: str | None
    manifest: Manifest
    failures: tuple[StoreFailure, ...] = ()
    cached: bool = False  # dest_dir already held a checkpoint matching the manifest


def hf_offline() -> bool:
    """True when HF_HUB_OFFLINE is set to a truthy value (read at call time, not at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@dataclass
class Registry:
    """Models by name, and the stores they are published to, in priority order."""

    stores: Sequence[str | Store]
    store_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    hf_cache_dir: str | os.PathLike | None = None
    chunk_bytes: int = DEFAULT_CHUNK_BYTES

    def __post_init__(self) -> None:
        if not self.stores:
            raise ValueError("Registry needs at least one store URL")
        self._stores: list[Store] = [s if isinstance(s, Store) else open_store(s, self.store_options.get(s, {}))
                                     for s in self.stores]
        self._catalog: dict[str, ModelSource] = {}
        self._published: dict[str, Manifest] = {}  # manifests this process published: trusted over store copies

    @property
    def store_list(self) -> list[Store]:
        return list(self._stores)

    # --- catalog ------------------------------------------------------------------------------------------
    def register(self, name: str, *, local_dir: str | os.PathLike | None = None, hf_repo: str | None = None,
                 hf_revision: str = "main") -> ModelSource:
        """Add `name` to the catalog with exactly one source: a local dir or a Hugging Face repo id."""
        check_model_name(name)
        if (local_dir is None) == (hf_repo is None):
            raise ValueError(f"model {name!r}: give exactly one of local_dir or hf_repo")
        src = ModelSource(name, Path(local_dir) if local_dir is not None else None, hf_repo, hf_revision)
        self._catalog[name] = src
        return src

    def source(self, name: str) -> ModelSource:
        check_model_name(name)
        try:
            return self._catalog[name]
        except KeyError:
            raise RegistryError(f"model {name!r} is not in the catalog (known: {sorted(self._catalog)})") from None

    def resolve(self, name: str) -> Path:
        """A local dir holding `name`'s checkpoint: its local dir, or its Hugging Face snapshot.

        With HF_HUB_OFFLINE set, only the local HF cache is consulted; a snapshot that is not cached
        raises ModelSourceError naming the model, repo and revision.
        """
        src = self.source(name)
        if src.local_dir is not None:
            if not src.local_dir.is_dir():
                raise ModelSourceError(f"model {name!r}: local dir {src.local_dir} does not exist")
            return src.local_dir
        from huggingface_hub import snapshot_download  # only models from the Hub need it

        offline = hf_offline()
        try:
            path = snapshot_download(repo_id=src.hf_repo, revision=src.hf_revision, cache_dir=self.hf_cache_dir,
                                     local_files_only=offline)
        except Exception as e:
            mode = "HF_HUB_OFFLINE is set and the snapshot is not in the local cache" if offline else "download failed"
            raise ModelSourceError(f"model {name!r}: Hugging Face snapshot {src.hf_repo}@{src.hf_revision} "
                                   f"unavailable: {mode} ({type(e).__name__}: {e})") from e
        return Path(path)

    # --- publish ------------------------------------------------------------------------------------------
    def publish(self, name: str, local_dir: str | os.PathLike | None = None) -> Manifest:
        """Build `name`'s manifest from `local_dir` (default: its catalog source) and upload to every store.

        Files go first and the manifest last, so a store that shows the manifest holds every listed
        file. Raises RegistryError listing each store that failed (the others still hold the model).
        """
        check_model_name(name)
        directory = Path(local_dir) if local_dir is not None else self.resolve(name)
        manifest = build_manifest(directory, name=name)
        failures: list[StoreFailure] = []
        for store in self._stores:
            try:
                for entry in manifest.files:
                    store.put_file(directory / entry.name, f"{name}/{entry.name}")
                store.put_bytes(f"{name}/{MANIFEST_FILE}", manifest.to_json().encode())
            except Exception as e:
                failures.append(StoreFailure(store.url, None, f"publish failed ({e})"))
                log.warning("publish %s to %s failed: %s", name, store.url, e)
        self._published[name] = manifest
        if failures:
            raise RegistryError(f"model {name!r}: publish failed on {len(failures)} of {len(self._stores)} "
                                "stores:\n  " + "\n  ".join(map(str, failures)))
        return manifest

    # --- read ---------------------------------------------------------------------------------------------
    def manifest(self, name: str) -> Manifest:
        """`name`'s manifest: the one this process published, else the first store's that reads and parses."""
        check_model_name(name)
        if name in self._published:
            return self._published[name]
        failures = []
        for store in self._stores:
            try:
                m = Manifest.from_json(store.get_bytes(f"{name}/{MANIFEST_FILE}").decode())
            except Exception as e:
                failures.append(StoreFailure(store.url, MANIFEST_FILE, f"{type(e).__name__}: {e}"))
                continue
            if m.model != name:
                failures.append(StoreFailure(store.url, MANIFEST_FILE, f"manifest is for model {m.model!r}"))
                continue
            return m
        raise RegistryError(f"model {name!r}: no store has a readable manifest:\n  " + "\n  ".join(map(str, failures)))

    def fetch(self, name: str, dest_dir: str | os.PathLike, streams: int = 16,
              manifest: Manifest | None = None, pace: CloudPace | None = None) -> FetchResult:
        """Download `name` into `dest_dir` from the first store whose files match the manifest's sha256.

        `manifest` is the trusted expectation (default: `self.manifest(name)`). An existing `dest_dir`
        that already matches is returned as is (`cached`); one that does not is never modified, and
        RegistryError is raised. If every store fails, RegistryError lists each store's problem and
        `dest_dir` is untouched. Every file of the model shares one pool of `streams` ranged readers;
        `pace` emulates the cloud link (per-stream bandwidth, first-byte latency, destination writes);
        a cancelled pace raises `live.pacing.TransferCancelled`, with `dest_dir` untouched too.
        """
        if streams < 1:
            raise ValueError(f"streams must be >= 1, got {streams}")
        check_model_name(name)
        dest = Path(dest_dir).absolute()
        expected = manifest if manifest is not None else self.manifest(name)
        if expected.model != name:
            raise RegistryError(f"model {name!r}: the manifest given is for {expected.model!r}")
        if dest.exists():
            problems = _verify_problems(dest, expected)
            if not problems:
                return FetchResult(name, dest, None, expected, cached=True)
            raise RegistryError(f"model {name!r}: {dest} exists and does not match the manifest "
                                f"({'; '.join(problems)}); remove it first")
        dest.parent.mkdir(parents=True, exist_ok=True)
        failures: list[StoreFailure] = []
        for store in self._stores:
            staging = Path(tempfile.mkdtemp(prefix=f"{_STAGING_PREFIX}{name}-", dir=dest.parent))
            try:
                failure = self._fetch_from(store, name, expected, staging, streams, pace)
                if failure is None:
                    os.rename(staging, dest)  # atomic: dest appears complete and verified, or not at all
                    return FetchResult(name, dest, store.url, expected, tuple(failures))
                failures.append(failure)
                log.warning("fetch %s: %s", name, failure)
            except TransferCancelled:
                raise  # the staging dir goes in `finally`; no other store is tried
            except OSError as e:  # e.g. dest appeared meanwhile: nothing of ours is placed there
                failures.append(StoreFailure(store.url, None, f"could not place checkpoint at {dest} ({e})"))
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        raise RegistryError(f"model {name!r}: no store could serve a checkpoint matching the manifest "
                            f"({len(failures)} tried):\n  " + "\n  ".join(map(str, failures)))

    def _fetch_from(self, store: Store, name: str, expected: Manifest, staging: Path,
                    streams: int, pace: CloudPace | None = None) -> StoreFailure | None:
        """Download and verify every file from `store` into `staging`; the first problem found, or None."""
        items = [(f"{name}/{e.name}", staging / e.name, e.size_bytes) for e in expected.files]
        # split a model smaller than streams x chunk finer, so that every stream carries a share
        per_stream = -(-expected.total_bytes // streams)
        chunk_bytes = max(1, min(self.chunk_bytes, max(_MIN_RANGE_BYTES, per_stream)))
        try:
            store.get_files(items, streams=streams, chunk_bytes=chunk_bytes, pace=pace)
        except TransferCancelled:
            raise  # not the store's fault: no other store is tried
        except Exception as e:  # missing object, network, short read: the message says which
            key = _failed_key(str(e), items)
            return StoreFailure(store.url, key, f"download failed ({e})")
        problems = _verify_problems(staging, expected)
        if problems:
            # "file: sha256 X, manifest says Y": keep the file name in the record's `file` field
            first = problems[0].split(":", 1)[0]
            return StoreFailure(store.url, f"{name}/{first}", "; ".join(problems))
        return None

    def download_urls(self, name: str, expires_s: int = 3600) -> dict[str, str]:
        """Presigned URLs of `name`'s files from the first store that can sign them; {} if none can."""
        expected = self.manifest(name)
        for store in self._stores:
            urls = {}
            for entry in expected.files:
                url = store.presign(f"{name}/{entry.name}", expires_s)
                if url is None:
                    break
                urls[entry.name] = url
            else:
                return urls
        return {}


def _failed_key(message: str, items: Sequence[tuple[str, Path, int]]) -> str | None:
    """The key a store error message names (its URL ends with the key), for the failure record."""
    return next((key for key, _path, _size in items if f"/{key}:" in message or f"/{key} " in message), None)


def _verify_problems(directory: Path, manifest: Manifest) -> list[str]:
    """`verify`'s problems, with a missing file reported as one more problem rather than raised."""
    try:
        return verify(directory, manifest)
    except FileNotFoundError as e:
        return [f"missing file ({e})"]
