"""Quantised weight variants of a Llama-family safetensors checkpoint (issue 15 item 5, live side).

    python -m live.quantize SRC_DIR DST_DIR --format int8|fp8

writes DST_DIR, a copy of SRC_DIR whose decoder-layer linear weights (q/k/v/o, gate/up/down projections) are
quantised per output channel, symmetrically: `int8` stores round(w / s) in [-127, 127] with s = max|w_row| / 127,
`fp8` stores (w / s) as torch.float8_e4m3fn with s = max|w_row| / 448 (the format's largest finite value). Each
quantised `<linear>.weight` gets a float32 `<linear>.weight_scale` of shape [out_features, 1] beside it (the
compressed-tensors naming), so `w ~= weight.float() * weight_scale`. Embeddings, norms, biases and the LM head stay
in the source dtype, as in published FP8 / INT8 checkpoints and as `core/variants.py` assumes by default.
config.json gains `quantization_config = {"quant_method": "tierlab_weight_format", "format": ...}` (a method of
tierlab's own: transformers does not read it, the CPU engine does, `live.engines.llama`). Tensors keep the source
files' order (layer order for progressive loading), shards keep their names (the index gains the scales), the other
files are copied (not a manifest: its hashes would be the source's). The copy is written under a temporary name and
renamed into place, so no partial checkpoint is ever left at DST_DIR.

The served deployment of such a copy is named `name@fmt` (`core.variants.variant_name`); the gateway records the
part after `@` as the request's `variant`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from live.checkpoint import _atomic_dir, safetensors_head
from live.llama_config import CONFIG_FILE, LlamaConfig
from live.manifest import MANIFEST_FILE, WEIGHTS_FILE, read_file_tensors
from live.shards import INDEX_FILE

if TYPE_CHECKING:
    import torch

QUANT_METHOD = "tierlab_weight_format"
SCALE_SUFFIX = "_scale"  # `<linear>.weight` -> `<linear>.weight_scale`
#: the decoder-layer linear weights a variant quantises (suffixes of `model.layers.{i}.`)
LINEAR_SUFFIXES = tuple(f".{t}.weight" for t in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                 "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
#: format -> (torch dtype name, safetensors tag, largest representable magnitude)
FORMATS: dict[str, tuple[str, str, float]] = {"int8": ("int8", "I8", 127.0), "fp8": ("float8_e4m3fn", "F8_E4M3", 448.0)}
_SOURCE_TAGS = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
_TAG_OF = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "int8": "I8", "float8_e4m3fn": "F8_E4M3"}


def is_quantised_linear(name: str) -> bool:
    """True for the tensors a variant quantises (decoder-layer linear weights, not biases, norms or lm_head)."""
    return name.startswith("model.layers.") and name.endswith(LINEAR_SUFFIXES)


def scale_name(weight_name: str) -> str:
    return weight_name + SCALE_SUFFIX


def split_weight_format(raw: Mapping[str, Any], where: str = CONFIG_FILE) -> tuple[str | None, dict[str, Any]]:
    """(weight format or None, config.json without tierlab's `quantization_config`).

    A config without `quantization_config`, or with another method's (left in place, so that the architecture
    check refuses it by name), has format None. A tierlab one with an unknown format raises naming the field.
    """
    out = dict(raw)
    qc = out.get("quantization_config")
    if not isinstance(qc, Mapping) or qc.get("quant_method") != QUANT_METHOD:
        return None, out
    fmt = qc.get("format")
    if fmt not in FORMATS:
        raise ValueError(f"{where}: quantization_config.format {fmt!r} is not one of {sorted(FORMATS)}")
    del out["quantization_config"]
    return str(fmt), out


def read_config(model_dir: str | os.PathLike[str]) -> tuple[LlamaConfig, str | None]:
    """A checkpoint dir's config and its weight format (None: not quantised); errors name config.json."""
    path = Path(model_dir) / CONFIG_FILE
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: must be a JSON object, got {type(raw).__name__}")
    fmt, plain = split_weight_format(raw, str(path))
    return LlamaConfig.from_hf_config(plain, str(path)), fmt


