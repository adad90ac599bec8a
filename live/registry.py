"""The model registry: a catalog of model sources, published to and fetched from object stores in priority order.

A model is published as a revision (`live.registry_versions`: content-addressed by the manifest's hash, under
keys of its own) holding its files plus `tierlab_manifest.json` (sizes and sha256 from
`live.manifest.build_manifest`), to every configured store, manifest last, so a reader that finds the manifest
finds every file it lists; then the model's alias moves to it. `name@revision` names one revision, plain `name`
the alias's; `rollback` moves the alias back and `gc` removes revisions nothing refers to
(`live.registry_admin`). `fetch` tries the stores in order (e.g. Azure primary, S3
backup, GCS tertiary): it downloads into a staging dir beside `dest_dir`, checks every file against
the manifest, and only then renames the staging dir to `dest_dir`. A checkpoint that fails the check
is never placed at `dest_dir`; the problem is recorded with the store URL and file, and the next
store is tried. Reads (`version`/`manifest`, `fetch`) go in health order (`live.store_health`): a store that did
not answer (refused, timed out: the clients' timeouts are short, see `live.stores`) is tried last for a back-off
period, so loads switch to the next store within about a second, and the store is preferred again once a later
probe finds it answering.

    reg = Registry(["az://models", "s3://backup/models"], {"s3://backup/models": {"endpoint_url": ...}})
    reg.publish("llama-tiny", "ckpt/")
    result = reg.fetch("llama-tiny", "/nvme/llama-tiny", streams=16)   # or "llama-tiny@<revision>"
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from live import registry_admin
from live.hf_cache import resolve_snapshot
from live.manifest import Manifest, build_manifest, verify
from live.pacing import CloudPace, TransferCancelled
from live.registry_versions import (
    Alias,
    GcItem,
    RegistryError,
    VersionInfo,
    check_model_name,
    current_revision,
    locate,
    manifest_key,
    parse_ref,
    read_alias,
    read_manifest_at,
    revision_of,
    revision_prefix,
)
from live.store_health import BackoffPolicy, StoreHealth, is_unreachable
from live.stores import DEFAULT_CHUNK_BYTES, Store, open_store

log = logging.getLogger(__name__)

__all__ = ["Alias", "FetchResult", "GcItem", "ModelSourceError", "Registry", "RegistryError", "StoreFailure",
           "Version", "VersionInfo", "check_model_name", "hf_offline", "parse_ref", "revision_of"]

_STAGING_PREFIX = ".tierlab-fetch-"
_MIN_RANGE_BYTES = 256 << 10  # a model smaller than streams x chunk is split finer, down to this


class ModelSourceError(RegistryError):
    """A model's source (local dir or Hugging Face snapshot) is not available."""


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

    name: str  # as asked: `name` or `name@revision`
    path: Path
    store_url: str | None
    manifest: Manifest
    failures: tuple[StoreFailure, ...] = ()
    cached: bool = False  # dest_dir already held a checkpoint matching the manifest

    @property
    def revision(self) -> str:
        return revision_of(self.manifest)


