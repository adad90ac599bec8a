"""Small Llama-architecture checkpoints in the Hugging Face layout, generated locally and deterministically.

A checkpoint directory holds `config.json` (LlamaConfig keys), `model.safetensors` (HF tensor
names, written in layer order: embeddings, layer 0..N-1, final norm, lm_head), `tokenizer.json`
(a byte-level BPE built with the `tokenizers` library), `tokenizer_config.json` and
`generation_config.json`. Weights are seeded random (numpy Generator), so the same seed gives
byte-identical files. The directory is written under a temporary name and renamed into place,
so a crash never leaves a partial checkpoint at the target path.

    python -m live.checkpoint OUT_DIR --preset tiny --seed 0

`shard_checkpoint` rewrites one as shards + `model.safetensors.index.json` (transformers' sharded layout).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import os
import re
import shutil
import struct
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from live.fsutil import fsync_dir as _fsync_dir
from live.llama_config import LlamaConfig, tensor_shapes
from live.manifest import MANIFEST_FILE, WEIGHTS_FILE, TensorRange, read_layout
from live.shards import INDEX_FILE

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
BOS_ID, EOS_ID = 0, 1
N_SPECIAL = 2
_BYTE_TOKENS = 256

# safetensors dtype tag, bytes per element, by the dtype names config.json uses
DTYPES: dict[str, tuple[str, int]] = {"bfloat16": ("BF16", 2), "float16": ("F16", 2), "float32": ("F32", 4)}
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


# the generator's historical name for the one Llama config dataclass
LlamaParams = LlamaConfig


# sizes are for bfloat16; float32 doubles them
PRESETS: dict[str, LlamaConfig] = {
    "tiny": LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=4096),  # ~10 MB
    "small": LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=14, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=8192),  # ~100 MB
    "medium": LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=14, num_attention_heads=8,
                          num_key_value_heads=4, vocab_size=16384),  # ~400 MB
    "large": LlamaConfig(hidden_size=1536, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=12,
                         num_key_value_heads=4, vocab_size=32000),  # ~1 GB
}


@dataclass(frozen=True)
class CheckpointInfo:
    """What `generate_checkpoint` wrote."""

    path: Path
    n_layers: int
    total_bytes: int
    files: tuple[str, ...]
    params: LlamaConfig
    dtype: str
    seed: int
    n_params: int


# ---------------------------------------------------------------- weights

def _to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 raw bits (uint16), rounding to nearest even as torch does (inputs are finite)."""
    u = x.view(np.uint32)
    u += np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
    return (u >> np.uint32(16)).astype(np.uint16)


def _tensor_bytes(name: str, shape: tuple[int, ...], dtype: str, rng: np.random.Generator, std: float) -> np.ndarray:
    """One tensor's stored bytes: norms are ones (as HF initialises them), matrices N(0, std)."""
    if name.endswith("layernorm.weight") or name == "model.norm.weight":
        x = np.ones(shape, dtype=np.float32)
    else:
        x = rng.standard_normal(shape, dtype=np.float32)
        x *= np.float32(std)
    if dtype == "bfloat16":
        return _to_bf16_bits(x)
    if dtype == "float16":
        return x.astype(np.float16)
    return x


def safetensors_head(entries: list[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, Any]) -> bytes:
    """The bytes before a safetensors file's data: u64 LE header length, then the JSON header of `entries`
    (name, dtype tag, shape, bytes) laid out in that order, padded so that the data starts 8-byte aligned."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, tag, shape, nbytes in entries:
        header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # as the safetensors library pads it
    return struct.pack("<Q", len(blob)) + blob


def write_safetensors_in_order(path: Path, shapes: list[tuple[str, tuple[int, ...]]], dtype: str,
                               tensors: Iterator[np.ndarray], metadata: dict[str, str]) -> int:
    """Write a safetensors file whose data follows `shapes` order; returns the file size in bytes.

    The header is built from the shapes alone, so tensors stream from `tensors` one at a time and
    the whole model is never held in memory. The safetensors library orders data by its own rules,
    hence writing the format by hand: u64 LE header length, JSON header, then the data.
    """
    tag, itemsize = DTYPES[dtype]
    head = safetensors_head([(name, tag, shape, int(np.prod(shape)) * itemsize) for name, shape in shapes], metadata)
    with open(path, "wb") as f:
        f.write(head)
        for (name, shape), arr in zip(shapes, tensors, strict=True):
            if arr.shape != shape:
                raise ValueError(f"{path}: tensor {name} has shape {arr.shape}, header says {shape}")
            f.write(memoryview(np.ascontiguousarray(arr)).cast("B"))
        f.flush()
        os.fsync(f.fileno())
        return f.tell()


# ---------------------------------------------------------------- tokenizer

_TOKENIZER_TEXT = """\
tierlab is a research testbed for serverless inference of large language models. Models live in a
hierarchy of storage tiers: GPU memory, host memory, local NVMe drives, SATA disks and a cloud object
store. When a request arrives for a model that is not resident on any GPU, the system performs a cold
start: it fetches the weights from the fastest tier that holds them, copies them to the GPU, starts the
engine, allocates the key-value cache and computes the first token. The time the user waits for that
first token is what the scheduling, caching and loading policies try to reduce.

