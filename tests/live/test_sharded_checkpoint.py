"""Sharded checkpoints (shards + `model.safetensors.index.json`) in the manifest, the loader (progressive
across shard boundaries), the engines' layer sources, and each bad input as an error naming the file or tensor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

from live.checkpoint import generate_checkpoint, shard_checkpoint  # noqa: E402
from live.loader import ChecksumError, load, start_load  # noqa: E402
from live.manifest import Manifest, build_manifest, sha256_file, verify  # noqa: E402
from live.shards import INDEX_FILE, ShardIndexError, read_weights_layout  # noqa: E402

SHARD_BYTES = 3 << 20  # the tiny preset (~10 MB) in 4 shards; layers 0 and 2 span two shards


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_checkpoint(tmp_path_factory.mktemp("single") / "tiny", "tiny", seed=7).path


@pytest.fixture(scope="module")
def sharded(single: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sharded") / "tiny"
    shard_checkpoint(single, out, SHARD_BYTES)
    return out


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def shards_of(ckpt: Path) -> list[str]:
    return sorted(set(json.loads((ckpt / INDEX_FILE).read_text())["weight_map"].values()))


# --------------------------------------------------------------------------- manifest


def test_manifest_hashes_every_shard_and_the_index_and_maps_layers_to_shards(sharded: Path) -> None:
    m = build_manifest(sharded, "tiny-sharded")
    names = {f.name for f in m.files}
    assert set(shards_of(sharded)) | {INDEX_FILE, "config.json", "tokenizer.json"} <= names
    assert len(shards_of(sharded)) == 4 and "model.safetensors" not in names
    for f in m.files:
        assert f.sha256 == sha256_file(sharded / f.name) and f.size_bytes == (sharded / f.name).stat().st_size
    lay = m.layout
    assert lay.file == INDEX_FILE and [s.name for s in lay.shards] == shards_of(sharded)
    assert lay.size_bytes == sum(s.size_bytes for s in lay.shards) and lay.n_layers == 4 and lay.in_layer_order()
    # every tensor's byte range is the one its shard's header gives, and names that shard
    index = json.loads((sharded / INDEX_FILE).read_text())["weight_map"]
    for t in lay.tensors():
        assert t.file == index[t.name]
        shard = next(s for s in lay.shards if s.name == t.file)
        assert shard.data_start_byte <= t.start_byte < t.end_byte <= shard.size_bytes
    spanning = [g.name for g in lay.groups() if len(g.spans()) > 1]
    assert spanning, "the fixture should put a layer across a shard boundary"
    again = Manifest.from_json(m.to_json())
    assert again == m and verify(sharded, again) == []


def test_a_single_file_manifest_is_unchanged_by_shard_support(single: Path) -> None:
    m = build_manifest(single, "tiny")
    layout = json.loads(m.to_json())["layout"]
    assert "shards" not in layout and all("file" not in t for g in layout["layers"] for t in g["tensors"])
    assert m.layout.weight_files[0].name == "model.safetensors" and Manifest.from_json(m.to_json()) == m


# --------------------------------------------------------------------------- loader


def test_loader_reads_shards_into_the_same_tensors_and_verifies_each_shard(single: Path, sharded: Path) -> None:
    plain = load(single)
    m = build_manifest(sharded, "s")
    loaded = load(sharded, manifest=m, chunk_bytes=1 << 20)
    assert list(loaded.tensors) == list(plain.tensors)  # file order across shards = layer order
    for name, t in plain.tensors.items():
        assert torch.equal(loaded.tensors[name], t), name
    assert loaded.timing.bytes_read == m.layout.size_bytes and loaded.config == plain.config


def test_progressive_releases_a_layer_only_once_its_bytes_in_every_shard_are_resident(single: Path,
                                                                                       sharded: Path) -> None:
    reference = load(single).tensors
    seen: list[tuple[int, set[str], bool]] = []

    def on_layer(i: int, tensors: dict) -> None:
        handle = box["handle"]
        spans = {(handle._file_index[t.file], t.end_byte) for t in handle._groups[i]}
        files = {t.file for t in handle._groups[i]}
        # at release time: resident in every shard it spans, and the values are the real ones
        ok = handle._plan.holds(spans) and all(torch.equal(v, reference[k]) for k, v in tensors.items())
        seen.append((i, files, ok))

    box: dict = {}
    # a slow emulated tier in 256 KiB chunks: layers arrive one by one, shards one after the other
    box["handle"] = start_load(sharded, on_layer=on_layer, chunk_bytes=256 << 10, max_read_Bps=40e6,
                               n_threads=4, manifest=build_manifest(sharded, "s"))
    ckpt = box["handle"].result(timeout=60)
    assert [i for i, _f, _ok in seen] == list(range(ckpt.n_layers + 1))
    assert all(ok for _i, _f, ok in seen), seen
    assert any(len(files) > 1 for _i, files, _ok in seen)  # some released group spanned two shards
    ready = ckpt.timing.layer_ready_s
    assert list(ready) == sorted(ready) and ready[0] < ckpt.timing.read_s * 0.9  # progressive, not at the end


def test_a_corrupt_shard_fails_the_load_naming_it(sharded: Path, tmp_path: Path) -> None:
    bad = copy_of(sharded, tmp_path / "bad")
    m = build_manifest(bad, "s")
    victim = bad / shards_of(bad)[2]
    data = bytearray(victim.read_bytes())
    data[-100] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=victim.name):
        load(bad, manifest=m)


# --------------------------------------------------------------------------- bad input


def _missing(ckpt: Path) -> str:
    name = shards_of(ckpt)[1]
    (ckpt / name).unlink()
    return rf"{name}: shard named by .*{INDEX_FILE} is missing"


def _truncated(ckpt: Path) -> str:
    name = shards_of(ckpt)[2]
    with open(ckpt / name, "r+b") as f:
        f.truncate((ckpt / name).stat().st_size - 1000)
    return rf"{name}: tensor .* lie outside the data section .* \(is the file truncated\?\)"


def _unknown(ckpt: Path) -> str:
    index = json.loads((ckpt / INDEX_FILE).read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = shards_of(ckpt)[0]
    (ckpt / INDEX_FILE).write_text(json.dumps(index))
    return rf"{INDEX_FILE}: names tensor 'model.layers.9.mlp.up_proj.weight' in .*, but no shard holds it"


def _duplicate(ckpt: Path) -> str:
    from safetensors.torch import load_file, save_file

    first, last = shards_of(ckpt)[0], shards_of(ckpt)[-1]
    tensors = load_file(ckpt / last)
    tensors["model.embed_tokens.weight"] = load_file(ckpt / first)["model.embed_tokens.weight"]
    save_file(tensors, ckpt / last)
    return rf"tensor 'model.embed_tokens.weight' is held by two shards, {first} and {last}"


BAD_INPUTS = {"missing shard": (_missing, FileNotFoundError), "truncated shard": (_truncated, ValueError),
              "index names an absent tensor": (_unknown, ShardIndexError),
              "two shards hold one tensor": (_duplicate, ShardIndexError)}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_shards_are_refused_naming_the_file_or_tensor(case: str, sharded: Path, tmp_path: Path) -> None:
    from live.engines.layer_sources import safetensors_files
    from live.engines.tokasaurus import count_params

    break_it, error = BAD_INPUTS[case]
    bad = copy_of(sharded, tmp_path / "bad")
    message = break_it(bad)
    for refuse in (read_weights_layout, build_manifest, load, start_load, safetensors_files, count_params):
        with pytest.raises(error, match=message):
            refuse(bad)


def test_the_engines_read_shards_through_the_loader_and_count_their_parameters(single: Path,
                                                                               sharded: Path) -> None:
    from live.engines.cpu_server import Engine
    from live.engines.llama import LlamaModel
    from live.engines.loader_source import LoaderLayerSource
    from live.engines.tokasaurus import count_params

    ids = torch.tensor([1, 5, 9, 42])
    plain = LlamaModel.from_dir(single).forward(ids)
    torch.testing.assert_close(LlamaModel.from_dir(sharded).forward(ids), plain, rtol=0, atol=0)
    for progressive in (False, True):
        source = Engine(sharded, "m", progressive=progressive)._layer_source()
        assert isinstance(source, LoaderLayerSource)
        got = LlamaModel.from_dir(sharded, layer_source=source).forward(ids)
        assert source.done.wait(30) and source.error is None
        torch.testing.assert_close(got, plain, rtol=0, atol=0)
    assert count_params(sharded) == count_params(single) > 0
