"""uvicorn's HTTP/1.1 (h11) protocol with a read deadline, so that slow or silent clients cannot hold connections.

uvicorn times out only idle keep-alive connections: one that sends nothing, part of its headers or part of its
body stays open for ever. Here each request must arrive in full within ``read_timeout`` seconds of the
connection opening (first request) or of its first byte (later requests); otherwise the connection is closed.
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

RECEIVING = (h11.IDLE, h11.SEND_BODY)  # the client's states while its request is incomplete


class DeadlineH11Protocol(H11Protocol):
    """H11Protocol closing a connection whose request is not complete ``read_timeout`` seconds after it began."""

    read_timeout: float = 10.0
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state in RECEIVING:
            self._arm()
        super().data_received(data)
        if self.conn.their_state not in RECEIVING:
            self._disarm()

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
        if self.conn.their_state in RECEIVING and not self.transport.is_closing():
            self.logger.info("closing a connection whose request did not arrive within %g s", self.read_timeout)
            self.transport.close()


def with_read_timeout(seconds: float) -> type[DeadlineH11Protocol]:
    """The protocol class for uvicorn's ``http`` option, with a deadline of ``seconds``."""
    return type("DeadlineH11Protocol", (DeadlineH11Protocol,), {"read_timeout": seconds})
