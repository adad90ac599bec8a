"""Aligned host buffers for the loader: O_DIRECT wants buffer address, file offset and length aligned."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

ALIGN_BYTES = 4096  # O_DIRECT wants buffer address, file offset and length aligned to the logical block size


def round_up(n: int, to: int) -> int:
    """`n` rounded up to a multiple of `to`."""
    return -(-n // to) * to


def alloc_buffer(n_bytes: int, pinned: bool = False) -> np.ndarray:
    """A uint8 buffer of n_bytes rounded up to ALIGN_BYTES, starting at an ALIGN_BYTES-aligned address.

    Left uninitialised: the reads fault its pages in, so they are touched once, not zeroed and then written.
    """
    n = round_up(max(n_bytes, 1), ALIGN_BYTES)
    if pinned:  # page-locked host memory makes host -> GPU copies asynchronous and full speed
        import torch

        raw = torch.empty(n + ALIGN_BYTES, dtype=torch.uint8, pin_memory=True).numpy()
    else:
        raw = np.empty(n + ALIGN_BYTES, dtype=np.uint8)
    off = -raw.ctypes.data % ALIGN_BYTES
    return raw[off:off + n]


def check_buffer(buffer: np.ndarray, size: int, path: str | os.PathLike | Path) -> np.ndarray:
    """`buffer` cut to what a load of `size` bytes uses; ValueError if it is unfit or too small."""
    need = round_up(max(size, 1), ALIGN_BYTES)
    if buffer.dtype != np.uint8 or buffer.ndim != 1 or not buffer.flags.c_contiguous or not buffer.flags.writeable:
        raise ValueError("buffer must be a writable, contiguous 1-D uint8 array (see alloc_buffer)")
    if buffer.size < need:
        raise ValueError(f"{path}: buffer holds {buffer.size} bytes, loading needs {need}")
    return buffer[:need]
