"""A `LayerSource` fed by tierlab's loader (`live.loader`): parallel, layer-ordered reads.

The loader marks layer i usable once every byte up to the end of layer i is in host memory
(layer 0 carries the embeddings, the tail the final norm and lm_head); this adapter releases
the engine's groups (0 = embeddings, 1..N = layers, N+1 = tail) in that order.

An engine started by the node agent on a paced tier finds that tier's `live.pacing.PaceSpec` in
`$TIERLAB_READ_PACE`; its reads then share the tier's read bandwidth with the agent's copies and
other engines reading the same tier (the simulator's fetch hop over the tier's read link).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from live.engines.layer_sources import EventLayerSource, read_n_layers
from live.pacing import Device, Flow, PaceSpec

PACED_CHUNK_BYTES = 1 << 20  # paced reads land chunk by chunk: small chunks keep layers arriving one by one


class LoaderLayerSource(EventLayerSource):
    """Starts a `live.loader` load at construction; `wait(group)` blocks until that group is resident.

    `pace_spec` (default: the one in `$TIERLAB_READ_PACE`, if any) paces the read at the tier's read
    bandwidth, after its first-byte latency; `load_kwargs` go to `live.loader.start_load`.
    """

    def __init__(self, model_dir: str | os.PathLike[str], pace_spec: PaceSpec | None = None,
                 **load_kwargs: Any) -> None:
        super().__init__(read_n_layers(model_dir))
        from live.loader import start_load  # torch-heavy: imported only when a load starts

        spec = pace_spec if pace_spec is not None else PaceSpec.from_env()
        self.pace_spec = spec if spec is not None and spec.paced else None
        if self.pace_spec is not None and "pace" not in load_kwargs:
            load_kwargs["pace"] = Flow(reads=[Device(self.pace_spec)])
            load_kwargs.setdefault("chunk_bytes", PACED_CHUNK_BYTES)

        self.done = threading.Event()
        self.load_s: float | None = None
        self._start = time.perf_counter()
        self._load = start_load(model_dir, **load_kwargs)
        self._thread = threading.Thread(target=self._relay, name="loader-relay", daemon=True)
        self._thread.start()

    def start(self) -> LoaderLayerSource:
        return self  # the load began in __init__; kept for symmetry with the background source

    def _relay(self) -> None:
        try:
            first = self._load.wait_layer(0)
            embed = {k: v for k, v in first.items() if ".layers." not in k}
            self.put(0, embed)
            self.put(1, {k: v for k, v in first.items() if k not in embed})
            for i in range(1, self.n_layers):
                self.put(i + 1, self._load.wait_layer(i))
            self.put(self.n_layers + 1, self._load.wait_tail())
            self._load.result()  # raises a checksum or read error, if any
            self.load_s = time.perf_counter() - self._start
        except BaseException as exc:  # any failure must reach the waiters, or a forward pass hangs
            self.fail(exc)
        finally:
            self.done.set()
