"""Parent-death watchdog for engine processes that cannot watch their launcher themselves.

    python -I live/engines/watchdog.py --parent PID --pgid PGID [--grace-s 5] [--poll-s 0.2]

The CPU and null engines are tierlab's own Python: they call `live.lifecycle.exit_with_parent` in-process
(`--exit-with-parent PID`). Tokasaurus, vLLM, SGLang or llama-server are not ours, so a small sidecar process
does it for them: started by the launcher right after the engine, in a session of its own (outside the
engine's group), it runs that very same `exit_with_parent` helper with an `on_exit` that ends the engine's
whole process group: SIGTERM, up to `--grace-s` for the engine to exit, then SIGKILL until no member runs.
So an agent killed by SIGKILL leaves no engine, worker or grandchild behind. The sidecar exits by itself
once the group is empty (the engine stopped or crashed), and the launcher reaps it.

Why a sidecar rather than a wrapper in front of the engine: the engine stays the launcher's direct child,
the leader of its own group, so its pid, exit code and crash detection (`ProcessEngine.crash_reason`,
Tokasaurus's dead workers) are exactly what they are without a watchdog, and the watchdog is no member of
the group it polices. Why not `prctl(PR_SET_PDEATHSIG)`: the death signal reaches the direct child only (not
the workers an engine spawns), and it fires when the launching *thread* exits, which the agent's worker
threads do all the time.

Run with `python -I` (isolated): the launcher's or engine's PYTHON* variables cannot break it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

WATCHDOG_SCRIPT = Path(__file__).resolve()
_REPO_ROOT = WATCHDOG_SCRIPT.parents[2]


def watchdog_argv(pgid: int, parent_pid: int, *, grace_s: float = 5.0, poll_s: float = 0.2,
                  python: str = sys.executable) -> list[str]:
    """The sidecar's argv: it ends process group `pgid` when `parent_pid` is no longer its parent."""
    return [python, "-I", str(WATCHDOG_SCRIPT), "--parent", str(parent_pid), "--pgid", str(pgid),
            "--grace-s", repr(float(grace_s)), "--poll-s", repr(float(poll_s))]


def end_group(pgid: int, grace_s: float, poll_s: float = 0.02) -> bool:
    """SIGTERM group `pgid`, give it `grace_s` to exit, then SIGKILL until none of it runs (bounded: another
    `grace_s`); True if nothing of the group runs any more."""
    from live.engines.base import running_group_members

    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while running_group_members(pgid) and time.monotonic() < deadline:
        time.sleep(poll_s)
    deadline = time.monotonic() + max(grace_s, 1.0)
    while running_group_members(pgid) and time.monotonic() < deadline:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)  # delivered asynchronously: repeat until none runs
        time.sleep(poll_s)
    return not running_group_members(pgid)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="live/engines/watchdog.py", description=__doc__.split("\n")[0])
    p.add_argument("--parent", type=int, required=True, metavar="PID", help="end the group when PID is gone")
    p.add_argument("--pgid", type=int, required=True, help="the engine's process group")
    p.add_argument("--grace-s", type=float, default=5.0, help="SIGTERM-to-SIGKILL grace for the engine")
    p.add_argument("--poll-s", type=float, default=0.2, help="how often the parent and the group are checked")
    args = p.parse_args(argv)
    if args.grace_s < 0 or args.poll_s <= 0 or args.pgid <= 1:
        p.error(f"--grace-s must be >= 0, --poll-s > 0 and --pgid > 1, got {args.grace_s}, {args.poll_s}, "
                f"{args.pgid}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    from live.engines.base import running_group_members
    from live.lifecycle import exit_with_parent

    # the group's own stop (SIGTERM to it) never reaches this process: it leads a session of its own
    exit_with_parent(args.parent, args.poll_s,
                     on_exit=lambda: end_group(args.pgid, args.grace_s))
    while running_group_members(args.pgid):  # bounded by the engine's life: stop() or a crash empties it
        time.sleep(args.poll_s)
    return 0


if __name__ == "__main__":
    # run as a script under `python -I` (which implies -P): neither the repository nor this script's dir is on
    # sys.path by itself
    sys.path.insert(0, str(_REPO_ROOT))
    sys.exit(main())
