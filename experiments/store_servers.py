"""Real object-store servers on loopback: moto (S3, data in memory) and azurite (Azure Blob, data on disk).

The chaos replay (`experiments.chaos`) runs its cloud store on one of them so that it can hang it (SIGSTOP) or
stop and restart it; the tests start them the same way (`tests/live_registry/services.py`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
AZURITE_ACCOUNT = "devstoreaccount1"
# azurite's fixed, publicly documented development key (not a secret)
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
AZURITE_DIR = Path(os.environ.get("TIERLAB_AZURITE_DIR", Path.home() / ".cache" / "tierlab-azurite"))
AZURITE_INSTALL_TIMEOUT_S = 90.0
START_TIMEOUT_S = 20.0
S3_CREDS = {"key": "testing", "secret": "testing"}  # moto accepts any credentials


class ServiceUnavailable(RuntimeError):
    """A server could not be installed or started here; the message says why."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log_path: Path, timeout_s: float = START_TIMEOUT_S) -> None:
    """Poll `url` until the server answers at all (any HTTP status counts as up)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceUnavailable(f"server exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.1)
    raise ServiceUnavailable(f"no answer from {url} within {timeout_s} s: {log_path.read_text()[-2000:]}")


def stop_proc(proc: subprocess.Popen) -> None:
    """Stop only the process we started, by its pid (a stopped one is continued first, or SIGTERM waits)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def azurite_blob_exe() -> Path:
    """The azurite-blob launcher, installed with npm into AZURITE_DIR on first use."""
    exe = AZURITE_DIR / "node_modules" / ".bin" / "azurite-blob"
    if exe.exists():
        return exe
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        raise ServiceUnavailable("node/npm not installed, cannot install azurite")
    AZURITE_DIR.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run([npm, "install", "--prefix", str(AZURITE_DIR), "--no-audit", "--no-fund", "azurite"],
                              capture_output=True, text=True, timeout=AZURITE_INSTALL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ServiceUnavailable(f"npm install azurite took over {AZURITE_INSTALL_TIMEOUT_S} s") from None
    if done.returncode != 0 or not exe.exists():
        raise ServiceUnavailable(f"npm install azurite failed ({done.returncode}): {done.stderr[-2000:]}")
    return exe


def azurite_connection_string(endpoint: str) -> str:
    return (f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
            f"BlobEndpoint={endpoint};")


@dataclass
class StoreServer:
    """A moto or azurite server process on a fixed loopback port, which can be hung (SIGSTOP: connections are
    accepted by the kernel and never answered), resumed, killed and started again on the same port. Only
    azurite keeps its objects over a restart (on disk under `workdir`); moto's live in its memory."""

    kind: str  # "moto" | "azurite"
    workdir: Path
    port: int = 0
    proc: subprocess.Popen | None = None
    starts: int = 0
    _exe: Path | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in ("moto", "azurite"):
            raise ValueError(f"object store kind must be 'moto' or 'azurite', got {self.kind!r}")
        self.port = self.port or free_port()
        self.workdir.mkdir(parents=True, exist_ok=True)

    @property
    def persistent(self) -> bool:
        """Whether objects survive `kill` + `start` (azurite writes them to disk; moto keeps them in memory)."""
        return self.kind == "azurite"

    @property
    def endpoint(self) -> str:
        base = f"http://{HOST}:{self.port}"
        return f"{base}/{AZURITE_ACCOUNT}" if self.kind == "azurite" else base

    def options(self) -> dict[str, Any]:
        """The store options (`live.stores.open_store`) of a store on this server."""
        if self.kind == "azurite":
            return {"connection_string": azurite_connection_string(self.endpoint)}
        return {**S3_CREDS, "endpoint_url": self.endpoint}

    def start(self) -> None:
        """Start the server (again) on its port and wait until it answers."""
        if self.kind == "azurite":
            self._exe = self._exe or azurite_blob_exe()
            location = self.workdir / "azurite"
            location.mkdir(parents=True, exist_ok=True)
            argv = [str(self._exe), "--blobHost", HOST, "--blobPort", str(self.port), "--location", str(location),
                    "--skipApiVersionCheck", "--disableTelemetry", "--silent"]
            probe = self.endpoint + "?comp=list"
        else:
            exe = shutil.which("moto_server")
            if exe is None:
                raise ServiceUnavailable("moto_server is not on PATH (pip install 'moto[server]')")
            argv, probe = [exe, "-H", HOST, "-p", str(self.port)], self.endpoint + "/"
        log_path = self.workdir / f"{self.kind}.log"
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        self.starts += 1
        try:
            wait_http(probe, self.proc, log_path)
        except ServiceUnavailable:
            self.stop()
            raise

    def new_store(self, name: str = "") -> tuple[str, dict[str, Any]]:
        """A fresh bucket / container on the server: (store URL, store options)."""
        from live.stores import open_store

        bucket = name or f"tierlab-{uuid.uuid4().hex[:12]}"
        scheme = "az" if self.kind == "azurite" else "s3"
        open_store(f"{scheme}://{bucket}", self.options()).fs.mkdir(bucket)
        return f"{scheme}://{bucket}/models", self.options()

    def hang(self) -> None:
        """SIGSTOP: the port still accepts connections, nothing answers (a hung store)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: the port refuses connections until `start`."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None:
            stop_proc(self.proc)


@contextlib.contextmanager
def store_server(kind: str, workdir: Path, port: int | None = None) -> Iterator[StoreServer]:
    """A started `StoreServer`, stopped on exit."""
    server = StoreServer(kind, workdir, port or 0)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def moto_server(workdir: Path, port: int | None = None) -> Iterator[str]:
    """A moto S3 server on loopback (on `port`, default a free one: a given port lets a test stop a server and
    start another at the same endpoint); yields its endpoint URL. Its data lives in memory: gone once stopped."""
    with store_server("moto", workdir, port) as server:
        yield server.endpoint


@contextlib.contextmanager
def azurite_blob(workdir: Path) -> Iterator[str]:
    """An azurite Blob server on loopback with data under `workdir`; yields its connection string."""
    with store_server("azurite", workdir) as server:
        yield server.options()["connection_string"]
