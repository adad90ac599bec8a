"""Process-lifecycle helpers shared by the live processes (engines, agents, `experiments.serve`)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import ssl
import subprocess
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


def _watch_parent(parent_pid: int, poll_s: float, on_exit: Callable[[], object] | None) -> None:
    while os.getppid() == parent_pid:
        time.sleep(poll_s)
    log.warning("parent %d is gone; exiting", parent_pid)
    if on_exit is not None:
        try:
            on_exit()
        except Exception:  # exiting matters more than a clean-up that failed
            log.exception("clean-up before exit failed")
    os._exit(0)


def exit_with_parent(parent_pid: int, poll_s: float = 0.5, on_exit: Callable[[], object] | None = None) -> None:
    """Exit this process as soon as `parent_pid` is no longer its parent (the launcher died, even by SIGKILL).

    A daemon thread polls getppid(): a child re-parented to init (or a subreaper) sees another pid.
    `on_exit` runs first (e.g. stop the engines this process started).
    """
    threading.Thread(target=_watch_parent, args=(parent_pid, poll_s, on_exit), daemon=True,
                     name="exit-with-parent").start()


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def stop_process(proc: subprocess.Popen[bytes], grace_s: float = 20.0) -> int:
    """SIGTERM the process (it leads its own session), wait `grace_s`, then SIGKILL its group; its exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            log.warning("pid %d ignored SIGTERM for %.0f s; killing its group", proc.pid, grace_s)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait()


def wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    """Wait until none of `pids` runs, SIGKILLing the stragglers' groups at the deadline; those still running."""
    deadline = time.monotonic() + timeout_s
    left = [p for p in pids if pid_alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if pid_alive(p)]
    for pid in left:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    time.sleep(0.1 if left else 0)
    return [p for p in left if pid_alive(p)]


def wait_healthy(url: str, timeout_s: float, proc: subprocess.Popen[bytes] | None = None,
                 log_path: str | os.PathLike[str] | None = None, what: str = "server",
                 verify: ssl.SSLContext | bool = True) -> None:
    """Poll `url`/healthz until it answers 200; RuntimeError after `timeout_s`, or as soon as `proc` (the
    server's process, if given) exits, with the end of its log at `log_path`. `verify`: a context trusting an
    https server's CA, or True for the system's CAs."""
    import httpx  # a live dependency; imported here so the helpers above need none

    def tail() -> str:
        if log_path is None:
            return ""
        with contextlib.suppress(OSError), open(log_path, errors="replace") as f:
            return ":\n" + f.read()[-3000:]
        return ""

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}{tail()}")
        try:
            if httpx.get(url + "/healthz", timeout=1, trust_env=False, verify=verify).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what} at {url} not healthy in {timeout_s:g} s{tail()}")
