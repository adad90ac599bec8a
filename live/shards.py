"""Sharded safetensors checkpoints: the index, its checks, the merged layout, and a multi-file read plan.

A checkpoint's weights are one `model.safetensors`, or shards (`model-0000k-of-0000N.safetensors`)
named by `model.safetensors.index.json`, whose `weight_map` maps every tensor to its shard: the layout
transformers' `save_pretrained(..., max_shard_size=...)` writes, and every Hub model of more than a
few GB. `read_weights_layout` reads either into one `live.manifest.WeightLayout` (a group may then
span shards); a sharded one is checked first, and each of these is an error naming the file or tensor:
a shard missing, a shard truncated, the index naming a tensor no shard holds (or another shard than
the one holding it), a shard holding a tensor the index does not name, two shards holding one tensor.

`ReadPlan` is the loader's bookkeeping for reading several files into one host buffer: chunks in
file order, and per file the prefix that is resident, so that a group is usable once every byte of
it, in every shard it spans, is in memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from live.hostbuf import round_up
from live.manifest import (
    WEIGHTS_FILE,
    ShardFile,
    TensorRange,
    WeightLayout,
    group_tensors,
    read_file_tensors,
    read_layout,
)

INDEX_FILE = "model.safetensors.index.json"


class ShardIndexError(ValueError):
    """A sharded checkpoint's index and shards disagree; the message names the file and the tensor."""


def is_sharded(directory: str | os.PathLike) -> bool:
    """True when the checkpoint dir has an index and no single `model.safetensors` (which would win)."""
    d = Path(directory)
    return not (d / WEIGHTS_FILE).is_file() and (d / INDEX_FILE).is_file()


def read_index(directory: str | os.PathLike) -> dict[str, str]:
    """The index's `weight_map` (tensor -> shard file name), checked for shape and safe shard names."""
    index = Path(directory) / INDEX_FILE
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardIndexError(f"{index}: not valid JSON ({e})") from e
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ShardIndexError(f"{index}: no 'weight_map' object naming each tensor's shard")
    for tensor, shard in weight_map.items():
        # a shard is a plain file beside the index: never a path that could climb out of the checkpoint
        if not isinstance(shard, str) or not shard.endswith(".safetensors") or "/" in shard or "\\" in shard \
                or shard.startswith("."):
            raise ShardIndexError(f"{index}: tensor {tensor!r} names shard {shard!r}, not a .safetensors file "
                                  "beside the index")
    return dict(weight_map)


def shard_names(directory: str | os.PathLike) -> list[str]:
    """The shard files the index names, in read order (their names sort as transformers numbers them)."""
    return sorted(set(read_index(directory).values()))


def read_sharded_layout(directory: str | os.PathLike) -> WeightLayout:
    """The merged head / layer / tail layout of a sharded checkpoint, after checking index against shards."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    weight_map = read_index(directory)
    names = sorted(set(weight_map.values()))
    shards: list[ShardFile] = []
    holder: dict[str, str] = {}
    tensors: list[TensorRange] = []
    for name in names:
        path = directory / name
        if not path.is_file():
            example = next(t for t, s in weight_map.items() if s == name)
            raise FileNotFoundError(f"{path}: shard named by {index} is missing (it should hold {example!r} and "
                                    f"{sum(s == name for s in weight_map.values()) - 1} more tensors)")
        data_start, size, found = read_file_tensors(path)  # a truncated shard raises here, naming it
        shards.append(ShardFile(name, size, data_start))
        for t in found:
            if t.name in holder:
                raise ShardIndexError(f"{directory}: tensor {t.name!r} is held by two shards, {holder[t.name]} "
                                      f"and {name}")
            holder[t.name] = name
            if t.name not in weight_map:
                raise ShardIndexError(f"{path}: holds tensor {t.name!r}, which {INDEX_FILE} does not name")
        tensors += found
    for tensor, shard in weight_map.items():
        if tensor not in holder:
            raise ShardIndexError(f"{index}: names tensor {tensor!r} in {shard}, but no shard holds it")
        if holder[tensor] != shard:
            raise ShardIndexError(f"{index}: names tensor {tensor!r} in {shard}, but {holder[tensor]} holds it")
    rank = {name: k for k, name in enumerate(names)}
    head, layers, tail = group_tensors(tensors, index, order=lambda t: (rank[t.file], t.start_byte))
    return WeightLayout(file=INDEX_FILE, size_bytes=sum(s.size_bytes for s in shards), data_start_byte=0,
                        head=head, layers=layers, tail=tail, shards=tuple(shards))


def read_weights_layout(directory: str | os.PathLike) -> WeightLayout:
    """The layout of a checkpoint dir's weights: its `model.safetensors`, else its checked shards."""
    directory = Path(directory)
    if (directory / WEIGHTS_FILE).is_file():
        return read_layout(directory / WEIGHTS_FILE)
    if (directory / INDEX_FILE).is_file():
        return read_sharded_layout(directory)
    raise FileNotFoundError(f"{directory}: checkpoint has neither {WEIGHTS_FILE} nor {INDEX_FILE} (sharded)")


