"""Run Tokasaurus (`toka key=value ...`) against a newer FlashInfer than the one it was written for.

Tokasaurus 0.0.4 pins flashinfer-python 0.2.0.post2, which has no wheel for current CUDA / torch;
FlashInfer >= 0.2.3 changed two calls it makes:

- `sampling_from_probs(probs, uniform_samples)`: the second argument became `indices` (int32 rows
  of `probs`), and the kernel now creates a torch.Generator per call, which fails inside the CUDA
  graph Tokasaurus captures. It is replaced by an exact torch draw (the exponential race).
- `BatchPrefillWithPagedKVCacheWrapper.plan(head_dim=...)`: renamed `head_dim_qk`.

Each patch is applied only when the installed FlashInfer has the new signature, so with the pinned
version this launcher is plain `toka`. `TOKA_COMPAT_PREFILL_BACKEND=fa2` (or fa3) also fixes the
prefill kernel family, whose default ("auto": fa3 on Hopper) decides how long the JIT compile of
a first start takes. It patches at import time, in this process and in every
process Tokasaurus spawns: multiprocessing's spawn re-runs this file (as `__mp_main__`) in each
child before unpickling its target.

    python scripts/toka_compat.py model=/ckpt port=10210     # what TokasaurusProcess(executable=[...]) runs
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Any


def patch_flashinfer() -> list[str]:
    """Adapt FlashInfer's API to the calls Tokasaurus 0.0.4 makes; the names of the patches applied."""
    import flashinfer

    applied = []
    sample = flashinfer.sampling_from_probs
    if "uniform_samples" not in inspect.signature(sample).parameters:

        @functools.wraps(sample)
        def sampling_from_probs(probs: Any, uniform_samples: Any = None, deterministic: bool = True,
                                check_nan: bool = False) -> Any:
            # The new kernel builds a torch.Generator on every call, which CUDA graph capture forbids
            # (Tokasaurus captures its decode step). The exponential race, argmax(p / E) with E ~ Exp(1),
            # is an exact draw from p on torch's capture-safe CUDA RNG.
            import torch

            race = probs / torch.empty_like(probs).exponential_()
            return torch.argmax(race, dim=-1).to(torch.int32)

        flashinfer.sampling_from_probs = sampling_from_probs
        applied.append("sampling_from_probs(probs, uniform_samples)")

    wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper
    plan = wrapper.plan
    if "head_dim" not in inspect.signature(plan).parameters and not getattr(plan, "_toka_compat", False):

        @functools.wraps(plan)
        def compat_plan(self: Any, *args: Any, **kwargs: Any) -> Any:
            if "head_dim" in kwargs:
                kwargs["head_dim_qk"] = kwargs.pop("head_dim")
            return plan(self, *args, **kwargs)

        compat_plan._toka_compat = True  # type: ignore[attr-defined]
        wrapper.plan = compat_plan  # type: ignore[method-assign]
        applied.append("BatchPrefillWithPagedKVCacheWrapper.plan(head_dim=)")

    backend = os.environ.get("TOKA_COMPAT_PREFILL_BACKEND")
    if backend and "backend" in inspect.signature(wrapper.__init__).parameters:
        init = wrapper.__init__

        @functools.wraps(init)
        def compat_init(self: Any, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("backend", backend)
            init(self, *args, **kwargs)

        wrapper.__init__ = compat_init  # type: ignore[method-assign]
        applied.append(f"BatchPrefillWithPagedKVCacheWrapper(backend={backend!r})")
    return applied


# at import, not under __main__: spawned children import this file as __mp_main__, never as __main__
PATCHES = patch_flashinfer()

if __name__ == "__main__":
    print(f"toka_compat: flashinfer patches applied: {PATCHES or 'none needed'}", flush=True)
    from tokasaurus.entry import main

    main()
