"""The registry from the command line: publish a checkpoint as a new revision, list a model's revisions, move its
alias back (rollback), collect revisions nothing refers to.

    python -m live.registry_cli --store s3://bucket/models publish llama ckpt/
    python -m live.registry_cli --store s3://bucket/models publish llama --hf-repo org/llama --hf-revision v1.0
    python -m live.registry_cli --store s3://bucket/models versions llama
    python -m live.registry_cli --store s3://bucket/models rollback llama 0123456789abcdef
    python -m live.registry_cli --store s3://bucket/models gc --keep llama@0123456789abcdef --dry-run

Store options (endpoints, credentials) are JSON keyed by store URL, as the agent takes them (`--store-options`).
With `--audit-log FILE` (default: $TIERLAB_AUDIT_LOG) every publish, rollback and gc that changes a store is
appended to that hash-chained audit log (`live.audit`: who, what, when, outcome; never credentials).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from live.audit import AuditError, AuditLog
from live.registry import Registry, RegistryError, hf_offline


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m live.registry_cli", description=__doc__.split("\n\n")[0])
    p.add_argument("--store", action="append", default=[], required=True, metavar="URL",
                   help="registry store, in priority order; repeat")
    p.add_argument("--store-options", default="{}", help='JSON: {"s3://b/p": {"endpoint_url": ...}}')
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.add_argument("--audit-log", default=os.environ.get("TIERLAB_AUDIT_LOG") or None, metavar="FILE",
                   help="append publish / rollback / gc to this audit log (default: $TIERLAB_AUDIT_LOG)")
    sub = p.add_subparsers(dest="cmd", required=True)
    pub = sub.add_parser("publish", help="publish a checkpoint dir (or a Hub snapshot) as a new revision; move the "
                                         "alias to it")
    pub.add_argument("name")
    pub.add_argument("dir", nargs="?", help="checkpoint dir (or give --hf-repo)")
    pub.add_argument("--hf-repo", help="a Hugging Face repo id, read from the local Hub cache")
    pub.add_argument("--hf-revision", default="main", help="branch, tag or commit hash (default: main)")
    pub.add_argument("--hf-cache-dir", help="Hub cache (default: HF_HUB_CACHE, else $HF_HOME/hub)")
    pub.add_argument("--reupload", action="store_true", help="upload the files even where the revision is stored")
    ver = sub.add_parser("versions", help="list a model's revisions in every store, and its alias history")
    ver.add_argument("name")
    rb = sub.add_parser("rollback", help="move a model's alias to a revision every store holds")
    rb.add_argument("name")
    rb.add_argument("revision")
    gc = sub.add_parser("gc", help="remove revisions no alias names (and not kept), older than the grace period")
    gc.add_argument("name", nargs="?", help="one model (default: every model in the stores)")
    gc.add_argument("--keep", action="append", default=[], metavar="NAME@REV|REV",
                    help="a revision still in use (e.g. loaded somewhere); repeat")
    gc.add_argument("--grace-s", type=float, default=3600.0, help="keep revisions written this recently (s)")
    gc.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    return p


def _when(unix: float) -> str:
    return datetime.datetime.fromtimestamp(unix, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S") if unix else "?"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one registry command; 0 on success, 1 with the error on stderr (naming model, revision, stores)."""
    p = _parser()
    args = p.parse_args(argv)
    try:
        options = json.loads(args.store_options)
    except json.JSONDecodeError as e:
        p.error(f"--store-options: not JSON ({e})")
    try:
        reg = Registry(list(args.store), {k: dict(v) for k, v in options.items()},
                       hf_cache_dir=getattr(args, "hf_cache_dir", None))
        out = _run(reg, args, p, AuditLog(args.audit_log) if args.audit_log else None)
    except (RegistryError, ValueError, OSError, AuditError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(out, indent=1) if args.json else _text(out))
    return 0


@contextlib.contextmanager
def _audited(audit: AuditLog | None, action: str, target: str, stores: Sequence[str],
             **details: Any) -> Iterator[dict[str, Any]]:
    """Record the block as `action` on `target` in `audit` (outcome ok or the error), if there is one."""
    if audit is None:
        yield {}
        return
    with audit.action(action, target, details={"stores": list(stores), **details}) as facts:
        yield facts


