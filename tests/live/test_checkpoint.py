"""Generated checkpoints (HF layout, layer order, tokenizer, determinism, atomicity) and their manifests."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from live.checkpoint import PRESETS, LlamaParams, generate_checkpoint, main  # noqa: E402
from live.llama_config import LlamaConfig  # noqa: E402
from live.manifest import (  # noqa: E402
    MANIFEST_FILE,
    Manifest,
    SafetensorsHeaderError,
    build_manifest,
    read_layout,
    verify,
)

REPO = Path(__file__).resolve().parents[2]
FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
LAYER_TENSORS = ["input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return generate_checkpoint(tmp_path_factory.mktemp("ck") / "tiny", "tiny", seed=0).path


def raw_header(path: Path) -> tuple[int, dict]:
    """(header length, header) parsed straight from the bytes, independent of live.manifest."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return n, json.loads(f.read(n))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def test_files_exist_with_hf_names_in_layer_order(tiny: Path):
    assert {p.name for p in tiny.iterdir()} == FILES
    n, header = raw_header(tiny / "model.safetensors")
    assert n % 8 == 0
    meta = header.pop("__metadata__")
    assert meta["format"] == "pt" and meta["seed"] == "0"
    layers = json.loads((tiny / "config.json").read_text())["num_hidden_layers"]
    expected = ["model.embed_tokens.weight"]
    for i in range(layers):
        expected += [f"model.layers.{i}.{t}.weight" for t in LAYER_TENSORS]
    expected += ["model.norm.weight", "lm_head.weight"]
    by_offset = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    assert by_offset == expected
    # contiguous, strictly increasing, covering the data section exactly
    end = 0
    for name in expected:
        begin, stop = header[name]["data_offsets"]
        assert begin == end and stop > begin, name
        end = stop
    assert 8 + n + end == (tiny / "model.safetensors").stat().st_size


