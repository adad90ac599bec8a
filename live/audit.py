"""The audit log: one JSON line per admin or operator action (model publish, version move, deletion, ...), each
line chained to the previous one by hash, so that editing, removing, inserting or reordering lines is detected.

A line holds `seq` (0, 1, ...), `time_unix`, `actor` (who: an OS user, a tenant, "admin"), `action`, `target`,
`outcome` ("ok", or "error: ..."), `details` (small facts: revision ids, byte counts; never request contents,
and keys that name secrets are refused), `prev` (the previous line's `hash`; 64 zeros for the first) and
`hash`: the sha256 of the line's canonical JSON without `hash` (sorted keys, no spaces). Appends from several
processes are serialised with an exclusive `flock` on the file and each line is fsynced before the lock goes.
The chain finds any change short of rewriting every line after it; that too is found against a copy of a later
hash kept elsewhere (`verify` prints the last one).

    python -m live.audit verify FILE       # exit 0: the chain is intact; 1: the first line that breaks it, and why
    python -m live.audit show FILE         # the entries, one per line
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import getpass
import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GENESIS = "0" * 64
FIELDS = ("seq", "time_unix", "actor", "action", "target", "outcome", "details", "prev", "hash")
# detail keys that would carry a secret: refused rather than written (a secret in an append-only log stays forever)
SECRET_WORDS = ("token", "key", "secret", "password", "authorization", "credential")


class AuditError(RuntimeError):
    """An entry that cannot be written (a secret-looking detail, an unreadable log)."""


def line_hash(entry: Mapping[str, Any]) -> str:
    """sha256 (hex) of `entry` without its `hash` field, as canonical JSON."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def default_actor() -> str:
    """The OS user running this process (the CLI's actor)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid:{os.getuid()}"


def _check_details(details: Mapping[str, Any]) -> dict[str, Any]:
    bad = [k for k in details if any(w in k.lower() for w in SECRET_WORDS)]
    if bad:
        raise AuditError(f"audit details {bad} look like secrets: the audit log never holds secrets")
    return dict(details)


class AuditLog:
    """Append-only, hash-chained JSON lines at `path` (created with its parent dirs, mode 0600)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()  # threads of this process; flock orders processes

    @contextlib.contextmanager
    def _locked(self) -> Iterator[int]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            with self._lock:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    yield fd
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def append(self, action: str, target: str, outcome: str = "ok", *, actor: str | None = None,
               details: Mapping[str, Any] | None = None, now_unix: float | None = None) -> dict[str, Any]:
        """Write one entry after the last one; the entry as written. AuditError if the log's last line is not a
        whole entry (the chain cannot be continued from a damaged log: `verify` says where)."""
        entry: dict[str, Any] = {"time_unix": time.time() if now_unix is None else now_unix,
                                 "actor": actor or default_actor(), "action": action, "target": target,
                                 "outcome": outcome, "details": _check_details(details or {})}
        with self._locked() as fd:
            last = _last_entry(self.path)
            entry["seq"] = 0 if last is None else int(last["seq"]) + 1
            entry["prev"] = GENESIS if last is None else str(last["hash"])
            entry["hash"] = line_hash(entry)
            data = (json.dumps({k: entry[k] for k in FIELDS}, separators=(",", ":")) + "\n").encode()
            os.write(fd, data)
            os.fsync(fd)
        return entry

    @contextlib.contextmanager
    def action(self, action: str, target: str, *, actor: str | None = None,
               details: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        """Record `action` once the block ends: outcome "ok", or "error: <type>: <message>" if it raised (the
        exception goes on). The block may add to the yielded `details`."""
        facts: dict[str, Any] = dict(details or {})
        try:
            yield facts
        except BaseException as e:
            self.append(action, target, f"error: {type(e).__name__}: {e}"[:500], actor=actor, details=facts)
            raise
        self.append(action, target, "ok", actor=actor, details=facts)


def _last_entry(path: Path) -> dict[str, Any] | None:
    """The last line's entry (None for an empty log); AuditError if that line is not a whole JSON entry."""
    size = path.stat().st_size
    if size == 0:
        return None
    with open(path, "rb") as f:
        f.seek(max(0, size - 65536))
        tail = f.read()
    if not tail.endswith(b"\n"):
        raise AuditError(f"{path}: the last line is cut short (a write that did not finish); run "
                         f"`python -m live.audit verify {path}`")
    line = tail.rstrip(b"\n").rsplit(b"\n", 1)[-1]
    try:
        entry = json.loads(line)
        if not isinstance(entry, dict) or "seq" not in entry or "hash" not in entry:
            raise ValueError("no seq or hash")
    except (ValueError, KeyError, TypeError) as e:
        raise AuditError(f"{path}: the last line is not an audit entry ({e})") from None
    return entry


@dataclass(frozen=True)
class Verdict:
    """What `verify` found: entries read, and the first line (1-based) that breaks the chain, with why."""

    entries: int
    bad_line: int | None = None
    problem: str = ""
    last_hash: str = GENESIS

    @property
    def ok(self) -> bool:
        return self.bad_line is None


def verify(path: str | os.PathLike[str]) -> Verdict:
    """Check every line of the log at `path`: valid JSON with the fields, `seq` counting up from 0, `prev` equal
    to the previous line's `hash`, and `hash` equal to the line's own hash."""
    prev, n = GENESIS, 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                return Verdict(n, lineno, "cut short (no newline): a write that did not finish", prev)
            try:
                entry = json.loads(raw)
            except ValueError as e:
                return Verdict(n, lineno, f"not JSON ({e})", prev)
            if not isinstance(entry, dict) or set(entry) != set(FIELDS):
                got = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
                return Verdict(n, lineno, f"fields {got}, expected {sorted(FIELDS)}", prev)
            if entry["seq"] != n:
                return Verdict(n, lineno, f"seq {entry['seq']!r}, expected {n} (a line removed, added or moved)",
                               prev)
            if entry["prev"] != prev:
                return Verdict(n, lineno, "prev does not match the previous line's hash (a line removed, added or "
                                          "moved before it)", prev)
            if line_hash(entry) != entry["hash"]:
                return Verdict(n, lineno, "hash does not match the line's content (the line was edited)", prev)
            prev, n = entry["hash"], n + 1
    return Verdict(n, None, "", prev)


def read_entries(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every entry of the log (no checks: `verify` for those)."""
    with open(path, "rb") as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    """`verify FILE` or `show FILE`; exit status 0 when the chain is intact, 1 otherwise (or on a missing file)."""
    p = argparse.ArgumentParser(prog="python -m live.audit", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for cmd, what in (("verify", "check the hash chain"), ("show", "print the entries")):
        sub.add_parser(cmd, help=what).add_argument("file", type=Path)
    args = p.parse_args(argv)
    if not args.file.is_file():
        print(f"{args.file}: no such audit log", file=sys.stderr)
        return 1
    verdict = verify(args.file)
    if args.cmd == "show":
        for e in read_entries(args.file) if verdict.ok else []:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e["time_unix"]))
            print(f"{e['seq']:>6} {when} {e['actor']:<12} {e['action']:<16} {e['target']:<32} {e['outcome']} "
                  f"{json.dumps(e['details'], sort_keys=True)}")
    if verdict.ok:
        print(f"{args.file}: {verdict.entries} entries, chain intact (last hash {verdict.last_hash[:16]})")
        return 0
    print(f"{args.file}:{verdict.bad_line}: chain broken: {verdict.problem} ({verdict.entries} entries before it are "
          "intact)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