def weights_location(path: str | os.PathLike) -> tuple[Path, WeightLayout]:
    """(dir holding the weight files, layout) for a checkpoint dir, a `.safetensors` file or an index file."""
    path = Path(path)
    if path.is_dir():
        return path, read_weights_layout(path)
    if path.name == INDEX_FILE and path.is_file():
        return path.parent, read_sharded_layout(path.parent)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    return path.parent, read_layout(path)


def weight_file_paths(directory: str | os.PathLike) -> list[Path]:
    """Paths of a checkpoint dir's weight files (checked shards, or the single file), in read order."""
    directory = Path(directory)
    return [directory / f.name for f in read_weights_layout(directory).weight_files]


class ReadPlan:
    """Several files read into one buffer in chunks; per file, the resident prefix. Not thread-safe.

    File k lands at `bases[k]` (aligned to `align`, so that O_DIRECT reads may run to the next
    boundary), its chunks in order; chunks are numbered in file order, so handing them out in order
    reads the files one after the other.
    """

    def __init__(self, sizes: Sequence[int], chunk_bytes: int, align: int) -> None:
        self.sizes = list(sizes)
        self.chunk_bytes = chunk_bytes
        self.bases: list[int] = []
        self.chunks: list[tuple[int, int, int]] = []  # (file index, start, end)
        self._first: list[int] = []  # the file's first chunk number
        self._before: list[int] = []  # bytes of the files before it (the read's global order)
        base = before = 0
        for k, size in enumerate(self.sizes):
            self.bases.append(base)
            self._first.append(len(self.chunks))
            self._before.append(before)
            self.chunks += [(k, a, min(a + chunk_bytes, size)) for a in range(0, size, chunk_bytes)]
            base += round_up(size, align)
            before += size
        self.buffer_bytes = base
        self.total_bytes = before
        self._done = bytearray(len(self.chunks))
        self._prefix = list(self._first)  # per file: its first chunk not yet done (or its end)
        self.resident = [0] * len(self.sizes)  # per file: bytes [0, resident) are in the buffer

    @property
    def n_chunks(self) -> int:
        return len(self.chunks)

    def global_end(self, k: int) -> int:
        """Bytes of the whole read up to the end of chunk k (for pacing the read as one stream)."""
        f, _a, b = self.chunks[k]
        return self._before[f] + b

    def complete(self, k: int) -> bool:
        """Chunk k is in the buffer; True when a file's resident prefix grew."""
        self._done[k] = 1
        f = self.chunks[k][0]
        end = self._first[f + 1] if f + 1 < len(self.sizes) else len(self.chunks)
        n = self._prefix[f]
        while n < end and self._done[n]:
            n += 1
        if n == self._prefix[f]:
            return False
        self._prefix[f] = n
        self.resident[f] = min((n - self._first[f]) * self.chunk_bytes, self.sizes[f])
        return True

    @property
    def resident_bytes(self) -> int:
        return sum(self.resident)

    def all_done(self) -> bool:
        return all(r == s for r, s in zip(self.resident, self.sizes, strict=True))

    def holds(self, spans: Iterable[tuple[int, int]]) -> bool:
        """True when each (file index, end byte) is within that file's resident prefix."""
        return all(self.resident[f] >= end for f, end in spans)
