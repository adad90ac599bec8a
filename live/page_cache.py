"""The OS page cache around a checkpoint file: drop a file's pages (so the next read comes from storage, as a
cold start's does) and ask how much of it is resident. Used by the loader benchmarks and their tests."""

from __future__ import annotations

import ctypes
import os

import numpy as np


def evict_page_cache(path: str | os.PathLike) -> str:
    """Make the next read of `path` come from storage; returns the method used.

    As root with a writable /proc/sys/vm/drop_caches: "drop_caches" (all clean caches dropped).
    Otherwise (containers, non-root): "fadvise", POSIX_FADV_DONTNEED on the file after syncing it,
    which drops its clean pages.
    """
    os.sync()  # dirty pages survive both methods; write them back first
    if os.geteuid() == 0:
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3")
            return "drop_caches"
        except OSError:  # PermissionError included: read-only /proc/sys in a container
            pass
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return "fadvise"


def resident_fraction(path: str | os.PathLike) -> float:
    """Fraction of a file's pages in the page cache (mincore); 0.0 where that cannot be asked."""
    size = os.path.getsize(path)
    if size == 0:
        return 0.0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    except (OSError, AttributeError):
        return 0.0
    page = os.sysconf("SC_PAGE_SIZE")
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED: maps, touches nothing
        if addr in (None, ctypes.c_void_p(-1).value):
            return 0.0
        try:
            vec = ctypes.create_string_buffer((size + page - 1) // page)
            if libc.mincore(addr, size, vec) != 0:
                return 0.0
            return float((np.frombuffer(vec.raw, dtype=np.uint8) & 1).mean())
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
