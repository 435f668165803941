"""Serve an aiohttp application from inside a running event loop (sandbox, API, tests).

``ServerLimits`` guards a server from clients that hold connections open (slowloris): a connection has
``header_timeout_s`` to send its first request's headers (aiohttp's keep-alive timeout, set to the same, bounds the
wait for each later request's), and one client address may hold at most ``max_per_client`` connections; one more is
answered 503 and closed at once, before it costs a file descriptor for longer than that. Bodies are the
application's to bound (the API reads them under a deadline).

Requests that aiohttp refuses itself, before any handler runs (a request line or URL too long, too many headers,
both Content-Length and Transfer-Encoding, an unknown Content-Encoding, not HTTP at all), get the same JSON error
body and ``Server`` header as every other answer: ``_JsonErrors``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

LOG = logging.getLogger(__name__)

_REFUSAL = b'{"error": "too many connections from this address: close some first", "reason": "too_many_connections"}'
_TOO_MANY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\nConnection: close\r\n"
    b"Server: deeptarget\r\nContent-Length: %d\r\n\r\n%s" % (len(_REFUSAL), _REFUSAL)
)


@dataclass(frozen=True)
class ServerLimits:
    header_timeout_s: float | None = None  # None: aiohttp's defaults (no bound on the first request's headers)
    max_per_client: int | None = None  # None: no cap per client address


class _JsonErrors(RequestHandler):
    """aiohttp's protocol, whose own error answers (it makes them for requests it cannot parse) are JSON with our
    ``Server`` header instead of plain text naming aiohttp and its version. No new state (``__slots__`` is empty),
    so a handler's class can be switched to this one."""

    __slots__ = ()

    def handle_error(
        self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs it; raises when an answer was already begun
        phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
        reason = "malformed_request" if 400 <= status < 500 else "internal"
        what = "the request could not be parsed" if 400 <= status < 500 else "the server could not answer"
        body = {"error": f"{status} {phrase}: {what}", "reason": reason}
        response = web.json_response(body, status=status, headers={"Server": "deeptarget"})
        response.force_close()
        return response


class _ConnectionGuard:
    """Counts open connections per client address and wraps each new protocol in a ``_Guarded``."""

    def __init__(self, factory: Callable[[], asyncio.Protocol], limits: ServerLimits) -> None:
        self.factory = factory
        self.limits = limits
        self.open: Counter[str] = Counter()
        self.capped: set[str] = set()  # addresses told off once already (a flood of refusals is one log line)

    def __call__(self) -> asyncio.Protocol:
        inner = self.factory()
        if type(inner) is RequestHandler:
            inner.__class__ = _JsonErrors  # the same layout; aiohttp's Server makes its handlers itself
        return _Guarded(self, inner)

    def admit(self, peer: str) -> bool:
        cap = self.limits.max_per_client
        if cap is not None and self.open[peer] >= cap:
            if peer not in self.capped:
                LOG.warning("refusing connections from %s: it holds %d already", peer, cap)
                self.capped.add(peer)
            return False
        self.open[peer] += 1
        return True

    def release(self, peer: str) -> None:
        self.open[peer] -= 1
        if self.open[peer] <= 0:
            del self.open[peer]
            self.capped.discard(peer)


class _Guarded(asyncio.Protocol):
    """aiohttp's protocol, behind a per-client cap and a deadline on the first request's headers."""

    def __init__(self, guard: _ConnectionGuard, inner: asyncio.Protocol) -> None:
        self._guard = guard
        self._inner: asyncio.Protocol | None = inner
        self._peer = ""
        self._transport: asyncio.BaseTransport | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._tail = b""  # the last bytes seen, so a header end split across reads is found

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        self._transport = transport
        if not self._guard.admit(self._peer):
            self._inner = None
            if isinstance(transport, asyncio.WriteTransport):  # a TCP server's transports are
                transport.write(_TOO_MANY)
            transport.close()
            return
        timeout = self._guard.limits.header_timeout_s
        if timeout is not None:
            self._deadline = asyncio.get_running_loop().call_later(timeout, self._too_slow)
        assert self._inner is not None  # cleared only by a refusal (above) or a lost connection
        self._inner.connection_made(transport)

    def _too_slow(self) -> None:
        self._deadline = None
        if self._transport is not None:
            LOG.debug("closed a connection from %s: no complete request headers in time", self._peer)
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            return
        if self._deadline is not None:
            seen = self._tail + data
            if b"\r\n\r\n" in seen or b"\n\n" in seen:  # the headers are in: from here on the app's deadlines hold
                self._deadline.cancel()
                self._deadline = None
            self._tail = seen[-3:]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._transport = None
        if self._inner is not None:
            self._guard.release(self._peer)
            inner, self._inner = self._inner, None
            inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()


class AppServer:
    """``async with AppServer(app, host, port) as server``; port 0 picks a free one, ``server.url`` tells it."""

    def __init__(
        self, app: web.Application, host: str = "127.0.0.1", port: int = 0, limits: ServerLimits | None = None
    ) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.limits = limits or ServerLimits()
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> AppServer:
        handler_args: dict[str, Any] = {}  # AppRunner's **kwargs go to aiohttp's protocol
        if self.limits.header_timeout_s is not None:  # also closes idle keep-alive connections after that long
            handler_args["keepalive_timeout"] = self.limits.header_timeout_s
        self._runner = web.AppRunner(self.app, access_log=None, **handler_args)
        await self._runner.setup()
        assert self._runner.server is not None
        guard = _ConnectionGuard(self._runner.server, self.limits)
        self._server = await asyncio.get_running_loop().create_server(guard, self.host, self.port, backlog=128)
        if self._server.sockets:
            self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()  # no new connections; the runner then closes the open ones
            self._server = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> AppServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
