"""Quantised weight variants (`live.quantize`) served by the CPU engine: the int8 / fp8 copy of a bf16 checkpoint
halves the linear weights' bytes on disk and in memory, and the engine computes exactly the model transformers
computes with the dequantised weights (logits to 1e-4)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors import safe_open

from live.checkpoint import build_tokenizer
from live.engines.base import CpuEngineProcess, free_port
from live.engines.layer_sources import EventLayerSource, SafetensorsLayerSource
from live.engines.llama import LlamaModel
from live.engines.loader_source import LoaderLayerSource
from live.manifest import WEIGHTS_FILE, read_file_tensors
from live.quantize import dequantize, is_quantised_linear, quantize_checkpoint, quantize_tensor, scale_name

transformers = pytest.importorskip("transformers")

SIZES = {"vocab_size": 320,  # build_tokenizer's smallest byte-level vocabulary and then some
         "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
         "attention_bias": True,  # q/k/v/o biases: a quantised linear adds its bias after the scale
         "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
PROMPT = [5, 17, 42, 3, 88, 61, 9, 33, 70, 2, 45, 12]


@pytest.fixture(scope="module")
def bf16_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama written by transformers' `save_pretrained` in bfloat16 (weights redrawn larger than
    transformers' init, so the logits are far from uniform and quantisation error shows)."""
    out = tmp_path_factory.mktemp("quant") / "bf16"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZES)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.3 if name.endswith("bias") else 0.15)
    model.to(torch.bfloat16).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def variants(bf16_ckpt: Path) -> dict[str, Path]:
    return {fmt: quantize_checkpoint(bf16_ckpt, bf16_ckpt.parent / fmt, fmt).path for fmt in ("int8", "fp8")}


def reference_logits(src: Path, quantised: Path | None) -> torch.Tensor:
    """transformers' float32 logits over PROMPT for `src`, its linear weights replaced by `quantised`'s
    dequantised ones when given."""
    model = transformers.LlamaForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    if quantised is not None:
        params = dict(model.named_parameters())
        with safe_open(str(quantised / WEIGHTS_FILE), framework="pt") as f:
            names = [n for n in f.keys() if is_quantised_linear(n)]  # noqa: SIM118 - not a mapping
            assert len(names) == 7 * SIZES["num_hidden_layers"]
            with torch.no_grad():
                for name in names:
                    params[name].copy_(dequantize(f.get_tensor(name), f.get_tensor(scale_name(name))))
    with torch.no_grad():
        return model(torch.tensor([PROMPT])).logits[0].float()


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_engine_computes_the_dequantised_model(bf16_ckpt: Path, variants: dict[str, Path], fmt: str) -> None:
    ckpt = variants[fmt]
    engine = LlamaModel.from_dir(ckpt, torch.float32)
    assert engine.weight_format == fmt
    ours = engine.forward(PROMPT)
    expected = reference_logits(bf16_ckpt, ckpt)
    assert torch.allclose(ours, expected, atol=1e-4, rtol=1e-4), (ours - expected).abs().max()
    # the comparison can fail: the bf16 original's logits differ from the variant's by far more than 1e-4
    original = reference_logits(bf16_ckpt, None)
    assert (original - expected).abs().max() > 1e-2
    # the engine's real load path (the parallel loader, as `cpu_engine` uses it) gives the same model
    progressive = LlamaModel.from_dir(ckpt, torch.float32, layer_source=LoaderLayerSource(ckpt))
    assert torch.equal(progressive.forward(PROMPT), ours)


def test_variant_halves_linear_bytes_on_disk_and_resident(bf16_ckpt: Path, variants: dict[str, Path]) -> None:
    _, _, src = read_file_tensors(bf16_ckpt / WEIGHTS_FILE)
    src_by_name = {t.name: t for t in src}
    bf16_model = LlamaModel.from_dir(bf16_ckpt, torch.bfloat16)
    for fmt, ckpt in variants.items():
        _, size, out = read_file_tensors(ckpt / WEIGHTS_FILE)
        by_name = {t.name: t for t in out}
        linear = [n for n in src_by_name if is_quantised_linear(n)]
        assert len(linear) == 7 * SIZES["num_hidden_layers"]
        for name in linear:  # one byte per weight instead of bf16's two, plus a float32 scale per output channel
            assert by_name[name].dtype == {"int8": "I8", "fp8": "F8_E4M3"}[fmt]
            assert by_name[name].n_bytes * 2 == src_by_name[name].n_bytes
            assert by_name[scale_name(name)].n_bytes == 4 * src_by_name[name].shape[0]
        for name, t in src_by_name.items():  # embeddings, norms, biases, lm_head: as stored
            if name not in linear:
                assert (by_name[name].dtype, by_name[name].n_bytes) == (t.dtype, t.n_bytes)
        assert set(by_name) == set(src_by_name) | {scale_name(n) for n in linear}
        linear_src = sum(src_by_name[n].n_bytes for n in linear)
        linear_out = sum(by_name[n].n_bytes + by_name[scale_name(n)].n_bytes for n in linear)
        assert 0.5 < linear_out / linear_src < 0.5 + 2 / SIZES["hidden_size"] + 1e-9  # scale overhead 4 B / in
        # resident in a bf16 engine: the variant holds its linear weights quantised, the rest as the original
        model = LlamaModel.from_dir(ckpt, torch.bfloat16)
        assert bf16_model.weight_bytes() - model.weight_bytes() == linear_src - linear_out
        assert json.loads((ckpt / "config.json").read_text())["quantization_config"]["format"] == fmt
        assert size < (bf16_ckpt / WEIGHTS_FILE).stat().st_size


