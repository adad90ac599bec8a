"""Test-only helpers for real storage servers on loopback: moto (S3) and azurite (Azure Blob) are started by
`experiments.store_servers` (shared with the chaos replay); a hanging TCP server stands in for a hung store."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

from experiments.store_servers import (  # noqa: F401  (re-exported for the tests)
    HOST,
    ServiceUnavailable,
    azurite_blob,
    free_port,
    moto_server,
)


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
