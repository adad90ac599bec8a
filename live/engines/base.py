"""How an engine process is run: `EngineHandle`, what the node agent drives (start, wait_ready, stop, alive,
url, port, pid). `ProcessEngine` runs a command in its own process group (log file, readiness probe, crash
detection, group kill, and optionally the parent-death sidecar of `live.engines.watchdog`); `CpuEngineProcess`
runs `python -m live.engines.cpu_server` with it, `live.engines.tokasaurus.TokasaurusProcess` runs Tokasaurus's
`toka`, and `live.engines.openai_compat.OpenAICompatProcess` any OpenAI-compatible server from a command template.

Where the layer weights come from (`LayerSource` and its implementations) is `live.engines.layer_sources`,
re-exported here. This module imports neither torch nor safetensors: the node agent uses the engine processes
without paying for torch.
"""

from __future__ import annotations

import abc
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar, Self

from live.engines.layer_sources import (  # noqa: F401  (re-exported: callers import them from here)
    BackgroundSafetensorsLayerSource,
    EventLayerSource,
    LayerSource,
    SafetensorsLayerSource,
    read_n_layers,
    safetensors_files,
    tensor_group,
)
from live.engines.watchdog import watchdog_argv

REPO_ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- engine processes


class EngineStartError(RuntimeError):
    """The engine process exited (or never became ready); the message carries its log tail."""