A policy is plain Python. It never sleeps, never reads a clock of its own and never touches the disk.
It receives the current time and a read-only view of the cluster, and it returns decisions: route this
request to that instance, load this model on that node from that tier, evict, promote, prefetch, scale.
The simulator and the live stack both execute these decisions and write the same records.

Progressive loading lets the first forward pass start computing layer 0 while layers 1, 2 and 3 are
still being read. Each layer's weights are stored contiguously in the file, in the order the forward
pass needs them, so the loader can signal that layer i is ready as soon as its bytes are in memory.

Numbers matter: 16 GiB of weights at 2.5 GB/s take 6.9 seconds; at 25 GB/s, 0.69 seconds. The cost of
keeping a model warm is measured in GPU-hours, which are priced at about $2.50 per hour in 2024.

def first_token_s(layer_ready_s, layer_compute_s, start_s):
    t = start_s
    for ready in layer_ready_s:
        t = max(t, ready) + layer_compute_s
    return t

The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs! How vexingly quick
daft zebras jump? Sphinx of black quartz, judge my vow. "Hello, world", said the program; 'hello' said
the test. Zürich, Montréal, São Paulo and Kraków are cities; naïve café crème costs €3.
"""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the alphabet of the ByteLevel pre-tokenizer."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars), strict=True))


def _learn_merges(words: Counter[tuple[str, ...]], max_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE on the training words; ties go to the smallest pair so the result is deterministic."""
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += count
        if not pairs:
            break
        best, count = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if count < 2:  # a pair seen once is memorisation, not a merge
            break
        merges.append(best)
        a, b = best
        new_words: Counter[tuple[str, ...]] = Counter()
        for word, c in words.items():
            out: list[str] = []
            k = 0
            while k < len(word):
                if k + 1 < len(word) and word[k] == a and word[k + 1] == b:
                    out.append(a + b)
                    k += 2
                else:
                    out.append(word[k])
                    k += 1
            new_words[tuple(out)] += c
        words = new_words
    return merges


@functools.lru_cache(maxsize=8)
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if vocab_size < N_SPECIAL + _BYTE_TOKENS:
        raise ValueError(f"vocab_size={vocab_size} must be >= {N_SPECIAL + _BYTE_TOKENS}")
    byte_chars = [_bytes_to_unicode()[b] for b in range(256)]
    vocab: dict[str, int] = {BOS_TOKEN: BOS_ID, EOS_TOKEN: EOS_ID}
    for ch in byte_chars:
        vocab[ch] = len(vocab)
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    words = Counter(tuple(w) for w, _ in pre.pre_tokenize_str(_TOKENIZER_TEXT))
    merges = []
    for a, b in _learn_merges(words, vocab_size - len(vocab)):
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
            merges.append((a, b))
    # fill to exactly vocab_size with valid but rare merges (token + byte), so config and tokenizer agree
    tokens = list(vocab)[N_SPECIAL:]
    k = 0
    while len(vocab) < vocab_size:
        for ch in byte_chars:
            if len(vocab) >= vocab_size:
                break
            if tokens[k] + ch not in vocab:
                vocab[tokens[k] + ch] = len(vocab)
                tokens.append(tokens[k] + ch)
                merges.append((tokens[k], ch))
        k += 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(BOS_TOKEN, special=True), AddedToken(EOS_TOKEN, special=True)])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, BOS_ID)])
    if tok.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise AssertionError(f"tokenizer has {tok.get_vocab_size(with_added_tokens=True)} tokens, wanted {vocab_size}")
    return tok.to_str()


