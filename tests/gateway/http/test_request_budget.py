"""The per-request decoded-memory budget (``--max-decoded-bytes``): each datatype is charged its
element size, a string its UTF-8 bytes plus ``STRING_OVERHEAD``; a request exactly at the budget
is decoded, one byte over it is refused with 413 naming the tensor and the budget, before the
tensor is built. Large JSON bodies are also counted before they are parsed."""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.errors import PayloadTooLarge
from gateway.http.codec import STRING_OVERHEAD, decode_request
from gateway.serving.types import NUMPY_DTYPES, ModelVersion, TensorSpec
from tests.support.server import InProcessServer

FIXED = [t for t in NUMPY_DTYPES if t != "BYTES"]


def model(*inputs: tuple[str, str]) -> ModelVersion:
    specs = tuple(TensorSpec(name, datatype, (-1, -1)) for name, datatype in inputs)
    return ModelVersion("m", "1", Path("m.onnx"), "0" * 64, specs, ())


def json_tensor(name: str, datatype: str, data: list[Any]) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": [1, len(data)], "data": data}


def decode_json(inputs: list[dict[str, Any]], m: ModelVersion, budget: int) -> None:
    decode_request(orjson.dumps({"inputs": inputs}), None, m, budget=budget)


def binary_strings(name: str, items: list[str]) -> tuple[bytes, int]:
    raw = b"".join(struct.pack("<I", len(e)) + e for e in (s.encode() for s in items))
    params = {"binary_data_size": len(raw)}
    entry = {"name": name, "datatype": "BYTES", "shape": [1, len(items)], "parameters": params}
    head = orjson.dumps({"inputs": [entry]})
    return head + raw, len(head)


def over_budget(exc: pytest.ExceptionInfo[PayloadTooLarge], name: str, budget: int) -> None:
    assert exc.value.status == 413
    assert repr(name) in exc.value.message and f"budget of {budget} bytes" in exc.value.message


@pytest.mark.parametrize("datatype", FIXED)
def test_fixed_size_tensors_are_charged_elements_times_element_size(datatype: str) -> None:
    count = 37
    cost = count * NUMPY_DTYPES[datatype].itemsize
    value = True if datatype == "BOOL" else 1
    inputs = [json_tensor("x", datatype, [value] * count)]
    m = model(("x", datatype))
    decode_json(inputs, m, budget=cost)  # exactly at the budget
    with pytest.raises(PayloadTooLarge) as exc:
        decode_json(inputs, m, budget=cost - 1)  # the request is one byte over
    over_budget(exc, "x", cost - 1)


def test_a_fixed_size_tensor_is_refused_from_its_declared_shape() -> None:
    """Nothing of it is decoded: the data need not even be there."""
    entry = {"name": "x", "datatype": "FP64", "shape": [1000, 1000], "data": []}
    with pytest.raises(PayloadTooLarge) as exc:
        decode_json([entry], model(("x", "FP64")), budget=8_000_000 - 1)
    over_budget(exc, "x", 8_000_000 - 1)


@pytest.mark.parametrize("form", ["json", "binary"])
def test_strings_are_charged_their_utf8_bytes_plus_the_overhead(form: str) -> None:
    items = ["", "a", "é", "日本語", "x" * 100]  # 0 + 1 + 2 + 9 + 100 UTF-8 bytes, 106 chars
    cost = len(items) * STRING_OVERHEAD + 112
    m = model(("s", "BYTES"))
    if form == "json":
        body, header = orjson.dumps({"inputs": [json_tensor("s", "BYTES", items)]}), None
    else:
        body, header = binary_strings("s", items)
    decoded = decode_request(body, header, m, budget=cost)
    assert decoded.inputs["s"].ravel().tolist() == items
    with pytest.raises(PayloadTooLarge) as exc:
        decode_request(body, header, m, budget=cost - 1)
    over_budget(exc, "s", cost - 1)


def test_the_budget_is_for_the_whole_request_and_names_the_tensor_that_crosses_it() -> None:
    m = model(("a", "FP32"), ("b", "INT16"))
    inputs = [json_tensor("a", "FP32", [0.5] * 10), json_tensor("b", "INT16", [1] * 10)]
    decode_json(inputs, m, budget=60)
    with pytest.raises(PayloadTooLarge) as exc:
        decode_json(inputs, m, budget=59)
    over_budget(exc, "b", 59)


def test_a_large_json_body_of_strings_is_refused_before_it_is_parsed() -> None:
    count = 100_000  # 400 KB of JSON; parsed, 100,000 str objects
    body = orjson.dumps({"inputs": [json_tensor("s", "BYTES", ["a"] * count)]})
    budget = count * STRING_OVERHEAD // 2
    # the strings, 7 more (keys, "s", "BYTES") and 5 containers; counted, not parsed
    with pytest.raises(PayloadTooLarge, match="holds about 100012 strings, arrays and obj") as exc:
        decode_request(body, None, model(("s", "BYTES")), budget=budget)
    assert f"budget of {budget} bytes" in exc.value.message


# -- through the gateway ------------------------------------------------------------------------

BUDGET = 16384  # above the 120 strings and containers of an echo request, counted x 64


@pytest.fixture(scope="module")
def gateway(demo_repo: Path) -> Iterator[InProcessServer]:
    with InProcessServer(demo_repo, args=["--max-decoded-bytes", str(BUDGET)]) as s:
        yield s


def echo(fp64: int) -> dict[str, Any]:
    """An echo request whose decoded tensors take 8 * fp64 bytes (every other input empty)."""
    empty = [
        {"name": f"in_{t.lower()}", "datatype": t, "shape": [0, 0], "data": []}
        for t in NUMPY_DTYPES
        if t != "FP64"
    ]
    return {"inputs": [*empty, json_tensor("in_fp64", "FP64", [0.25] * fp64)]}


def output(r: httpx.Response, name: str) -> Any:
    return next(o["data"] for o in r.json()["outputs"] if o["name"] == name)


def test_the_gateway_answers_413_in_the_protocols_format(gateway: InProcessServer) -> None:
    url = gateway.url + "/v2/models/echo/infer"
    r = httpx.post(url, json=echo(BUDGET // 8))
    assert r.status_code == 200, r.text
    assert output(r, "out_fp64") == [0.25] * (BUDGET // 8)
    r = httpx.post(url, json=echo(BUDGET // 8 + 1))
    assert r.status_code == 413, r.text
    error = r.json()["error"]
    assert list(r.json()) == ["error"]
    assert "'in_fp64'" in error and f"budget of {BUDGET} bytes" in error
    assert httpx.post(url, json=echo(1)).status_code == 200  # and it keeps serving


def test_large_bodies_are_decoded_on_the_decode_pool(gateway: InProcessServer) -> None:
    """A body past 1 MiB is parsed on a ``turnout-decode`` thread: the same answers as on the
    loop, and the pool's threads exist once one was sent."""
    body = orjson.dumps(echo(1)) + b" " * (1 << 20)  # JSON allows trailing whitespace
    r = httpx.post(gateway.url + "/v2/models/echo/infer", content=body)
    assert r.status_code == 200, r.text
    assert any(t.name.startswith("turnout-decode") for t in threading.enumerate())
    assert output(r, "out_fp64") == [0.25]
