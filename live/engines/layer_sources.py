"""Where an engine's layer weights come from (`LayerSource`), so that a model's first forward pass can compute
layer i while later layers are still loading (progressive loading).

Groups follow the checkpoint's compute order: 0 = embeddings, 1..N = decoder layers, N+1 = final norm +
lm_head. `SafetensorsLayerSource` reads everything up front; `BackgroundSafetensorsLayerSource` loads group by
group in a thread; `EventLayerSource` is the building block for any producer (the tier loader) that hands groups
over as they become resident. Nothing here imports torch or safetensors at import time.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from live.manifest import WEIGHTS_FILE

if TYPE_CHECKING:
    import torch

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


# --------------------------------------------------------------------------- layer sources


@runtime_checkable
class LayerSource(Protocol):
    """Per-group weights of a Llama checkpoint, handed over as they become resident.

    Groups: 0 = `model.embed_tokens.*`, 1..n_layers = `model.layers.{group-1}.*`,
    n_layers+1 = `model.norm.*` and `lm_head.*`. `wait(group)` blocks until that group is resident
    and returns its tensors keyed by their checkpoint names (e.g. `model.layers.0.self_attn.q_proj.weight`),
    in the checkpoint's dtype. It raises if loading failed.
    """

    @property
    def n_layers(self) -> int:
        """Number of decoder layers N (so there are N + 2 groups)."""
        ...

    def wait(self, group: int) -> dict[str, torch.Tensor]: ...


def tensor_group(name: str, n_layers: int) -> int:
    """The group a checkpoint tensor belongs to (see `LayerSource`)."""
    if name.startswith("model.embed_tokens."):
        return 0
    match = _LAYER_RE.match(name)
    if match:
        layer = int(match.group(1))
        if layer >= n_layers:
            raise ValueError(f"tensor {name!r} names layer {layer} but the checkpoint has {n_layers} layers")
        return layer + 1
    if name.startswith(("model.norm.", "lm_head.")):
        return n_layers + 1
    raise ValueError(f"tensor {name!r} is not part of a Llama checkpoint")


def read_n_layers(model_dir: str | os.PathLike[str]) -> int:
    """`num_hidden_layers` from the checkpoint's config.json."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return int(config["num_hidden_layers"])


def safetensors_files(model_dir: str | os.PathLike[str]) -> list[Path]:
    """The checkpoint's safetensors files: its `model.safetensors`, or the shards its index names (checked
    against the index: a missing or truncated shard, or a tensor the index and shards disagree on, raises
    naming it), else every `*.safetensors` file of the dir."""
    from live.shards import INDEX_FILE, weight_file_paths

    root = Path(model_dir)
    if (root / WEIGHTS_FILE).is_file() or (root / INDEX_FILE).is_file():
        return weight_file_paths(root)
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {root}")
    return files


class EventLayerSource:
    """A `LayerSource` fed by a producer: `put(group, tensors)` releases a group, `wait` blocks on it.

    The producer may be a loader thread, the tier loader, or a test releasing layers with delays.
    `fail(exc)` wakes every waiter with that error, so a failed load never hangs a forward pass.
    """

    def __init__(self, n_layers: int) -> None:
        self._n_layers = n_layers
        self._events = [threading.Event() for _ in range(n_layers + 2)]
        self._tensors: dict[int, dict[str, torch.Tensor]] = {}
        self._error: BaseException | None = None
        # perf_counter() at which each group was released; read by stats and tests
        self.released_at: dict[int, float] = {}

    @property
    def n_layers(self) -> int:
        return self._n_layers

    @property
    def n_groups(self) -> int:
        return self._n_layers + 2

    def put(self, group: int, tensors: dict[str, torch.Tensor]) -> None:
        """Release one group (its tensors are resident from now on)."""
        self._tensors[group] = tensors
        self.released_at[group] = time.perf_counter()
        self._events[group].set()

    def fail(self, error: BaseException) -> None:
        """Loading failed: every current and future `wait` raises."""
        self._error = error
        for event in self._events:
            event.set()

    @property
    def error(self) -> BaseException | None:
        """The loading error, if loading failed."""
        return self._error

    def ready(self, group: int) -> bool:
        return self._events[group].is_set() and self._error is None

    def all_ready(self) -> bool:
        return all(self.ready(g) for g in range(self.n_groups))

    def wait(self, group: int, timeout_s: float | None = None) -> dict[str, torch.Tensor]:
        if not 0 <= group < self.n_groups:
            raise IndexError(f"group {group} out of range 0..{self.n_groups - 1}")
        if not self._events[group].wait(timeout_s):
            raise TimeoutError(f"group {group} not resident after {timeout_s} s")
        if self._error is not None:
            raise RuntimeError(f"loading group {group} failed: {self._error!r}") from self._error
        return self._tensors[group]


def _iter_groups(model_dir: str | os.PathLike[str], n_layers: int) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Read a checkpoint group by group, in compute order, each tensor copied into process memory."""
    from safetensors import safe_open

    with contextlib.ExitStack() as stack:
        by_group: dict[int, list[tuple[str, object]]] = {g: [] for g in range(n_layers + 2)}
        seen: dict[str, Path] = {}
        for path in safetensors_files(model_dir):
            handle = stack.enter_context(safe_open(str(path), framework="pt"))
            for name in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                if name in seen:  # two files holding one tensor: which one the model gets must not be luck
                    raise ValueError(f"tensor {name!r} is held by two files, {seen[name].name} and {path.name}")
                seen[name] = path
                by_group[tensor_group(name, n_layers)].append((name, handle))
        for group in range(n_layers + 2):
            # get_tensor returns a copy-on-write mmap of the file; clone() makes the bytes resident,
            # so "loaded" means read from the tier, not merely mapped
            yield group, {name: handle.get_tensor(name).clone() for name, handle in by_group[group]}  # type: ignore[attr-defined]


class SafetensorsLayerSource(EventLayerSource):
    """Reads the whole checkpoint in the constructor; every `wait` returns at once."""

    def __init__(self, model_dir: str | os.PathLike[str]) -> None:
        super().__init__(read_n_layers(model_dir))
        start = time.perf_counter()
        for group, tensors in _iter_groups(model_dir, self.n_layers):
            self.put(group, tensors)
        self.load_s = time.perf_counter() - start


class BackgroundSafetensorsLayerSource(EventLayerSource):
    """Loads the checkpoint group by group (compute order) in a daemon thread; `wait` blocks per group.

    `delay_s_per_group` sleeps before each group: an experiment knob that stands in for a slow tier.
    """

    def __init__(self, model_dir: str | os.PathLike[str], delay_s_per_group: float = 0.0) -> None:
        super().__init__(read_n_layers(model_dir))
        self.model_dir = Path(model_dir)
        self.delay_s_per_group = delay_s_per_group
        self.done = threading.Event()
        self.load_s: float | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> BackgroundSafetensorsLayerSource:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="layer-loader", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        start = time.perf_counter()
        try:
            for group, tensors in _iter_groups(self.model_dir, self.n_layers):
                if self.delay_s_per_group > 0:
                    time.sleep(self.delay_s_per_group)
                self.put(group, tensors)
            self.load_s = time.perf_counter() - start
        except BaseException as exc:  # any failure must reach the waiters, or a forward pass hangs
            self.fail(exc)
        finally:
            self.done.set()
