"""Checkpoint manifests: file sizes and sha256 hashes, and the layer layout of `model.safetensors`.

The layout groups the tensors of the weights file by what a forward pass needs, in order: the
"head" (embeddings), layer 0..N-1 (`model.layers.{i}.*`), and the "tail" (final norm, lm_head and
anything else). Byte ranges are absolute offsets in the file, so a loader can tell when a group's
bytes are resident. The safetensors header is parsed here directly (no library needed).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
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
    """One tensor of the weights file: dtype tag, shape and absolute byte range [start_byte, end_byte)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start_byte: int
    end_byte: int

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


@dataclass(frozen=True)
class WeightLayout:
    """Where every tensor of one safetensors file lies, grouped head / layers / tail."""

    file: str
    size_bytes: int
    data_start_byte: int
    head: TensorGroup
    layers: tuple[TensorGroup, ...]
    tail: TensorGroup

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def groups(self) -> tuple[TensorGroup, ...]:
        """Head, layers 0..N-1, tail: the order a forward pass consumes them."""
        return (self.head, *self.layers, self.tail)

    def tensors(self) -> tuple[TensorRange, ...]:
        """All tensors in file order."""
        return tuple(sorted((t for g in self.groups() for t in g.tensors), key=lambda t: t.start_byte))

    def in_layer_order(self) -> bool:
        """True when each group's bytes come after the previous group's (what progressive loading wants)."""
        ends = [g.end_byte for g in self.groups() if g.tensors]
        starts = [g.start_byte for g in self.groups() if g.tensors]
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
        def group(g: TensorGroup) -> dict:
            return {"name": g.name, "tensors": [
                {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "start_byte": t.start_byte,
                 "end_byte": t.end_byte} for t in g.tensors]}

        lay = self.layout
        return json.dumps({
            "version": self.version,
            "model": self.model,
            "files": [{"name": f.name, "size_bytes": f.size_bytes, "sha256": f.sha256} for f in self.files],
            "layout": {"file": lay.file, "size_bytes": lay.size_bytes, "data_start_byte": lay.data_start_byte,
                       "head": group(lay.head), "layers": [group(g) for g in lay.layers], "tail": group(lay.tail)},
        }, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        d = json.loads(text)
        if d.get("version") != MANIFEST_VERSION:
            raise ValueError(f"manifest version {d.get('version')!r} not supported (expected {MANIFEST_VERSION})")

        def group(g: dict) -> TensorGroup:
            return TensorGroup(g["name"], tuple(
                TensorRange(t["name"], t["dtype"], tuple(t["shape"]), t["start_byte"], t["end_byte"])
                for t in g["tensors"]))

        lay = d["layout"]
        layout = WeightLayout(lay["file"], lay["size_bytes"], lay["data_start_byte"], group(lay["head"]),
                              tuple(group(g) for g in lay["layers"]), group(lay["tail"]))
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


def read_layout(path: str | os.PathLike) -> WeightLayout:
    """The head / layer / tail layout of a safetensors file, from its header alone."""
    path = Path(path)
    data_start, header = read_safetensors_header(path)
    size = path.stat().st_size
    head: list[TensorRange] = []
    tail: list[TensorRange] = []
    layers: dict[int, list[TensorRange]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = entry["data_offsets"]
            t = TensorRange(name, str(entry["dtype"]), tuple(int(x) for x in entry["shape"]),
                            data_start + int(begin), data_start + int(end))
        except (KeyError, TypeError, ValueError) as e:
            raise SafetensorsHeaderError(f"{path}: bad header entry for tensor {name!r} ({e})") from e
        if not data_start <= t.start_byte <= t.end_byte <= size:
            raise SafetensorsHeaderError(f"{path}: tensor {name!r} bytes [{t.start_byte}, {t.end_byte}) lie outside "
                                         f"the data section [{data_start}, {size})")
        m = _LAYER_RE.match(name)
        if m:
            layers.setdefault(int(m.group(1)), []).append(t)
        elif name.startswith(_HEAD_PREFIXES):
            head.append(t)
        else:
            tail.append(t)
    if layers and sorted(layers) != list(range(len(layers))):
        missing = sorted(set(range(max(layers) + 1)) - set(layers))
        raise SafetensorsHeaderError(f"{path}: layer indices are not contiguous (missing {missing})")

    def group(name: str, ts: list[TensorRange]) -> TensorGroup:
        return TensorGroup(name, tuple(sorted(ts, key=lambda t: t.start_byte)))

    return WeightLayout(file=path.name, size_bytes=size, data_start_byte=data_start, head=group("head", head),
                        layers=tuple(group(f"layer.{i}", layers[i]) for i in range(len(layers))),
                        tail=group("tail", tail))


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
    """Hash every file of a checkpoint dir and read the layout of its `model.safetensors`."""
    directory = Path(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: checkpoint has no {WEIGHTS_FILE}")
    layout = read_layout(weights)
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
