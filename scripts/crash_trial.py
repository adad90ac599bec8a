"""One side of a crash-consistency trial, run as a child process that the test SIGKILLs at a random point.

    python scripts/crash_trial.py publish --store URL [--options JSON] --name NAME --dir DIR [--pace-s S]
    python scripts/crash_trial.py fetch --store URL [--options JSON] --name NAME --dest DIR
                                        [--stream-Bps B] [--streams K]

Each prints `START` (flushed) once its imports and setup are done and right before the real operation begins,
then `DONE <seconds>` when the operation returned, so that the parent can time its kill against the operation
alone. The operation is the product's own code path (`Registry.publish_version`, `Registry.fetch`).

Pacing, to spread kill points over a publish that would otherwise take milliseconds: `--pace-s` sleeps that
long before every store write (`put_file` / `put_bytes` of the store object the registry holds) and half that
long inside every `os.fsync` (so that a kill can land between a temp file's write and its rename into place, the
window a file:// store's atomic writes have). A fetch is paced by the registry's own `CloudPace` (`--stream-Bps`
per ranged-read stream).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from live.pacing import CloudPace  # noqa: E402
from live.registry import Registry  # noqa: E402
from live.stores import Store, open_store  # noqa: E402


def _paced(fn: Callable[..., Any], delay_s: float) -> Callable[..., Any]:
    """`fn`, sleeping `delay_s` before each call."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        time.sleep(delay_s)
        return fn(*args, **kwargs)

    return wrapper


def _store(url: str, options: str) -> Store:
    return open_store(url, json.loads(options) if options else {})


def _say(text: str) -> None:
    print(text, flush=True)


def publish(args: argparse.Namespace) -> None:
    """Publish `args.dir` as a new revision of `args.name` (files first, manifest, then the alias)."""
    store = _store(args.store, args.options)
    if args.pace_s > 0:
        store.put_file = _paced(store.put_file, args.pace_s)  # type: ignore[method-assign]
        store.put_bytes = _paced(store.put_bytes, args.pace_s)  # type: ignore[method-assign]
        os.fsync = _paced(os.fsync, args.pace_s / 2)
    registry = Registry([store])
    _say("START")
    t0 = time.perf_counter()
    version = registry.publish_version(args.name, args.dir)
    _say(f"DONE {time.perf_counter() - t0:.4f} {version.revision}")


def fetch(args: argparse.Namespace) -> None:
    """Fetch the current revision of `args.name` into `args.dest` (a staging dir beside it, then one rename)."""
    registry = Registry([_store(args.store, args.options)])
    manifest = registry.manifest(args.name)
    pace = CloudPace(args.stream_Bps) if args.stream_Bps else None
    _say("START")
    t0 = time.perf_counter()
    registry.fetch(args.name, args.dest, streams=args.streams, manifest=manifest, pace=pace)
    _say(f"DONE {time.perf_counter() - t0:.4f}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="op", required=True)
    for op in ("publish", "fetch"):
        s = sub.add_parser(op)
        s.add_argument("--store", required=True, help="store URL (file://, s3://, ...)")
        s.add_argument("--options", default="", help="store options as JSON (credentials, endpoint_url)")
        s.add_argument("--name", required=True, help="model name")
    pub = sub.choices["publish"]
    pub.add_argument("--dir", required=True, help="checkpoint dir to publish")
    pub.add_argument("--pace-s", type=float, default=0.0, help="sleep before each store write (and fsync / 2)")
    fet = sub.choices["fetch"]
    fet.add_argument("--dest", required=True, help="destination dir (must not exist)")
    fet.add_argument("--stream-Bps", type=float, default=None, help="per-stream bandwidth of the paced fetch")
    fet.add_argument("--streams", type=int, default=2, help="ranged-read streams")
    args = p.parse_args(argv)
    {"publish": publish, "fetch": fetch}[args.op](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
