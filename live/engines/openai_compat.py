"""Any OpenAI-compatible engine as an engine process: a command template, a readiness probe, capability flags.

An `OpenAICompatSpec` says how to run one engine program, e.g. (the examples under conf/live/engines/)

    name: vllm
    command: vllm serve {model_dir} --host {host} --port {port} --served-model-name {model_name}
    ready_path: /health
    streaming: true
    chat: true
    max_context: 8192

`command` is split with `shlex` first and each word is then filled in, so a model dir with spaces stays one
argument and nothing is ever run through a shell. The placeholders are `PLACEHOLDERS` (`{max_context}` only
when `max_context` is set); any other `{name}` is a config error naming the field. `OpenAICompatProcess` runs
the command with `ProcessEngine`'s lifecycle: its own process group (stop() kills the whole group), crash
detection, `GET ready_path` == 200 as readiness, and the parent-death watchdog sidecar (`live.engines.watchdog`),
so that a SIGKILLed agent leaves no engine behind.

Capabilities are enforced by the gateway, from the flags the agent reports with the instance: an engine
without `streaming` is asked without streaming and the gateway makes the SSE stream itself (the path
Tokasaurus takes); `capability_error` turns a chat request to an engine without `chat`, or a request whose
`max_tokens` alone exceeds `max_context`, into a clear 400 (the engine itself refuses a prompt that does not
fit: only it has the tokenizer, and its 400 reaches the client as it is).
"""

from __future__ import annotations

import math
import os
import shlex
import string
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from live.engines.base import REPO_ROOT, ProcessEngine

# what a command template may name: the checkpoint dir the agent prepared, where to listen, the name the gateway
# sends as "model", this interpreter (to run Python engines in the agent's environment), and this checkout
PLACEHOLDERS = ("model_dir", "port", "host", "model_name", "python", "repo_root", "max_context")
SPEC_FIELDS = ("name", "command", "ready_path", "streaming", "chat", "max_context", "env", "cwd",
               "stop_grace_s", "probe_interval_s")


class EngineSpecError(ValueError):
    """An engine spec that cannot be used; the message names the field."""


def _template_fields(template: str, where: str) -> list[str]:
    """The placeholder names of one word of a command template (EngineSpecError if it is malformed)."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise EngineSpecError(f"{where}: malformed template word {template!r}: {e}") from None
    names = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if spec or conversion:
            raise EngineSpecError(f"{where}: {{{name}}} in {template!r} may not carry a format spec or conversion")
        names.append(name)
    return names


@dataclass(frozen=True)
class OpenAICompatSpec:
    """How one OpenAI-compatible engine program is run, probed, and what it can serve (see the module doc)."""

    name: str
    command: str
    ready_path: str = "/health"
    streaming: bool = True
    chat: bool = True
    max_context: int | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None  # the engine's working dir (placeholders allowed); None: the agent's
    stop_grace_s: float = 10.0  # SIGTERM-to-SIGKILL grace (GPU engines free their memory on SIGTERM)
    probe_interval_s: float = 0.2
    where: str = "engine"  # the config path that error messages name

    def __post_init__(self) -> None:
        w = self.where
        if not isinstance(self.name, str) or not self.name.strip():
            raise EngineSpecError(f"{w}.name: a non-empty string is needed, got {self.name!r}")
        if not isinstance(self.command, str):
            raise EngineSpecError(f"{w}.command: a string is needed (the argv is split with shlex), got "
                                  f"{type(self.command).__name__}")
        try:
            words = shlex.split(self.command)
        except ValueError as e:  # an unclosed quote
            raise EngineSpecError(f"{w}.command: cannot split {self.command!r}: {e}") from None
        if not words:
            raise EngineSpecError(f"{w}.command: empty")
        for key, value in (("command", self.command), ("cwd", self.cwd)):
            for word in shlex.split(value) if key == "command" else ([value] if value is not None else []):
                for name in _template_fields(word, f"{w}.{key}"):
                    if name not in PLACEHOLDERS:
                        raise EngineSpecError(f"{w}.{key}: unknown placeholder {{{name}}}; known: "
                                              f"{', '.join('{' + p + '}' for p in PLACEHOLDERS)}")
                    if name == "max_context" and self.max_context is None:
                        raise EngineSpecError(f"{w}.{key}: {{max_context}} is used but {w}.max_context is not set")
        if not isinstance(self.ready_path, str) or not self.ready_path.startswith("/"):
            raise EngineSpecError(f"{w}.ready_path: an absolute URL path such as '/health' is needed, "
                                  f"got {self.ready_path!r}")
        for key in ("streaming", "chat"):
            if not isinstance(getattr(self, key), bool):
                raise EngineSpecError(f"{w}.{key}: true or false, got {getattr(self, key)!r}")
        ctx = self.max_context
        if ctx is not None and (isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 1):
            raise EngineSpecError(f"{w}.max_context: an integer >= 1 (tokens) or null, got {ctx!r}")
        if not isinstance(self.env, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                        for k, v in self.env.items()):
            raise EngineSpecError(f"{w}.env: a mapping of strings to strings, got {self.env!r}")
        for key in ("stop_grace_s", "probe_interval_s"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise EngineSpecError(f"{w}.{key}: a number of seconds > 0, got {value!r}")

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any], where: str = "engine") -> OpenAICompatSpec:
        """A spec from a config mapping (YAML / JSON); unknown or missing keys are errors naming them."""
        if not isinstance(cfg, Mapping):
            raise EngineSpecError(f"{where}: a mapping is needed, got {type(cfg).__name__}")
        unknown = sorted(set(cfg) - set(SPEC_FIELDS))
        if unknown:
            raise EngineSpecError(f"{where}: unknown key(s) {unknown}; known: {list(SPEC_FIELDS)}")
        missing = [k for k in ("name", "command") if k not in cfg]
        if missing:
            raise EngineSpecError(f"{where}.{missing[0]}: required")
        values = dict(cfg)
        if values.get("env") is None:
            values["env"] = {}
        return cls(**values, where=where)

    def values(self, model_dir: str | os.PathLike[str], port: int, host: str, model_name: str,
               python: str = sys.executable) -> dict[str, str]:
        """What each placeholder stands for."""
        return {"model_dir": str(model_dir), "port": str(port), "host": host, "model_name": model_name,
                "python": python, "repo_root": str(REPO_ROOT),
                "max_context": "" if self.max_context is None else str(self.max_context)}

    def argv(self, values: Mapping[str, str]) -> list[str]:
        """The command's argv: split first, then each word filled in (a value never becomes two words)."""
        return [word.format_map(values) for word in shlex.split(self.command)]


