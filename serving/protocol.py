"""uvicorn's httptools HTTP/1.1 protocol with a read deadline and a bound on the request head, so that slow, silent or
header-flooding clients cannot hold connections or memory.

uvicorn times out only idle keep-alive connections: one that sends nothing, part of its headers or part of its
body stays open for ever. Here each request must arrive in full within ``read_timeout`` seconds of the
connection opening (first request) or of its first byte (later requests); otherwise the connection is closed.
Neither uvicorn nor llhttp bounds the request line and headers (a client could send gigabytes of header lines
within the deadline, kept in memory), so a head above ``MAX_HEAD_BYTES`` is answered 431 and the connection closed;
the body is bounded by ``serving.limits.BodyLimit``. uvicorn queues pipelined requests (sent before the previous
answer) without bound, about 80 bytes of memory per byte sent; a connection queueing more than ``MAX_PIPELINED`` is
closed.
Every refusal of this layer, which the application never sees, is reported by its reason (``REFUSALS``) to the
callback ``protocol_class`` is given, for ``/metrics``.
httptools (llhttp, in C) parses a request in a fraction of the time of uvicorn's pure-Python h11 protocol.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 64 * 1024  # the request line and headers of one request
MAX_PIPELINED = 64  # requests a connection may queue behind the one being answered
# Reasons this layer refuses a request or a connection (their answers: docs/serving.md, "Metrics")
REFUSALS = ("head_too_large", "malformed", "pipeline_too_deep", "over_capacity", "read_timeout")


class HeadTooLarge(Exception):
    """Raised from a parser callback to stop parsing a request whose head exceeds ``MAX_HEAD_BYTES``."""


class PipelineTooDeep(Exception):
    """Raised from a parser callback to stop parsing on a connection queueing more than ``MAX_PIPELINED`` requests."""


class DeadlineProtocol(HttpToolsProtocol):
    """HttpToolsProtocol closing a connection whose request is not complete ``read_timeout`` seconds after it
    began."""

    read_timeout: float = 10.0
    _deadline: asyncio.TimerHandle | None = None
    _in_head: bool = True  # between the end of the last request (or the connection's start) and the end of headers
    _raw_head: int = 0  # bytes received while the head was incomplete
    _parsed_head: int = 0  # bytes of the URL and of the headers httptools has handed over
    _head_too_large: bool = False
    _pipeline_too_deep: bool = False
    _running: Any = None  # the RequestResponseCycle being answered
    on_refusal: Callable[[str], None] = staticmethod(lambda reason: None)  # told each refusal's REFUSALS key

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._raw_head += len(data)
        super().data_received(data)
        # Headers still incomplete after this chunk: every byte since the request began is head. httptools holds a
        # header until the next one starts, so this catches one huge header its callbacks have not handed over.
        if self._in_head and self._raw_head > MAX_HEAD_BYTES:
            self._refuse_head()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._parsed_head = 0
        self._arm()

    def on_url(self, url: bytes) -> None:
        self._count_parsed(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_parsed(len(name) + len(value) + 4)  # ": " and CRLF
        super().on_header(name, value)

    def _count_parsed(self, size: int) -> None:
        """A head that arrives in one chunk never stays incomplete after it: count what the parser hands over."""
        self._parsed_head += size
        if self._parsed_head > MAX_HEAD_BYTES:
            self._head_too_large = True
            raise HeadTooLarge  # httptools stops with a parser error, answered through send_400_response

    def send_400_response(self, msg: str) -> None:
        if self._head_too_large:
            self._refuse_head()
        elif self._pipeline_too_deep:  # answers to the queued requests are owed first: close without one
            self.logger.info("closing a connection that queued more than %d pipelined requests", MAX_PIPELINED)
            self.on_refusal("pipeline_too_deep")
            self._drop_running()
            self.transport.close()
        else:
            self.on_refusal("malformed")
            super().send_400_response(msg)

    def on_headers_complete(self) -> None:
        self._in_head, self._raw_head = False, 0
        super().on_headers_complete()
        if len(self.pipeline) > MAX_PIPELINED:
            self._pipeline_too_deep = True
            raise PipelineTooDeep  # httptools stops with a parser error, answered through send_400_response

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()
        self._in_head = True

    def _refuse_head(self) -> None:
        if self.transport.is_closing():  # refused already, from an earlier chunk
            return
        body = f"request line and headers exceed the limit of {MAX_HEAD_BYTES} bytes".encode()
        self.logger.info("closing a connection whose request head exceeded %d bytes", MAX_HEAD_BYTES)
        self.on_refusal("head_too_large")
        self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; "
                             b"charset=utf-8\r\ncontent-length: " + str(len(body)).encode() +
                             b"\r\nconnection: close\r\n\r\n" + body)
        self.transport.close()

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        if app is service_unavailable:  # uvicorn's answer beyond limit_concurrency, in place of the application
            self.on_refusal("over_capacity")
        self._running = cycle
        super()._start_asgi_task(cycle, app)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._drop_running()
        super().connection_lost(exc)

    def _drop_running(self) -> None:
        """Tell the request being answered that its client is gone, as uvicorn tells only the newest request (one
        still queued when requests were pipelined): the answer is then dropped, not written to a closed socket,
        which uvloop raises as an error."""
        running = self._running
        if running is not None and not running.response_complete:
            running.disconnected = True
            running.message_event.set()

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
            if self._in_head:  # otherwise the application has the request and counts it as abandoned (499)
                self.on_refusal("read_timeout")
            self.transport.close()


def protocol_class(read_timeout: float, on_refusal: Callable[[str], None]) -> type[DeadlineProtocol]:
    """The protocol class for uvicorn's ``http`` option, with a deadline of ``read_timeout`` seconds, telling
    ``on_refusal`` the reason of every refusal."""
    return type("DeadlineProtocol", (DeadlineProtocol,), {"read_timeout": read_timeout,
                                                          "on_refusal": staticmethod(on_refusal)})