def test_quantize_tensor_is_per_channel_symmetric() -> None:
    w = torch.tensor([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0], [3.0, 1.5, -0.75]])
    q, s = quantize_tensor(w, "int8")
    assert q.dtype == torch.int8 and s.shape == (3, 1)
    assert q[0].tolist() == [64, -127, 32] and q[1].tolist() == [0, 0, 0] and q[2, 0] == 127
    assert torch.allclose(dequantize(q, s), w, atol=float(s.max()) / 2)
    q8, s8 = quantize_tensor(w, "fp8")
    assert q8.dtype == torch.float8_e4m3fn and float(q8.float().abs().max()) == 448.0
    assert torch.allclose(dequantize(q8, s8), w, rtol=0.07)  # e4m3: 3 mantissa bits
    with pytest.raises(ValueError, match="int4"):
        quantize_tensor(w, "int4")


def test_bad_input_is_refused_by_name(bf16_ckpt: Path, variants: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not one of"):
        quantize_checkpoint(bf16_ckpt, tmp_path / "x", "int4")
    with pytest.raises(ValueError, match=r"no config\.json"):
        quantize_checkpoint(tmp_path, tmp_path / "x", "int8")
    with pytest.raises(ValueError, match=r"quantization_config.*already quantised"):
        quantize_checkpoint(variants["int8"], tmp_path / "x", "fp8")
    with pytest.raises(FileExistsError):
        quantize_checkpoint(bf16_ckpt, variants["fp8"], "int8")
    # a config naming an unknown format: the engine names the field
    bad = tmp_path / "bad-format"
    bad.mkdir()
    raw = json.loads((variants["int8"] / "config.json").read_text())
    raw["quantization_config"]["format"] = "int3"
    (bad / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"quantization_config.format 'int3'"):
        LlamaModel.from_dir(bad)
    # quantised weights whose scale is missing, and int8 weights a plain config does not announce
    config = LlamaModel.from_dir(variants["int8"]).config
    groups = SafetensorsLayerSource(variants["int8"])
    layer0 = dict(groups.wait(1))
    del layer0[scale_name("model.layers.0.mlp.up_proj.weight")]
    unscaled = {n: t for n, t in groups.wait(1).items() if not n.endswith("_scale")}
    for fmt, tensors, match in (("int8", layer0, "lacks tensor 'model.layers.0.mlp.up_proj.weight_scale'"),
                                (None, unscaled, "dtype torch.int8; without a tierlab quantization_config")):
        source = EventLayerSource(config.num_hidden_layers)
        source.put(0, groups.wait(0))
        source.put(1, tensors)
        with pytest.raises((KeyError, ValueError), match=match):
            LlamaModel(config, source, torch.float32, fmt).forward([1, 2])


def test_a_failed_quantisation_leaves_no_checkpoint(bf16_ckpt: Path, tmp_path: Path) -> None:
    """A linear weight that is not [out, in] fails mid-write: neither the target nor a temp dir is left."""
    from safetensors.torch import save_file

    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text((bf16_ckpt / "config.json").read_text())
    save_file({"model.embed_tokens.weight": torch.zeros(4, 4), "model.layers.0.mlp.up_proj.weight": torch.zeros(8)},
              str(src / WEIGHTS_FILE))
    out = tmp_path / "out" / "int8"
    with pytest.raises(ValueError, match=r"up_proj.weight' has shape \(8,\), expected \[out, in\]"):
        quantize_checkpoint(src, out, "int8")
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_cli_and_a_served_variant(bf16_ckpt: Path, tmp_path: Path) -> None:
    """`python -m live.quantize` writes the variant; a real engine process serves it as `name@int8`, reports its
    weight format and bytes, and answers what the in-process model computes."""
    dst = tmp_path / "tiny-int8"
    run = subprocess.run([sys.executable, "-m", "live.quantize", str(bf16_ckpt), str(dst), "--format", "int8"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "14 linear weights quantised" in run.stdout
    bad = subprocess.run([sys.executable, "-m", "live.quantize", str(bf16_ckpt), str(tmp_path / "y"), "--format",
                          "int4"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "'int4' is not one of ['fp8', 'int8']" in bad.stderr
    _add_tokenizer(dst)
    proc = CpuEngineProcess(dst, free_port(), model_name="tiny@int8", threads=1)
    proc.start()
    try:
        proc.wait_ready(timeout_s=60)
        stats: dict[str, Any] = httpx.get(proc.url + "/stats", timeout=10).json()
        local = LlamaModel.from_dir(dst)
        assert stats["weight_format"] == "int8" and stats["weight_bytes"] == local.weight_bytes()
        assert [m["id"] for m in httpx.get(proc.url + "/v1/models", timeout=10).json()["data"]] == ["tiny@int8"]
        r = httpx.post(proc.url + "/v1/completions", timeout=30,
                       json={"model": "tiny@int8", "prompt": "hello tierlab", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        tokenizer = build_tokenizer(SIZES["vocab_size"])  # the config has no BOS: none is prepended
        tokens = list(local.generate(tokenizer.encode("hello tierlab").ids, max_tokens=4))
        assert r.json()["choices"][0]["text"] == tokenizer.decode(tokens, skip_special_tokens=True)
    finally:
        proc.close()


def _add_tokenizer(ckpt: Path) -> None:
    """transformers wrote no tokenizer: a byte-level one over the checkpoint's vocabulary, for the server."""
    build_tokenizer(SIZES["vocab_size"]).save(str(ckpt / "tokenizer.json"))
