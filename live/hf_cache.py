"""Checkpoints from a local Hugging Face Hub cache: a repo id at a revision (branch, tag or commit hash) resolved to
its snapshot dir the way `huggingface_hub` does it, offline when HF_HUB_OFFLINE is set.

The cache is the layout `huggingface_hub` writes (`<cache>/models--org--name/{blobs,snapshots/<commit>,
refs/<branch or tag>}`); `snapshot_download` resolves the revision through `refs/` (a commit hash needs no ref)
and `scan_cache_dir` tells what is cached when the revision is not, so that the error can say what is there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class HubSnapshot:
    """A cached snapshot: the repo and revision asked for, the commit it resolved to, and its dir."""

    repo: str
    revision: str
    commit: str
    path: Path
    cache_dir: Path


def hub_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The Hub cache to read: `cache_dir`, else HF_HUB_CACHE, else $HF_HOME/hub, else the XDG / home default.

    Read at call time: `huggingface_hub.constants` fixes these when it is first imported, and a process (or a
    test) may set HF_HOME later.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def cached_revisions(repo: str, cache_dir: Path) -> str:
    """What the cache holds of `repo` (commits and the refs naming them), for error messages."""
    from huggingface_hub import scan_cache_dir

    try:
        info = scan_cache_dir(cache_dir)
    except Exception as e:  # no cache dir at all, or unreadable
        return f"nothing ({type(e).__name__}: {e})"
    for r in info.repos:
        if r.repo_id == repo and r.repo_type == "model":
            revs = [f"{rev.commit_hash}" + (f" ({', '.join(sorted(rev.refs))})" if rev.refs else "")
                    for rev in sorted(r.revisions, key=lambda rev: rev.commit_hash)]
            return ", ".join(revs) or "no snapshot"
    return "nothing of this repo"


def resolve_snapshot(repo: str, revision: str = "main", cache_dir: str | os.PathLike | None = None,
                     offline: bool = True) -> HubSnapshot:
    """The snapshot of `repo` at `revision` (branch, tag or full commit hash) in the Hub cache.

    `offline`: only the cache is read (as `local_files_only=True`); else a missing snapshot is downloaded.
    Raises LookupError naming the repo, revision and cache dir, and listing what the cache holds of the repo.
    """
    from huggingface_hub import snapshot_download  # only models from the Hub need it

    cache = hub_cache_dir(cache_dir)
    try:
        path = Path(snapshot_download(repo_id=repo, revision=revision, cache_dir=cache, local_files_only=offline))
    except Exception as e:
        mode = ("HF_HUB_OFFLINE is set and the snapshot is not in the local cache" if offline
                else "download failed and the snapshot is not in the local cache")
        raise LookupError(f"Hugging Face snapshot {repo}@{revision} unavailable: {mode} (cache dir {cache}; it "
                          f"holds of {repo}: {cached_revisions(repo, cache)}). Download it where the Hub is reachable, "
                          f"e.g. `hf download {repo} --revision {revision} --cache-dir {cache}` "
                          f"({type(e).__name__}: {e})") from e
    return HubSnapshot(repo, revision, path.name, path, cache)
