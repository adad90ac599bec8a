"""The parallel progressive loader: same tensors as safetensors, zero-copy, layer events in order, checksums."""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

from safetensors.torch import load_file, save_file  # noqa: E402

from live.checkpoint import LlamaParams, generate_checkpoint  # noqa: E402
from live.loader import (  # noqa: E402
    ALIGN_BYTES,
    ChecksumError,
    alloc_buffer,
    default_device,
    load,
    start_load,
)
from live.manifest import build_manifest  # noqa: E402
from live.pacing import Device, Flow, PaceSpec, local_device  # noqa: E402
from live.page_cache import evict_page_cache, resident_fraction  # noqa: E402

# 6 layers of ~190 KB: with 64 KiB chunks every layer spans several chunks
PARAMS = LlamaParams(hidden_size=128, intermediate_size=320, num_hidden_layers=6, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=1024)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return generate_checkpoint(tmp_path_factory.mktemp("ck") / "m", PARAMS, seed=0).path


@pytest.fixture(scope="module")
def reference(ckpt: Path) -> dict:
    return load_file(ckpt / "model.safetensors")


def assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name], t), name


def test_load_equals_safetensors_and_is_zero_copy(ckpt: Path, reference: dict):
    c = load(ckpt)
    assert_same(c.tensors, reference)
    starts = [t.start_byte for t in c.layout.tensors()]
    assert list(c.tensors) == [t.name for t in c.layout.tensors()] and starts == sorted(starts)
    # every tensor is a view into the one host buffer, at its offset in the file
    base = c.buffer.ctypes.data
    for t in c.layout.tensors():
        assert c.tensors[t.name].data_ptr() == base + t.start_byte, t.name
    assert c.n_layers == 6 and set(c.layer(2)) == {n for n in reference if n.startswith("model.layers.2.")}
    assert c.config is not None and c.config["num_hidden_layers"] == 6


def test_timing_is_consistent(ckpt: Path):
    t = load(ckpt, chunk_bytes=64 << 10, n_threads=3).timing
    assert t.bytes_read == (ckpt / "model.safetensors").stat().st_size
    assert len(t.layer_ready_s) == 6 and list(t.layer_ready_s) == sorted(t.layer_ready_s)
    assert t.layer_ready_s[0] > 0 and t.layer_ready_s[-1] <= t.tail_ready_s <= t.total_s
    assert 0 < t.read_s <= t.total_s and t.to_device_s == 0 and t.verify_s == 0
    assert t.read_bw_Bps > 0 and t.n_threads == 3 and t.chunk_bytes == 64 << 10 and t.device == "cpu"


@pytest.mark.parametrize(("n_threads", "chunk_bytes", "direct_io"), [
    (1, 16 << 20, None), (4, 3 * ALIGN_BYTES, True), (3, 10007, None), (8, 4096, False), (2, 999, False),
])
def test_chunking_and_direct_io_variants_read_the_same(ckpt: Path, reference: dict, n_threads, chunk_bytes,
                                                       direct_io):
    c = load(ckpt, n_threads=n_threads, chunk_bytes=chunk_bytes, direct_io=direct_io)
    assert_same(c.tensors, reference)
    if direct_io is False or chunk_bytes % ALIGN_BYTES:
        assert not c.timing.direct_io


@pytest.mark.parametrize("size", [1, 7, 4095, 4097, 3 * 4096 + 5, 65536 + 333])
@pytest.mark.parametrize("direct_io", [True, False])
def test_file_sizes_not_multiple_of_chunk_or_alignment(tmp_path: Path, size: int, direct_io: bool):
    rng = np.random.default_rng(size)
    tensors = {"a.u8": torch.from_numpy(rng.integers(0, 256, size, dtype=np.uint8)),
               "b.f32": torch.from_numpy(rng.standard_normal(3, dtype=np.float32))}
    path = tmp_path / "odd.safetensors"
    save_file(tensors, path)
    assert path.stat().st_size % ALIGN_BYTES  # the point of the test
    for chunk in (ALIGN_BYTES, 2 * ALIGN_BYTES):
        c = load(path, n_threads=3, chunk_bytes=chunk, direct_io=direct_io)
        assert_same(c.tensors, tensors)


def test_tensor_misaligned_for_its_dtype_is_copied(tmp_path: Path):
    """A 3-byte uint8 tensor puts the float32 after it at an odd offset: loaded correctly, by copy."""
    u8, f32 = np.arange(3, dtype=np.uint8), np.arange(5, dtype=np.float32)
    header = json.dumps({"x.u8": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
                         "y.f32": {"dtype": "F32", "shape": [5], "data_offsets": [3, 23]}}).encode()
    header += b" " * (-len(header) % 8)
    path = tmp_path / "mis.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + u8.tobytes() + f32.tobytes())
    c = load(path)
    assert torch.equal(c.tensors["y.f32"], torch.from_numpy(f32)) and torch.equal(c.tensors["x.u8"],
                                                                                  torch.from_numpy(u8))


