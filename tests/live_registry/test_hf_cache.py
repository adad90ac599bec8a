"""Models named by a Hugging Face repo id, resolved from a local Hub cache with HF_HUB_OFFLINE=1: the cache laid
out with huggingface_hub's own helpers (blobs, snapshots/<commit>, refs/<branch or tag>) and accepted by its own
`snapshot_download(local_files_only=True)`, `scan_cache_dir` and `try_to_load_from_cache`; a transformers-written
sharded checkpoint in it registered by `hf_repo`, published to moto S3 as revisions and fetched back; revisions
by branch, tag and commit; an uncached revision's error names the repo, revision and cache dir."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest

pytest.importorskip("huggingface_hub")
from live.hf_cache import hub_cache_dir, resolve_snapshot
from live.manifest import build_manifest
from live.registry import ModelSourceError, Registry, revision_of
from live.shards import INDEX_FILE
from tests.live_serve.serving import checkpoint_cache
from tests.live_serve.test_sharded_serve import write_hf_sharded

from .test_registry import _tree

REPO = "tierlab-test/llama-sharded"
NAME = "hf-llama"
C1 = hashlib.sha1(b"tierlab commit 1").hexdigest()  # a 40-hex commit id, as the Hub's
C2 = hashlib.sha1(b"tierlab commit 2").hexdigest()


def add_to_hub_cache(cache: Path, repo: str, src: Path, commit: str, refs: Sequence[str]) -> Path:
    """Lay `src`'s files into the Hub cache `cache` as a download by huggingface_hub does, with its own helpers:
    each file's bytes once in `blobs/<etag>` (sha256 for LFS-tracked weights, the git blob sha1 otherwise), a
    relative symlink in `snapshots/<commit>/`, each ref (branch or tag) in `refs/`. The snapshot dir."""
    from huggingface_hub.file_download import (
        _cache_commit_hash_for_specific_revision,
        _create_symlink,
        repo_folder_name,
    )
    from huggingface_hub.utils.sha import git_hash

    storage = cache / repo_folder_name(repo_id=repo, repo_type="model")
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        data = f.read_bytes()
        etag = hashlib.sha256(data).hexdigest() if f.suffix == ".safetensors" else git_hash(data)
        blob = storage / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            blob.write_bytes(data)
        pointer = storage / "snapshots" / commit / f.relative_to(src)
        pointer.parent.mkdir(parents=True, exist_ok=True)
        _create_symlink(str(blob), str(pointer), new_blob=False)
    for ref in refs:
        _cache_commit_hash_for_specific_revision(str(storage), ref, commit)
    return storage / "snapshots" / commit


@pytest.fixture(scope="module")
def hf_sharded() -> Path:
    """transformers' own sharded save of a tiny Llama (shared with tests/live_serve, cached)."""
    return write_hf_sharded(checkpoint_cache() / "hf-llama-sharded-h64-l3-v1")


