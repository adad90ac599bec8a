"""The registry CLI's audit trail against a real moto S3 server: every publish, rollback and gc that changes a
store is one hash-chained line (who, what, revision, outcome, also for a failure), a dry run is none, and the
store credentials appear in no line and no output."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from live.audit import default_actor, read_entries, verify
from live.checkpoint import generate_checkpoint
from live.registry_cli import main as registry_cli
from live.stores import open_store

NAME = "audited"


def test_publish_rollback_gc_are_audited_without_secrets(tmp_path: Path, tiny_ckpt: Path, moto_endpoint: str,
                                                         capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    key = f"AKIA{uuid.uuid4().hex[:16].upper()}"
    options = {"key": key, "secret": secret, "endpoint_url": moto_endpoint}  # moto takes any credentials
    bucket = f"tierlab-{uuid.uuid4().hex[:12]}"
    open_store(f"s3://{bucket}", options).fs.mkdir(bucket)
    url = f"s3://{bucket}/models"
    log = tmp_path / "audit.jsonl"
    monkeypatch.setenv("TIERLAB_AUDIT_LOG", str(log))  # the default --audit-log
    base = ["--store", url, "--store-options", json.dumps({url: options}), "--json"]
    second = generate_checkpoint(tmp_path / "v2" / "tiny", "tiny", 1).path

    def run(*args: str, ok: bool = True) -> dict:
        assert registry_cli([*base, *args]) == (0 if ok else 1)
        out = capsys.readouterr()
        assert secret not in out.out + out.err and key not in out.out + out.err
        return json.loads(out.out) if ok else {}

    v1 = run("publish", NAME, str(tiny_ckpt))["published"].split("@")[1]
    v2 = run("publish", NAME, str(second))["published"].split("@")[1]
    run("rollback", NAME, v1)
    run("versions", NAME)  # reads: not audited
    run("gc", "--grace-s", "0", "--dry-run")  # changes nothing: not audited
    removed = run("gc", NAME, "--grace-s", "0")["collected"]
    assert [f"{i['model']}@{i['revision']}" for i in removed] == [f"{NAME}@{v2}"]
    run("rollback", NAME, v2, ok=False)  # collected: the failure is audited too

    assert verify(log).ok
    text = log.read_text()
    assert secret not in text and key not in text
    entries = read_entries(log)
    assert [(e["action"], e["target"], e["outcome"][:5]) for e in entries] == [
        ("publish", NAME, "ok"), ("publish", NAME, "ok"), ("rollback", NAME, "ok"), ("gc", NAME, "ok"),
        ("rollback", NAME, "error")]
    assert all(e["actor"] == default_actor() and e["details"]["stores"] == [url] for e in entries)
    assert [e["details"].get("revision") for e in entries] == [v1, v2, v1, None, v2]
    assert entries[2]["details"]["previous"] == v2
    assert entries[3]["details"]["removed"] == [f"{NAME}@{v2} {url}"]
    assert "RegistryError" in entries[4]["outcome"]