def test_progressive_events_fire_in_layer_order_with_bytes_resident(ckpt: Path, reference: dict):
    seen: list[tuple[int, list[str]]] = []
    checks: list[bool] = []

    def on_layer(i: int, tensors: dict) -> None:
        # the prefix of the file up to this group's last byte is in memory, and the values are final
        need = max(t.end_byte for g in groups[: i + 1] for t in g)
        assigned.wait(10)  # the first callback may come before start_load has returned
        checks.append(box["handle"].bytes_resident >= need)
        checks.append(all(torch.equal(v, reference[k]) for k, v in tensors.items()))
        seen.append((i, sorted(tensors)))

    from live.loader import _groups  # the dispatch groups, to know which bytes each event covers
    from live.manifest import read_layout

    lay = read_layout(ckpt / "model.safetensors")
    groups = _groups(lay)
    assigned = threading.Event()
    box: dict = {}
    box["handle"] = handle = start_load(ckpt, on_layer=on_layer, chunk_bytes=64 << 10, n_threads=4)
    assigned.set()
    c = handle.result(timeout=30)
    assert [i for i, _ in seen] == list(range(7)) and all(checks)
    assert seen[0][1] == sorted(["model.embed_tokens.weight", *lay.layers[0].names])
    assert seen[6][1] == ["lm_head.weight", "model.norm.weight"]
    assert all(e.is_set() for e in handle.ready) and handle.done()
    assert_same(c.tensors, reference)


def test_consumers_waiting_on_layers_see_them_resident(ckpt: Path, reference: dict):
    """One consumer thread per layer, waiting before the load starts; each sees its layer's final bytes."""
    results: dict[int, bool] = {}
    order: list[int] = []
    lock = threading.Lock()
    started = threading.Barrier(8)
    box: dict = {}

    def consumer(i: int) -> None:
        started.wait()
        h = box["handle"]
        tensors = h.wait_tail(timeout=30) if i == 6 else h.wait_layer(i, timeout=30)
        ok = all(torch.equal(v, reference[k]) for k, v in tensors.items())
        with lock:
            results[i] = ok and h.ready[i].is_set() and all(e.is_set() for e in h.ready[:i])
            order.append(i)

    threads = [threading.Thread(target=consumer, args=(i,)) for i in range(7)]
    for t in threads:
        t.start()
    box["handle"] = start_load(ckpt, chunk_bytes=32 << 10, n_threads=2)
    started.wait()
    for t in threads:
        t.join(timeout=30)
    assert results == dict.fromkeys(range(7), True)
    assert "model.embed_tokens.weight" in box["handle"].wait_layer(0)
    with pytest.raises(IndexError):
        box["handle"].wait_layer(6)


def test_manifest_verified_load(ckpt: Path, reference: dict):
    m = build_manifest(ckpt)
    c = load(ckpt, manifest=m)
    assert_same(c.tensors, reference)
    assert c.timing.verify_s > 0


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_checksum_mismatch_raises_naming_the_file_and_returns_nothing(ckpt: Path, tmp_path: Path):
    m = build_manifest(ckpt)
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    flip_byte(bad / "model.safetensors", m.layout.layers[3].start_byte + 100)
    with pytest.raises(ChecksumError, match=r"model\.safetensors"):
        load(bad, manifest=m)
    handle = start_load(bad, manifest=m, chunk_bytes=64 << 10)
    with pytest.raises(ChecksumError):
        handle.result(timeout=30)
    with pytest.raises(ChecksumError):  # once failed, waits fail too
        handle.wait_layer(0)
    assert handle._tensors == {}


def test_mismatching_small_file_and_size_are_named(ckpt: Path, tmp_path: Path):
    m = build_manifest(ckpt)
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    flip_byte(bad / "config.json", 0)
    with pytest.raises(ChecksumError, match=r"config\.json"):
        load(bad, manifest=m)
    shutil.copy(ckpt / "config.json", bad / "config.json")
    with open(bad / "model.safetensors", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ChecksumError, match=r"model\.safetensors: size"):
        start_load(bad, manifest=m)