class EngineHandle(abc.ABC):
    """One engine process as the node agent sees it."""

    kind: ClassVar[str] = ""  # "cpu" | "tokasaurus": which engine serves behind `url`
    # whether the engine answers `stream: true` with server-sent events; where it does not, the
    # gateway asks it without streaming and makes the SSE stream for the client itself
    streaming: ClassVar[bool] = True
    # whether it serves /v1/chat/completions, and its context window in tokens (None: not declared); the
    # gateway refuses with a 400 what the engine cannot serve (`live.engines.openai_compat.capability_error`)
    chat: ClassVar[bool] = True
    max_context: ClassVar[int | None] = None

    @property
    @abc.abstractmethod
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:8001 (the OpenAI API lives under /v1)."""

    @property
    @abc.abstractmethod
    def port(self) -> int: ...

    @property
    @abc.abstractmethod
    def pid(self) -> int | None:
        """Process id (None before start)."""

    @abc.abstractmethod
    def start(self) -> None:
        """Launch the process; returns at once (use `wait_ready`)."""

    @abc.abstractmethod
    def wait_ready(self, timeout_s: float) -> float:
        """Block until the engine answers its readiness probe; returns seconds since start().

        Raises EngineStartError if the process died, TimeoutError if not ready in time.
        """

    @abc.abstractmethod
    def stop(self) -> None:
        """Terminate the engine and everything it started; idempotent."""

    @abc.abstractmethod
    def alive(self) -> bool:
        """True while the process runs."""


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on host (another process may still take it before use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _group_member_states(pgid: int) -> list[tuple[int, str]]:
    """(pid, state letter from /proc/<pid>/stat) of every process of group pgid; [] without /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # exited while we looked
        # fields after "pid (comm)": state ppid pgrp ...; comm may contain spaces and parentheses
        fields = text[text.rfind(")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid:
            members.append((int(stat.parent.name), fields[0]))
    return members


def running_group_members(pgid: int) -> list[int]:
    """Pids of the processes of group pgid that still run (zombies excluded).

    Zombies are left out because a reparented child that died stays a zombie until init reaps it,
    and some containers' init never does; signalling the group would still "find" it. Without
    /proc (not Linux) this falls back to asking the kernel whether the group exists at all.
    """
    if not Path("/proc").is_dir():
        return [pgid] if _kill_group(pgid, 0) else []
    return [pid for pid, state in _group_member_states(pgid) if state not in ("Z", "X")]


def dead_group_members(pgid: int) -> list[int]:
    """Pids of the processes of group pgid that exited but were not reaped yet (zombies); [] without /proc."""
    return [pid for pid, state in _group_member_states(pgid) if state in ("Z", "X")]


def _kill_group(pgid: int, sig: int) -> bool:
    """Send sig to the process group; False if the group no longer exists."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


class ProcessEngine(EngineHandle):
    """An engine run as a command in its own process group (session), its output in a temp log file.

    Subclasses say what to run (`command()`, plus `_launch_argv()` / `_env()` / `_cwd()` hooks); this
    base starts it, probes `GET ready_path` until it answers 200, detects a crash (the process exited,
    or, with `dead_child_is_crash`, one of its children died and was left unreaped), and `stop()`
    sends SIGTERM to the whole group, then SIGKILL after `stop_grace_s`, and reaps the process, so no
    orphan outlives it. With `parent_watchdog`, a sidecar (`live.engines.watchdog`) ends the group if this
    process dies without calling stop(), even by SIGKILL.
    """

    ready_path: ClassVar[str] = "/ping"
    log_prefix: ClassVar[str] = "engine-"
    # an engine that runs its work in child processes it never reaps (Tokasaurus: server, manager and
    # model workers under one launcher) has crashed when one of them is a zombie; the grace skips the
    # instant between a short-lived helper's exit and its reaping
    dead_child_is_crash: ClassVar[bool] = False
    dead_child_grace_s: ClassVar[float] = 2.0
    # an engine that cannot watch its launcher itself (not tierlab's code: Tokasaurus, vLLM, ...) runs under
    # `live.engines.watchdog`, which ends its process group when this process dies, even by SIGKILL
    parent_watchdog: ClassVar[bool] = False

    def __init__(self, port: int, host: str = "127.0.0.1", *, stop_grace_s: float = 5.0,
                 probe_interval_s: float = 0.05) -> None:
        self._port = port
        self.host = host
        self.stop_grace_s = stop_grace_s
        self.probe_interval_s = probe_interval_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: tempfile._TemporaryFileWrapper[bytes] | None = None
        self._started_at = 0.0  # perf_counter() at start()
        self.launched_at_unix: float | None = None
        self._zombies_seen: dict[int, float] = {}  # pid -> perf_counter() when first seen dead
        self._watchdog: subprocess.Popen[bytes] | None = None  # the parent-death sidecar (`parent_watchdog`)

    # -- what to run (subclasses)

    @abc.abstractmethod
    def command(self) -> list[str]:
        """The argv that start() runs."""

    def _launch_argv(self) -> list[str]:
        """The argv actually launched (`command()` plus anything known only at start)."""
        return self.command()

    def _env(self) -> dict[str, str]:
        """The engine's environment."""
        return dict(os.environ)

    def _cwd(self) -> str | None:
        """The engine's working directory (None: this process's)."""
        return None

    # -- EngineHandle

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self._port}"

    @property
    def port(self) -> int:
        return self._port

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def watchdog_pid(self) -> int | None:
        """The parent-death sidecar's pid (None without `parent_watchdog`, before start and after stop)."""
        return self._watchdog.pid if self._watchdog is not None else None

    @property
    def pgid(self) -> int | None:
        """The process group id (equals pid: the engine leads its own session)."""
        return self.pid

    def start(self) -> None:
        if self._proc is not None:
            raise RuntimeError("engine already started")
        # a file, not a pipe: nobody drains a pipe while the engine runs, and a full pipe would block it
        self._log_file = tempfile.NamedTemporaryFile(prefix=self.log_prefix, suffix=".log", delete=False)  # noqa: SIM115
        self.launched_at_unix = time.time()
        self._started_at = time.perf_counter()
        argv = self._launch_argv()
        try:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                env=self._env(),
                cwd=self._cwd(),
                start_new_session=True,  # own process group: stop() can kill everything it spawned
            )
        except OSError as e:  # the executable is missing or not executable: no process, no log to keep
            self.close()
            raise EngineStartError(f"cannot run {argv[0]!r}: {e}") from e
        if self.parent_watchdog:
            self._start_watchdog()

    def _start_watchdog(self) -> None:
        """The parent-death sidecar (`live.engines.watchdog`): in a session of its own, so that stopping the
        engine's group never reaches it; it exits by itself once the group is empty."""
        assert self._proc is not None
        try:
            self._watchdog = subprocess.Popen(
                watchdog_argv(self._proc.pid, os.getpid(), grace_s=self.stop_grace_s),
                stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:  # no interpreter to run it: an engine nobody would stop after a SIGKILL is refused
            self.close()
            raise EngineStartError(f"cannot start the engine's parent-death watchdog: {e}") from e

    def _reap_watchdog(self, pgid: int) -> None:
        """Once the group is gone the sidecar has nothing left to watch: end and reap it."""
        dog, self._watchdog = self._watchdog, None
        if dog is None:
            return
        if not running_group_members(pgid):
            dog.kill()  # at once, rather than waiting for its next poll to see the group empty
        try:
            dog.wait(timeout=self.stop_grace_s + 2.0)
        except subprocess.TimeoutExpired:
            dog.kill()
            dog.wait()

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None and not self._dead_children()

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    def _dead_children(self) -> list[int]:
        """Children that died unreaped at least `dead_child_grace_s` ago (only with `dead_child_is_crash`)."""
        if not self.dead_child_is_crash or self._proc is None:
            return []
        now = time.perf_counter()
        dead = dead_group_members(self._proc.pid)
        self._zombies_seen = {pid: self._zombies_seen.get(pid, now) for pid in dead}
        return [pid for pid, seen in self._zombies_seen.items() if now - seen >= self.dead_child_grace_s]

    def crash_reason(self) -> str | None:
        """Why the engine is down ("engine exited with code N", "engine child process P died"), or None."""
        if self._proc is None:
            return None
        if self._proc.poll() is not None:
            return f"engine exited with code {self._proc.returncode}"
        dead = self._dead_children()
        if dead:
            return f"engine child process {dead[0]} died (the engine itself still runs)"
        return None

    @property
    def log_path(self) -> Path | None:
        """The file holding the engine's stdout and stderr (kept after stop(), deleted by close())."""
        return Path(self._log_file.name) if self._log_file is not None else None

    def log_tail(self, max_bytes: int = 4000) -> str:
        """The last max_bytes of the engine's stdout+stderr."""
        if self._log_file is None:
            return ""
        try:
            with open(self._log_file.name, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - max_bytes))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def probe(self, path: str = "/ping", timeout_s: float = 1.0) -> int | None:
        """HTTP status of GET path, or None if nothing answers."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout_s) as response:
                return int(response.status)
        except urllib.error.HTTPError as err:
            return int(err.code)
        except (urllib.error.URLError, OSError):
            return None

    def wait_ready(self, timeout_s: float) -> float:
        if self._proc is None:
            raise RuntimeError("engine not started")
        deadline = time.perf_counter() + timeout_s
        while True:
            crash = self.crash_reason()
            if crash is not None:
                raise EngineStartError(f"{crash} before it was ready; log tail:\n{self.log_tail()}")
            if self.probe(self.ready_path) == 200:
                return time.perf_counter() - self._started_at
            if time.perf_counter() >= deadline:
                raise TimeoutError(f"engine not ready after {timeout_s} s; log tail:\n{self.log_tail()}")
            time.sleep(self.probe_interval_s)

    def stop(self) -> None:
        proc = self._proc
        if proc is None:
            return
        pgid = proc.pid
        if _kill_group(pgid, signal.SIGTERM):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=self.stop_grace_s)
        # SIGKILL whatever is left of the group: the leader if it ignored SIGTERM, and any child
        # it spawned, which would otherwise outlive it as an orphan
        _kill_group(pgid, signal.SIGKILL)
        proc.wait()
        deadline = time.perf_counter() + self.stop_grace_s
        while running_group_members(pgid) and time.perf_counter() < deadline:
            _kill_group(pgid, signal.SIGKILL)  # SIGKILL is delivered asynchronously; repeat until none runs
            time.sleep(0.01)
        self._reap_watchdog(pgid)
        if self._log_file is not None:
            self._log_file.close()

    def close(self) -> None:
        """stop() and delete the log file."""
        self.stop()
        if self._log_file is not None:
            self._log_file.close()
            with contextlib.suppress(OSError):
                os.unlink(self._log_file.name)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __del__(self) -> None:
        # a forgotten handle must not leave a server behind
        with contextlib.suppress(Exception):
            if self._proc is not None and self._proc.poll() is None:
                self.stop()


class CpuEngineProcess(ProcessEngine):
    """`python -m live.engines.cpu_server` in its own process group (session), logs in a temp file.

    `stop()` sends SIGTERM to the whole group, then SIGKILL after `stop_grace_s`, and reaps the
    process, so no orphan outlives it. The server also exits by itself if this process dies
    (`--exit-with-parent`), which covers a parent killed with SIGKILL.
    """

    kind: ClassVar[str] = "cpu"
    streaming: ClassVar[bool] = True
    log_prefix: ClassVar[str] = "cpu-engine-"

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        port: int,
        host: str = "127.0.0.1",
        progressive: bool = False,
        *,
        model_name: str | None = None,
        dtype: str = "float32",
        threads: int | None = None,
        max_num_seqs: int = 8,
        env: Mapping[str, str] | None = None,
        extra_args: list[str] | None = None,
        prefix_cache_blocks: int = 0,
        prefix_block_tokens: int = 16,
        python: str = sys.executable,
        stop_grace_s: float = 5.0,
        probe_interval_s: float = 0.05,
    ) -> None:
        super().__init__(port, host, stop_grace_s=stop_grace_s, probe_interval_s=probe_interval_s)
        self.model_dir = Path(model_dir)
        self.progressive = progressive
        self.model_name = model_name
        self.dtype = dtype
        self.threads = threads
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        self.max_num_seqs = max_num_seqs
        if prefix_cache_blocks < 0 or prefix_block_tokens < 1:
            raise ValueError(f"prefix_cache_blocks must be >= 0 and prefix_block_tokens >= 1, got "
                             f"{prefix_cache_blocks} and {prefix_block_tokens}")
        self.prefix_cache_blocks = prefix_cache_blocks
        self.prefix_block_tokens = prefix_block_tokens
        self.extra_env = dict(env or {})  # e.g. the tier pacing of the directory the engine reads
        self.extra_args = list(extra_args or [])
        self.python = python

    def command(self) -> list[str]:
        """The argv that start() runs."""
        argv = [
            self.python, "-m", "live.engines.cpu_server",
            "--model-dir", str(self.model_dir),
            "--host", self.host,
            "--port", str(self._port),
            "--dtype", self.dtype,
            "--exit-with-parent", str(os.getpid()),
        ]  # fmt: skip
        if self.progressive:
            argv.append("--progressive")
        if self.model_name:
            argv += ["--model-name", self.model_name]
        if self.threads:
            argv += ["--threads", str(self.threads)]
        argv += ["--max-num-seqs", str(self.max_num_seqs)]
        if self.prefix_cache_blocks:
            argv += ["--prefix-cache-blocks", str(self.prefix_cache_blocks),
                     "--prefix-block-tokens", str(self.prefix_block_tokens)]
        return argv + self.extra_args

    def _launch_argv(self) -> list[str]:
        assert self.launched_at_unix is not None  # set by start() just before
        return [*self.command(), "--launched-at", repr(self.launched_at_unix)]

    def _env(self) -> dict[str, str]:
        env = super()._env()
        # the engine imports `live` from this checkout even when the package is not installed
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.extra_env)
        return env

    def _cwd(self) -> str | None:
        return str(REPO_ROOT)
