"""Registry publish / fetch against real stores: a local dir, moto S3 and (where it runs) azurite, on loopback."""

from __future__ import annotations

import logging
import os
import urllib.request
from pathlib import Path

import pytest

from live.agent_tiers import REVISION_FILE
from live.manifest import MANIFEST_FILE, WEIGHTS_FILE, verify
from live.registry import ModelSourceError, Registry, RegistryError, check_model_name
from live.stores import Store, open_store

NAME = "llama-tiny"


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` and its bytes (an agent tier copy's revision mark left out: not content)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != REVISION_FILE}


def _all_paths(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def _corrupt(store: Store, key: str) -> bytes:
    """Overwrite `key` with bytes of the same size that differ (so only the sha256 check can catch it)."""
    data = bytearray(store.get_bytes(key))
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
    store.put_bytes(key, bytes(data))
    return bytes(data)


def test_publish_and_fetch_file_and_s3(tmp_path: Path, tiny_ckpt: Path, s3_url: tuple[str, dict]) -> None:
    file_url = (tmp_path / "primary").as_uri()
    reg = Registry([file_url, s3_url[0]], {s3_url[0]: s3_url[1]})
    manifest = reg.publish(NAME, tiny_ckpt)

    expected_keys = sorted([f"{NAME}/{f.name}" for f in manifest.files] + [f"{NAME}/{MANIFEST_FILE}"])
    for store in reg.store_list:
        assert store.list(NAME) == expected_keys  # every file and the manifest, no temp keys left
        assert store.size(f"{NAME}/{WEIGHTS_FILE}") == (tiny_ckpt / WEIGHTS_FILE).stat().st_size
        assert store.exists(f"{NAME}/{MANIFEST_FILE}")
        assert not store.exists(f"{NAME}/nope.bin")

    result = reg.fetch(NAME, tmp_path / "dest", streams=16)
    assert result.store_url == file_url and result.failures == ()
    assert _tree(result.path) == _tree(tiny_ckpt)
    assert verify(result.path, manifest) == []

    # from S3 alone, with a fresh registry that must read the manifest back from the store
    s3_only = Registry([s3_url[0]], {s3_url[0]: s3_url[1]}, chunk_bytes=1 << 20)
    assert s3_only.manifest(NAME) == manifest
    got = s3_only.fetch(NAME, tmp_path / "dest_s3", streams=8)
    assert got.store_url == s3_url[0]
    assert _tree(got.path) == _tree(tiny_ckpt)

    # an existing dest that matches is a cache hit, not a re-download
    again = s3_only.fetch(NAME, tmp_path / "dest_s3")
    assert again.cached and again.store_url is None


def test_corrupt_primary_falls_back_to_backup(tmp_path: Path, tiny_ckpt: Path, s3_url: tuple[str, dict],
                                             caplog: pytest.LogCaptureFixture) -> None:
    reg = Registry([s3_url[0], (tmp_path / "backup").as_uri()], {s3_url[0]: s3_url[1]}, chunk_bytes=1 << 20)
    reg.publish(NAME, tiny_ckpt)
    primary = reg.store_list[0]
    corrupt = _corrupt(primary, f"{NAME}/{WEIGHTS_FILE}")

    dest = tmp_path / "models" / NAME
    with caplog.at_level(logging.WARNING, logger="live.registry"):
        result = reg.fetch(NAME, dest)

    assert result.store_url == reg.store_list[1].url
    [failure] = result.failures
    assert failure.store_url == s3_url[0]
    assert failure.file == f"{NAME}/{WEIGHTS_FILE}"
    assert "sha256" in failure.problem
    assert s3_url[0] in caplog.text and WEIGHTS_FILE in caplog.text
    assert (dest / WEIGHTS_FILE).read_bytes() == (tiny_ckpt / WEIGHTS_FILE).read_bytes() != corrupt
    assert _tree(dest) == _tree(tiny_ckpt)
    assert os.listdir(dest.parent) == [NAME]  # staging dirs of the failed attempt are gone


def test_all_stores_corrupt_raises_and_leaves_dest_untouched(tmp_path: Path, tiny_ckpt: Path,
                                                             s3_url: tuple[str, dict]) -> None:
    file_url = (tmp_path / "primary").as_uri()
    reg = Registry([file_url, s3_url[0]], {s3_url[0]: s3_url[1]})
    reg.publish(NAME, tiny_ckpt)
    _corrupt(reg.store_list[0], f"{NAME}/{WEIGHTS_FILE}")
    _corrupt(reg.store_list[1], f"{NAME}/config.json")

    parent = tmp_path / "models"
    parent.mkdir()
    with pytest.raises(RegistryError) as err:
        reg.fetch(NAME, parent / NAME)
    msg = str(err.value)
    assert NAME in msg and file_url in msg and s3_url[0] in msg
    assert WEIGHTS_FILE in msg and "config.json" in msg
    assert os.listdir(parent) == []

    # an existing, non-matching dest is never modified
    dest = parent / NAME
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(RegistryError, match="does not match the manifest"):
        reg.fetch(NAME, dest)
    assert _tree(dest) == {"keep.txt": b"mine"}


def test_missing_object_in_primary_is_recorded(tmp_path: Path, tiny_ckpt: Path, s3_url: tuple[str, dict]) -> None:
    reg = Registry([s3_url[0], (tmp_path / "backup").as_uri()], {s3_url[0]: s3_url[1]})
    reg.publish(NAME, tiny_ckpt)
    reg.store_list[0].delete(f"{NAME}/tokenizer.json")
    result = reg.fetch(NAME, tmp_path / "dest")
    assert result.failures[0].file == f"{NAME}/tokenizer.json"
    assert _tree(result.path) == _tree(tiny_ckpt)


@pytest.mark.parametrize("name", ["../evil", "a/b", "a\\b", "..", ".hidden", "", "a..b", "x y", "/abs", "m\x00",
                                  "naïve", "a" * 129])
def test_unsafe_names_rejected_before_any_file(tmp_path: Path, tiny_ckpt: Path, name: str) -> None:
    root = tmp_path / "store"
    reg = Registry([root.as_uri()])
    before = _all_paths(tmp_path)
    with pytest.raises(ValueError, match="unsafe model name"):
        check_model_name(name)
    for call in (lambda: reg.publish(name, tiny_ckpt), lambda: reg.fetch(name, tmp_path / "dest"),
                 lambda: reg.manifest(name), lambda: reg.register(name, local_dir=tiny_ckpt),
                 lambda: reg.download_urls(name)):
        with pytest.raises(ValueError, match="unsafe model name"):
            call()
    assert _all_paths(tmp_path) == before


def test_presigned_urls_download_from_moto(tmp_path: Path, tiny_ckpt: Path, s3_url: tuple[str, dict]) -> None:
    reg = Registry([(tmp_path / "primary").as_uri(), s3_url[0]], {s3_url[0]: s3_url[1]})
    manifest = reg.publish(NAME, tiny_ckpt)
    assert reg.store_list[0].presign(f"{NAME}/config.json") is None  # local dirs cannot sign

    urls = reg.download_urls(NAME, expires_s=600)
    assert sorted(urls) == sorted(f.name for f in manifest.files)
    for fname in ("config.json", WEIGHTS_FILE):
        assert "Signature" in urls[fname] or "X-Amz-Signature" in urls[fname]
        with urllib.request.urlopen(urls[fname], timeout=10) as resp:
            assert resp.read() == (tiny_ckpt / fname).read_bytes()


def test_local_source_catalog(tmp_path: Path, tiny_ckpt: Path) -> None:
    reg = Registry([(tmp_path / "s").as_uri()])
    reg.register(NAME, local_dir=tiny_ckpt)
    assert reg.resolve(NAME) == tiny_ckpt
    m = reg.publish(NAME)  # from the catalog source
    assert m.model == NAME
    with pytest.raises(RegistryError, match="not in the catalog"):
        reg.resolve("other")


def test_hf_offline_snapshot_not_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reg = Registry([(tmp_path / "s").as_uri()], hf_cache_dir=tmp_path / "hf-cache")
    reg.register("hf-model", hf_repo="tierlab-test/definitely-not-cached", hf_revision="main")
    with pytest.raises(ModelSourceError) as err:
        reg.resolve("hf-model")
    msg = str(err.value)
    assert "hf-model" in msg and "tierlab-test/definitely-not-cached@main" in msg and "HF_HUB_OFFLINE" in msg
    with pytest.raises(ModelSourceError, match="hf-model"):
        reg.publish("hf-model")
    assert not (tmp_path / "s").exists()


def test_azure_primary_s3_backup(tmp_path: Path, tiny_ckpt: Path, az_url: tuple[str, dict],
                                 s3_url: tuple[str, dict]) -> None:
    reg = Registry([az_url[0], s3_url[0]], {az_url[0]: az_url[1], s3_url[0]: s3_url[1]}, chunk_bytes=1 << 20)
    manifest = reg.publish(NAME, tiny_ckpt)
    az = reg.store_list[0]
    assert az.list(NAME) == sorted([f"{NAME}/{f.name}" for f in manifest.files] + [f"{NAME}/{MANIFEST_FILE}"])

    first = reg.fetch(NAME, tmp_path / "a", streams=8)
    assert first.store_url == az_url[0] and _tree(first.path) == _tree(tiny_ckpt)

    _corrupt(az, f"{NAME}/{WEIGHTS_FILE}")
    second = reg.fetch(NAME, tmp_path / "b")
    assert second.store_url == s3_url[0]
    assert second.failures[0].store_url == az_url[0] and "sha256" in second.failures[0].problem
    assert _tree(second.path) == _tree(tiny_ckpt)

    # azurite signs with the account key of the connection string (SAS)
    url = az.presign(f"{NAME}/config.json", 600)
    assert url is not None and "sig=" in url
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.read() == (tiny_ckpt / "config.json").read_bytes()


def test_open_store_rejects_unknown_scheme() -> None:
    with pytest.raises(ValueError, match="unsupported store scheme"):
        open_store("ftp://host/x")
    with pytest.raises(ValueError, match="missing bucket"):
        open_store("s3://")
