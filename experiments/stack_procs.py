"""The processes of a running stack, read from /proc: the gateway (`experiments.serve`) and its descendants
(agents, engines, watchdogs), each with its role and a label, and their RSS, open fds and threads. Shared by
the soak (`experiments.soak`) and the chaos replay (`experiments.chaos_faults`)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _ppids() -> dict[int, int]:
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
            if stat[0] != "Z":
                out[int(entry.name)] = int(stat[1])
    return out


def cmdline(pid: int) -> list[str]:
    """The command line of `pid` ([] if it is gone)."""
    try:
        return [a for a in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0") if a]
    except OSError:
        return []


def flag(argv: Sequence[str], name: str) -> str | None:
    """The value of option `name` in `argv` (`--x v` or `--x=v`), or None."""
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def describe(pid: int, root: int) -> tuple[str, str]:
    """(role, a label naming it) for a process of the stack, from its command line."""
    if pid == root:
        return "gateway", "gateway"
    argv = cmdline(pid)
    line = " ".join(argv)
    if "live.agent" in line:
        return "agent", f"agent {flag(argv, '--node') or pid}"
    if "watchdog" in line:
        return "watchdog", f"watchdog {pid}"
    if "live.engines" in line or "--model-dir" in line:
        return "engine", f"engine {flag(argv, '--model-name') or '?'} ({pid})"
    return "other", f"{Path(argv[0]).name if argv else '?'} ({pid})"


def stack_pids(root: int) -> list[int]:
    """`root` and its descendants (the agents are its children, the engines theirs)."""
    ppids = _ppids()
    children: dict[int, list[int]] = {}
    for pid, ppid in ppids.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo and len(out) < 10_000:  # bounded: a process tree is finite, the guard is for a /proc race
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def read_process(pid: int) -> dict[str, float] | None:
    """{rss_MB, fds, threads} of a live process from /proc (None if it is gone). RSS in MB of 1e6 bytes."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    try:
        rss_kB = float(fields["VmRSS"].split()[0])
        threads = float(fields["Threads"].strip())
    except (KeyError, ValueError, IndexError):
        return None
    return {"rss_MB": rss_kB * 1024 / 1e6, "fds": float(fds), "threads": threads}


def sample_stack(root: int, t_s: float) -> list[dict[str, Any]]:
    """One sample of every process of the stack."""
    rows = []
    for pid in stack_pids(root):
        values = read_process(pid)
        if values is None:
            continue
        role, label = describe(pid, root)
        rows.append({"t_s": round(t_s, 3), "proc": label, "role": role, "pid": pid, **values})
    return rows
