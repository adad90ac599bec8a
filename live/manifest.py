"""Checkpoint manifests: file sizes and sha256 hashes, and the layer layout of the weights.

The layout groups the tensors of the weights by what a forward pass needs, in order: the "head"
(embeddings), layer 0..N-1 (`model.layers.{i}.*`), and the "tail" (final norm, lm_head and anything
else). Each tensor's byte range is absolute in the file it lies in (`TensorRange.file`), so a loader
can tell when a group's bytes are resident. The weights are one `model.safetensors`, or shards named
by `model.safetensors.index.json` (see `live.shards`; a group may then span shards). The safetensors
header is parsed here directly (no library needed).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "tierlab_manifest.json"  # never listed in a manifest, so it can live beside the files it covers
MANIFEST_VERSION = 1
HASH_CHUNK_BYTES = 16 << 20
_MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
_HEAD_PREFIXES = ("model.embed_tokens.",)


class SafetensorsHeaderError(ValueError):
    """A safetensors header is malformed; the message names the file."""


@dataclass(frozen=True)
class TensorRange:
    """One tensor: dtype tag, shape, and absolute byte range [start_byte, end_byte) in `file` (a weights file)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start_byte: int
    end_byte: int
    file: str = WEIGHTS_FILE

    @property
    def n_bytes(self) -> int:
        return self.end_byte - self.start_byte


@dataclass(frozen=True)
class TensorGroup:
    """Tensors a forward pass needs together ("head", "layer.{i}", "tail"), sorted by file offset."""

    name: str
    tensors: tuple[TensorRange, ...]

    @property
    def start_byte(self) -> int:
        """Smallest offset of the group (meaningful within one file; see `spans` for a sharded layout)."""
        return min((t.start_byte for t in self.tensors), default=0)

    @property
    def end_byte(self) -> int:
        return max((t.end_byte for t in self.tensors), default=0)

    @property
    def n_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors)

    def spans(self) -> dict[str, tuple[int, int]]:
        """Per weights file the group touches: (first byte, end byte) of its tensors there."""
        out: dict[str, tuple[int, int]] = {}
        for t in self.tensors:
            a, b = out.get(t.file, (t.start_byte, t.end_byte))
            out[t.file] = (min(a, t.start_byte), max(b, t.end_byte))
        return out


@dataclass(frozen=True)
class ShardFile:
    """One shard of a sharded checkpoint: file name, size, and where its data section starts."""

    name: str
    size_bytes: int
    data_start_byte: int


@dataclass(frozen=True)
class WeightLayout:
    """Where every tensor of the weights lies, grouped head / layers / tail.

    One file: `file` is its name, `size_bytes` its size, `shards` empty. Sharded: `file` is the index
    (`model.safetensors.index.json`), `size_bytes` the shards' total, `data_start_byte` 0, and `shards`
    the shard files in read order; each tensor names its shard.
    """

    file: str
    size_bytes: int
    data_start_byte: int
    head: TensorGroup
    layers: tuple[TensorGroup, ...]
    tail: TensorGroup
    shards: tuple[ShardFile, ...] = ()

    @property
    def weight_files(self) -> tuple[ShardFile, ...]:
        """The files holding tensor bytes, in read order (the single file, or the shards)."""
        return self.shards or (ShardFile(self.file, self.size_bytes, self.data_start_byte),)

    def position(self, t: TensorRange) -> tuple[int, int]:
        """(file rank in read order, offset): orders tensors across shards."""
        rank = next((k for k, f in enumerate(self.weight_files) if f.name == t.file), 0)
        return rank, t.start_byte

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def groups(self) -> tuple[TensorGroup, ...]:
        """Head, layers 0..N-1, tail: the order a forward pass consumes them."""
        return (self.head, *self.layers, self.tail)

    def tensors(self) -> tuple[TensorRange, ...]:
        """All tensors in file order (shards in read order)."""
        return tuple(sorted((t for g in self.groups() for t in g.tensors), key=self.position))

    def in_layer_order(self) -> bool:
        """True when each group's bytes come after the previous group's (what progressive loading wants)."""
        groups = [g for g in self.groups() if g.tensors]
        ends = [max((*self.position(t)[:1], t.end_byte) for t in g.tensors) for g in groups]
        starts = [min(self.position(t) for t in g.tensors) for g in groups]
        return all(s >= e for s, e in zip(starts[1:], ends, strict=False))


