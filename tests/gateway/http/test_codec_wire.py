"""gateway.http.codec, the wire forms of issue 16: raw binary requests, BYTES elements that are
not UTF-8, and non-finite floats in JSON outputs."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import orjson
import pytest
import tritonclient.http as triton  # type: ignore[import-untyped]

from gateway.errors import BadRequest, PayloadTooLarge
from gateway.http.codec import InferRequest, decode_request, encode_response
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


# -- NaN and ±Inf in JSON outputs ----------------------------------------------------------------
def encode(outputs: dict[str, np.ndarray], request_id: str = "r", binary: bool = False) -> bytes:
    request = InferRequest(None, {}, {}, (), binary)
    specs = {n: TensorSpec(n, DATATYPES[a.dtype.name], (-1,)) for n, a in outputs.items()}
    body, header_length = encode_response("m", "1", request_id, outputs, request, specs)
    assert header_length is None
    return body


DATATYPES = {"float16": "FP16", "float32": "FP32", "float64": "FP64", "int32": "INT32"}
SPECIALS = [1.5, np.nan, np.inf, -np.inf, 0.1, -0.0, 3e-5]


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_non_finite_outputs_are_json_tokens_that_python_and_tritonclient_read_back(
    dtype: str,
) -> None:
    values = np.array(SPECIALS, dtype=dtype)
    body = encode({"y": values, "n": np.arange(3, dtype=np.int32)})
    assert b"NaN" in body and b"-Infinity" in body and b"null" not in body
    parsed = np.array(json.loads(body)["outputs"][0]["data"], dtype=dtype)
    np.testing.assert_array_equal(parsed, values)
    assert np.signbit(parsed).tolist() == np.signbit(values).tolist()
    result = triton.InferResult.from_response_body(body)
    got = result.as_numpy("y")
    np.testing.assert_array_equal(got, values)  # NaN equal to NaN, the infinities by sign
    assert np.isposinf(got[2]) and np.isneginf(got[3])


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_finite_values_beside_non_finite_ones_are_written_as_for_a_finite_output(
    dtype: str,
) -> None:
    """The slow path writes finite values with the same text as the fast one (float32 as its
    shortest form, not as the float64 it widens to)."""
    finite = np.array([x for x in SPECIALS if np.isfinite(x)], dtype=dtype)
    mixed = np.concatenate([finite, np.array([np.inf], dtype=dtype)])
    fast = orjson.loads(encode({"y": finite}))["outputs"][0]["data"]
    slow = json.loads(encode({"y": mixed}))["outputs"][0]["data"]
    assert slow[:-1] == fast and slow[-1] == float("inf")
    text = encode({"y": mixed})
    assert orjson.dumps(finite, option=orjson.OPT_SERIALIZE_NUMPY)[1:-1] in text


def test_a_finite_response_quoting_null_is_unchanged() -> None:
    outputs = {"y": np.array([0.25, 2.0], dtype=np.float32)}
    body = encode(outputs, request_id="null")
    assert orjson.loads(body)["id"] == "null" and orjson.loads(body)["outputs"][0]["data"] == [
        0.25,
        2.0,
    ]


def test_non_finite_values_in_binary_outputs_are_left_alone() -> None:
    values = np.array(SPECIALS, dtype=np.float32)
    request = InferRequest(None, {}, {}, (), True)
    specs = {"y": TensorSpec("y", "FP32", (-1,))}
    body, header_length = encode_response("m", "1", "r", {"y": values}, request, specs)
    assert header_length is not None
    np.testing.assert_array_equal(np.frombuffer(body[header_length:], "<f4"), values)


def test_an_empty_or_large_output_with_specials() -> None:
    assert json.loads(encode({"y": np.array([], dtype=np.float32)}))["outputs"][0]["data"] == []
    big = np.random.default_rng(2).standard_normal(10_000).astype(np.float32)
    big[::97] = np.nan
    big[5::89] = -np.inf
    parsed = np.array(json.loads(encode({"y": big}))["outputs"][0]["data"], dtype=np.float32)
    np.testing.assert_array_equal(parsed, big)


# -- BYTES elements that are not UTF-8 -----------------------------------------------------------
NOT_UTF8 = [b"\xff\xfe", b"ok", b"", "é".encode(), b"\x80" * 300, b"caf\xe9"]


def binary_request(name: str, items: list[bytes], shape: list[int]) -> tuple[bytes, int]:
    section = strings(items)
    entry = {
        "name": name,
        "datatype": "BYTES",
        "shape": shape,
        "parameters": {"binary_data_size": len(section)},
    }
    head = orjson.dumps({"inputs": [entry]})
    return head + section, len(head)


def test_bytes_that_are_not_utf8_decode_exactly_to_a_fixed_width_bytes_array() -> None:
    body, length = binary_request("s", NOT_UTF8, [2, 3])
    decoded = decode_request(body, length, model(("s", "BYTES", (-1, 3))))
    array = decoded.inputs["s"]
    assert array.dtype == np.dtype("S301") and array.shape == (2, 3)
    assert array.ravel().tolist() == NOT_UTF8


def test_utf8_elements_still_decode_to_str() -> None:
    body, length = binary_request("s", [b"a\x00b", "é".encode()], [2])
    decoded = decode_request(body, length, model(("s", "BYTES", (-1,))))
    assert decoded.inputs["s"].dtype == object and decoded.inputs["s"].tolist() == ["a\x00b", "é"]


@pytest.mark.parametrize("items", [[b"\xff\x00"], [b"\xff", b"a\x00b"], [b"\x00", b"\xff"]])
def test_bytes_that_are_not_utf8_with_a_nul_byte_are_a_400(items: list[bytes]) -> None:
    body, length = binary_request("s", items, [len(items)])
    with pytest.raises(BadRequest) as exc:
        decode_request(body, length, model(("s", "BYTES", (-1,))))
    assert "is not UTF-8" in exc.value.message and "NUL" in exc.value.message


def test_the_fixed_width_copy_is_charged_to_the_budget() -> None:
    """One long element widens every element: 1,000 of them at 1,001 bytes each."""
    items = [b"\xff" * 1000] + [b"x"] * 999
    body, length = binary_request("s", items, [1000])
    m = model(("s", "BYTES", (-1,)))
    with pytest.raises(PayloadTooLarge):
        decode_request(body, length, m, budget=1000 * 1001)
    decode_request(body, length, m, budget=1000 * 1001 + 2000 + 1000 * 64)


def test_json_strings_must_be_utf8() -> None:
    body = b'{"inputs": [{"name": "s", "datatype": "BYTES", "shape": [1], "data": ["\xff"]}]}'
    with pytest.raises(BadRequest, match="malformed JSON"):
        decode_request(body, None, model(("s", "BYTES", (-1,))))


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json-asked"])
def test_bytes_outputs_round_trip_exactly_through_the_binary_extension(binary: bool) -> None:
    """What a model returns as bytes reaches tritonclient unchanged; asked for JSON, an output
    that is not UTF-8 goes binary all the same (JSON cannot carry it)."""
    body, length = binary_request("s", NOT_UTF8, [6])
    decoded = decode_request(body, length, model(("s", "BYTES", (-1,))))
    request = InferRequest(None, {}, {}, (), binary)
    specs = {"y": TensorSpec("y", "BYTES", (-1,))}
    out, header_length = encode_response("m", "1", "r", {"y": decoded.inputs["s"]}, request, specs)
    result = triton.InferResult.from_response_body(out, header_length=header_length)
    assert result.as_numpy("y").tolist() == NOT_UTF8


# -- sequence-batching parameters ----------------------------------------------------------------
def json_request(**parameters: object) -> bytes:
    entry = {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0.0] * 4}
    return orjson.dumps({"inputs": [entry], "parameters": parameters})


@pytest.mark.parametrize(
    ("parameters", "named"),
    [
        ({"sequence_id": 7}, "sequence_id"),
        ({"sequence_id": "corr-1"}, "sequence_id"),
        ({"sequence_start": True}, "sequence_start"),
        ({"sequence_end": True}, "sequence_end"),
        ({"sequence_id": 0, "sequence_end": True}, "sequence_end"),
        ({"sequence_id": 3, "sequence_start": True, "sequence_end": False}, "sequence_id"),
        ({"sequence_id": 1.5}, "sequence_id"),
        ({"sequence_start": "no"}, "sequence_start"),
    ],
)
def test_sequence_parameters_on_a_model_that_is_not_stateful_are_a_400_naming_them(
    parameters: dict[str, object], named: str
) -> None:
    with pytest.raises(BadRequest) as exc:
        decode_request(json_request(**parameters), None, model(("x", "FP32", (-1, 4))))
    assert exc.value.message.startswith(f"\"parameters.{named}\": model 'm' is not stateful")


@pytest.mark.parametrize(
    "parameters",
    [{"sequence_id": 0}, {"sequence_id": ""}, {"sequence_start": False, "sequence_end": False}],
)
def test_sequence_parameters_that_ask_for_no_sequence_pass(parameters: dict[str, object]) -> None:
    decode_request(json_request(**parameters), None, model(("x", "FP32", (-1, 4))))
