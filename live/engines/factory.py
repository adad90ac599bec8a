"""One place that turns an engine kind ("cpu" | "tokasaurus" | "openai") and a model dir into an engine process."""

from __future__ import annotations

import os
from collections.abc import Mapping

from live.engines.base import CpuEngineProcess, ProcessEngine
from live.engines.openai_compat import OpenAICompatProcess, OpenAICompatSpec
from live.engines.tokasaurus import TokasaurusProcess

# "openai": any OpenAI-compatible server (vLLM, SGLang, llama-server, ...) run from an `OpenAICompatSpec`
ENGINE_KINDS = ("cpu", "tokasaurus", "openai")


def make_engine(
    kind: str,
    model_dir: str | os.PathLike[str],
    port: int,
    *,
    host: str = "127.0.0.1",
    model_name: str | None = None,
    dtype: str = "float32",
    threads: int | None = None,
    progressive: bool = False,
    toka_executable: str = "toka",
    n_gpus: int = 1,
    max_num_seqs: int = 8,
    env: Mapping[str, str] | None = None,
    spec: OpenAICompatSpec | None = None,
    prefix_cache_blocks: int = 0,
    prefix_block_tokens: int = 16,
) -> ProcessEngine:
    """An engine process of `kind` serving `model_dir` on host:port (not started).

    `model_name`, `dtype`, `threads` and `progressive` are the CPU engine's; Tokasaurus serves in its
    own dtype (bf16: its attention kernels have no fp32 path), echoes the request's model name, and
    takes its GPU count (`n_gpus`) and executable (`toka_executable`). `max_num_seqs` is the CPU engine's
    batch limit; `env` is added to the CPU engine's environment (e.g. `live.pacing`'s tier pacing), and to an
    "openai" engine's. `spec` (required for "openai") says which program that is and how to run and probe it.
    `prefix_cache_blocks` > 0: the CPU engine keeps a prefix (KV) cache of that many blocks.
    """
    if kind == "cpu":
        return CpuEngineProcess(model_dir, port, host=host, progressive=progressive, model_name=model_name,
                                dtype=dtype, threads=threads, max_num_seqs=max_num_seqs, env=env,
                                prefix_cache_blocks=prefix_cache_blocks, prefix_block_tokens=prefix_block_tokens)
    if kind == "tokasaurus":
        return TokasaurusProcess(model_dir, port, host=host, n_gpus=n_gpus, executable=toka_executable)
    if kind == "openai":
        if spec is None:
            raise ValueError("engine kind 'openai' needs a spec (an OpenAICompatSpec: command template, readiness "
                             "probe, capabilities), e.g. live.engines.openai_compat.load_spec('conf/live/engines/"
                             "vllm.yaml')")
        return OpenAICompatProcess(spec, model_dir, port, host=host, model_name=model_name, env=env)
    raise ValueError(f"unknown engine kind {kind!r}; choose one of {ENGINE_KINDS}")
