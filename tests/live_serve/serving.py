"""A harness for end-to-end tests of `python -m experiments.serve`: start it as a subprocess with hydra
overrides, wait for serve.json, talk to it (openai client, admin endpoints, metrics), stop it with Ctrl-C and
read what it wrote. Every process it starts is killed at the end, whatever the test did."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pandas as pd

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 90.0


def env() -> dict[str, str]:
    """The test's environment with this checkout importable (as CI's fresh clone)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
            "PYTHONUNBUFFERED": "1"}


@dataclass
class Served:
    """A running `experiments.serve` and what it wrote."""

    proc: subprocess.Popen[str]
    out_dir: Path
    info: dict[str, Any]
    log: Path
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.info["url"]

    @property
    def key(self) -> str:
        return next(iter(self.info["tenants"].values()))["api_key"]

    def client(self, timeout_s: float = 120.0) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.info["openai_base_url"], api_key=self.key, max_retries=0,
                             timeout=timeout_s)

    def async_client(self, timeout_s: float = 120.0) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.info["openai_base_url"], api_key=self.key, max_retries=0,
                                  timeout=timeout_s)

    def _admin(self, path: str) -> pd.DataFrame:
        r = httpx.get(self.url + path, headers={"Authorization": f"Bearer {self.info['admin_token']}"}, timeout=30)
        r.raise_for_status()
        data = r.json()
        return pd.DataFrame(data["rows"], columns=data["columns"])

    def records(self) -> pd.DataFrame:
        """The gateway's request rows so far (GET /admin/records)."""
        return self._admin("/admin/records")

    def actions(self) -> pd.DataFrame:
        """The policy actions so far (GET /admin/actions)."""
        return self._admin("/admin/actions")

    def metric(self, name_and_labels: str) -> float:
        """One sample of /metrics, e.g. 'tierlab_instances{status="ready"}'."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        line = next(ln for ln in text.splitlines() if ln.startswith(name_and_labels))
        return float(line.split()[-1])

    def wait_for(self, what: str, predicate: Any, timeout_s: float = 60.0, every_s: float = 0.2) -> Any:
        """Poll `predicate()` until it returns something truthy (returned), else fail naming `what`."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}\n"
                                     f"{self.log.read_text()[-3000:]}")
            time.sleep(every_s)

    def stop(self) -> dict[str, Any]:
        """Ctrl-C, wait for the clean exit, and return summary.json."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        assert self.proc.returncode == 0, self.log.read_text()[-3000:]
        self.summary = json.loads((self.out_dir / "summary.json").read_text())
        return self.summary

    def table(self, name: str) -> pd.DataFrame:
        """One of the parquet files written at the stop (records, tier_moves, instances, actions)."""
        return pd.read_parquet(self.out_dir / f"{name}.parquet")


@contextlib.contextmanager
def serve(tmp: Path, overrides: Sequence[str], policy: str = "seed_tiered") -> Iterator[Served]:
    """`python -m experiments.serve port=0 policy=<policy> <overrides>` with its outputs under `tmp`; killed at
    the end if the test did not stop it."""
    out_dir = tmp / "run"
    argv = [sys.executable, "-m", "experiments.serve", "port=0", f"policy={policy}", f"hydra.run.dir={out_dir}",
            f"checkpoint_cache={checkpoint_cache()}", "progress=false", *overrides]
    log = tmp / "serve.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, text=True, env=env(), cwd=tmp)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        info_path = out_dir / "serve.json"
        while not info_path.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"experiments.serve did not start (exit {proc.poll()}):\n{log.read_text()[-4000:]}")
            time.sleep(0.1)
        yield Served(proc, out_dir, json.loads(info_path.read_text()), log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)  # its agents and engines exit with it (--exit-with-parent)
            proc.wait()


@dataclass(frozen=True)
class Proc:
    """A live (not zombie) process of this machine, as /proc shows it."""

    pid: int
    ppid: int
    argv: list[str]

    @property
    def cmdline(self) -> str:
        return " ".join(self.argv)


def processes() -> list[Proc]:
    """Every live process but this one (engines name their tier dir in --model-dir, agents theirs in --tier)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except (OSError, IndexError):
            continue
        if stat[0] != "Z":
            out.append(Proc(int(entry.name), int(stat[1]), [a for a in argv if a]))
    return out


def checkpoint_cache() -> Path:
    """Generated checkpoints shared by the e2e tests of one run (generation is deterministic)."""
    path = Path(os.environ.get("TIERLAB_TEST_CKPT_CACHE", "/tmp/tierlab-test-checkpoints"))
    path.mkdir(parents=True, exist_ok=True)
    return path
