"""gateway.http.inflate: compressed request bodies inflated piece by piece, the cap applied to
the inflated size (a bomb is cut off before more than the cap exists), corrupt, truncated and
nested streams refused with the right status."""

from __future__ import annotations

import gzip
import struct
import subprocess
import sys
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from gateway.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from gateway.http.inflate import ACCEPTED, MAX_MEMBERS, STEP, Inflater, coding_of

ROOT = Path(__file__).resolve().parents[3]

BODY = np.random.default_rng(5).integers(0, 64, 300_000, dtype=np.uint8).tobytes()
MIB = 1 << 20


def raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


# "deflate" is the zlib format, as tritonclient sends it; "deflate-raw" what some clients send
ENCODED = {"gzip": gzip.compress(BODY), "deflate": zlib.compress(BODY)}
CODINGS = ["gzip", "x-gzip", "deflate", "deflate-raw"]


def pieces(data: bytes, size: int) -> Iterator[bytes]:
    return (data[i : i + size] for i in range(0, len(data), size))


def inflate(coding: str, data: bytes, limit: int = 1 << 30, piece: int = 1 << 16) -> bytes:
    inflater = Inflater(coding, limit)
    for part in pieces(data, piece):
        assert inflater.feed(part)
    return inflater.body()


def gzip_of_zeros(total: int, block: int = MIB) -> Iterator[bytes]:
    """A gzip stream of ``total`` zero bytes, made without compressing them all: after a full
    flush deflate starts afresh, so every block of zeros compresses to the same bytes."""
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    compressed = c.compress(bytes(block)) + c.flush(zlib.Z_FULL_FLUSH)
    yield b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"  # gzip header: deflate, no name, no mtime
    crc = 0
    zeros = bytes(block)
    for _ in range(total // block):
        crc = zlib.crc32(zeros, crc)
        yield compressed
    yield c.flush() + struct.pack("<II", crc, total & 0xFFFFFFFF)


@pytest.mark.parametrize("coding", CODINGS)
@pytest.mark.parametrize("piece", [1, 1000, 1 << 20], ids=["bytewise", "1kB", "whole"])
def test_each_coding_inflates_to_the_exact_body(coding: str, piece: int) -> None:
    """Bytewise on a shorter body: every split point of headers, blocks and trailers."""
    body = BODY[:20_000] if piece == 1 else BODY
    compressors: dict[str, Callable[[bytes], bytes]] = {
        "gzip": gzip.compress,
        "x-gzip": gzip.compress,
        "deflate": zlib.compress,
        "deflate-raw": raw_deflate,
    }
    data = compressors[coding](body)
    assert inflate(coding.removesuffix("-raw"), data, piece=piece) == body


def test_the_limit_counts_inflated_bytes_exactly() -> None:
    data = gzip.compress(BODY)
    assert inflate("gzip", data, limit=len(BODY)) == BODY
    with pytest.raises(PayloadTooLarge) as exc:
        inflate("gzip", data, limit=len(BODY) - 1)
    assert exc.value.status == 413
    assert f"limit of {len(BODY) - 1} bytes" in exc.value.message


def bomb_peak() -> tuple[int, int, int]:
    """Feed 1 GiB of zeros (about 1 MB of gzip) to an inflater capped at 16 MiB: (status it
    refused with, bytes it inflated, peak bytes traced while it ran)."""
    inflater = Inflater("gzip", 16 * MIB)
    bomb = list(gzip_of_zeros(1 << 30))  # 1,026 parts, the same 1 kB block again and again
    assert sum(map(len, bomb)) < 2 * MIB
    status = 0
    tracemalloc.start()
    try:
        for part in bomb:
            inflater.feed(part)
    except PayloadTooLarge as exc:  # caught by hand: pytest.raises allocates a traceback's worth
        status = exc.status
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return status, inflater.size, peak


def test_a_bomb_is_cut_off_without_holding_more_than_the_limit() -> None:
    """Refused, and the memory the inflater ever held is the cap plus what zlib itself needs,
    not the bomb. Measured in a process of its own: tracemalloc's peak counts every thread's
    allocations, and other threads of a test process allocate meanwhile."""
    code = "from tests.gateway.http.test_inflate import bomb_peak; print(*bomb_peak())"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    status, size, peak = map(int, out.split())
    limit = 16 * MIB
    assert status == 413
    assert size == limit + 1  # one byte past the cap, never more
    # Besides the output: one zlib call's output twice (blocks, then joined; STEP each), zlib's
    # 32 KiB window and under 10 KiB of tables, the list of chunks.
    assert peak < limit + 2 * STEP + 64 * 1024, peak


def test_the_bomb_generator_makes_valid_gzip() -> None:
    assert gzip.decompress(b"".join(gzip_of_zeros(4 * MIB))) == bytes(4 * MIB)


def test_most_bounds_one_call_and_the_rest_follows() -> None:
    """How read_inflated splits the work between the event loop and the decode pool."""
    inflater = Inflater("gzip", 1 << 30)
    assert not inflater.feed(gzip.compress(BODY), most=1000)
    assert 1000 <= inflater.size < len(BODY)
    assert inflater.feed(b"")
    assert inflater.body() == BODY


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
def test_a_truncated_stream_is_a_400(coding: str) -> None:
    data = ENCODED[coding]
    for cut_at in (0, 1, 9, len(data) // 2, len(data) - 1):
        with pytest.raises(BadRequest) as exc:
            inflate(coding, data[:cut_at])
        assert exc.value.status == 400
        assert "ends before its stream does" in exc.value.message


@pytest.mark.parametrize(
    ("coding", "data"),
    [
        ("gzip", b"not gzip at all"),
        ("gzip", ENCODED["gzip"][:-8] + b"\0\0\0\0\0\0\0\0"),  # bad CRC and length
        ("deflate", b"\xff" * 64),
        ("deflate", ENCODED["deflate"][:40] + b"\xff" * 40 + ENCODED["deflate"][80:]),
    ],
    ids=["gzip-garbage", "gzip-bad-trailer", "deflate-garbage", "deflate-damaged"],
)
def test_a_corrupt_stream_is_a_400(coding: str, data: bytes) -> None:
    with pytest.raises(BadRequest) as exc:
        inflate(coding, data)
    assert exc.value.status == 400 and "corrupt" in exc.value.message


def test_gzip_members_in_sequence_are_one_body_and_zero_padding_is_ignored() -> None:
    data = gzip.compress(BODY[:1000]) + gzip.compress(BODY[1000:]) + bytes(512)
    assert inflate("gzip", data, piece=777) == BODY


def test_members_are_bounded() -> None:
    member = gzip.compress(b"")
    assert inflate("gzip", member * MAX_MEMBERS) == b""
    with pytest.raises(BadRequest) as exc:
        inflate("gzip", member * (MAX_MEMBERS + 1))
    assert f"more than {MAX_MEMBERS} members" in exc.value.message


def test_bytes_after_a_deflate_stream_are_a_400() -> None:
    with pytest.raises(BadRequest) as exc:
        inflate("deflate", zlib.compress(b"{}") + b"trailing")
    assert "follow the end" in exc.value.message


@pytest.mark.parametrize(
    ("value", "coding"),
    [
        ("identity", None),
        ("", None),
        ("gzip", "gzip"),
        (" GZip ", "gzip"),
        ("x-gzip", "x-gzip"),
        ("Deflate", "deflate"),
        ("identity, gzip", "gzip"),
    ],
)
def test_content_encoding_values(value: str, coding: str | None) -> None:
    assert coding_of(value) == coding


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("br", "is not supported"),
        ("zstd", "is not supported"),
        ("gzip, gzip", "applies 2 codings"),
        ("deflate, gzip", "applies 2 codings"),
        ("compress", "is not supported"),
        ("g" * 10_000, "is not supported"),
    ],
)
def test_unsupported_or_nested_encodings_are_a_415_listing_what_is(value: str, says: str) -> None:
    with pytest.raises(UnsupportedMediaType) as exc:
        coding_of(value)
    assert exc.value.status == 415 and exc.value.accept_encoding == ACCEPTED
    assert says in exc.value.message and len(exc.value.message) < 300
