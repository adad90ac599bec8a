"""The request path's HTTP client to engines: one aiohttp keep-alive pool, seen through httpx's error types.

Why not httpx here (it stays for agents and the control plane): profiled under 16 connections of load, httpx
and httpcore took about two thirds of the gateway's CPU, most of it in the connection pool, which on every
request and every response close walks all pooled connections and polls each idle socket (`has_expired`,
through anyio's extra-attribute lookups). aiohttp's pool hands a connection over in O(1), parses responses in
C, and `content.iter_any()` yields each piece as it is read (no buffering of SSE chunks).

The rest of the gateway catches httpx's exceptions and tells connection failures from slow engines with
`live.gateway_agents.connection_error`; so that those decisions stay exactly as they were, aiohttp's errors
are raised as their httpx counterparts (refused / reset / closed early -> ConnectError, ReadError,
RemoteProtocolError; a silent engine -> ConnectTimeout / ReadTimeout).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import aiohttp
import httpx

T = TypeVar("T")
JSON_HEADERS = {"Content-Type": "application/json"}
# Below the keep-alive of the engines' servers (uvicorn closes idle connections after 5 s): the gateway drops an
# idle connection before the engine does, so a request is never written onto one the engine is closing.
KEEPALIVE_S = 3.0


def as_httpx_error(e: aiohttp.ClientError) -> httpx.TransportError:
    """aiohttp's error `e` as the httpx error the gateway's failure handling expects."""
    if isinstance(e, aiohttp.ServerTimeoutError):  # before TimeoutError: it is one too
        return (httpx.ConnectTimeout if isinstance(e, aiohttp.ConnectionTimeoutError) else httpx.ReadTimeout)(
            str(e) or type(e).__name__)
    if isinstance(e, aiohttp.ClientConnectorError):
        return httpx.ConnectError(str(e))
    if isinstance(e, aiohttp.ServerDisconnectedError):
        return httpx.RemoteProtocolError(str(e) or "server disconnected")
    if isinstance(e, aiohttp.ClientPayloadError | aiohttp.ClientResponseError):
        return httpx.RemoteProtocolError(str(e))
    if isinstance(e, aiohttp.ClientOSError):
        return httpx.ReadError(str(e))
    return httpx.TransportError(str(e))


async def _translated(aw: Awaitable[T]) -> T:
    """Await `aw`, raising aiohttp's errors as their httpx counterparts (`as_httpx_error`)."""
    try:
        return await aw
    except aiohttp.ClientError as e:
        raise as_httpx_error(e) from e


class UpstreamResponse:
    """An engine's answer, read as it comes: status, then the body piece by piece or whole."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._r = response
        self.status_code = response.status

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body's bytes in the pieces they were read in (each SSE chunk as soon as it arrives)."""
        try:  # one handler around the loop, not a wrapper coroutine per piece (the streamed hot path)
            async for piece in self._r.content.iter_any():
                yield piece
        except aiohttp.ClientError as e:
            raise as_httpx_error(e) from e

    async def aread(self) -> bytes:
        return await _translated(self._r.read())

    async def aclose(self) -> None:
        # a body read to its end leaves the connection in the pool; one cut short (client gone) closes it
        if self._r.content.at_eof():
            self._r.release()
        else:
            self._r.close()


class Upstream:
    """Keep-alive connections to the engines, shared by every request (no limit on their number)."""

    def __init__(self, connect_timeout_s: float, read_timeout_s: float) -> None:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_S, use_dns_cache=True)
        # the request's own deadline (asyncio.timeout_at in the forwarding code) bounds it as a whole
        timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout_s, sock_read=read_timeout_s)
        # auto_decompress off: the engine's bytes are relayed as they are; no proxy from the environment
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False,
                                              trust_env=False, skip_auto_headers=("User-Agent",))

    async def post(self, url: str, raw: bytes) -> UpstreamResponse:
        """POST the JSON bytes `raw` to `url`; the response once its status line and headers are in."""
        r = await _translated(self._session.post(url, data=raw, headers=JSON_HEADERS, allow_redirects=False))
        return UpstreamResponse(r)

    async def aclose(self) -> None:
        await self._session.close()
        await asyncio.sleep(0)  # let the transports close before the loop may end