def test_missing_files_raise_clearly(ckpt: Path, tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        load(tmp_path)
    m = build_manifest(ckpt)
    partial = tmp_path / "partial"
    shutil.copytree(ckpt, partial)
    (partial / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        load(partial, manifest=m)


def test_consumer_error_is_the_load_error(ckpt: Path):
    def on_layer(i: int, tensors: dict) -> None:
        if i == 2:
            raise RuntimeError("consumer failed at layer 2")

    with pytest.raises(RuntimeError, match="layer 2"):
        load(ckpt, on_layer=on_layer, chunk_bytes=64 << 10)


def test_reused_buffer(ckpt: Path, reference: dict):
    size = (ckpt / "model.safetensors").stat().st_size
    buf = alloc_buffer(size)
    assert buf.ctypes.data % ALIGN_BYTES == 0 and buf.size % ALIGN_BYTES == 0 and buf.size >= size
    for _ in range(2):
        c = load(ckpt, buffer=buf)
        assert_same(c.tensors, reference)
        assert c.tensors["lm_head.weight"].data_ptr() - buf.ctypes.data == c.layout.tail.tensors[-1].start_byte
    with pytest.raises(ValueError, match="buffer"):
        load(ckpt, buffer=alloc_buffer(size // 2))
    with pytest.raises(ValueError, match="uint8"):
        load(ckpt, buffer=np.zeros(size, dtype=np.float32))


def test_device_cpu_and_default_device(ckpt: Path, reference: dict):
    assert default_device() in {"cpu", "cuda"}
    c = load(ckpt, device="cpu")
    assert_same(c.tensors, reference)
    assert c.timing.device == "cpu" and c.timing.to_device_s == 0


def test_bad_arguments(ckpt: Path):
    with pytest.raises(ValueError):
        load(ckpt, n_threads=0)
    with pytest.raises(ValueError):
        load(ckpt, chunk_bytes=0)
    with pytest.raises(ValueError, match="max_read_Bps"):
        start_load(ckpt, max_read_Bps=0)


def test_read_cap_emulates_a_slower_tier_and_stays_progressive(ckpt: Path, reference: dict):
    """max_read_Bps: the ~2.6 MB file at 6.5 MB/s takes >= 0.4 s, and layers still arrive one by one."""
    size = (ckpt / "model.safetensors").stat().st_size
    cap_Bps = size / 0.4
    c = load(ckpt, chunk_bytes=64 << 10, n_threads=4, max_read_Bps=cap_Bps)
    assert_same(c.tensors, reference)
    t = c.timing
    assert t.max_read_Bps == cap_Bps and t.read_s >= 0.4 * 0.99
    # group 0 (embeddings + layer 0) is ~23% of the bytes: usable long before the tail
    assert t.layer_ready_s[0] < 0.6 * t.tail_ready_s
    assert all(b - a > 0.02 for a, b in zip(t.layer_ready_s, t.layer_ready_s[1:], strict=False))
    assert load(ckpt, chunk_bytes=64 << 10).timing.max_read_Bps is None  # off by default


def test_paced_read_shares_the_tier_with_another_flow(ckpt: Path, reference: dict, tmp_path: Path):
    """`pace`: a read of an emulated tier takes size / read_Bps alone, twice that while another flow (here a
    copy's read in another thread; across processes the state file does the same) shares the tier."""
    size = (ckpt / "model.safetensors").stat().st_size
    spec = PaceSpec(str(tmp_path / ".tierlab-pace"), read_Bps=size / 0.5, name="sata")
    c = load(ckpt, chunk_bytes=64 << 10, n_threads=4, pace=Flow(reads=[Device(spec)]))
    assert_same(c.tensors, reference)
    t = c.timing
    assert t.paced and 0.5 * 0.9 <= t.read_s <= 0.5 * 1.3, t.read_s
    assert t.layer_ready_s[0] < 0.6 * t.tail_ready_s  # still progressive

    other = Flow(reads=[Device(spec)])
    copy = threading.Thread(target=lambda: [other.acquire(64 << 10) for _ in range(0, size, 64 << 10)])
    copy.start()
    shared = load(ckpt, chunk_bytes=64 << 10, n_threads=4, pace=Flow(reads=[Device(spec)])).timing
    copy.join()
    assert 1.0 * 0.85 <= shared.read_s <= 1.0 * 1.3, shared.read_s
    assert not load(ckpt, pace=Flow(reads=[local_device()])).timing.paced  # an unpaced flow changes nothing


def test_evict_page_cache_then_cold_load(ckpt: Path, reference: dict):
    path = ckpt / "model.safetensors"
    method = evict_page_cache(path)
    assert method in {"drop_caches", "fadvise"}
    assert 0.0 <= resident_fraction(path) <= 1.0
    assert_same(load(ckpt).tensors, reference)
    load(ckpt, direct_io=False)  # buffered reads fill the page cache
    assert resident_fraction(path) > 0.9


def test_tmpfs_tier(reference: dict, ckpt: Path):
    """A DRAM tier on tmpfs: O_DIRECT is refused there on older kernels (fallback), allowed on >= 6.6."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        pytest.skip("no writable /dev/shm")
    d = Path(tempfile.mkdtemp(dir=shm))
    try:
        shutil.copy(ckpt / "model.safetensors", d / "model.safetensors")
        for direct_io in (True, None, False):
            c = load(d, direct_io=direct_io, chunk_bytes=64 << 10)
            assert_same(c.tensors, reference)
            assert direct_io is not False or not c.timing.direct_io
    finally:
        shutil.rmtree(d)
