"""Test-only helpers that start real storage servers on loopback: moto (S3) and azurite (Azure Blob)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

HOST = "127.0.0.1"
AZURITE_ACCOUNT = "devstoreaccount1"
# azurite's fixed, publicly documented development key (not a secret)
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
AZURITE_DIR = Path(os.environ.get("TIERLAB_AZURITE_DIR", Path.home() / ".cache" / "tierlab-azurite"))
AZURITE_INSTALL_TIMEOUT_S = 90.0
START_TIMEOUT_S = 20.0


class ServiceUnavailable(RuntimeError):
    """A server could not be installed or started here; the message says why (tests skip with it)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log_path: Path, timeout_s: float = START_TIMEOUT_S) -> None:
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


def _stop(proc: subprocess.Popen) -> None:
    """Stop only the process we started, by its pid."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@contextlib.contextmanager
def moto_server(workdir: Path, port: int | None = None) -> Iterator[str]:
    """A moto S3 server on loopback (on `port`, default a free one: a given port lets a test stop a server and
    start another at the same endpoint); yields its endpoint URL. Its data lives in memory: gone once stopped."""
    exe = shutil.which("moto_server")
    if exe is None:
        raise ServiceUnavailable("moto_server is not on PATH (pip install 'moto[server]')")
    port = free_port() if port is None else port
    log_path = workdir / "moto.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([exe, "-H", HOST, "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        endpoint = f"http://{HOST}:{port}"
        _wait_http(endpoint + "/", proc, log_path)
        yield endpoint
    finally:
        _stop(proc)


@contextlib.contextmanager
def hanging_server(port: int) -> Iterator[str]:
    """A TCP server on loopback `port` that accepts every connection and never answers (a hung store);
    yields its endpoint URL. Connections are held open until the server stops, so clients see silence, not a
    reset."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((HOST, port))
    listener.listen(128)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _addr = listener.accept()
            except OSError:  # the listener was closed: stop
                return
            held.append(conn)

    thread = threading.Thread(target=accept, name="hanging-server", daemon=True)
    thread.start()
    try:
        yield f"http://{HOST}:{port}"
    finally:
        listener.close()
        with contextlib.suppress(OSError):  # wake accept() on platforms where close alone does not
            socket.create_connection((HOST, port), timeout=0.2).close()
        thread.join(timeout=5)
        for conn in held:
            conn.close()


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


@contextlib.contextmanager
def azurite_blob(workdir: Path) -> Iterator[str]:
    """An azurite Blob server on loopback with data under `workdir`; yields its connection string."""
    exe = azurite_blob_exe()
    port = free_port()
    location = workdir / "azurite"
    location.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "azurite.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(exe), "--blobHost", HOST, "--blobPort", str(port), "--location", str(location),
                                 "--skipApiVersionCheck", "--disableTelemetry", "--silent"],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        endpoint = f"http://{HOST}:{port}/{AZURITE_ACCOUNT}"
        _wait_http(endpoint + "?comp=list", proc, log_path)
        yield (f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
               f"BlobEndpoint={endpoint};")
    finally:
        _stop(proc)
