"""Compressed request bodies (``Content-Encoding: gzip``, ``x-gzip`` or ``deflate``), inflated
as they arrive with the body cap applied to the inflated size.

A decompression bomb (a megabyte of gzip that inflates to a gigabyte) is refused with 413 as
soon as its output passes the cap: zlib is never asked for more than the bytes still allowed
plus one, so no more than the cap is ever inflated. The compressed bytes count against the same
cap on the wire. An unknown coding, or more than one (``gzip, gzip``), is 415 with an
``Accept-Encoding`` header naming what is supported; a corrupt or truncated stream is 400.

"deflate" is the zlib format (RFC 9110 §8.4.1.2, what tritonclient sends); a raw deflate
stream, which some clients send under the same name, is recognised by its missing zlib header.
Several gzip members one after the other are one body, as gzip(1) reads them.
"""

from __future__ import annotations

import asyncio
import zlib
from concurrent.futures import Executor
from typing import Any, Final

from starlette.requests import ClientDisconnect

from gateway.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType, cut
from gateway.http.responses import Receive, check_declared_length

CODINGS: Final = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": 0}
ACCEPTED: Final = "gzip, deflate"  # the Accept-Encoding of a 415
_IDENTITY: Final = "identity"
# Inflated bytes a request may reach on the event loop; past it the rest is inflated on the
# decode pool (as inference.py parses plain bodies of that size there).
ON_LOOP: Final = 1 << 20
STEP: Final = 1 << 18  # most bytes one zlib call inflates
MAX_MEMBERS: Final = 64  # gzip members in one body: each costs a decompressor


def coding_of(value: str) -> str | None:
    """The one content coding a ``Content-Encoding`` value names (None: identity)."""
    names = [token.strip().lower() for token in value.split(",")]
    codings = [name for name in names if name and name != _IDENTITY]
    if not codings:
        return None
    if len(codings) == 1 and codings[0] in CODINGS:
        return codings[0]
    unsupported = cut(value, 60)
    if len(codings) > 1:
        raise UnsupportedMediaType(
            f"Content-Encoding {unsupported!r} applies {len(codings)} codings; "
            f"at most one is accepted ({ACCEPTED})",
            accept_encoding=ACCEPTED,
        )
    raise UnsupportedMediaType(
        f"Content-Encoding {unsupported!r} is not supported; send {ACCEPTED}, or no encoding",
        accept_encoding=ACCEPTED,
    )


class Inflater:
    """One compressed body, fed in pieces; ``body()`` is the inflated whole.

    ``feed`` raises PayloadTooLarge once the output would pass ``limit`` bytes and BadRequest
    on a corrupt stream; ``body`` raises BadRequest on a truncated one. Not thread-safe: one
    caller at a time (the event loop, or the decode pool while the loop awaits it)."""

    __slots__ = ("_chunks", "_coding", "_d", "_full", "_members", "_tail", "limit", "size")

    def __init__(self, coding: str, limit: int) -> None:
        self._coding = coding
        self.limit = limit
        self.size = 0
        self._chunks: list[bytes] = []
        self._d: Any = None  # zlib's Decompress, made once the first bytes say which format
        self._tail = b""  # input left by a feed that stopped at ``most``
        self._full = False  # the last decompress filled its room: zlib may hold more output
        self._members = 0

    def feed(self, data: bytes, most: int | None = None) -> bool:
        """Inflate ``data`` after whatever the previous call left; with ``most``, stop after
        about that many more output bytes. True when all the input so far has been inflated."""
        if self._tail:
            data, self._tail = self._tail + data, b""
        if self._d is None and len(data) < 2:  # "deflate" needs two bytes to tell its format
            self._tail = data
            return True
        while data or self._full:
            if self._d is None or self._d.eof:
                data = self._start(data)
                continue
            # One more than allowed tells "over the limit". By steps: zlib builds each call's
            # output in blocks and then joins them, so a call briefly holds its output twice.
            room = min(self.limit - self.size + 1, STEP)
            if most is not None:
                if most <= 0:
                    self._tail = data
                    return False
                room = min(room, most)
            try:
                out = self._d.decompress(data, room)
            except zlib.error as exc:
                raise BadRequest(f"the {self._coding} request body is corrupt: {exc}") from None
            self.size += len(out)
            if self.size > self.limit:
                raise PayloadTooLarge(
                    f"the {self._coding} request body inflates to more than the limit of "
                    f"{self.limit} bytes"
                )
            self._chunks.append(out)
            self._full = len(out) == room and not self._d.eof
            if most is not None:
                most -= len(out)
            data = self._d.unconsumed_tail or (self._d.unused_data if self._d.eof else b"")
        return True

    def body(self) -> bytes:
        """The inflated body, once every piece has been fed."""
        if self._tail or self._d is None or not self._d.eof:
            raise BadRequest(f"the {self._coding} request body ends before its stream does")
        return self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)

    def _start(self, data: bytes) -> bytes:
        """A decompressor for the stream (or gzip member) that ``data`` begins; the data left."""
        self._full = False
        wbits = CODINGS[self._coding]
        if self._d is not None:  # after the end of a stream: only another gzip member
            if not wbits:
                raise BadRequest(f"{len(data)} bytes follow the end of the deflate request body")
            data = data.lstrip(b"\x00")  # gzip(1) ignores zeros padding the last member
            if not data:
                return data
            self._members += 1
            if self._members >= MAX_MEMBERS:
                raise BadRequest(
                    f"the gzip request body has more than {MAX_MEMBERS} members (streams)"
                )
        elif not wbits:
            wbits = -zlib.MAX_WBITS  # raw deflate, unless the zlib header is there
            # zlib's two-byte header: the deflate method (8), and a check making it a multiple of 31
            if len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0:
                wbits = zlib.MAX_WBITS
        self._d = zlib.decompressobj(wbits)
        return data


async def read_inflated(
    receive: Receive, declared: str | bytes | None, coding: str, limit: int, pool: Executor
) -> bytes:
    """The inflated body of a request whose Content-Encoding is ``coding`` and Content-Length
    ``declared``, read from ASGI ``receive``. Up to ``ON_LOOP`` bytes in and out are inflated
    on the event loop, the rest on ``pool``. Raises starlette's ClientDisconnect when the
    client leaves before the end."""
    check_declared_length(declared, limit)
    inflater = Inflater(coding, limit)
    loop = asyncio.get_running_loop()
    received = 0
    more = True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientDisconnect()
        chunk: bytes = message.get("body", b"")
        more = message.get("more_body", False)
        received += len(chunk)
        if received > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        if received <= ON_LOOP and inflater.size < ON_LOOP:
            if inflater.feed(chunk, ON_LOOP - inflater.size):
                continue
            chunk = b""  # what is left of it waits in the inflater
        await loop.run_in_executor(pool, inflater.feed, chunk)
    return inflater.body()