def test_config_matches_tensor_shapes(tiny: Path):
    c = json.loads((tiny / "config.json").read_text())
    assert c["architectures"] == ["LlamaForCausalLM"] and c["model_type"] == "llama"
    assert c["torch_dtype"] == "bfloat16" and c["tie_word_embeddings"] is False
    for key in ("rms_norm_eps", "rope_theta", "max_position_embeddings", "bos_token_id", "eos_token_id"):
        assert key in c
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    want = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for layer in range(c["num_hidden_layers"]):
        shapes = [(h,), (q, h), (kv, h), (kv, h), (h, q), (h,), (i, h), (i, h), (h, i)]
        want.update({f"model.layers.{layer}.{t}.weight": s for t, s in zip(LAYER_TENSORS, shapes, strict=True)})
    with safe_open(tiny / "model.safetensors", "pt") as f:
        assert set(f.keys()) == set(want)
        for name, shape in want.items():
            t = f.get_tensor(name)
            assert tuple(t.shape) == shape and t.dtype == torch.bfloat16, name
    gen = json.loads((tiny / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (c["bos_token_id"], c["eos_token_id"])


def test_weights_are_seeded_small_and_norms_one(tiny: Path):
    t = load_file(tiny / "model.safetensors")
    q = t["model.layers.0.self_attn.q_proj.weight"].float()
    assert abs(q.mean().item()) < 1e-3 and 0.018 < q.std().item() < 0.022
    assert torch.all(t["model.norm.weight"] == 1) and torch.all(t["model.layers.3.input_layernorm.weight"] == 1)
    assert not torch.equal(t["model.layers.0.mlp.up_proj.weight"], t["model.layers.1.mlp.up_proj.weight"])


def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def forward(t: dict, c: dict, ids: list[int]):
    """A plain Llama forward pass (GQA, RoPE, SwiGLU) in float32: the checkpoint must be usable as a model."""
    n_h, n_kv = c["num_attention_heads"], c["num_key_value_heads"]
    hd = c["hidden_size"] // n_h
    T = len(ids)
    inv = 1.0 / c["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd)
    ang = torch.outer(torch.arange(T).float(), inv)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def rope(x):
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    w = {k: v.float() for k, v in t.items()}
    x = w["model.embed_tokens.weight"][ids]
    mask = torch.full((T, T), float("-inf")).triu(1)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], c["rms_norm_eps"])
        q = rope((h @ w[p + "self_attn.q_proj.weight"].T).view(T, n_h, hd).transpose(0, 1))
        k = rope((h @ w[p + "self_attn.k_proj.weight"].T).view(T, n_kv, hd).transpose(0, 1))
        v = (h @ w[p + "self_attn.v_proj.weight"].T).view(T, n_kv, hd).transpose(0, 1)
        k, v = k.repeat_interleave(n_h // n_kv, 0), v.repeat_interleave(n_h // n_kv, 0)
        att = torch.softmax(q @ k.transpose(1, 2) / hd**0.5 + mask, -1) @ v
        x = x + att.transpose(0, 1).reshape(T, -1) @ w[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], c["rms_norm_eps"])
        gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    return rms_norm(x, w["model.norm.weight"], c["rms_norm_eps"]) @ w["lm_head.weight"].T


def test_forward_pass_is_numerically_sane(tiny: Path):
    c = json.loads((tiny / "config.json").read_text())
    tok = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    ids = tok.encode("Progressive loading overlaps the transfer with compute.").ids
    logits = forward(load_file(tiny / "model.safetensors"), c, ids)
    assert logits.shape == (len(ids), c["vocab_size"])
    assert torch.isfinite(logits).all()
    assert 0.05 < logits.std().item() < 5  # neither vanishing nor exploding


@pytest.mark.parametrize("text", [
    "Hello, world!", "", "  leading and trailing spaces  ", "tabs\tand\nnewlines\r\n",
    "naïve café, Zürich, Kraków — €3 🚀 漢字", "def f(x):\n    return x ** 2  # 0x1F",
])
def test_tokenizer_round_trips_text(tiny: Path, text: str):
    c = json.loads((tiny / "config.json").read_text())
    tok = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    assert tok.get_vocab_size(with_added_tokens=True) == c["vocab_size"]
    enc = tok.encode(text)
    assert enc.ids[0] == c["bos_token_id"]
    assert all(0 <= i < c["vocab_size"] for i in enc.ids)
    assert tok.decode(enc.ids, skip_special_tokens=True) == text
    tc = json.loads((tiny / "tokenizer_config.json").read_text())
    assert tok.token_to_id(tc["bos_token"]) == c["bos_token_id"]
    assert tok.token_to_id(tc["eos_token"]) == c["eos_token_id"]


def test_tokenizer_compresses_english(tiny: Path):
    tok = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    text = "the policy returns decisions: route this request to that instance, load this model"
    assert len(tok.encode(text).ids) < len(text.encode()) / 2  # BPE merges, not bytes


@pytest.mark.parametrize(("preset", "nominal_bytes"), [("tiny", 10e6), ("small", 100e6), ("medium", 400e6),
                                                       ("large", 1e9)])
def test_preset_sizes_roughly_as_named(preset: str, nominal_bytes: float):
    assert 0.9 * nominal_bytes < 2 * PRESETS[preset].n_params < 1.1 * nominal_bytes


def test_generated_size_matches_params(tiny: Path):
    weights = (tiny / "model.safetensors").stat().st_size
    n, _ = raw_header(tiny / "model.safetensors")
    assert weights == 8 + n + 2 * PRESETS["tiny"].n_params


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path: Path, tiny: Path):
    again = generate_checkpoint(tmp_path / "again", "tiny", seed=0)
    other = generate_checkpoint(tmp_path / "other", "tiny", seed=1)
    for name in FILES:
        assert sha256(tiny / name) == sha256(again.path / name), name
    assert sha256(tiny / "model.safetensors") != sha256(other.path / "model.safetensors")
    assert sha256(tiny / "tokenizer.json") == sha256(other.path / "tokenizer.json")
    assert again.files == tuple(sorted(FILES)) and again.n_layers == 4
    assert again.total_bytes == sum((again.path / f).stat().st_size for f in FILES)


def test_dtypes_share_the_draws(tmp_path: Path, tiny: Path):
    """float32 and float16 checkpoints of a seed hold the same draws; bf16 is float32 rounded as torch rounds."""
    f32 = generate_checkpoint(tmp_path / "f32", "tiny", seed=0, dtype="float32")
    f16 = generate_checkpoint(tmp_path / "f16", "tiny", seed=0, dtype="fp16")
    assert json.loads((f16.path / "config.json").read_text())["torch_dtype"] == "float16"
    a, b, h = (load_file(p / "model.safetensors") for p in (tiny, f32.path, f16.path))
    for name in a:
        assert b[name].dtype == torch.float32 and h[name].dtype == torch.float16
        assert torch.equal(b[name].to(torch.bfloat16), a[name]), name
        assert torch.equal(b[name].to(torch.float16), h[name]), name


