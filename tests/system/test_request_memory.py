"""One request's memory and the event loop, on a real gateway process.

A 60 MB JSON body of one-character strings took a gateway from 258 MiB to a 2.5 GiB peak and held
its event loop for 7 s (measured before the decoded-memory budget). Now it is refused with 413
before it is parsed, and a large body is decoded beside the loop, which keeps answering others.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from gateway.demo import ECHO_TYPES
from tests.support.load import figures, fraud_bodies
from tests.support.server import Server

ATTACK_BYTES = 60_000_000
MiB = 1 << 20


def echo_body(data: list[str]) -> bytes:
    """An echo request carrying ``data`` as its BYTES input (every other input empty)."""
    inputs = [
        {"name": f"in_{k}", "datatype": k.upper(), "shape": [0, 0], "data": []}
        for k in ECHO_TYPES
        if k != "bytes"
    ]
    inputs.append({"name": "in_bytes", "datatype": "BYTES", "shape": [1, len(data)], "data": data})
    return orjson.dumps({"inputs": inputs})


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def reset_peak(pid: int) -> None:
    """Set the process's VmHWM (peak resident set) back to its current resident set."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@pytest.mark.parametrize(
    ("args", "refusal"),
    [
        ([], "exceeds the limit of 16777216"),  # the default body cap
        (["--max-body-bytes", str(64 * MiB)], "strings, arrays and objects"),  # the budget
    ],
    ids=["default-cap", "cap-raised-to-64MiB"],
)
def test_a_60_mb_body_of_strings_is_refused_before_it_takes_memory(
    demo_repo: Path, args: list[str], refusal: str
) -> None:
    body = echo_body(["a"] * (ATTACK_BYTES // 4))
    assert len(body) >= ATTACK_BYTES
    with Server(demo_repo, args=args) as s:
        assert s.process is not None
        pid = s.process.pid
        reset_peak(pid)
        before = status_kib(pid, "VmHWM")
        r = httpx.post(s.url + "/v2/models/echo/infer", content=body, timeout=60)
        peak = status_kib(pid, "VmHWM")
        served = httpx.post(s.url + "/v2/models/echo/infer", content=echo_body(["b"]))
    assert r.status_code == 413, r.text
    assert refusal in r.json()["error"]
    assert served.status_code == 200, served.text
    grown_mib = (peak - before) / 1024
    figures("request-memory", args=args, rss_mib=before // 1024, peak_growth_mib=round(grown_mib))
    # At most the body three times over: uvicorn's receive buffer, the chunks read from it and
    # their join; then 32 MiB for the interpreter and allocator. (Parsed, it took 2.2 GiB more.)
    assert grown_mib <= 3 * len(body) / MiB + 32, grown_mib


def binary_strings_body(count: int) -> tuple[bytes, int]:
    """An echo request of ``count`` one-byte BYTES elements in binary, the last not UTF-8: the
    gateway decodes all of them, one by one, before it refuses the request with 400."""
    items = [b"a"] * (count - 1) + [b"\xff"]
    raw = b"".join(struct.pack("<I", len(e)) + e for e in items)
    inputs: list[dict[str, object]] = [
        {"name": f"in_{k}", "datatype": k.upper(), "shape": [0, 0], "data": []}
        for k in ECHO_TYPES
        if k != "bytes"
    ]
    params = {"binary_data_size": len(raw)}
    inputs.append(
        {"name": "in_bytes", "datatype": "BYTES", "shape": [1, count], "parameters": params}
    )
    head = orjson.dumps({"inputs": inputs})
    return head + raw, len(head)


@pytest.fixture(scope="module")
def gateway(demo_repo: Path) -> Iterator[Server]:
    with Server(demo_repo) as s:
        yield s


def test_the_loop_answers_others_while_a_large_body_is_decoded(gateway: Server) -> None:
    """One-row requests sent one after another while a 5 MB body is decoded: each is answered
    within a fraction of the large request's time (before, the loop decoded it and every
    request sent meanwhile waited for all of it). Relative, not absolute, so a slow machine
    slows both sides alike."""
    body, header_length = binary_strings_body(1_000_000)
    small = fraud_bodies(1, seed=5)[0]
    url = gateway.url + "/v2/models"
    probes: list[tuple[float, float]] = []  # (sent, done)
    stop = threading.Event()

    def probe() -> None:
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                sent = time.monotonic()
                assert client.post(url + "/fraud/infer", content=small).status_code == 200
                probes.append((sent, time.monotonic()))

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        start = time.monotonic()
        r = httpx.post(
            url + "/echo/infer",
            content=body,
            headers={"Inference-Header-Content-Length": str(header_length)},
            timeout=60,
        )
        end = time.monotonic()
    finally:
        stop.set()
        prober.join()
    # Its last element is not UTF-8: the binary extension carries it into the model (issue 16,
    # item 5), and the echo of it cannot come back out as text: a 400 naming the input.
    assert r.status_code == 400 and "bytes of input 'in_bytes'" in r.json()["error"]
    during = [done - sent for sent, done in probes if start <= sent and done <= end]
    figures(
        "loop-while-decoding",
        large_s=round(end - start, 3),
        answered_meanwhile=len(during),
        worst_small_s=round(max(during, default=end - start), 3),
    )
    assert len(during) >= 3, (during, end - start)
    assert max(during) < (end - start) / 4, (during, end - start)