def build_tokenizer(vocab_size: int):
    """A byte-level BPE `tokenizers.Tokenizer` with exactly `vocab_size` tokens (BOS id 0, EOS id 1)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_tokenizer_json(vocab_size))


# ---------------------------------------------------------------- checkpoint

def resolve_params(preset_or_params: str | LlamaConfig) -> tuple[str, LlamaConfig]:
    """(preset name or "custom", params) for a preset name or explicit params the tokenizer can serve."""
    if isinstance(preset_or_params, LlamaConfig):
        if preset_or_params.vocab_size < N_SPECIAL + _BYTE_TOKENS:  # the byte-level BPE needs every byte
            raise ValueError(f"vocab_size={preset_or_params.vocab_size} must be >= {N_SPECIAL + _BYTE_TOKENS} "
                             "(special tokens + 256 byte tokens)")
        return "custom", preset_or_params
    if preset_or_params not in PRESETS:
        raise ValueError(f"unknown preset {preset_or_params!r}; choose one of {sorted(PRESETS)} or pass a LlamaConfig")
    return preset_or_params, PRESETS[preset_or_params]


def _normalise_dtype(dtype: str) -> str:
    dtype = _DTYPE_ALIASES.get(dtype, dtype)
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} not supported; choose one of {sorted(DTYPES)}")
    return dtype


def _tmp_prefix(out_dir: Path) -> str:
    return f".{out_dir.name}.tmp-"


def _remove_stale_tmp_dirs(out_dir: Path) -> None:
    """Remove temp dirs left by generators of this path that were killed (their pid is gone)."""
    pattern = re.compile(re.escape(_tmp_prefix(out_dir)) + r"(\d+)-")
    for d in out_dir.parent.glob(_tmp_prefix(out_dir) + "*"):
        m = pattern.match(d.name)
        if not m or not d.is_dir():
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:
            pass  # someone else's live process



@contextlib.contextmanager
def _atomic_dir(out_dir: Path, overwrite: bool) -> Iterator[Path]:
    """A temp dir beside `out_dir` to fill; on success it is fsynced and renamed to `out_dir`, on any error
    removed, `out_dir` untouched. An existing `out_dir` is an error unless `overwrite`."""
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_tmp_prefix(out_dir)}{os.getpid()}-", dir=out_dir.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint is meant to be shared
        _fsync_dir(tmp)
        if out_dir.exists():  # overwrite: move the old one aside first so the target is never half-written
            old = Path(tempfile.mkdtemp(prefix=f"{_tmp_prefix(out_dir)}{os.getpid()}-old-", dir=out_dir.parent))
            os.replace(out_dir, old / "x")
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
        _fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def generate_checkpoint(out_dir: str | os.PathLike, preset_or_params: str | LlamaConfig = "tiny", seed: int = 0, *,
                        dtype: str = "bfloat16", overwrite: bool = False) -> CheckpointInfo:
    """Write a seeded random Llama checkpoint in HF layout to `out_dir`, atomically.

    Files are written into a sibling temp dir, fsynced, and the dir is renamed to `out_dir`; on any
    error the temp dir is removed and `out_dir` is untouched. An existing `out_dir` is an error unless
    `overwrite`.
    """
    out_dir = Path(out_dir).absolute()
    preset, params = resolve_params(preset_or_params)
    dtype = _normalise_dtype(dtype)
    # the dtype written and the tokenizer's special ids belong in config.json too
    params = replace(params, torch_dtype=dtype, bos_token_id=BOS_ID, eos_token_ids=(EOS_ID,))
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    with _atomic_dir(out_dir, overwrite) as tmp:
        shapes = tensor_shapes(params)
        rng = np.random.default_rng(seed)
        arrays = (_tensor_bytes(name, shape, dtype, rng, params.initializer_range)
                  for name, shape in shapes)
        metadata = {"format": "pt", "generator": "tierlab.live.checkpoint", "preset": preset, "seed": str(seed)}
        write_safetensors_in_order(tmp / WEIGHTS_FILE, shapes, dtype, arrays, metadata)
        config = params.to_hf_config()
        small_files = {
            "config.json": json.dumps(config, indent=2) + "\n",
            "generation_config.json": json.dumps(
                {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "do_sample": False}, indent=2) + "\n",
            "tokenizer.json": _tokenizer_json(params.vocab_size),
            "tokenizer_config.json": json.dumps({
                "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN,
                "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
                "model_max_length": params.max_position_embeddings}, indent=2) + "\n",
        }
        for name, text in small_files.items():
            with open(tmp / name, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
    files = tuple(sorted(p.name for p in out_dir.iterdir()))
    total = sum((out_dir / f).stat().st_size for f in files)
    return CheckpointInfo(path=out_dir, n_layers=params.num_hidden_layers, total_bytes=total, files=files,
                          params=params, dtype=dtype, seed=seed, n_params=params.n_params)


def shard_checkpoint(src_dir: str | os.PathLike, out_dir: str | os.PathLike, max_shard_bytes: int, *,
                     overwrite: bool = False) -> list[str]:
    """Copy a single-file checkpoint to `out_dir` as shards + index, as transformers' `save_pretrained` lays
    them out; returns the shard names.

    Tensors keep their file order (layer order for checkpoints this module wrote) and go to
    `model-0000k-of-0000N.safetensors` greedily, a new shard starting where the next tensor would pass
    `max_shard_bytes` (a tensor larger than that gets a shard of its own); so a layer may span two
    shards. `model.safetensors.index.json` maps each tensor to its shard; the other files are copied.
    Atomic like `generate_checkpoint`.
    """
    src, out = Path(src_dir), Path(out_dir).absolute()
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    layout = read_layout(src / WEIGHTS_FILE)
    by_tag = {tag: (name, np.dtype(np.uint16 if name == "bfloat16" else name)) for name, (tag, _) in DTYPES.items()}
    shards: list[list[TensorRange]] = [[]]
    for t in layout.tensors():
        if t.dtype not in by_tag:
            raise ValueError(f"{src / WEIGHTS_FILE}: tensor {t.name} has dtype {t.dtype}; sharding supports "
                             f"{sorted(by_tag)}")
        if shards[-1] and sum(x.n_bytes for x in shards[-1]) + t.n_bytes > max_shard_bytes:
            shards.append([])
        shards[-1].append(t)
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    raw = np.memmap(src / WEIGHTS_FILE, dtype=np.uint8, mode="r")
    with _atomic_dir(out, overwrite) as tmp:
        for name, part in zip(names, shards, strict=True):
            dtypes = {t.dtype for t in part}
            if len(dtypes) != 1:  # write_safetensors_in_order writes one dtype per file
                raise ValueError(f"{src / WEIGHTS_FILE}: shard {name} would mix dtypes {sorted(dtypes)}")
            dtype_name, np_dtype = by_tag[dtypes.pop()]
            arrays = (raw[t.start_byte:t.end_byte].view(np_dtype).reshape(t.shape) for t in part)
            write_safetensors_in_order(tmp / name, [(t.name, t.shape) for t in part], dtype_name, arrays,
                                       {"format": "pt"})
        index = {"metadata": {"total_size": sum(t.n_bytes for t in layout.tensors())},
                 "weight_map": {t.name: name for name, part in zip(names, shards, strict=True) for t in part}}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        for f in sorted(src.iterdir()):
            if f.is_file() and f.name not in (WEIGHTS_FILE, MANIFEST_FILE) and not f.name.startswith("."):
                shutil.copyfile(f, tmp / f.name)
    return names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m live.checkpoint", description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="bfloat16", help="bfloat16 | float16 | float32")
    ap.add_argument("--layers", type=int, default=None, help="override the preset's num_hidden_layers")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--max-shard-bytes", type=int, default=None,
                    help="also write OUT_DIR-sharded: the same weights as shards + index (transformers' layout)")
    args = ap.parse_args(argv)
    params = PRESETS[args.preset]
    if args.layers is not None:
        params = replace(params, num_hidden_layers=args.layers)
    try:
        info = generate_checkpoint(args.out_dir, params if args.layers is not None else args.preset, args.seed,
                                   dtype=args.dtype, overwrite=args.overwrite)
        if args.max_shard_bytes is not None:
            sharded = args.out_dir.with_name(args.out_dir.name + "-sharded")
            shard_checkpoint(info.path, sharded, args.max_shard_bytes, overwrite=args.overwrite)
            print(f"sharded copy: {sharded}", file=sys.stderr)
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"path": str(info.path), "n_layers": info.n_layers, "n_params": info.n_params,
                      "total_bytes": info.total_bytes, "dtype": info.dtype, "seed": info.seed,
                      "files": list(info.files), "params": asdict(info.params)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