def test_custom_params(tmp_path: Path):
    p = LlamaParams(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=1, vocab_size=300)
    info = generate_checkpoint(tmp_path / "c", p, seed=7)
    assert info.n_layers == 2 and info.n_params == p.n_params
    assert load_file(info.path / "model.safetensors")["model.layers.1.self_attn.k_proj.weight"].shape == (16, 64)
    assert Tokenizer.from_file(str(info.path / "tokenizer.json")).get_vocab_size() == 300


@pytest.mark.parametrize(("args", "kwargs"), [
    (("nope",), {}),
    ((PRESETS["tiny"],), {"dtype": "int4"}),
    (("tiny",), {"seed": -1}),
])
def test_invalid_arguments_leave_nothing(tmp_path: Path, args, kwargs):
    with pytest.raises(ValueError):
        generate_checkpoint(tmp_path / "out", *args, **kwargs)
    assert siblings(tmp_path / "out") == []


@pytest.mark.parametrize("bad", [
    {"hidden_size": 100, "num_attention_heads": 3},  # not divisible
    {"num_attention_heads": 4, "num_key_value_heads": 3},  # GQA groups uneven
    {"num_hidden_layers": 0},
    {"vocab_size": True},  # a bool is not a size
    {"rope_theta": -1.0},
])
def test_invalid_params_rejected(bad: dict):
    base = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 300}
    with pytest.raises(ValueError, match=next(iter(bad))):
        LlamaParams(**(base | bad))


def test_vocab_smaller_than_the_byte_alphabet_is_refused_by_the_generator(tmp_path: Path):
    """The engine runs any vocab; the generator's byte-level tokenizer needs 2 specials + 256 bytes."""
    small_vocab = LlamaParams(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, vocab_size=100)
    with pytest.raises(ValueError, match="vocab_size=100"):
        generate_checkpoint(tmp_path / "out", small_vocab)
    assert siblings(tmp_path / "out") == []


def test_written_config_is_the_params_with_dtype_and_special_ids(tiny: Path):
    """config.json round-trips through the one config class: the generator's params plus what it decided."""
    written = LlamaConfig.from_dir(tiny)
    assert written == replace(PRESETS["tiny"], torch_dtype="bfloat16", bos_token_id=0, eos_token_ids=(1,))
    assert written.to_hf_config() == json.loads((tiny / "config.json").read_text())


def test_existing_dir_refused_then_overwritten(tmp_path: Path):
    out = generate_checkpoint(tmp_path / "m", "tiny", seed=0).path
    before = sha256(out / "model.safetensors")
    with pytest.raises(FileExistsError):
        generate_checkpoint(out, "tiny", seed=1)
    assert sha256(out / "model.safetensors") == before
    generate_checkpoint(out, "tiny", seed=1, overwrite=True)
    assert sha256(out / "model.safetensors") != before
    assert siblings(out) == ["m"]


def test_killed_generation_leaves_no_checkpoint(tmp_path: Path):
    """SIGKILL while model.safetensors is being written: the target path never appears; the debris is swept."""
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "live.checkpoint", str(out), "--preset", "medium"], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not any(tmp_path.glob(".killed.tmp-*/model.safetensors")):
            assert proc.poll() is None and time.monotonic() < deadline, "generator ended before it could be killed"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".killed.tmp-")]  # the dead writer's temp dir
    generate_checkpoint(out, "tiny", seed=0)  # the next writer removes it
    assert siblings(out) == ["killed"]


