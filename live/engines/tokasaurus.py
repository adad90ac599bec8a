"""Tokasaurus (GPU) as an engine process: `toka model=<dir> port=<p> ...`, with launch profiles by model size.

Tokasaurus (github.com/ScalingIntelligence/tokasaurus) is configured by pydra `key=value`
arguments (`model=`, `port=`, `tp_size=`, `torch_compile=T|F`, `kv_cache_num_tokens=`,
`max_seqs_per_forward=`, ...). Its launcher process runs the web server and spawns a manager and
one model worker per GPU; the server answers `GET /ping` only once every process passed the
start-up barrier (weights loaded, warm-up done), so /ping is the readiness probe. It serves the
OpenAI `/v1/completions` and `/v1/chat/completions` without streaming (a `stream: true` request
gets one JSON body), hence `streaming = False`. It listens on 0.0.0.0 whatever `host` says; `host`
only builds the URL.

Its worker processes are never reaped by the launcher, so a worker that dies stays a zombie in the
engine's process group while the launcher waits forever: that is detected as a crash
(`dead_child_is_crash`).

Profiles by model size (`toka_profile`), from the seed's engine table:

| parameters                 | profile  | GPUs                                  | torch_compile |
|----------------------------|----------|---------------------------------------|---------------|
| <= 4e9 (1-3B)              | small    | 1 (fast start)                        | off           |
| <= 20e9 (7-13B)            | medium   | 1                                     | on            |
| > 20e9 (70B+)              | large    | tp_size = largest power of 2 <= GPUs, at most 8, at least 2 | on |

20B is where bf16 weights (40 GB) stop leaving room for a useful KV cache on one 80 GB GPU.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from live.engines.base import EngineStartError, ProcessEngine, safetensors_files
from live.manifest import SafetensorsHeaderError, read_safetensors_header

SMALL_MAX_PARAMS = 4_000_000_000  # Llama-3.2-1B / 3B
MEDIUM_MAX_PARAMS = 20_000_000_000  # Llama-3.1-8B, 13B models
MAX_TP_SIZE = 8  # one node's GPUs
# files Tokasaurus reads from a local model dir before any weight (AutoConfig, GenerationConfig, AutoTokenizer)
REQUIRED_FILES = ("config.json", "generation_config.json")
_ARG_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=")


@dataclass(frozen=True)
class TokaProfile:
    """How Tokasaurus is launched for a model size: tensor parallelism, compilation, extra `key=value` args."""

    name: str  # "small" | "medium" | "large"
    tp_size: int
    torch_compile: bool
    extra_args: tuple[str, ...] = ()

    def args(self) -> list[str]:
        """The profile as Tokasaurus `key=value` arguments."""
        return [f"tp_size={self.tp_size}", f"torch_compile={'T' if self.torch_compile else 'F'}", *self.extra_args]


def toka_profile(n_params: int, n_gpus_available: int) -> TokaProfile:
    """The launch profile for a model of `n_params` parameters on a node with `n_gpus_available` GPUs.

    Raises ValueError for non-positive inputs, and for a large model (> MEDIUM_MAX_PARAMS) with
    fewer than 2 GPUs: its weights do not fit one GPU with a KV cache beside them.
    """
    for name, value in (("n_params", n_params), ("n_gpus_available", n_gpus_available)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"toka_profile: {name} must be a positive int, got {value!r}")
    if n_params <= SMALL_MAX_PARAMS:
        # no torch.compile: it adds a minute or more to start-up, and a small model is what must start fast
        return TokaProfile("small", tp_size=1, torch_compile=False)
    if n_params <= MEDIUM_MAX_PARAMS:
        return TokaProfile("medium", tp_size=1, torch_compile=True)
    usable = min(n_gpus_available, MAX_TP_SIZE)
    if usable < 2:
        raise ValueError(f"toka_profile: a {n_params / 1e9:.0f}B-parameter model needs tensor parallelism over "
                         f">= 2 GPUs, but n_gpus_available={n_gpus_available}")
    # attention heads and vocabularies of large models divide by powers of two, not by 3, 5, 6 or 7
    return TokaProfile("large", tp_size=1 << int(math.log2(usable)), torch_compile=True)


def count_params(model_dir: str | os.PathLike[str]) -> int:
    """Parameters of a checkpoint dir, from its safetensors headers alone (no weight is read)."""
    total = 0
    for path in safetensors_files(model_dir):
        _, header = read_safetensors_header(path)
        try:
            total += sum(math.prod(entry["shape"]) for name, entry in header.items() if name != "__metadata__")
        except (KeyError, TypeError) as e:
            raise SafetensorsHeaderError(f"{path}: a header entry has no valid shape ({e!r})") from e
    return total


class TokasaurusProcess(ProcessEngine):
    """`toka model=<dir> port=<port> <profile args> <extra args>` in its own process group.

    `executable`: the `toka` command, a name looked up on PATH or a path, or an argv prefix (e.g.
    `[python, "launcher.py"]`). `profile`: default `toka_profile(count_params(model_dir), n_gpus)`.
    `env`: variables added to this process's environment (CUDA_VISIBLE_DEVICES, cache dirs).
    `n_gpus`: GPUs the profile may use (ignored when `profile` is given).
    A missing executable or model file raises EngineStartError from start(), naming it.
    """

    kind: ClassVar[str] = "tokasaurus"
    streaming: ClassVar[bool] = False
    log_prefix: ClassVar[str] = "toka-engine-"
    dead_child_is_crash: ClassVar[bool] = True
    # Tokasaurus cannot watch its launcher: the watchdog sidecar ends its group if the agent dies, even by SIGKILL
    parent_watchdog: ClassVar[bool] = True

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        port: int,
        host: str = "127.0.0.1",
        *,
        profile: TokaProfile | None = None,
        n_gpus: int = 1,
        executable: str | Sequence[str] = "toka",
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        stop_grace_s: float = 10.0,
        probe_interval_s: float = 0.2,
    ) -> None:
        super().__init__(port, host, stop_grace_s=stop_grace_s, probe_interval_s=probe_interval_s)
        # absolute: pydra parses values as Python literals, and a relative dir would also be tried as a hub id
        self.model_dir = Path(model_dir).absolute()
        self.n_gpus = n_gpus
        self._profile = profile
        self.executable = [executable] if isinstance(executable, str) else list(executable)
        if not self.executable:
            raise ValueError("TokasaurusProcess: executable must not be empty")
        self.extra_args = list(extra_args)
        bad = [a for a in self.extra_args if not _ARG_RE.match(a)]
        if bad:
            raise ValueError(f"TokasaurusProcess: extra_args must be key=value, got {bad}")
        reserved = [a for a in self.extra_args if a.split("=", 1)[0] in ("model", "port")]
        if reserved:
            raise ValueError(f"TokasaurusProcess: extra_args must not set model or port (got {reserved})")
        self.extra_env = dict(env or {})

    def resolve_profile(self) -> TokaProfile:
        """The launch profile: the one given, else computed from the checkpoint's size (once)."""
        if self._profile is None:
            self._profile = toka_profile(count_params(self.model_dir), self.n_gpus)
        return self._profile

    def command(self) -> list[str]:
        """The argv that start() runs."""
        return [*self.executable, f"model={self.model_dir}", f"port={self._port}", *self.resolve_profile().args(),
                *self.extra_args]

    def _env(self) -> dict[str, str]:
        env = super()._env()
        env["PYTHONUNBUFFERED"] = "1"  # Tokasaurus is Python: its log reaches the file as it happens
        env.update(self.extra_env)
        return env

    def start(self) -> None:
        missing = [name for name in REQUIRED_FILES if not (self.model_dir / name).is_file()]
        if missing:
            raise EngineStartError(f"{self.model_dir} is not a local checkpoint dir Tokasaurus can load: "
                                   f"{', '.join(str(self.model_dir / m) for m in missing)} missing")
        exe = self.executable[0]
        if shutil.which(exe, path=self._env().get("PATH")) is None:
            raise EngineStartError(f"Tokasaurus executable {exe!r} not found or not executable (install "
                                   "tokasaurus, or pass executable= / --toka with its path)")
        try:
            self.resolve_profile()
        except (ValueError, OSError) as e:
            raise EngineStartError(f"no Tokasaurus profile for {self.model_dir}: {e}") from e
        super().start()