def load_spec(path: str | os.PathLike[str]) -> OpenAICompatSpec:
    """The spec in a YAML (or JSON) file, e.g. conf/live/engines/vllm.yaml; errors name the file and field."""
    import yaml

    path = Path(path)
    try:
        cfg = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise EngineSpecError(f"engine spec {path}: cannot read it: {e}") from None
    return OpenAICompatSpec.from_mapping(cfg, where=str(path))


class OpenAICompatProcess(ProcessEngine):
    """An OpenAI-compatible engine run from an `OpenAICompatSpec` (own process group, watchdog, readiness probe).

    `env` is added to the spec's environment (the agent's tier pacing; a Python engine of tierlab's reads it,
    others ignore it). Capabilities (`streaming`, `chat`, `max_context`) are the spec's.
    """

    kind: ClassVar[str] = "openai"
    log_prefix: ClassVar[str] = "openai-engine-"
    parent_watchdog: ClassVar[bool] = True

    def __init__(self, spec: OpenAICompatSpec, model_dir: str | os.PathLike[str], port: int,
                 host: str = "127.0.0.1", *, model_name: str | None = None, env: Mapping[str, str] | None = None,
                 python: str = sys.executable) -> None:
        super().__init__(port, host, stop_grace_s=spec.stop_grace_s, probe_interval_s=spec.probe_interval_s)
        self.spec = spec
        # absolute: the engine may run in another working dir
        self.model_dir = Path(model_dir).absolute()
        self.model_name = model_name or self.model_dir.name
        self.extra_env = dict(env or {})
        self._values = spec.values(self.model_dir, port, host, self.model_name, python)
        self.log_prefix = f"{spec.name}-engine-"  # type: ignore[misc]  # per instance: the log names the program

    # the spec's capabilities and probe, per instance (the base class declares them per class)
    @property  # type: ignore[override]
    def streaming(self) -> bool:
        return self.spec.streaming

    @property  # type: ignore[override]
    def chat(self) -> bool:
        return self.spec.chat

    @property  # type: ignore[override]
    def max_context(self) -> int | None:
        return self.spec.max_context

    @property  # type: ignore[override]
    def ready_path(self) -> str:
        return self.spec.ready_path

    def command(self) -> list[str]:
        """The argv that start() runs."""
        return self.spec.argv(self._values)

    def _env(self) -> dict[str, str]:
        env = super()._env()
        env["PYTHONUNBUFFERED"] = "1"  # a Python engine's log reaches the file as it happens
        env.update(self.spec.env)
        env.update(self.extra_env)
        return env

    def _cwd(self) -> str | None:
        return self.spec.cwd.format_map(self._values) if self.spec.cwd is not None else None


def capability_error(path: str, body: Mapping[str, Any], chat: bool, max_context: int | None) -> str | None:
    """Why an engine with these capabilities cannot serve this request (a 400 for the client), or None.

    A chat request to an engine without chat; a `max_tokens` (or `max_completion_tokens`) that alone exceeds
    the context window. Streaming is no refusal: the gateway streams a whole answer itself.
    """
    if path.endswith("/chat/completions") and not chat:
        return "this model's engine does not serve chat completions; use /v1/completions with a prompt"
    if max_context is not None:
        for key in ("max_tokens", "max_completion_tokens"):
            value = body.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > max_context:
                return (f"'{key}' is {value}, more than this model's context window of {max_context} tokens "
                        "(prompt and completion together)")
    return None
