"""The hash-chained audit log: entries written and verified, every kind of tampering found at its line, appends
from several processes serialised, a cut-short write refused, secrets refused, and the CLI's exit codes."""

from __future__ import annotations

import itertools
import json
import multiprocessing
from pathlib import Path

import pytest

from live.audit import GENESIS, AuditError, AuditLog, line_hash, main, read_entries, verify


def _log(tmp_path: Path, n: int = 4) -> Path:
    log = AuditLog(tmp_path / "audit" / "audit.jsonl")
    for i in range(n):
        log.append("publish", f"m{i}", actor="ops", details={"revision": f"{i:016x}"}, now_unix=1000.0 + i)
    return log.path


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def test_entries_chain_and_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _log(tmp_path)
    entries = read_entries(path)
    assert [e["seq"] for e in entries] == [0, 1, 2, 3] and entries[0]["prev"] == GENESIS
    assert all(e["prev"] == p["hash"] for p, e in itertools.pairwise(entries))
    assert all(line_hash(e) == e["hash"] for e in entries)
    assert entries[2]["actor"] == "ops" and entries[2]["target"] == "m2" and entries[2]["outcome"] == "ok"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    v = verify(path)
    assert v.ok and v.entries == 4 and v.last_hash == entries[-1]["hash"]
    assert main(["verify", str(path)]) == 0 and "4 entries, chain intact" in capsys.readouterr().out


def _edit(lines: list[str]) -> list[str]:
    e = json.loads(lines[1])
    e["target"] = "other"
    return [lines[0], json.dumps(e, separators=(",", ":")) + "\n", *lines[2:]]


def _forge(lines: list[str]) -> list[str]:
    """Line 2 edited and its own hash recomputed: the next line's prev no longer matches."""
    e = json.loads(lines[1])
    e["outcome"] = "error: nothing happened"
    e["hash"] = line_hash(e)
    return [lines[0], json.dumps(e, separators=(",", ":")) + "\n", *lines[2:]]


@pytest.mark.parametrize(("tamper", "bad_line", "why"), [
    (_edit, 2, "the line was edited"),
    (_forge, 3, "prev does not match"),
    (lambda ls: [ls[0], *ls[2:]], 2, "seq 2, expected 1"),          # a line removed
    (lambda ls: [ls[0], ls[2], ls[1], ls[3]], 2, "seq 2, expected 1"),  # two lines swapped
    (lambda ls: [ls[0], ls[1], ls[1], *ls[2:]], 3, "seq 1, expected 2"),  # a line repeated
    (lambda ls: [*ls[:3], ls[3][:-20]], 4, "cut short"),            # a write that did not finish
    (lambda ls: [*ls[:2], "{not json\n", *ls[2:]], 3, "not JSON"),
])
def test_tampering_is_found_at_its_line(tmp_path: Path, tamper, bad_line: int, why: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    path = _log(tmp_path)
    path.write_text("".join(tamper(_lines(path))))
    v = verify(path)
    assert not v.ok and v.bad_line == bad_line and why in v.problem, v
    assert main(["verify", str(path)]) == 1
    assert f"{path}:{bad_line}: chain broken" in capsys.readouterr().err


def test_a_cut_short_log_is_not_continued(tmp_path: Path) -> None:
    path = _log(tmp_path, 2)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(AuditError, match="cut short"):
        AuditLog(path).append("rollback", "m0")
    assert verify(path).bad_line == 2


def test_secrets_are_refused_and_outcomes_recorded(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl")
    for key in ("api_key", "admin_token", "Authorization", "aws_secret_access_key"):
        with pytest.raises(AuditError, match="look like secrets"):
            log.append("rotate", "tenant", details={key: "sk-live-123"})
    assert not log.path.exists() or log.path.read_text() == ""
    with log.action("gc", "m", details={"dry_run": False}) as facts:
        facts["removed"] = 2
    with pytest.raises(ValueError, match="boom"), log.action("rollback", "m"):
        raise ValueError("boom")
    ok, failed = read_entries(log.path)
    assert ok["outcome"] == "ok" and ok["details"] == {"dry_run": False, "removed": 2}
    assert failed["outcome"] == "error: ValueError: boom" and verify(log.path).ok


def _appender(path: str, who: str, n: int) -> None:
    log = AuditLog(path)
    for i in range(n):
        log.append("copy", f"m{i}", actor=who)


def test_appends_from_several_processes_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "shared.jsonl"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_appender, args=(str(path), f"p{k}", 40)) for k in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    v = verify(path)
    assert v.ok and v.entries == 120
    actors = [e["actor"] for e in read_entries(path)]
    assert {a: actors.count(a) for a in set(actors)} == {"p0": 40, "p1": 40, "p2": 40}


def test_the_cli_refuses_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(tmp_path / "none.jsonl")]) == 1
    assert "no such audit log" in capsys.readouterr().err
