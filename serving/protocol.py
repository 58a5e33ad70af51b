"""uvicorn's httptools HTTP/1.1 protocol with a read deadline and a bound on the request head, so that slow, silent or
header-flooding clients cannot hold connections or memory.

uvicorn times out only idle keep-alive connections: one that sends nothing, part of its headers or part of its
body stays open for ever. Here each request must arrive in full within ``read_timeout`` seconds of the
connection opening (first request) or of its first byte (later requests); otherwise the connection is closed.
Neither uvicorn nor llhttp bounds the request line and headers (a client could send gigabytes of header lines
within the deadline, kept in memory), so a head above ``MAX_HEAD_BYTES`` is answered 431 and the connection closed;
the body is bounded by ``serving.limits.BodyLimit``.
httptools (llhttp, in C) parses a request in a fraction of the time of uvicorn's pure-Python h11 protocol.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 64 * 1024  # the request line and headers of one request


class HeadTooLarge(Exception):
    """Raised from a parser callback to stop parsing a request whose head exceeds ``MAX_HEAD_BYTES``."""


class DeadlineProtocol(HttpToolsProtocol):
    """HttpToolsProtocol closing a connection whose request is not complete ``read_timeout`` seconds after it
    began."""

    read_timeout: float = 10.0
    _deadline: asyncio.TimerHandle | None = None
    _head_bytes: int = 0
    _head_too_large: bool = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        self._arm()

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)  # ": " and CRLF
        super().on_header(name, value)

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > MAX_HEAD_BYTES:
            self._head_too_large = True
            raise HeadTooLarge  # httptools stops and raises a parser error, which answers through send_400_response

    def send_400_response(self, msg: str) -> None:
        if not self._head_too_large:
            super().send_400_response(msg)
            return
        body = f"request line and headers exceed the limit of {MAX_HEAD_BYTES} bytes".encode()
        self.logger.info("closing a connection whose request head exceeded %d bytes", MAX_HEAD_BYTES)
        self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; "
                             b"charset=utf-8\r\ncontent-length: " + str(len(body)).encode() +
                             b"\r\nconnection: close\r\n\r\n" + body)
        self.transport.close()

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