def _run(reg: Registry, args: argparse.Namespace, p: argparse.ArgumentParser, audit: AuditLog | None = None) -> dict:
    """The command's result as plain data (printed as JSON or text); changes are recorded in `audit`."""
    if args.cmd == "publish":
        if (args.dir is None) == (args.hf_repo is None):
            p.error("publish: give a checkpoint dir or --hf-repo, not both")
        source = {"hf_repo": args.hf_repo, "hf_revision": args.hf_revision} if args.hf_repo else {"dir": args.dir}
        with _audited(audit, "publish", args.name, args.store, **source) as facts:
            if args.hf_repo is not None:
                reg.register(args.name, hf_repo=args.hf_repo, hf_revision=args.hf_revision)
            v = reg.publish_version(args.name, args.dir, reupload=args.reupload)
            facts.update(revision=v.revision, files=len(v.manifest.files), bytes=v.manifest.total_bytes)
        return {"published": v.ref, "files": len(v.manifest.files), "bytes": v.manifest.total_bytes,
                "offline": hf_offline() if args.hf_repo else None}
    if args.cmd == "versions":
        alias = reg.alias(args.name)
        return {"model": args.name, "alias": alias.revision if alias else None,
                "versions": [{**v.__dict__, "ref": v.ref} for v in reg.versions(args.name)],
                "history": [m.__dict__ for m in alias.history] if alias else []}
    if args.cmd == "rollback":
        with _audited(audit, "rollback", args.name, args.store, revision=args.revision) as facts:
            before = reg.alias(args.name)
            facts["previous"] = before.revision if before else None
            alias = reg.rollback(args.name, args.revision)
        return {"model": args.name, "alias": alias.revision if alias else args.revision}
    if args.dry_run:  # changes nothing: not audited
        items = reg.gc(args.name, keep=args.keep, grace_s=args.grace_s, dry_run=True)
    else:
        with _audited(audit, "gc", args.name or "*", args.store, keep=list(args.keep), grace_s=args.grace_s) as facts:
            items = reg.gc(args.name, keep=args.keep, grace_s=args.grace_s, dry_run=False)
            facts["removed"] = [f"{_collected_name(i.__dict__)} {i.store_url}" for i in items]
    return {"dry_run": args.dry_run, "collected": [i.__dict__ for i in items]}


def _collected_name(item: dict) -> str:
    """`model@revision`, or the key of a stale temp object (no revision: the in-place slot's is unknown)."""
    if item["reason"] == "stale temp object":
        return item["prefix"]
    return f"{item['model']}@{item['revision'] or '?'}"


def _text(out: dict) -> str:
    """A human-readable rendering of `_run`'s result."""
    if "versions" in out and not out["versions"]:
        return f"{out['model']}: not published in any store"
    if "versions" in out:
        lines = [f"{out['model']}: alias -> {out['alias'] or '(none: the in-place revision is current)'}"]
        for v in out["versions"]:
            flags = ",".join(f for f, on in (("current", v["current"]), ("in-place", v["in_place"]),
                                             ("INCOMPLETE", not v["complete"])) if on)
            lines.append(f"  {v['ref']:<40} {v['size_bytes']:>14,d} B  {_when(v['modified_unix'])}  "
                         f"{v['store_url']}  {flags}")
        lines += [f"  moved {m['previous']} -> {m['revision']} ({m['op']}, {_when(m['time_unix'])}, {m['by']})"
                  for m in out["history"]]
        return "\n".join(lines)
    if "collected" in out:
        verb = "would remove" if out["dry_run"] else "removed"
        lines = [f"{verb} {_collected_name(i)} from {i['store_url']} ({i['size_bytes']:,d} B, "
                 f"{i['age_s']:.0f} s old, {i['reason']})" for i in out["collected"]]
        return "\n".join(lines) or "nothing to collect"
    return "\n".join(f"{k}: {v}" for k, v in out.items() if v is not None)


if __name__ == "__main__":
    raise SystemExit(main())