def quantize_tensor(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(quantised weight, float32 scale [out, 1]) of a [out, in] weight, per output channel, symmetric."""
    import torch

    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; known: {sorted(FORMATS)}")
    if w.dim() != 2:
        raise ValueError(f"quantize_tensor expects a 2-d [out, in] weight, got shape {tuple(w.shape)}")
    dtype_name, _, qmax = FORMATS[fmt]
    w32 = w.float()
    absmax = w32.abs().amax(dim=1, keepdim=True)
    # an all-zero row keeps scale 1 (its values are 0 whatever the scale; 0 would divide by zero)
    scale = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))
    x = w32 / scale
    q = x.round().clamp(-qmax, qmax).to(torch.int8) if fmt == "int8" else x.clamp(-qmax, qmax).to(
        getattr(torch, dtype_name))
    return q.contiguous(), scale.contiguous()


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight a quantised tensor stands for, `q * scale` (float32, or `dtype`)."""
    import torch

    w = q.to(torch.float32) * scale.to(torch.float32)
    return w if dtype is None else w.to(dtype)


@dataclass(frozen=True)
class QuantWeight:
    """A quantised linear weight as stored: q (int8 or float8_e4m3fn, [out, in]) and its scale ([out, 1])."""

    q: torch.Tensor
    scale: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes


def linear(x: torch.Tensor, w: torch.Tensor | QuantWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` over a plain or a quantised weight; the latter as `(x @ q^T) * scale^T (+ bias)`, q converted to
    x's dtype for this matmul only (the resident copy stays quantised)."""
    import torch.nn.functional as F  # already imported by the caller: a dict lookup

    if isinstance(w, QuantWeight):
        y = F.linear(x, w.q.to(x.dtype)) * w.scale.to(x.dtype).reshape(-1)
        return y if bias is None else y + bias
    return F.linear(x, w, bias)


@dataclass(frozen=True)
class QuantizeInfo:
    """What `quantize_checkpoint` wrote: bytes of the linear weights before and after (scales included)."""

    path: Path
    weight_format: str
    source_bytes: int  # every weights file of the source
    out_bytes: int  # every weights file of the copy
    linear_source_bytes: int  # the quantised tensors, in the source dtype
    linear_out_bytes: int  # the same tensors quantised, plus their scales
    n_quantised: int
    elapsed_s: float


def _weight_files(src: Path) -> list[Path]:
    """The source's weights files (one model.safetensors, or the index's shards), or an error naming the dir."""
    from live.engines.layer_sources import safetensors_files

    if not (src / CONFIG_FILE).is_file():
        raise ValueError(f"{src}: not a checkpoint (no {CONFIG_FILE})")
    if not (src / WEIGHTS_FILE).is_file() and not (src / INDEX_FILE).is_file():
        raise ValueError(f"{src}: not a checkpoint (neither {WEIGHTS_FILE} nor {INDEX_FILE})")
    return safetensors_files(src)


def _write_ordered(path: Path, entries: list[tuple[str, str, tuple[int, ...], int]], tensors: Any,
                   metadata: dict[str, str]) -> int:
    """Write a safetensors file whose data follows `entries` order (name, tag, shape, bytes), streaming tensors.

    The safetensors library orders data by dtype and name, which would scatter a layer's tensors; progressive
    loading wants them in layer order, hence the format by hand: u64 LE header length, JSON header, data.
    """
    import torch

    with open(path, "wb") as f:
        f.write(safetensors_head(list(entries), metadata))
        for (name, _, shape, nbytes), t in zip(entries, tensors, strict=True):
            raw = t.contiguous().reshape(-1).view(torch.uint8).numpy()
            if tuple(t.shape) != shape or raw.nbytes != nbytes:
                raise ValueError(f"{path}: tensor {name} has shape {tuple(t.shape)}, header says {shape}")
            f.write(memoryview(raw))
        f.flush()
        os.fsync(f.fileno())
        return f.tell()


def quantize_checkpoint(src_dir: str | os.PathLike[str], dst_dir: str | os.PathLike[str], fmt: str, *,
                        overwrite: bool = False, progress: bool = False) -> QuantizeInfo:
    """Write `dst_dir`, the `fmt` variant of checkpoint `src_dir` (module docstring); atomic like
    `live.checkpoint.generate_checkpoint`. Bad input raises ValueError naming the file or field."""
    from safetensors import safe_open
    from tqdm import tqdm

    start = time.perf_counter()
    src, dst = Path(src_dir), Path(dst_dir).absolute()
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is not one of {sorted(FORMATS)}")
    if not src.is_dir():
        raise ValueError(f"{src}: not a checkpoint directory")
    files = _weight_files(src)
    raw_config = json.loads((src / CONFIG_FILE).read_text())
    where = str(src / CONFIG_FILE)
    if isinstance(raw_config, dict) and raw_config.get("quantization_config") is not None:
        qc = raw_config["quantization_config"]
        method = qc.get("quant_method") if isinstance(qc, dict) else qc
        raise ValueError(f"{where}: field 'quantization_config' is set (quant_method {method!r}): the checkpoint "
                         "is already quantised")
    read_config(src)  # the architecture check, before anything is written
    plan: list[tuple[Path, list[Any]]] = [(p, sorted(read_file_tensors(p)[2], key=lambda t: t.start_byte))
                                          for p in files]
    for path, tensors in plan:
        for t in tensors:
            if t.dtype not in _SOURCE_TAGS:
                raise ValueError(f"{path}: tensor {t.name!r} has dtype {t.dtype}; a source checkpoint holds "
                                 f"{sorted(_SOURCE_TAGS)} (already quantised?)")
            if t.name.endswith(SCALE_SUFFIX):
                raise ValueError(f"{path}: tensor {t.name!r} is a quantisation scale (already quantised?)")
    _, qtag, _ = FORMATS[fmt]
    linear_src = linear_out = n_q = out_bytes = data_bytes = 0
    weight_map: dict[str, str] = {}
    total = sum(len(ts) for _, ts in plan)
    bar = tqdm(total=total, desc=f"quantise {fmt}", unit="tensor", disable=not progress)
    with _atomic_dir(dst, overwrite) as tmp:
        for path, tensors in plan:
            entries: list[tuple[str, str, tuple[int, ...], int]] = []
            for t in tensors:
                if is_quantised_linear(t.name):
                    if len(t.shape) != 2:
                        raise ValueError(f"{path}: linear weight {t.name!r} has shape {t.shape}, expected [out, in]")
                    entries.append((t.name, qtag, t.shape, t.shape[0] * t.shape[1]))
                    entries.append((scale_name(t.name), "F32", (t.shape[0], 1), 4 * t.shape[0]))
                    linear_src += t.n_bytes
                    linear_out += t.shape[0] * t.shape[1] + 4 * t.shape[0]
                    n_q += 1
                else:
                    entries.append((t.name, t.dtype, t.shape, t.n_bytes))
            weight_map.update({name: path.name for name, *_ in entries})
            data_bytes += sum(n for *_, n in entries)

            def stream(path: Path = path, tensors: list[Any] = tensors) -> Any:
                with safe_open(str(path), framework="pt") as handle:
                    for t in tensors:
                        x = handle.get_tensor(t.name)
                        if is_quantised_linear(t.name):
                            yield from quantize_tensor(x, fmt)
                        else:
                            yield x
                        bar.update(1)

            out_bytes += _write_ordered(tmp / path.name, entries, stream(),
                                        {"format": "pt", "tierlab_weight_format": fmt})
        if (src / INDEX_FILE).is_file() and not (src / WEIGHTS_FILE).is_file():
            index = {"metadata": {"total_size": data_bytes}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        config_out = dict(raw_config)
        config_out["quantization_config"] = {
            "quant_method": QUANT_METHOD, "format": fmt, "scheme": "symmetric, per output channel",
            "scale_suffix": SCALE_SUFFIX, "scale_dtype": "float32",
            "modules": [s.removeprefix(".").removesuffix(".weight") for s in LINEAR_SUFFIXES],
            "not_quantised": "embeddings, norms, biases, lm_head (source dtype)"}
        (tmp / CONFIG_FILE).write_text(json.dumps(config_out, indent=2) + "\n", encoding="utf-8")
        written = {p.name for p in files} | {CONFIG_FILE, INDEX_FILE, MANIFEST_FILE}
        for f in sorted(src.iterdir()):
            if f.is_file() and f.name not in written and not f.name.startswith("."):
                shutil.copyfile(f, tmp / f.name)
    bar.close()
    return QuantizeInfo(path=dst, weight_format=fmt, source_bytes=sum(p.stat().st_size for p in files),
                        out_bytes=out_bytes, linear_source_bytes=linear_src, linear_out_bytes=linear_out,
                        n_quantised=n_q, elapsed_s=time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m live.quantize", description=__doc__.split("\n\n")[0])
    ap.add_argument("src_dir", type=Path)
    ap.add_argument("dst_dir", type=Path)
    ap.add_argument("--format", required=True, help=f"one of {sorted(FORMATS)}")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    try:
        info = quantize_checkpoint(args.src_dir, args.dst_dir, args.format, overwrite=args.overwrite, progress=True)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    linear_ratio = info.linear_out_bytes / max(1, info.linear_source_bytes)
    print(f"{info.path}: {info.weight_format}, {info.n_quantised} linear weights quantised, linear bytes "
          f"{info.linear_source_bytes} -> {info.linear_out_bytes} ({linear_ratio:.3f}x), "
          f"weights files {info.source_bytes} -> {info.out_bytes} ({info.out_bytes / info.source_bytes:.3f}x), "
          f"{info.elapsed_s:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
