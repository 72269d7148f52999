"""gateway.http.codec, the wire forms of issue 16: raw binary requests, BYTES elements that are
not UTF-8, and non-finite floats in JSON outputs."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from gateway.errors import BadRequest, PayloadTooLarge
from gateway.http.codec import decode_request
from gateway.serving.types import NUMPY_DTYPES, ModelVersion, TensorSpec

F32 = np.dtype("<f4")


def model(*specs: tuple[str, str, tuple[int, ...]]) -> ModelVersion:
    inputs = tuple(TensorSpec(name, datatype, shape) for name, datatype, shape in specs)
    return ModelVersion("m", "1", Path("m.onnx"), "0" * 64, inputs, ())


def strings(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


# -- raw binary requests (Inference-Header-Content-Length: 0) ------------------------------------
@pytest.mark.parametrize(
    ("shape", "rows", "expected"),
    [
        ((-1, 4), 3, (3, 4)),
        ((-1, 4), 0, (0, 4)),
        ((2, -1), 3, (2, 6)),  # the dynamic axis need not be the first
        ((-1,), 5, (5,)),
        ((3, 4), 1, (3, 4)),  # no dynamic axis: exactly one tensor
    ],
)
def test_a_raw_body_is_the_one_input_with_its_dynamic_axis_inferred(
    shape: tuple[int, ...], rows: int, expected: tuple[int, ...]
) -> None:
    array = np.arange(np.prod(expected), dtype=F32).reshape(expected)
    decoded = decode_request(array.tobytes(), 0, model(("x", "FP32", shape)))
    assert list(decoded.inputs) == ["x"]
    np.testing.assert_array_equal(decoded.inputs["x"], array)
    assert decoded.outputs == () and decoded.binary_output is False and decoded.id is None


@pytest.mark.parametrize("datatype", ["INT8", "UINT16", "INT64", "FP16", "FP64", "BOOL"])
def test_raw_bodies_of_every_fixed_size_datatype(datatype: str) -> None:
    dtype = NUMPY_DTYPES[datatype]
    array = (np.arange(12) % 2).astype(dtype).reshape(6, 2)
    decoded = decode_request(array.tobytes(), 0, model(("x", datatype, (-1, 2))))
    np.testing.assert_array_equal(decoded.inputs["x"], array)


def test_a_raw_bytes_body_is_length_prefixed_elements() -> None:
    items = [b"a", b"", "é".encode(), b"xyz"]
    decoded = decode_request(strings(items), 0, model(("s", "BYTES", (-1,))))
    assert decoded.inputs["s"].tolist() == ["a", "", "é", "xyz"]


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"\x00" * 5, "does not fit input 'x' (FP32, shape [-1, 4]), which takes 4 elements"),
        (b"\x00" * 4 * 5, "does not fit input 'x'"),  # whole elements, not whole rows
        (b"\x00" * 4 * 4 * 3 + b"\x00\x00", "does not fit"),
    ],
    ids=["not-whole-elements", "not-whole-rows", "trailing-bytes"],
)
def test_a_raw_body_that_is_not_whole_rows_is_a_400(body: bytes, says: str) -> None:
    with pytest.raises(BadRequest) as exc:
        decode_request(body, 0, model(("x", "FP32", (-1, 4))))
    assert says in exc.value.message


def test_a_raw_body_for_a_fixed_shape_must_be_exactly_one_tensor() -> None:
    with pytest.raises(BadRequest) as exc:
        decode_request(b"\x00" * 4 * 24, 0, model(("x", "FP32", (3, 4))))
    assert "per request" in exc.value.message


def test_a_raw_body_for_a_model_with_several_inputs_is_a_400_naming_them() -> None:
    m = model(("a", "FP32", (-1, 2)), ("b", "INT64", (-1,)))
    with pytest.raises(BadRequest) as exc:
        decode_request(b"\x00" * 8, 0, m)
    assert "exactly one input" in exc.value.message and "'a', 'b'" in exc.value.message


def test_a_raw_body_cannot_size_two_dynamic_axes() -> None:
    with pytest.raises(BadRequest) as exc:
        decode_request(b"\x00" * 16, 0, model(("x", "FP32", (-1, -1))))
    assert "more than one dynamic axis" in exc.value.message


def test_raw_bodies_keep_the_row_element_and_memory_limits() -> None:
    m = model(("x", "FP32", (-1, 4)))
    body = b"\x00" * 4 * 4 * 10
    with pytest.raises(BadRequest, match="10 rows, above the limit of 9"):
        decode_request(body, 0, m, max_rows=9)
    with pytest.raises(BadRequest, match="40 elements, above the limit of 39"):
        decode_request(body, 0, m, max_elements=39)
    with pytest.raises(PayloadTooLarge, match="budget of 159 bytes"):
        decode_request(body, 0, m, budget=159)
    decode_request(body, 0, m, max_rows=10, max_elements=40, budget=160)


@pytest.mark.parametrize(
    "body",
    [strings([b"abc"])[:-1], b"\x01\x00", strings([b"a"]) + b"\xff\xff\xff\x7f"],
    ids=["short-element", "short-prefix", "huge-length"],
)
def test_a_raw_bytes_body_that_ends_inside_an_element_is_a_400(body: bytes) -> None:
    with pytest.raises(BadRequest, match="ends inside element"):
        decode_request(body, 0, model(("s", "BYTES", (-1,))))


def test_a_raw_bytes_body_counts_elements_against_the_limit_before_decoding() -> None:
    with pytest.raises(BadRequest, match="more than 100 BYTES elements"):
        decode_request(strings([b""] * 101), 0, model(("s", "BYTES", (-1,))), max_elements=100)


def test_json_request_docs_still_need_their_header() -> None:
    """A header length of 0 is the raw form, never an empty JSON header."""
    body = json.dumps({"inputs": []}).encode()
    with pytest.raises(BadRequest, match="does not fit"):
        decode_request(body, 0, model(("x", "FP32", (-1, 4))))
