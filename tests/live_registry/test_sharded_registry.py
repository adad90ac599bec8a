"""A sharded checkpoint through the registry: every shard and the index travel to moto S3 and azurite and back,
checked against the manifest; a shard missing from a store is named and the next store serves; a checkpoint
with bad shards is refused at publish, before any object is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from live.checkpoint import shard_checkpoint
from live.manifest import MANIFEST_FILE
from live.registry import Registry, RegistryError
from live.shards import INDEX_FILE, ShardIndexError
from live.stores import open_store

from .test_registry import _corrupt, _tree

NAME = "llama-sharded"


@pytest.fixture(scope="module")
def sharded_ckpt(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sharded") / "tiny"
    shard_checkpoint(tiny_ckpt, out, 3 << 20)  # 4 shards, layers across shard boundaries
    return out


def _shards(ckpt: Path) -> list[str]:
    return sorted(set(json.loads((ckpt / INDEX_FILE).read_text())["weight_map"].values()))


@pytest.mark.parametrize("store", ["s3", "azure"])
def test_every_shard_and_the_index_travel_and_are_verified(store: str, tmp_path: Path, sharded_ckpt: Path,
                                                           request: pytest.FixtureRequest) -> None:
    url, options = request.getfixturevalue("s3_url" if store == "s3" else "az_url")
    reg = Registry([url], {url: options})
    manifest = reg.publish(NAME, sharded_ckpt)
    keys = set(open_store(url, options).list(NAME))
    assert {f"{NAME}/{s}" for s in _shards(sharded_ckpt)} | {f"{NAME}/{INDEX_FILE}", f"{NAME}/{MANIFEST_FILE}"} <= keys
    # a fresh registry (another process) reads the manifest from the store and fetches every file
    got = Registry([url], {url: options}).fetch(NAME, tmp_path / "dest", streams=8)
    assert got.store_url == url and got.manifest == manifest and got.manifest.layout.shards
    assert _tree(tmp_path / "dest") == _tree(sharded_ckpt)


def test_a_shard_missing_or_corrupt_in_the_primary_is_named_and_the_backup_serves(
        tmp_path: Path, sharded_ckpt: Path, s3_url: tuple[str, dict]) -> None:
    primary = (tmp_path / "primary").as_uri()
    reg = Registry([primary, s3_url[0]], {s3_url[0]: s3_url[1]})
    reg.publish(NAME, sharded_ckpt)
    gone, bad = _shards(sharded_ckpt)[1], _shards(sharded_ckpt)[3]
    store = open_store(primary)
    store.delete(f"{NAME}/{gone}")
    got = reg.fetch(NAME, tmp_path / "a")
    assert got.store_url == s3_url[0] and got.failures[0].file == f"{NAME}/{gone}"
    assert _tree(tmp_path / "a") == _tree(sharded_ckpt)
    # both stores bad: one shard absent from the primary, another corrupt in the backup: nothing placed
    _corrupt(open_store(*s3_url), f"{NAME}/{bad}")
    with pytest.raises(RegistryError) as err:
        reg.fetch(NAME, tmp_path / "b")
    assert f"{NAME}/{gone}: download failed" in str(err.value) and f"{NAME}/{bad}: {bad}: sha256" in str(err.value)
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".tierlab-fetch-*"))


def test_a_checkpoint_with_bad_shards_is_refused_at_publish(tmp_path: Path, sharded_ckpt: Path,
                                                            s3_url: tuple[str, dict]) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(sharded_ckpt, bad)
    index = json.loads((bad / INDEX_FILE).read_text())
    index["weight_map"]["lm_head.bias"] = _shards(bad)[-1]
    (bad / INDEX_FILE).write_text(json.dumps(index))
    reg = Registry([s3_url[0]], {s3_url[0]: s3_url[1]})
    with pytest.raises(ShardIndexError, match=r"names tensor 'lm_head.bias' in .*, but no shard holds it"):
        reg.publish(NAME, bad)
    assert open_store(*s3_url).list(NAME) == []  # nothing of it was uploaded
    (bad / _shards(bad)[0]).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{_shards(sharded_ckpt)[0]}: shard named by .* is missing"):
        reg.publish(NAME, bad)
    assert open_store(*s3_url).list(NAME) == []
