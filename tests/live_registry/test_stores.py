"""Store primitives against a real moto S3 server and a local dir: parallel ranged reads, atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from live.stores import TMP_PREFIX, Store, StoreError, open_store


@pytest.fixture
def blob(tmp_path: Path) -> Path:
    """3 MB + 123 bytes of seeded random data: not a multiple of any chunk size used below."""
    p = tmp_path / "blob.bin"
    p.write_bytes(np.random.default_rng(7).bytes((3 << 20) + 123))
    return p


@pytest.mark.parametrize("streams,chunk_bytes", [(8, 256 << 10), (1, 1 << 20), (4, 3 << 20)])
def test_parallel_ranged_get_equals_original(tmp_path: Path, s3_store: Store, blob: Path, streams: int,
                                             chunk_bytes: int) -> None:
    s3_store.put_file(blob, "x/blob.bin")
    out = tmp_path / "out" / "blob.bin"
    n = s3_store.get_file("x/blob.bin", out, streams=streams, chunk_bytes=chunk_bytes)
    assert n == blob.stat().st_size
    assert out.read_bytes() == blob.read_bytes()
    assert os.listdir(out.parent) == ["blob.bin"]  # no temp file left


def test_get_file_error_leaves_nothing(tmp_path: Path, s3_store: Store, blob: Path) -> None:
    out = tmp_path / "out.bin"
    with pytest.raises(StoreError, match=r"missing\.bin"):
        s3_store.get_file("x/missing.bin", out)
    # an object shorter than expected fails mid-download: the partial temp file is removed too
    s3_store.put_file(blob, "x/blob.bin")
    with pytest.raises(StoreError, match="returned"):
        s3_store.get_file("x/blob.bin", out, chunk_bytes=1 << 20, size_bytes=blob.stat().st_size + 5)
    assert os.listdir(tmp_path) == ["blob.bin"]


def test_get_file_keeps_old_file_on_error(tmp_path: Path, s3_store: Store) -> None:
    out = tmp_path / "out.bin"
    out.write_bytes(b"old")
    with pytest.raises(StoreError):
        s3_store.get_file("x/missing.bin", out)
    assert out.read_bytes() == b"old"


def test_local_store_put_dir_list_size(tmp_path: Path, tiny_ckpt: Path) -> None:
    store = open_store((tmp_path / "root").as_uri())
    keys = store.put_dir(tiny_ckpt, "m")
    assert keys == store.list("m") == sorted(f"m/{p.name}" for p in tiny_ckpt.iterdir())
    assert not any(TMP_PREFIX in p.name for p in (tmp_path / "root").rglob("*"))
    assert store.size("m/config.json") == (tiny_ckpt / "config.json").stat().st_size
    assert store.presign("m/config.json") is None
    out = tmp_path / "w.safetensors"
    store.get_file("m/model.safetensors", out, streams=4, chunk_bytes=1 << 20)
    assert out.read_bytes() == (tiny_ckpt / "model.safetensors").read_bytes()


def test_keys_cannot_escape_root(tmp_path: Path) -> None:
    store = open_store((tmp_path / "root").as_uri())
    for key in ("../x", "a/../../x", "", "a\\b"):
        with pytest.raises(ValueError, match="bad key"):
            store.path(key)


def test_s3_put_dir_and_presign(s3_store: Store, tiny_ckpt: Path) -> None:
    import urllib.request

    keys = s3_store.put_dir(tiny_ckpt, "m")
    assert s3_store.list("m") == keys
    url = s3_store.presign("m/tokenizer.json", expires_s=60)
    assert url is not None and url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.read() == (tiny_ckpt / "tokenizer.json").read_bytes()