@dataclass(frozen=True)
class Version:
    """One revision of a model: its manifest, and the store it was read from (None: this process published it)."""

    name: str
    revision: str
    manifest: Manifest
    store_url: str | None

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.revision}"


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
    health_policy: BackoffPolicy = field(default_factory=BackoffPolicy)

    def __post_init__(self) -> None:
        if not self.stores:
            raise ValueError("Registry needs at least one store URL")
        self._stores: list[Store] = [s if isinstance(s, Store) else open_store(s, self.store_options.get(s, {}))
                                     for s in self.stores]
        self._catalog: dict[str, ModelSource] = {}
        # manifests this process published, by (name, revision): trusted over store copies
        self._published: dict[tuple[str, str], Manifest] = {}
        # which stores answered lately: per Registry (one per agent process), shared by its fetch threads
        self.health = StoreHealth(len(self._stores), self.health_policy)

    @property
    def store_list(self) -> list[Store]:
        return list(self._stores)

    # --- store health -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _health_order(self) -> Iterator[list[Store]]:
        """The stores to read from, in health order (those that did not answer lately last); the caller
        reports each store it tries (`_report`). Probes this caller claimed but did not reach are released."""
        plan = self.health.plan()
        try:
            yield [self._stores[i] for i in plan.order]
        finally:
            self.health.release(plan.probes)  # a no-op for the ones reported (reports clear the claim)

    def _report(self, store: Store, exc: BaseException | None) -> None:
        """Record how `store` did: an error that says it did not answer marks it down (tried last for a
        back-off); anything else (data, a missing key, a bad checksum) means it answered, so it is up."""
        i = next(k for k, s in enumerate(self._stores) if s is store)
        was_down = self.health.is_down(i)
        self.health.report(i, exc)
        if exc is not None and is_unreachable(exc):
            state = self.health.states()[i]
            log.warning("store %s did not answer (%s: %s); tried last for %.0f s", store.url, type(exc).__name__,
                        exc, self.health_policy.backoff_s(state.failures))
        elif was_down:
            log.warning("store %s answers again; preferred again", store.url)

    # --- catalog ------------------------------------------------------------------------------------------
    def register(self, name: str, *, local_dir: str | os.PathLike | None = None, hf_repo: str | None = None,
                 hf_revision: str = "main") -> ModelSource:
        """Add `name` to the catalog with exactly one source: a local dir or a Hugging Face repo id."""
        _plain_name(name, "register")
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

        A Hub snapshot comes from the local Hub cache (`live.hf_cache`; branch, tag or commit, refs resolved)
        and, unless HF_HUB_OFFLINE is set, is downloaded when missing; one that is unavailable raises
        ModelSourceError naming the model, repo, revision and cache dir.
        """
        src = self.source(name)
        if src.local_dir is not None:
            if not src.local_dir.is_dir():
                raise ModelSourceError(f"model {name!r}: local dir {src.local_dir} does not exist")
            return src.local_dir
        assert src.hf_repo is not None  # register() gives exactly one source
        try:
            return resolve_snapshot(src.hf_repo, src.hf_revision, self.hf_cache_dir, offline=hf_offline()).path
        except LookupError as e:
            raise ModelSourceError(f"model {name!r}: {e}") from e

    # --- publish ------------------------------------------------------------------------------------------
    def publish(self, name: str, local_dir: str | os.PathLike | None = None, *, reupload: bool = False,
                by: str | None = None) -> Manifest:
        """Publish `local_dir` (default: `name`'s catalog source) as a new revision of `name`; its manifest.

        See `publish_version`.
        """
        return self.publish_version(name, local_dir, reupload=reupload, by=by).manifest

    def publish_version(self, name: str, local_dir: str | os.PathLike | None = None, *, reupload: bool = False,
                        by: str | None = None) -> Version:
        """Build the manifest of `local_dir` (default: `name`'s catalog source), upload it to every store as the
        revision it hashes to, and move `name`'s alias there; the version.

        Per store, files go first and the manifest last, so a store that shows the manifest holds every listed
        file; a revision already there is not uploaded again (its manifest is rewritten, which renews its gc
        grace; a file the store lost or holds at another size is uploaded again) unless `reupload`. Other
        revisions' keys are never written. The alias moves only once the revision is complete, recording the
        previous revision and `by` (default: the OS user). Raises RegistryError listing each store that failed
        (the others hold the revision, their alias moved).
        """
        _plain_name(name, "publish")
        directory = Path(local_dir) if local_dir is not None else self.resolve(name)
        manifest = build_manifest(directory, name=name)
        rev = revision_of(manifest)
        failures: list[StoreFailure] = []
        for store in self._stores:
            try:
                self._publish_to(store, name, rev, manifest, directory, reupload, by)
            except Exception as e:
                failures.append(StoreFailure(store.url, None, f"publish of revision {rev} failed ({e})"))
                log.warning("publish %s@%s to %s failed: %s", name, rev, store.url, e)
        self._published[(name, rev)] = manifest
        if failures:
            raise RegistryError(f"model {name!r}: publish failed on {len(failures)} of {len(self._stores)} "
                                "stores:\n  " + "\n  ".join(map(str, failures)))
        return Version(name, rev, manifest, None)

    def _publish_to(self, store: Store, name: str, rev: str, manifest: Manifest, directory: Path,
                    reupload: bool, by: str | None) -> None:
        alias = read_alias(store, name)
        try:
            in_place: str | None = revision_of(read_manifest_at(store, name, name))
        except FileNotFoundError:
            in_place = None
        if in_place == rev:
            prefix, present = name, True
        else:
            present = store.exists(manifest_key(revision_prefix(name, rev)))
            # a name's first publish goes in place: the layout older readers know, and no alias is needed
            prefix = name if (not present and alias is None and in_place is None) else revision_prefix(name, rev)
        if reupload or not present:
            todo = list(manifest.files)
        else:  # the revision is there: upload only what the store lost or holds at another size (a repair)
            held = store.list_detail(prefix)
            todo = [e for e in manifest.files
                    if (info := held.get(f"{prefix}/{e.name}")) is None or info.size_bytes != e.size_bytes]
            if todo:
                log.warning("publish %s@%s to %s: re-uploading %d file(s) the store lost or holds at another "
                            "size: %s", name, rev, store.url, len(todo), [e.name for e in todo])
        for entry in todo:
            store.put_file(directory / entry.name, f"{prefix}/{entry.name}")
        store.put_bytes(manifest_key(prefix), manifest.to_json().encode())
        current = alias.revision if alias is not None else in_place
        if current in (None, rev):
            return  # the first publish, or this revision is current already: nothing to move
        now = time.time()
        moved = alias.moved(rev, "publish", now, by) if alias is not None else \
            Alias.first(name, rev, in_place, "publish", now, by)
        registry_admin.write_alias(store, moved)

    # --- versions -----------------------------------------------------------------------------------------
    def version(self, ref: str) -> Version:
        """The version `ref` names (`name@revision`, or `name`: the alias's revision, else the in-place one),
        from the first store that holds it readable and hashing to its revision."""
        name, rev = parse_ref(ref)
        failures = []
        with self._health_order() as stores:
            for store in stores:
                try:
                    want = rev if rev is not None else current_revision(store, name)
                    if (name, want) not in self._published:
                        _prefix, manifest = locate(store, name, want)
                except Exception as e:  # down, missing, unreadable, altered: the next store may serve
                    self._report(store, e)
                    failures.append(StoreFailure(store.url, None, f"{type(e).__name__}: {e}"))
                    continue
                self._report(store, None)
                if (name, want) in self._published:
                    return Version(name, want, self._published[(name, want)], None)
                return Version(name, want, manifest, store.url)
        hint = "" if rev is None else f" (`versions {name}` lists the revisions each store holds)"
        raise RegistryError(f"model {ref!r}: no store has a readable manifest{hint}:\n  "
                            + "\n  ".join(map(str, failures)))

    def manifest(self, ref: str) -> Manifest:
        """The manifest of the version `ref` names (see `version`)."""
        return self.version(ref).manifest

    def versions(self, name: str) -> list[VersionInfo]:
        """Every revision of `name` in every store (one listing per store), oldest first."""
        return registry_admin.list_versions(self._stores, _plain_name(name, "versions"))

    def alias(self, name: str) -> Alias | None:
        """`name`'s alias and its history, from the first store that has one (None: none has)."""
        _plain_name(name, "alias")
        return next((a for a in (read_alias(s, name) for s in self._stores) if a is not None), None)

    def rollback(self, name: str, revision: str, *, by: str | None = None) -> Alias | None:
        """Move `name`'s alias to `revision` (an earlier one, or any held by every store); see `set_alias`."""
        return self.set_alias(name, revision, op="rollback", by=by)

    def set_alias(self, name: str, revision: str, *, op: str = "set", by: str | None = None) -> Alias | None:
        """Point `name` at `revision` in every store; each store must hold it whole first.

        The move (with the previous revision, `op` and `by`) is appended to the alias's history. Raises
        RegistryError listing the stores that do not hold the revision (their alias is not moved).
        """
        return registry_admin.set_alias(self._stores, _plain_name(name, op), revision, op, by)

    def gc(self, name: str | None = None, *, keep: Sequence[str] = (), grace_s: float = 3600.0,
           dry_run: bool = False) -> list[GcItem]:
        """Remove revisions of `name` (default: every model) that no store's alias names, that are not in
        `keep` (`name@revision` or bare revision ids: e.g. revisions still loaded somewhere) and whose newest
        object is older than `grace_s`; `dry_run` only lists them. See `live.registry_admin.gc`."""
        if name is not None:
            _plain_name(name, "gc")
        return registry_admin.gc(self._stores, name, keep, grace_s, dry_run)

    # --- read ---------------------------------------------------------------------------------------------
    def fetch(self, name: str, dest_dir: str | os.PathLike, streams: int = 16,
              manifest: Manifest | None = None, pace: CloudPace | None = None) -> FetchResult:
        """Download `name` (or `name@revision`) into `dest_dir` from the first store whose files match the
        manifest's sha256.

        `manifest` is the trusted expectation (default: `self.manifest(name)`); the revision it hashes to is
        what is fetched, from the keys of that revision alone, so a publish of another revision meanwhile
        changes nothing for this fetch. An existing `dest_dir` that already matches is returned as is (`cached`);
        one that does not is never modified, and RegistryError is raised. If every store fails, RegistryError
        lists each store's problem and `dest_dir` is untouched. Every file of the model shares one pool of
        `streams` ranged readers; `pace` emulates the cloud link (per-stream bandwidth, first-byte latency,
        destination writes); a cancelled pace raises `live.pacing.TransferCancelled`, with `dest_dir` untouched too.
        """
        if streams < 1:
            raise ValueError(f"streams must be >= 1, got {streams}")
        base, pinned = parse_ref(name)
        dest = Path(dest_dir).absolute()
        expected = manifest if manifest is not None else self.manifest(name)
        if expected.model != base:
            raise RegistryError(f"model {name!r}: the manifest given is for {expected.model!r}")
        rev = revision_of(expected)
        if pinned is not None and pinned != rev:
            raise RegistryError(f"model {name!r}: the manifest given is revision {rev}, not {pinned}")
        if dest.exists():
            problems = _verify_problems(dest, expected)
            if not problems:
                return FetchResult(name, dest, None, expected, cached=True)
            raise RegistryError(f"model {name!r}: {dest} exists and does not match the manifest "
                                f"({'; '.join(problems)}); remove it first")
        dest.parent.mkdir(parents=True, exist_ok=True)
        failures: list[StoreFailure] = []
        with self._health_order() as stores:  # a store down for manifests is tried last here too
            for store in stores:
                staging = Path(tempfile.mkdtemp(prefix=f"{_STAGING_PREFIX}{base}-", dir=dest.parent))
                try:
                    failure = self._fetch_from(store, base, rev, expected, staging, streams, pace)
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

    def _fetch_from(self, store: Store, name: str, rev: str, expected: Manifest, staging: Path,
                    streams: int, pace: CloudPace | None = None) -> StoreFailure | None:
        """Download and verify every file of revision `rev` from `store` into `staging`; the first problem, or None.

        Reports the store's health: down if it did not answer, up if it did (even with bad data)."""
        try:
            prefix, _stored = locate(store, name, rev)
        except Exception as e:  # down, or lacks the revision (or its manifest is unreadable): try the next
            self._report(store, e)
            return StoreFailure(store.url, None, f"{type(e).__name__}: {e}")
        items = [(f"{prefix}/{e.name}", staging / e.name, e.size_bytes) for e in expected.files]
        # split a model smaller than streams x chunk finer, so that every stream carries a share
        per_stream = -(-expected.total_bytes // streams)
        chunk_bytes = max(1, min(self.chunk_bytes, max(_MIN_RANGE_BYTES, per_stream)))
        try:
            store.get_files(items, streams=streams, chunk_bytes=chunk_bytes, pace=pace)
        except TransferCancelled:
            raise  # not the store's fault: no other store is tried
        except Exception as e:  # missing object, network, short read: the message says which
            self._report(store, e)
            key = _failed_key(str(e), items)
            return StoreFailure(store.url, key, f"download failed ({e})")
        self._report(store, None)  # it answered, whatever the checksums say
        problems = _verify_problems(staging, expected)
        if problems:
            # "file: sha256 X, manifest says Y": keep the file name in the record's `file` field
            first = problems[0].split(":", 1)[0]
            return StoreFailure(store.url, f"{prefix}/{first}", "; ".join(problems))
        return None

    def download_urls(self, name: str, expires_s: int = 3600) -> dict[str, str]:
        """Presigned URLs of `name`'s (or `name@revision`'s) files from the first store that can sign them and
        holds the revision; {} if none can."""
        version = self.version(name)
        with self._health_order() as stores:
            for store in stores:
                try:
                    prefix, _m = locate(store, version.name, version.revision)
                except Exception as e:
                    self._report(store, e)
                    continue
                self._report(store, None)
                urls = {}
                for entry in version.manifest.files:
                    url = store.presign(f"{prefix}/{entry.name}", expires_s)
                    if url is None:
                        break
                    urls[entry.name] = url
                else:
                    return urls
        return {}


def _plain_name(name: str, op: str) -> str:
    """`name` checked, and without a revision: `op` acts on a model, the revision being what it derives or takes."""
    if parse_ref(name)[1] is not None:
        raise ValueError(f"model {name!r}: {op} takes a plain model name (a revision is the manifest's hash, "
                         "derived by publish; give it separately to rollback)")
    return name


def _failed_key(message: str, items: Sequence[tuple[str, Path, int]]) -> str | None:
    """The key a store error message names (its URL ends with the key), for the failure record."""
    return next((key for key, _path, _size in items if f"/{key}:" in message or f"/{key} " in message), None)


def _verify_problems(directory: Path, manifest: Manifest) -> list[str]:
    """`verify`'s problems, with a missing file reported as one more problem rather than raised."""
    try:
        return verify(directory, manifest)
    except FileNotFoundError as e:
        return [f"missing file ({e})"]
