"""Hostile clients against a real gateway on loopback (uvicorn, a real null engine behind it): deeply nested JSON,
invalid UTF-8, a body cut short, huge headers, slow clients holding connections. Each gets a clean answer or a
closed connection, never a 5xx; a request whose client vanished leaves a record; other clients are served
meanwhile; the gateway stays alive."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from urllib.parse import urlparse

import httpx
import pytest

from live.gateway import Gateway

from .conftest import MODEL, GatewayServer, serving, static_config

KEY = "sk-alice"
PATH = "/v1/chat/completions"
GOOD = b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}' % MODEL.encode()


@pytest.fixture(scope="module")
def gateway(null_engines) -> Iterator[GatewayServer]:  # the conftest fixture: a callable
    engine = null_engines()
    gw = Gateway(static_config())
    with serving(gw) as gs:
        gw.adopt_instance(MODEL, "s0", engine.url)
        yield gs


def _post(gs: GatewayServer, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(gs.url + PATH, content=body, timeout=30, trust_env=False,
                      headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})})


def _alive(gs: GatewayServer) -> None:
    """The gateway still answers a normal request, promptly."""
    t0 = time.monotonic()
    r = _post(gs, GOOD)
    assert r.status_code == 200 and time.monotonic() - t0 < 5, r.text


@contextlib.contextmanager
def _raw(gs: GatewayServer) -> Iterator[socket.socket]:
    u = urlparse(gs.url)
    s = socket.create_connection((u.hostname, u.port), timeout=10)
    try:
        yield s
    finally:
        s.close()


def _head(n_body: int, extra: str = "") -> bytes:
    return (f"POST {PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {n_body}\r\n{extra}\r\n").encode()


@pytest.mark.parametrize("body", [
    b"[" * 200_000 + b"]" * 200_000,
    b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
    b"\x00\x01garbage",
    b"",
], ids=["nested-arrays", "nested-objects", "invalid-utf8", "binary", "empty"])  # (ids: the env holds the test id)
def test_malformed_bodies_are_400(gateway: GatewayServer, body: bytes) -> None:
    r = _post(gateway, body)
    assert r.status_code == 400, (r.status_code, r.text[:300])
    assert r.json()["error"]["code"] == "invalid_json"
    _alive(gateway)


def test_a_body_cut_short_leaves_a_record_and_no_hang(gateway: GatewayServer) -> None:
    before = len(gateway.gateway.records())
    with _raw(gateway) as s:
        s.sendall(_head(10_000) + b'{"model": "')  # promises 10,000 bytes, sends 11, hangs up
    deadline = time.monotonic() + 10
    while len(gateway.gateway.records()) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    rows = gateway.gateway.records().iloc[before:]
    assert len(rows) == 1 and rows["outcome"].iloc[0] != "completed", rows.to_dict("records")
    _alive(gateway)


def test_huge_headers_are_refused_cleanly(gateway: GatewayServer) -> None:
    with _raw(gateway) as s:
        s.sendall(_head(len(GOOD), "X-Big: " + "a" * 2_000_000 + "\r\n") + GOOD)
        with contextlib.suppress(ConnectionError):
            answer = s.recv(4096)
            assert answer == b"" or not answer.startswith(b"HTTP/1.1 5"), answer[:200]
    _alive(gateway)


def test_slow_clients_do_not_hold_up_others(gateway: GatewayServer) -> None:
    socks = []
    try:
        for _ in range(50):  # each sends half its headers, then nothing
            s = socket.create_connection((urlparse(gateway.url).hostname, urlparse(gateway.url).port), timeout=10)
            s.sendall(_head(len(GOOD))[:40])
            socks.append(s)
        for _ in range(5):
            _alive(gateway)
        with _raw(gateway) as s:  # one that dribbles a whole request a few bytes at a time still gets its answer
            data = _head(len(GOOD)) + GOOD
            for i in range(0, len(data), 16):
                s.sendall(data[i:i + 16])
                time.sleep(0.002)
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
    finally:
        for s in socks:
            s.close()
    _alive(gateway)