@dataclass(frozen=True)
class FileEntry:
    """One file of a checkpoint: path relative to the checkpoint dir, size and sha256 (hex)."""

    name: str
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """A model's files (size, sha256) and the layer layout of its weights file."""

    model: str
    files: tuple[FileEntry, ...]
    layout: WeightLayout
    version: int = MANIFEST_VERSION

    @property
    def total_bytes(self) -> int:
        return sum(f.size_bytes for f in self.files)

    def file(self, name: str) -> FileEntry:
        for f in self.files:
            if f.name == name:
                return f
        raise KeyError(f"manifest of {self.model} has no file {name!r}")

    def to_json(self) -> str:
        lay = self.layout

        def tensor(t: TensorRange) -> dict:
            d = {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "start_byte": t.start_byte,
                 "end_byte": t.end_byte}
            if t.file != lay.file:  # only sharded layouts say it: a single file's manifest is unchanged
                d["file"] = t.file
            return d

        def group(g: TensorGroup) -> dict:
            return {"name": g.name, "tensors": [tensor(t) for t in g.tensors]}

        layout = {"file": lay.file, "size_bytes": lay.size_bytes, "data_start_byte": lay.data_start_byte,
                  "head": group(lay.head), "layers": [group(g) for g in lay.layers], "tail": group(lay.tail)}
        if lay.shards:
            layout["shards"] = [{"name": f.name, "size_bytes": f.size_bytes, "data_start_byte": f.data_start_byte}
                                for f in lay.shards]
        return json.dumps({
            "version": self.version,
            "model": self.model,
            "files": [{"name": f.name, "size_bytes": f.size_bytes, "sha256": f.sha256} for f in self.files],
            "layout": layout,
        }, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        d = json.loads(text)
        if d.get("version") != MANIFEST_VERSION:
            raise ValueError(f"manifest version {d.get('version')!r} not supported (expected {MANIFEST_VERSION})")

        lay = d["layout"]

        def group(g: dict) -> TensorGroup:
            return TensorGroup(g["name"], tuple(
                TensorRange(t["name"], t["dtype"], tuple(t["shape"]), t["start_byte"], t["end_byte"],
                            t.get("file", lay["file"]))
                for t in g["tensors"]))

        shards = tuple(ShardFile(f["name"], f["size_bytes"], f["data_start_byte"]) for f in lay.get("shards", ()))
        layout = WeightLayout(lay["file"], lay["size_bytes"], lay["data_start_byte"], group(lay["head"]),
                              tuple(group(g) for g in lay["layers"]), group(lay["tail"]), shards)
        files = tuple(FileEntry(f["name"], f["size_bytes"], f["sha256"]) for f in d["files"])
        return cls(model=d["model"], files=files, layout=layout, version=d["version"])

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the manifest as `tierlab_manifest.json` into `directory`; returns its path."""
        path = Path(directory) / MANIFEST_FILE
        path.write_text(self.to_json(), encoding="utf-8")
        return path


def read_safetensors_header(path: str | os.PathLike) -> tuple[int, dict]:
    """(data start offset, header dict) of a safetensors file: u64 LE length, then that many bytes of JSON."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise SafetensorsHeaderError(f"{path}: {size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER_BYTES or 8 + n > size:
            raise SafetensorsHeaderError(f"{path}: header length {n} is impossible for a {size}-byte file")
        blob = f.read(n)
    try:
        header = json.loads(blob)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsHeaderError(f"{path}: header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise SafetensorsHeaderError(f"{path}: header is not a JSON object")
    return 8 + n, header


def read_file_tensors(path: str | os.PathLike) -> tuple[int, int, list[TensorRange]]:
    """(data start offset, file size, tensors) of one safetensors file, from its header alone.

    Every tensor's bytes must lie inside the file's data section: a truncated file raises
    SafetensorsHeaderError naming the file and the first tensor it cuts.
    """
    path = Path(path)
    data_start, header = read_safetensors_header(path)
    size = path.stat().st_size
    tensors = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = entry["data_offsets"]
            t = TensorRange(name, str(entry["dtype"]), tuple(int(x) for x in entry["shape"]),
                            data_start + int(begin), data_start + int(end), path.name)
        except (KeyError, TypeError, ValueError) as e:
            raise SafetensorsHeaderError(f"{path}: bad header entry for tensor {name!r} ({e})") from e
        if not data_start <= t.start_byte <= t.end_byte <= size:
            raise SafetensorsHeaderError(f"{path}: tensor {name!r} bytes [{t.start_byte}, {t.end_byte}) lie outside "
                                         f"the data section [{data_start}, {size}) (is the file truncated?)")
        tensors.append(t)
    return data_start, size, tensors


def group_tensors(tensors: list[TensorRange], where: str | os.PathLike,
                  order: Callable[[TensorRange], tuple[int, int]] = lambda t: (0, t.start_byte),
                  ) -> tuple[TensorGroup, tuple[TensorGroup, ...], TensorGroup]:
    """(head, layers, tail) of `tensors`, each group sorted by `order`; `where` names the source in errors."""
    head: list[TensorRange] = []
    tail: list[TensorRange] = []
    layers: dict[int, list[TensorRange]] = {}
    for t in tensors:
        m = _LAYER_RE.match(t.name)
        if m:
            layers.setdefault(int(m.group(1)), []).append(t)
        elif t.name.startswith(_HEAD_PREFIXES):
            head.append(t)
        else:
            tail.append(t)
    if layers and sorted(layers) != list(range(len(layers))):
        missing = sorted(set(range(max(layers) + 1)) - set(layers))
        raise SafetensorsHeaderError(f"{where}: layer indices are not contiguous (missing {missing})")

    def group(name: str, ts: list[TensorRange]) -> TensorGroup:
        return TensorGroup(name, tuple(sorted(ts, key=order)))

    return (group("head", head), tuple(group(f"layer.{i}", layers[i]) for i in range(len(layers))),
            group("tail", tail))


def read_layout(path: str | os.PathLike) -> WeightLayout:
    """The head / layer / tail layout of a safetensors file, from its header alone."""
    path = Path(path)
    data_start, size, tensors = read_file_tensors(path)
    head, layers, tail = group_tensors(tensors, path)
    return WeightLayout(file=path.name, size_bytes=size, data_start_byte=data_start, head=head, layers=layers,
                        tail=tail)


def sha256_file(path: str | os.PathLike, chunk_bytes: int = HASH_CHUNK_BYTES) -> str:
    """Hex sha256 of a file, read in chunks into one reused buffer."""
    h = hashlib.sha256()
    buf = bytearray(chunk_bytes)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _listed_files(directory: Path) -> list[str]:
    """Regular files under `directory` (relative posix paths), minus the manifest itself and hidden files."""
    out = []
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory)
        if p.is_file() and rel.as_posix() != MANIFEST_FILE and not any(s.startswith(".") for s in rel.parts):
            out.append(rel.as_posix())
    return out


def build_manifest(directory: str | os.PathLike, name: str | None = None) -> Manifest:
    """Hash every file of a checkpoint dir and read the layout of its weights (one file, or checked shards).

    A sharded checkpoint with a shard missing or truncated, or an index that disagrees with the shards,
    raises (FileNotFoundError / ValueError naming the file or tensor) before anything is hashed.
    """
    from live.shards import read_weights_layout  # live.shards builds on this module

    directory = Path(directory)
    layout = read_weights_layout(directory)
    files = tuple(FileEntry(rel, (directory / rel).stat().st_size, sha256_file(directory / rel))
                  for rel in _listed_files(directory))
    return Manifest(model=name or directory.name, files=files, layout=layout)


def verify(directory: str | os.PathLike, manifest: Manifest) -> list[str]:
    """Problems with the files of `directory` against `manifest`, one "name: what is wrong" per bad file.

    An empty list means every listed file has the recorded size and sha256. A missing file is not a
    mismatch but an unusable checkpoint: it raises FileNotFoundError naming the file. Files not in
    the manifest are ignored.
    """
    directory = Path(directory)
    problems = []
    for entry in manifest.files:
        path = directory / entry.name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: listed in the manifest of {manifest.model} but missing")
        size = path.stat().st_size
        if size != entry.size_bytes:
            problems.append(f"{entry.name}: size {size} bytes, manifest says {entry.size_bytes}")
            continue
        digest = sha256_file(path)
        if digest != entry.sha256:
            problems.append(f"{entry.name}: sha256 {digest}, manifest says {entry.sha256}")
    return problems
