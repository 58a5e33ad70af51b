"""uvicorn's httptools HTTP/1.1 protocol with a read deadline, so that slow or silent clients cannot hold connections.

uvicorn times out only idle keep-alive connections: one that sends nothing, part of its headers or part of its
body stays open for ever. Here each request must arrive in full within ``read_timeout`` seconds of the
connection opening (first request) or of its first byte (later requests); otherwise the connection is closed.
httptools (llhttp, in C) parses a request in a fraction of the time of uvicorn's pure-Python h11 protocol.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class DeadlineProtocol(HttpToolsProtocol):
    """HttpToolsProtocol closing a connection whose request is not complete ``read_timeout`` seconds after it
    began."""

    read_timeout: float = 10.0
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.read_timeout, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.logger.info("closing a connection whose request did not arrive within %g s", self.read_timeout)
            self.transport.close()


def with_read_timeout(seconds: float) -> type[DeadlineProtocol]:
    """The protocol class for uvicorn's ``http`` option, with a deadline of ``seconds``."""
    return type("DeadlineProtocol", (DeadlineProtocol,), {"read_timeout": seconds})