def test_cli(tmp_path: Path, capsys):
    assert main([str(tmp_path / "cli"), "--preset", "tiny", "--seed", "3", "--layers", "2"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_layers"] == 2 and info["seed"] == 3 and set(info["files"]) == FILES
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["num_hidden_layers"] == 2
    assert main([str(tmp_path / "cli"), "--preset", "tiny"]) == 2  # exists


# ------------------------------------------------------------------ manifest

def test_manifest_lists_files_and_layer_layout(tiny: Path):
    m = build_manifest(tiny, "tiny-test")
    assert m.model == "tiny-test"
    assert {f.name for f in m.files} == FILES
    for f in m.files:
        assert f.size_bytes == (tiny / f.name).stat().st_size and f.sha256 == sha256(tiny / f.name)
    lay = m.layout
    assert lay.file == "model.safetensors" and lay.n_layers == 4 and lay.in_layer_order()
    assert lay.head.names == ("model.embed_tokens.weight",)
    assert lay.tail.names == ("model.norm.weight", "lm_head.weight")
    n, header = raw_header(tiny / "model.safetensors")
    assert lay.data_start_byte == 8 + n
    for i, g in enumerate(lay.layers):
        assert g.names == tuple(f"model.layers.{i}.{t}.weight" for t in LAYER_TENSORS)
        for t in g.tensors:
            begin, end = header[t.name]["data_offsets"]
            assert (t.start_byte, t.end_byte) == (8 + n + begin, 8 + n + end)
            assert list(t.shape) == header[t.name]["shape"] and t.dtype == "BF16"
    groups = lay.groups()
    assert all(a.end_byte <= b.start_byte for a, b in itertools.pairwise(groups))
    assert sum(g.n_bytes for g in groups) == lay.size_bytes - lay.data_start_byte


def test_manifest_json_round_trip(tiny: Path, tmp_path: Path):
    m = build_manifest(tiny)
    assert Manifest.from_json(m.to_json()) == m
    copy = tmp_path / "copy"
    shutil.copytree(tiny, copy)
    m.save(copy)  # stored beside the files, it is not one of them
    assert (copy / MANIFEST_FILE).is_file()
    assert build_manifest(copy, m.model) == m
    with pytest.raises(ValueError, match="version"):
        Manifest.from_json(json.dumps(json.loads(m.to_json()) | {"version": 99}))


def test_verify_detects_flipped_byte_and_size_change(tiny: Path, tmp_path: Path):
    m = build_manifest(tiny)
    copy = tmp_path / "copy"
    shutil.copytree(tiny, copy)
    assert verify(copy, m) == []
    with open(copy / "model.safetensors", "r+b") as f:  # one bit, deep in layer 2's weights
        off = m.layout.layers[2].start_byte + 12345
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0x01]))
    with open(copy / "config.json", "a") as f:
        f.write(" ")
    problems = verify(copy, m)
    assert len(problems) == 2
    assert problems[0].startswith("config.json: size") and problems[1].startswith("model.safetensors: sha256")


def test_verify_raises_naming_a_missing_file(tiny: Path, tmp_path: Path):
    m = build_manifest(tiny)
    copy = tmp_path / "copy"
    shutil.copytree(tiny, copy)
    (copy / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        verify(copy, m)


def test_layout_of_a_library_written_file(tmp_path: Path):
    """safetensors.torch.save_file orders data its own way; layers are still grouped by name."""
    tensors = {"lm_head.weight": torch.ones(8, 4), "model.embed_tokens.weight": torch.zeros(8, 4),
               "model.layers.1.mlp.up_proj.weight": torch.ones(3, 4, dtype=torch.bfloat16),
               "model.layers.0.mlp.up_proj.weight": torch.ones(3, 4, dtype=torch.bfloat16),
               "model.norm.weight": torch.ones(4)}
    save_file(tensors, tmp_path / "model.safetensors")
    lay = read_layout(tmp_path / "model.safetensors")
    assert [g.names for g in lay.layers] == [("model.layers.0.mlp.up_proj.weight",),
                                             ("model.layers.1.mlp.up_proj.weight",)]
    assert lay.head.names == ("model.embed_tokens.weight",)
    assert set(lay.tail.names) == {"lm_head.weight", "model.norm.weight"}


@pytest.mark.parametrize("blob", [b"\x01", struct.pack("<Q", 10**9) + b"{}", struct.pack("<Q", 4) + b"{no}",
                                  struct.pack("<Q", 2) + b"[]"])
def test_malformed_header_names_the_file(tmp_path: Path, blob: bytes):
    path = tmp_path / "model.safetensors"
    path.write_bytes(blob)
    with pytest.raises(SafetensorsHeaderError, match=r"model\.safetensors"):
        read_layout(path)


def test_header_offsets_outside_the_file_rejected(tmp_path: Path):
    header = json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + np.zeros(2, np.float32).tobytes())
    with pytest.raises(SafetensorsHeaderError, match="outside"):
        read_layout(path)
