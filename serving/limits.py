"""ASGI middleware bounding what a request may make the service hold: its body in bytes (also once gunzipped)
and its JSON values."""

from __future__ import annotations

import zlib

from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.inputs import parse_count
from serving.oip import HEADER_LENGTH
from serving.responses import error_response, input_error_response, is_v2

JSON_HEADER_LENGTH = HEADER_LENGTH.lower().encode()  # as ASGI gives header names
GZIP = zlib.MAX_WBITS | 16  # zlib's window bits for the gzip container
GUNZIP_SLICE = 64 * 1024
MAX_GZIP_MEMBERS = 64  # `cat a.gz b.gz` bodies have a few; thousands of empty ones only cost time
ONCE_ONLY = (b"content-encoding", JSON_HEADER_LENGTH)  # headers whose every reader must see the same single value


class TooLarge(ValueError):
    """A gzip body that inflates beyond the byte limit."""


class BodyLimit:
    """Answer 413 to a body above ``max_bytes``, or to JSON holding more than ``max_values`` values, before the app
    reads it. A ``Content-Encoding: gzip`` body is inflated here, to at most ``max_bytes``, and reaches the app
    uncompressed (so both bounds hold for what it inflates to); one that is not gzip, or a body in any other
    encoding but identity, gets 400 (422 outside /v2).

    Decoded JSON takes about 30 times its text in memory when the text is dense (``0,0,0,...``), so the values are
    counted first: a JSON value beyond the first of its array or object follows a comma, and the commas in the text
    bound the values. Which part of a body is JSON follows from its route, never from headers alone: none on
    ``raw_paths``, the leading JSON header of an Open Inference Protocol body with the binary extension, all of it
    elsewhere.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, max_values: int, raw_paths: frozenset[str]) -> None:
        self.app, self.max_bytes, self.max_values, self.raw_paths = app, max_bytes, max_values, raw_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        repeated = [name for name in ONCE_ONLY if sum(key == name for key, _ in scope["headers"]) > 1]
        if repeated:  # a dict of the headers keeps the last copy, the app's Headers.get the first: they would disagree
            await input_error_response(scope["path"], f"header '{repeated[0].decode()}' is given more than once; "
                                                      "send it once")(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = parse_count(headers.get(b"content-length", b"0"))
        if declared is not None and declared > self.max_bytes:
            await self._refuse(scope, receive, send, f"request body exceeds the limit of {self.max_bytes} bytes")
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(scope, receive, send, f"request body exceeds the limit of {self.max_bytes} bytes")
                return
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False
        encoding = headers.get(b"content-encoding", b"identity").strip().lower()
        if body and encoding not in (b"gzip", b"identity"):
            shown = encoding[:40].decode("latin-1")
            await input_error_response(scope["path"], f"Content-Encoding '{shown}' is not supported; send the body "
                                                      "gzip or uncompressed")(scope, receive, send)
            return
        if body and encoding == b"gzip":
            try:  # in a worker thread: a body of many tiny members must not stall the other clients
                body = await run_in_threadpool(gunzip, body, self.max_bytes)
            except TooLarge:
                await self._refuse(scope, receive, send, f"request body inflates beyond the limit of {self.max_bytes} "
                                                         "bytes")
                return
            except zlib.error as error:
                await input_error_response(scope["path"], f"the body is not valid gzip ({error}); compress it with "
                                                          "gzip or send it uncompressed")(scope, receive, send)
                return
            # in place, not a copy: the route the router records in the scope must reach RequestMetrics outside
            scope["headers"] = [(key, value) for key, value in scope["headers"]
                                if key not in (b"content-encoding", b"content-length")
                                ] + [(b"content-length", str(len(body)).encode())]
        values = self._json_part(scope["path"], body, headers).count(b",") + 1
        if values > self.max_values:
            await self._refuse(scope, receive, send, f"request JSON holds up to {values} values, more than the limit "
                                                     f"of {self.max_values}")
            return

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _json_part(self, path: str, body: bytes, headers: dict[bytes, bytes]) -> bytes:
        """The JSON text of a body: none on a raw path, the JSON header of a binary /v2 body, else all of it."""
        if path in self.raw_paths:
            return b""
        length = parse_count(headers.get(JSON_HEADER_LENGTH, b""))
        if is_v2(path) and length is not None:
            return body[:length]
        return body

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, reason: str) -> None:
        response = error_response(scope["path"], 413, f"{reason}; send fewer items per request")
        await response(scope, receive, send)


def gunzip(body: bytes, max_bytes: int) -> bytes:
    """The gzip ``body`` inflated: one member or several one after the other (RFC 1952 allows them, as
    ``cat a.gz b.gz`` writes); TooLarge beyond ``max_bytes`` in all, zlib.error when a member is cut short or the
    bytes after one are not another, or when there are more than ``MAX_GZIP_MEMBERS``. The body is fed in slices of
    ``GUNZIP_SLICE`` bytes, so the work is linear in its size (zlib copies every byte after a member's end into
    ``unused_data``)."""
    view, offset, inflated, members = memoryview(body), 0, bytearray(), 0
    while offset < len(view):
        if members == MAX_GZIP_MEMBERS:
            raise zlib.error(f"more than {MAX_GZIP_MEMBERS} gzip members; send at most {MAX_GZIP_MEMBERS}")
        inflater, start = zlib.decompressobj(GZIP), offset
        while not inflater.eof:
            if offset == len(view):
                raise zlib.error("truncated stream")
            piece = view[offset:offset + GUNZIP_SLICE]
            try:
                inflated += inflater.decompress(piece, max_bytes + 1 - len(inflated))
            except zlib.error as error:
                if members == 0:
                    raise
                raise zlib.error(f"{len(view) - start} bytes follow the stream and are not another gzip member "
                                 f"({error})") from None
            if len(inflated) > max_bytes:
                raise TooLarge(max_bytes)
            offset += len(piece) - len(inflater.unused_data)  # below the output cap nothing is left unconsumed
        members += 1
    return bytes(inflated)
