"""The parent-death watchdog sidecar (`live.engines.watchdog`), directly and as Tokasaurus's.

Everything is a real process: a launcher subprocess starts an engine (a stand-in program with a grandchild, or
Tokasaurus's stand-in `toka`) and its sidecar, and is then SIGKILLed; the engine's whole process group must
exit in bounded time. No GPU: Tokasaurus's `toka` is the stand-in of test_tokasaurus.py (`executable=` is the
class's own command override).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

from live.checkpoint import generate_checkpoint
from live.engines.base import running_group_members
from live.engines.watchdog import end_group, watchdog_argv
from live.lifecycle import pid_alive

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}

# a stand-in engine: a grandchild in its group, and deaf to SIGTERM (the sidecar must escalate to SIGKILL)
STUBBORN_ENGINE = textwrap.dedent("""
    import signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    print("up", flush=True)
    time.sleep(600)
""")


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        time.sleep(0.05)


def kill_launcher_and_expect_no_orphan(launcher: str, timeout_s: float = 15.0,
                                       env: dict[str, str] | None = None) -> tuple[int, int | None]:
    """Run `launcher` (Python source) in a subprocess: it starts an engine and prints "<pgid> <sidecar pid>" once
    the engine serves. SIGKILL it, then require that nothing of the engine's group runs within `timeout_s` and
    that the sidecar is gone too. Returns (pgid, sidecar pid)."""
    parent = subprocess.Popen([sys.executable, "-c", launcher], cwd=REPO, env=env or ENV, stdout=subprocess.PIPE,
                              text=True)
    pgid = 0
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline().split()  # bounded: the launcher exits (EOF) if it fails
        assert len(line) == 2, f"launcher failed (exit {parent.poll()})"
        pgid, dog = int(line[0]), (int(line[1]) if line[1] != "None" else None)
        assert running_group_members(pgid), "the engine should run before its launcher dies"
        parent.kill()  # SIGKILL: no stop(), no atexit, no finally in the launcher
        parent.wait(timeout=10)
        wait_until(lambda: running_group_members(pgid) == [], timeout_s, f"group {pgid} exits after its launcher")
        if dog is not None:
            wait_until(lambda: not pid_alive(dog), 5, "the sidecar exits with the group")
        return pgid, dog
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if pgid and running_group_members(pgid):
            os.killpg(pgid, signal.SIGKILL)  # never leave a process behind, even when the test failed


def test_sidecar_kills_the_whole_group_when_the_launcher_is_sigkilled() -> None:
    launcher = textwrap.dedent(f"""
        import os, subprocess, sys, time
        from live.engines.watchdog import watchdog_argv
        engine = subprocess.Popen([sys.executable, "-c", {STUBBORN_ENGINE!r}], stdout=subprocess.PIPE,
                                  start_new_session=True)
        engine.stdout.readline()  # the grandchild is started
        dog = subprocess.Popen(watchdog_argv(engine.pid, os.getpid(), grace_s=0.5, poll_s=0.05),
                               start_new_session=True)
        print(engine.pid, dog.pid, flush=True)
        time.sleep(600)
    """)
    kill_launcher_and_expect_no_orphan(launcher)


def test_sidecar_exits_by_itself_once_the_group_is_empty() -> None:
    engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    dog = subprocess.Popen(watchdog_argv(engine.pid, os.getpid(), poll_s=0.05), start_new_session=True)
    try:
        time.sleep(0.3)
        assert dog.poll() is None  # it watches while the engine runs...
        os.killpg(engine.pid, signal.SIGKILL)
        engine.wait(timeout=10)
        assert dog.wait(timeout=10) == 0  # ...and leaves once the group is gone (no process kept per dead engine)
    finally:
        for proc in (engine, dog):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_end_group_escalates_to_sigkill_for_an_engine_deaf_to_sigterm() -> None:
    engine = subprocess.Popen([sys.executable, "-c", STUBBORN_ENGINE], stdout=subprocess.PIPE,
                              start_new_session=True)
    try:
        assert engine.stdout is not None and engine.stdout.readline().strip() == b"up"
        assert len(running_group_members(engine.pid)) == 2
        t0 = time.monotonic()
        assert end_group(engine.pid, grace_s=0.3)
        assert 0.3 <= time.monotonic() - t0 < 5  # the grace was given, then SIGKILL
        assert engine.wait(timeout=5) == -signal.SIGKILL and running_group_members(engine.pid) == []
    finally:
        if engine.poll() is None:
            os.killpg(engine.pid, signal.SIGKILL)
            engine.wait()


def test_watchdog_refuses_bad_arguments() -> None:
    out = subprocess.run(watchdog_argv(1, os.getpid()), capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "--pgid > 1" in out.stderr


def test_tokasaurus_group_exits_when_its_agent_is_sigkilled(fake_toka: Path, tmp_path: Path) -> None:
    ckpt = generate_checkpoint(tmp_path / "tiny", "tiny", 0).path
    launcher = textwrap.dedent(f"""
        from live.engines.base import free_port, running_group_members
        from live.engines.tokasaurus import TokasaurusProcess
        import time
        engine = TokasaurusProcess({str(ckpt)!r}, free_port(), executable={str(fake_toka)!r})
        engine.start()
        engine.wait_ready(30)
        assert len(running_group_members(engine.pgid)) == 2  # the launcher and its model worker
        print(engine.pgid, engine.watchdog_pid, flush=True)
        time.sleep(600)
    """)
    _, dog = kill_launcher_and_expect_no_orphan(launcher)
    assert dog is not None  # Tokasaurus runs with the sidecar