@pytest.fixture
def hub(tmp_path: Path, hf_sharded: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HF_HOME in a temp dir, offline; its cache holds REPO at C1 (tag v1.0) and C2 (branch main: one more file)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hf-home" / "hub"
    add_to_hub_cache(cache, REPO, hf_sharded, C1, ["v1.0"])
    v2 = tmp_path / "v2"
    shutil.copytree(hf_sharded, v2)
    (v2 / "README.md").write_text("second commit\n")
    add_to_hub_cache(cache, REPO, v2, C2, ["main"])
    return cache


def test_the_cache_is_one_huggingface_hub_itself_reads(hub: Path, hf_sharded: Path) -> None:
    from huggingface_hub import scan_cache_dir, snapshot_download, try_to_load_from_cache

    assert hub_cache_dir() == hub  # $HF_HOME/hub, read at call time
    [repo] = scan_cache_dir(hub).repos
    assert repo.repo_id == REPO and {(r.commit_hash, frozenset(r.refs)) for r in repo.revisions} == {
        (C1, frozenset({"v1.0"})), (C2, frozenset({"main"}))}
    for revision, commit in (("main", C2), ("v1.0", C1), (C1, C1)):
        path = Path(snapshot_download(REPO, revision=revision, cache_dir=hub, local_files_only=True))
        assert path == hub / f"models--{REPO.replace('/', '--')}" / "snapshots" / commit
    cached = try_to_load_from_cache(REPO, INDEX_FILE, cache_dir=hub, revision="v1.0")
    assert isinstance(cached, str) and Path(cached).read_bytes() == (hf_sharded / INDEX_FILE).read_bytes()


def test_branch_tag_and_commit_resolve_offline_and_publish_as_revisions(hub: Path, hf_sharded: Path, tmp_path: Path,
                                                                        s3_url: tuple[str, dict]) -> None:
    url, options = s3_url
    reg = Registry([url], {url: options})  # no hf_cache_dir: HF_HOME's cache
    for revision, commit in (("main", C2), ("v1.0", C1), (C1, C1)):
        reg.register(NAME, hf_repo=REPO, hf_revision=revision)
        assert reg.resolve(NAME).name == commit
        assert resolve_snapshot(REPO, revision).commit == commit

    reg.register(NAME, hf_repo=REPO, hf_revision="v1.0")
    v1 = reg.publish_version(NAME)  # from the cache, through the snapshot's symlinks
    assert v1.manifest.layout.shards and v1.revision == revision_of(build_manifest(hf_sharded, name=NAME))
    reg.register(NAME, hf_repo=REPO, hf_revision="main")
    v2 = reg.publish_version(NAME)
    assert v2.revision != v1.revision and {f.name for f in v2.manifest.files} - {f.name for f in v1.manifest.files} \
        == {"README.md"}

    fresh = Registry([url], {url: options})
    assert fresh.version(NAME).revision == v2.revision  # the alias follows the last publish
    got = fresh.fetch(v1.ref, tmp_path / "v1")
    assert _tree(got.path) == _tree(hf_sharded) and len([f for f in got.manifest.files if "-of-" in f.name]) >= 3
    fresh.rollback(NAME, v1.revision)
    assert _tree(fresh.fetch(NAME, tmp_path / "plain").path) == _tree(hf_sharded)


def test_the_serve_catalog_reads_hub_models_from_the_cache(hub: Path, tmp_path: Path) -> None:
    from experiments.serve_catalog import build_catalog

    [entry] = build_catalog({NAME: {"hf_repo": REPO, "revision": "v1.0"}}, tmp_path / "catalog", progress=False)
    assert entry.path == hub / f"models--{REPO.replace('/', '--')}" / "snapshots" / C1


def test_an_uncached_revision_or_repo_is_a_clear_error(hub: Path, tmp_path: Path) -> None:
    reg = Registry([(tmp_path / "store").as_uri()])
    reg.register(NAME, hf_repo=REPO, hf_revision="v9")
    with pytest.raises(ModelSourceError) as err:
        reg.publish(NAME)
    msg = str(err.value)
    for part in (NAME, f"{REPO}@v9", "HF_HUB_OFFLINE", f"cache dir {hub}", f"{C1} (v1.0)", f"{C2} (main)",
                 f"hf download {REPO} --revision v9"):
        assert part in msg, (part, msg)
    assert not (tmp_path / "store").exists()  # nothing published

    reg.register("other", hf_repo="tierlab-test/not-cached", hf_revision="main")
    with pytest.raises(ModelSourceError, match=r"tierlab-test/not-cached@main unavailable.*nothing of this repo"):
        reg.resolve("other")
    empty = Registry([(tmp_path / "store").as_uri()], hf_cache_dir=tmp_path / "no-cache")
    empty.register(NAME, hf_repo=REPO)
    with pytest.raises(ModelSourceError, match=rf"cache dir {tmp_path / 'no-cache'}; it holds of {REPO}: nothing"):
        empty.resolve(NAME)
