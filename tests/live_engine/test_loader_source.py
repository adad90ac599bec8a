"""The engine fed by tierlab's loader: same logits as a plain load, layers released in order, shards."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from live.checkpoint import generate_checkpoint
from live.engines.llama import LlamaModel
from live.engines.loader_source import LoaderLayerSource


def test_loader_fed_model_matches_plain_load(tmp_path: Path) -> None:
    ckpt = generate_checkpoint(tmp_path / "ck", "tiny", seed=3)
    ids = torch.tensor([1, 5, 9, 42, 7])
    plain = LlamaModel.from_dir(ckpt.path).forward(ids)
    source = LoaderLayerSource(ckpt.path)
    progressive = LlamaModel.from_dir(ckpt.path, layer_source=source).forward(ids)
    assert source.done.wait(30) and source.error is None
    torch.testing.assert_close(progressive, plain, rtol=0, atol=0)
    released = [source.released_at[g] for g in range(source.n_layers + 2)]
    assert released == sorted(released)  # groups arrive in file (= compute) order


def test_loader_source_reports_a_corrupt_checkpoint(tmp_path: Path) -> None:
    from live.manifest import build_manifest

    ckpt = generate_checkpoint(tmp_path / "ck", "tiny", seed=4)
    manifest = build_manifest(ckpt.path, "m")
    weights = Path(ckpt.path) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # flip a byte in the last tensor
    weights.write_bytes(bytes(data))
    source = LoaderLayerSource(ckpt.path, manifest=manifest)
    assert source.done.wait(30)
    assert source.error is not None and "model.safetensors" in str(source.error)


def test_engine_reads_both_modes_and_shards_through_the_loader(tmp_path: Path) -> None:
    """One model.safetensors and a sharded checkpoint: tierlab's loader (which reads across shards)."""
    from safetensors.torch import load_file, save_file

    from live.engines.cpu_server import Engine

    ckpt = generate_checkpoint(tmp_path / "ck", "tiny", seed=5).path
    ids = torch.tensor([1, 5, 9])
    plain = LlamaModel.from_dir(ckpt).forward(ids)
    for progressive in (False, True):
        source = Engine(ckpt, "m", progressive=progressive)._layer_source()
        assert isinstance(source, LoaderLayerSource)
        torch.testing.assert_close(LlamaModel.from_dir(ckpt, layer_source=source).forward(ids), plain, rtol=0, atol=0)
    tensors = load_file(ckpt / "model.safetensors")
    names = sorted(tensors)
    weight_map = {}
    for k, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        shard = f"model-0000{k + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(ckpt / shard))
        weight_map |= dict.fromkeys(part, shard)
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    source = Engine(ckpt, "m")._layer_source()
    assert isinstance(source, LoaderLayerSource)
    torch.testing.assert_close(LlamaModel.from_dir(ckpt, layer_source=source).forward(ids), plain, rtol=0, atol=0)
