"""The checks a checkpoint passes before it is registered: an architecture the CPU engine computes exactly
(`live.architectures`), weights whose tensors and shapes are the ones config.json describes, and a chat
template that compiles. Reads config.json, the safetensors headers and the tokenizer files only: no torch,
no weights loaded, nothing written.

    config = check_checkpoint("ckpt")     # ValueError naming the file and the field or tensor
"""

from __future__ import annotations

import os
from pathlib import Path

from live.chat_template import load_chat_template
from live.engines.layer_sources import safetensors_files
from live.llama_config import CONFIG_FILE, LlamaConfig, check_weight_shapes
from live.quantize import is_quantised_linear, read_config, scale_name


def weight_shapes(model_dir: str | os.PathLike[str]) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, from the headers of the checkpoint's safetensors files (all shards)."""
    from safetensors import SafetensorError, safe_open  # the header only: no tensor is read

    shapes: dict[str, tuple[int, ...]] = {}
    for path in safetensors_files(model_dir):
        try:
            with safe_open(str(path), framework="numpy") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        except (OSError, SafetensorError) as exc:
            raise ValueError(f"{path}: not a readable safetensors file: {exc}") from None
    return shapes


def check_checkpoint(model_dir: str | os.PathLike[str]) -> LlamaConfig:
    """The checkpoint's config, once the engine is known to compute it exactly; raises ValueError naming the file
    and the field (an unsupported architecture), the tensor (a shape or a tensor that config.json does not
    explain) or the template (a chat template that does not compile)."""
    root = Path(model_dir)
    config, weight_format = read_config(root)
    shapes = weight_shapes(root)
    if weight_format is not None:  # a `live.quantize` variant: one scale per output channel of each linear weight
        for name, shape in list(shapes.items()):
            scale = shapes.get(scale_name(name))
            if is_quantised_linear(name) and scale is not None and scale == (shape[0], 1):
                del shapes[scale_name(name)]
    check_weight_shapes(config, shapes, str(root / CONFIG_FILE))
    load_chat_template(root)
    return config
