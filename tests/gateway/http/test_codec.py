from __future__ import annotations

import contextlib
import math
import re
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any, Literal

import numpy as np
import onnxruntime as ort
import orjson
import pytest
import tritonclient.http as triton  # type: ignore[import-untyped]
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper

from gateway.errors import BadRequest, GatewayError
from gateway.http.codec import (
    InferRequest,
    RequestedOutput,
    decode_request,
    encode_error,
    encode_response,
    output_names,
    parse_header_length,
)
from gateway.serving.types import NUMPY_DTYPES, ModelVersion, TensorSpec

DATATYPES = list(NUMPY_DTYPES)
FAST = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def version(inputs: list[TensorSpec], outputs: list[TensorSpec] | None = None) -> ModelVersion:
    return ModelVersion("m", "1", Path("m.onnx"), "0" * 64, tuple(inputs), tuple(outputs or []))


def one_input(datatype: str, shape: tuple[int, ...] = (-1, 3)) -> ModelVersion:
    return version([TensorSpec("x", datatype, shape)], [TensorSpec("y", datatype, shape)])


def request_body(inputs: list[dict[str, Any]], **top: Any) -> bytes:
    return orjson.dumps({**top, "inputs": inputs})


def asking(*outputs: RequestedOutput, binary_output: bool = False) -> InferRequest:
    return InferRequest(None, {}, {}, tuple(outputs), binary_output)


def sample(datatype: str) -> np.ndarray:
    """A (2, 3) array holding each datatype's extremes and awkward values."""
    dtype = NUMPY_DTYPES[datatype]
    if datatype == "BOOL":
        return np.array([[True, False, True], [False, False, True]])
    if datatype == "BYTES":
        return np.array([["", "a", "é"], ["\x00end\x00", "日本語", "x" * 100]], dtype=object)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        values = [info.min, info.max, 0, 1, info.max // 2 + 1, info.max - 1]
        return np.array(values, dtype=dtype).reshape(2, 3)
    info_f = np.finfo(dtype)
    values_f = [info_f.max, -info_f.max, info_f.smallest_subnormal, 0.1, -0.0, 1 / 3]
    return np.array(values_f, dtype=dtype).reshape(2, 3)


def assert_same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    if want.dtype == object:
        assert all(type(v) is str for v in got.ravel())
        assert got.tolist() == want.tolist()
    else:
        assert got.tobytes() == want.tobytes()  # bitwise: -0.0 and NaN payloads too


def response_as_request(body: bytes, header_length: int | None) -> tuple[bytes, int | None]:
    """Our response's output entries have exactly the request's input-entry layout."""
    head = body if header_length is None else body[:header_length]
    outputs = orjson.loads(head)["outputs"]
    for entry in outputs:
        entry["name"] = "x"
    new_head = orjson.dumps({"inputs": outputs})
    if header_length is None:
        return new_head, None
    return new_head + body[header_length:], len(new_head)


# -- round trips over every datatype -------------------------------------------------------------


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
@pytest.mark.parametrize("datatype", DATATYPES)
def test_json_round_trip(datatype: str, nested: bool) -> None:
    want = sample(datatype)
    data = want.tolist() if nested else want.ravel().tolist()
    body = request_body([{"name": "x", "shape": [2, 3], "datatype": datatype, "data": data}])
    decoded = decode_request(body, None, one_input(datatype))
    assert_same(decoded.inputs["x"], want)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("datatype", DATATYPES)
def test_decodes_what_tritonclient_sends(datatype: str, binary: bool) -> None:
    want = sample(datatype)
    tensor = triton.InferInput("x", [2, 3], datatype).set_data_from_numpy(want, binary_data=binary)
    asked = [triton.InferRequestedOutput("y", binary_data=not binary)]
    body, header_length = triton.InferenceServerClient.generate_request_body(
        [tensor], outputs=asked, request_id="r-1"
    )
    assert (header_length is not None) == binary
    decoded = decode_request(body, header_length, one_input(datatype))
    assert_same(decoded.inputs["x"], want)
    assert decoded.id == "r-1"
    assert decoded.outputs == (RequestedOutput("y", not binary),)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("datatype", DATATYPES)
def test_tritonclient_reads_our_response(datatype: str, binary: bool) -> None:
    want = sample(datatype)
    spec = TensorSpec("y", datatype, (-1, 3))
    body, header_length = encode_response(
        "m", "1", "r-1", {"y": want}, asking(RequestedOutput("y", binary)), {"y": spec}
    )
    assert (header_length is not None) == binary
    result = triton.InferResult.from_response_body(body, header_length=header_length)
    got = result.as_numpy("y")
    if datatype == "BYTES":
        # tritonclient hands back bytes for binary BYTES and str for JSON ones
        as_text = [v.decode() if isinstance(v, bytes) else v for v in got.ravel()]
        assert as_text == want.ravel().tolist()
        assert got.shape == want.shape
    else:
        assert_same(got, want)
    assert result.get_response()["id"] == "r-1"


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("datatype", DATATYPES)
def test_our_response_decodes_as_a_request(datatype: str, binary: bool) -> None:
    want = sample(datatype)
    body, header_length = encode_response(
        "m", "1", "r", {"y": want}, asking(RequestedOutput("y", binary)), {}
    )
    decoded = decode_request(*response_as_request(body, header_length), one_input(datatype))
    assert_same(decoded.inputs["x"], want)


def test_string_tensors_feed_onnxruntime() -> None:
    """The str convention is what onnxruntime's tensor(string) needs (bytes would be mangled)."""
    x = helper.make_tensor_value_info("x", TensorProto.STRING, [None])
    y = helper.make_tensor_value_info("y", TensorProto.STRING, [None])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx_model.ir_version = 9  # what this onnxruntime accepts
    session = ort.InferenceSession(
        onnx_model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    want = np.array(["a", "é", ""], dtype=object)
    tensor = triton.InferInput("x", [3], "BYTES").set_data_from_numpy(want, binary_data=True)
    body, header_length = triton.InferenceServerClient.generate_request_body([tensor])
    decoded = decode_request(body, header_length, one_input("BYTES", (-1,)))
    (got,) = session.run(["y"], decoded.inputs)
    assert got.tolist() == want.tolist()


def test_binary_arrays_are_aligned_and_contiguous_at_odd_offsets() -> None:
    model = version([TensorSpec("a", "INT8", (3,)), TensorSpec("b", "FP64", (2, 2))])
    a = np.array([1, 2, 3], dtype=np.int8)
    b = np.arange(4, dtype=np.float64).reshape(2, 2)
    tensors = [
        triton.InferInput("a", [3], "INT8").set_data_from_numpy(a),
        triton.InferInput("b", [2, 2], "FP64").set_data_from_numpy(b),
    ]
    body, header_length = triton.InferenceServerClient.generate_request_body(tensors)
    decoded = decode_request(body, header_length, model)
    for got, want in ((decoded.inputs["a"], a), (decoded.inputs["b"], b)):
        assert got.flags.aligned and got.flags.c_contiguous
        assert_same(got, want)


def test_mixes_json_and_binary_inputs_in_order() -> None:
    model = version([TensorSpec(n, "INT32", (-1,)) for n in "abc"])
    arrays = {n: np.arange(i, i + 3, dtype=np.int32) for i, n in enumerate("abc")}
    tensors = [
        triton.InferInput(n, [3], "INT32").set_data_from_numpy(arrays[n], binary_data=n != "b")
        for n in "abc"
    ]
    body, header_length = triton.InferenceServerClient.generate_request_body(tensors)
    decoded = decode_request(body, header_length, model)
    for n in "abc":
        assert_same(decoded.inputs[n], arrays[n])


def test_empty_and_scalar_tensors() -> None:
    model = version([TensorSpec("e", "FP32", (-1, 3)), TensorSpec("s", "BYTES", ())])
    body = request_body(
        [
            {"name": "e", "shape": [0, 3], "datatype": "FP32", "data": []},
            {"name": "s", "shape": [], "datatype": "BYTES", "data": ["only"]},
        ]
    )
    decoded = decode_request(body, None, model)
    assert_same(decoded.inputs["e"], np.empty((0, 3), dtype=np.float32))
    assert_same(decoded.inputs["s"], np.array("only", dtype=object))


def test_request_fields_and_defaults() -> None:
    model = one_input("FP32")
    plain = request_body([{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}])
    decoded = decode_request(plain, None, model)
    assert (decoded.id, decoded.parameters, decoded.outputs) == (None, {}, ())
    assert decoded.binary_output is False
    assert output_names(decoded, model) == ["y"]
    full = request_body(
        [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}],
        id="abc",
        parameters={"binary_data_output": True, "custom": [1]},
        outputs=[{"name": "y"}],
    )
    decoded = decode_request(full, None, model)
    assert (decoded.id, decoded.parameters) == ("abc", {"binary_data_output": True, "custom": [1]})
    assert decoded.outputs == (RequestedOutput("y", True),)
    assert output_names(decoded, model) == ["y"]


# -- decode errors -------------------------------------------------------------------------------

MODEL = version(
    [TensorSpec("x", "FP32", (-1, 3)), TensorSpec("n", "INT8", (2,))],
    [TensorSpec("y", "FP32", (-1,)), TensorSpec("z", "INT64", (-1,))],
)
X = {"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1.0, 2.0, 3.0]}
N = {"name": "n", "shape": [2], "datatype": "INT8", "data": [1, 2]}


def with_x(**changes: Any) -> bytes:
    return request_body([{**X, **changes}, N])


STRUCTURE_ERRORS = [
    pytest.param(b'{"inputs": [', "malformed JSON", id="truncated-json"),
    pytest.param(b"", "malformed JSON", id="empty-body"),
    pytest.param(b"\xff\xfe", "malformed JSON", id="not-utf8"),
    pytest.param(b"[1]", "must be a JSON object", id="body-array"),
    pytest.param(b"{}", '"inputs" must be a JSON array', id="no-inputs"),
    pytest.param(b'{"inputs": {}}', '"inputs" must be a JSON array', id="inputs-object"),
    pytest.param(b'{"inputs": [1]}', "inputs[0] must be a JSON object", id="input-not-object"),
    pytest.param(request_body([{**X, "name": 3}]), "string name", id="name-not-string"),
    pytest.param(request_body([X, N, {**X, "name": "q"}]), "unknown input 'q'", id="unknown"),
    pytest.param(request_body([X, N, X]), "'x' is given twice", id="duplicate"),
    pytest.param(request_body([X]), "missing input(s) 'n'", id="missing"),
    pytest.param(with_x(datatype="FP64"), "must be FP32, got 'FP64'", id="datatype"),
    pytest.param(with_x(datatype=None), "must be FP32, got None", id="datatype-null"),
    pytest.param(with_x(shape=3), "shape must be an array", id="shape-not-list"),
    pytest.param(with_x(shape=[-1, 3]), "non-negative integers", id="shape-negative"),
    pytest.param(with_x(shape=[1.0, 3]), "non-negative integers", id="shape-float"),
    pytest.param(with_x(shape=[True, 3]), "non-negative integers", id="shape-bool"),
    pytest.param(with_x(shape=["1", 3]), "non-negative integers", id="shape-string"),
    pytest.param(with_x(shape=[3]), "rank 1, the model expects rank 2", id="rank"),
    pytest.param(with_x(shape=[1, 4]), "at axis 1", id="fixed-dim"),
    pytest.param(with_x(data=[1.0, 2.0]), "has 2 elements but shape [1, 3] needs 3", id="count"),
    pytest.param(with_x(shape=[2, 3], data=[[1, 2, 3], [4, 5]]), "ragged", id="ragged-nested"),
    pytest.param(with_x(shape=[2, 3], data=[[1, 2, 3], 4, 5, 6]), "ragged", id="half-nested"),
    pytest.param(with_x(shape=[2, 3], data=[[1, 2, 3]]), "does not match shape", id="outer"),
    pytest.param(with_x(data=[1, [2], 3]), "got array", id="list-in-flat"),
    pytest.param(with_x(data=5), "data must be a JSON array", id="data-scalar"),
    pytest.param(with_x(data=None), "neither data nor", id="no-data"),
    pytest.param(with_x(parameters=[]), "parameters must be a JSON object", id="input-params"),
    pytest.param(
        with_x(parameters={"shared_memory_region": "r"}), "shared memory", id="shared-memory"
    ),
    pytest.param(
        with_x(data=None, parameters={"binary_data_size": 12}),
        "no Inference-Header-Content-Length",
        id="binary-without-header",
    ),
    pytest.param(
        request_body([X, N], parameters=[1]), '"parameters" must be a JSON object', id="params"
    ),
    pytest.param(
        request_body([X, N], parameters={"binary_data_output": 1}),
        "binary_data_output",
        id="binary-output-not-bool",
    ),
    pytest.param(request_body([X, N], id=5), '"id" must be a string', id="id-number"),
    pytest.param(request_body([X, N], outputs={}), '"outputs" must be a JSON array', id="outs"),
    pytest.param(request_body([X, N], outputs=[3]), "outputs[0] must be", id="out-not-object"),
    pytest.param(
        request_body([X, N], outputs=[{"name": "w"}]), "unknown output 'w'", id="unknown-out"
    ),
    pytest.param(
        request_body([X, N], outputs=[{"name": "y"}, {"name": "y"}]),
        "requested twice",
        id="duplicate-out",
    ),
    pytest.param(
        request_body([X, N], outputs=[{"name": "y", "parameters": {"binary_data": "yes"}}]),
        "binary_data must be true or false",
        id="out-binary-not-bool",
    ),
    pytest.param(
        request_body([X, N], outputs=[{"name": "y", "parameters": {"classification": 2}}]),
        "classification",
        id="classification",
    ),
]


@pytest.mark.parametrize(("body", "fragment"), STRUCTURE_ERRORS)
def test_structure_errors(body: bytes, fragment: str) -> None:
    with pytest.raises(BadRequest) as caught:
        decode_request(body, None, MODEL)
    assert fragment in caught.value.message
    assert caught.value.status == 400


VALUE_ERRORS = [
    pytest.param("FP32", '["1.5"]', "FP32 data must be numbers, got string '1.5'", id="fp-str"),
    pytest.param("FP32", "[true]", "got boolean", id="fp-bool"),
    pytest.param("FP64", "[null]", "got null", id="fp-null"),
    pytest.param("INT32", "[1.5]", "must be integers, got float 1.5", id="int-float"),
    pytest.param("INT32", "[1.0]", "must be integers", id="int-float-whole"),
    pytest.param("INT64", "[false]", "got boolean", id="int-bool"),
    pytest.param("INT16", '[{"a": 1}]', "got object", id="int-object"),
    pytest.param("BOOL", "[1]", "BOOL data must be true/false, got integer", id="bool-int"),
    pytest.param("BOOL", '["true"]', "got string", id="bool-str"),
    pytest.param("BYTES", "[1]", "BYTES data must be strings, got integer", id="bytes-int"),
    pytest.param("INT8", "[300]", "300 is out of range for INT8 [-128, 127]", id="int8-high"),
    pytest.param("INT8", "[-129]", "out of range for INT8", id="int8-low"),
    pytest.param("UINT8", "[-1]", "-1 is out of range for UINT8", id="uint8-negative"),
    pytest.param("UINT16", "[65536]", "out of range for UINT16", id="uint16-high"),
    pytest.param("INT64", "[9223372036854775808]", "out of range for INT64", id="int64-2^63"),
    pytest.param("UINT64", "[-1, 9223372036854775808]", "-1 is out of range", id="uint64-mix"),
    # orjson reads integers beyond 64 bits as floats
    pytest.param("UINT64", "[18446744073709551616]", "must be integers", id="uint64-2^64"),
    pytest.param("FP16", "[1, 70000]", "70000 overflows FP16", id="fp16-overflow"),
    pytest.param("FP32", "[1e39]", "1e+39 overflows FP32", id="fp32-overflow"),
    pytest.param("FP64", "[1e400]", "malformed JSON", id="fp64-infinite-literal"),
]


@pytest.mark.parametrize(("datatype", "data", "fragment"), VALUE_ERRORS)
def test_value_errors(datatype: str, data: str, fragment: str) -> None:
    count = data.count(",") + 1
    body = (
        f'{{"inputs": [{{"name": "x", "shape": [{count}], "datatype": "{datatype}", '
        f'"data": {data}}}]}}'
    ).encode()
    with pytest.raises(BadRequest) as caught:
        decode_request(body, None, one_input(datatype, (-1,)))
    assert fragment in caught.value.message


def test_uint64_mixing_int64_and_uint64_ranges_decodes() -> None:
    entry = b'{"name": "x", "shape": [2], "datatype": "UINT64", "data": [1, 9223372036854775808]}'
    body = b'{"inputs": [' + entry + b"]}"
    decoded = decode_request(body, None, one_input("UINT64", (-1,)))
    assert decoded.inputs["x"].tolist() == [1, 2**63]


def test_element_limit_is_checked_from_the_shape() -> None:
    body = with_x(shape=[10**12, 3], data=[])
    with pytest.raises(BadRequest, match="above the limit of 1000"):
        decode_request(body, None, MODEL, max_elements=1000)


def binary_body(entries: list[dict[str, Any]], tail: bytes) -> tuple[bytes, int]:
    head = orjson.dumps({"inputs": entries})
    return head + tail, len(head)


def raw_entry(name: str, datatype: str, shape: list[int], size: int) -> dict[str, Any]:
    return {
        "name": name,
        "shape": shape,
        "datatype": datatype,
        "parameters": {"binary_data_size": size},
    }


def strings(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


F32 = np.arange(3, dtype=np.float32).tobytes()
BINARY_ERRORS = [
    pytest.param("FP32", [raw_entry("x", "FP32", [3], 12)], F32[:8], "binary section", id="short"),
    pytest.param(
        "FP32", [raw_entry("x", "FP32", [3], 12)], F32 + b"!", "binary section", id="long"
    ),
    pytest.param("FP32", [raw_entry("x", "FP32", [3], 8)], F32[:8], "take 12 bytes", id="size"),
    pytest.param("FP32", [raw_entry("x", "FP32", [3], -1)], b"", "non-negative", id="negative"),
    pytest.param("FP32", [raw_entry("x", "FP32", [3], True)], F32, "non-negative", id="bool-size"),
    pytest.param(
        "FP32",
        [{**raw_entry("x", "FP32", [3], 12), "data": [1, 2, 3]}],
        F32,
        "both data and",
        id="both",
    ),
    pytest.param(
        "FP32", [{"name": "x", "shape": [3], "datatype": "FP32"}], b"", "neither", id="none"
    ),
    pytest.param(
        "FP32",
        [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2, 3]}],
        b"\x00",
        "binary section",
        id="tail-without-binary-inputs",
    ),
    pytest.param("BOOL", [raw_entry("x", "BOOL", [2], 2)], b"\x01\x02", "0 or 1", id="bool-2"),
    pytest.param(
        "BYTES", [raw_entry("x", "BYTES", [2], 4)], b"\x00" * 4, "too small", id="bytes-small"
    ),
    pytest.param(
        "BYTES",
        [raw_entry("x", "BYTES", [1], 6)],
        struct.pack("<I", 10) + b"ab",
        "ends inside element 0",
        id="bytes-cut",
    ),
    pytest.param(
        "BYTES",
        [raw_entry("x", "BYTES", [2], 10)],
        strings(b"a") + struct.pack("<I", 5) + b"b",
        "ends inside element 1",
        id="bytes-cut-late",
    ),
    pytest.param(
        "BYTES",
        [raw_entry("x", "BYTES", [1], 8)],
        strings(b"a") + b"xyz",
        "3 bytes remain",
        id="bytes-extra",
    ),
    pytest.param(
        "BYTES",
        [raw_entry("x", "BYTES", [1], 6)],
        strings(b"\xff\x00"),
        "NUL byte",
        id="bytes-not-utf8-with-nul",
    ),
]


@pytest.mark.parametrize(("datatype", "entries", "tail", "fragment"), BINARY_ERRORS)
def test_binary_errors(
    datatype: str, entries: list[dict[str, Any]], tail: bytes, fragment: str
) -> None:
    body, header_length = binary_body(entries, tail)
    with pytest.raises(BadRequest) as caught:
        decode_request(body, header_length, one_input(datatype, (-1,)))
    assert fragment in caught.value.message


@pytest.mark.parametrize("header_length", [-1, 10_000], ids=["negative", "beyond-body"])
def test_header_length_outside_the_body(header_length: int) -> None:
    with pytest.raises(BadRequest, match="Inference-Header-Content-Length"):
        decode_request(with_x(), header_length, MODEL)


@pytest.mark.parametrize(("value", "expected"), [(None, None), ("0", 0), ("152", 152), (" 7 ", 7)])
def test_parse_header_length(value: str | None, expected: int | None) -> None:
    assert parse_header_length(value) == expected


@pytest.mark.parametrize("value", ["", "-1", "1.5", "abc", "+5", "1_0", "١٢", "0x10"])
def test_parse_header_length_rejects(value: str) -> None:
    with pytest.raises(BadRequest, match=r"^Inference-Header-Content-Length: must be an integer"):
        parse_header_length(value)


def test_header_length_from_the_header_decodes_binary() -> None:
    tensor = triton.InferInput("x", [1, 3], "FP32").set_data_from_numpy(
        np.ones((1, 3), dtype=np.float32)
    )
    body, header_length = triton.InferenceServerClient.generate_request_body([tensor])
    decoded = decode_request(body, parse_header_length(str(header_length)), one_input("FP32"))
    assert decoded.inputs["x"].tolist() == [[1.0, 1.0, 1.0]]


# -- encoding ------------------------------------------------------------------------------------

SPECS = {"y": TensorSpec("y", "FP32", (-1,)), "z": TensorSpec("z", "INT64", (-1,))}
OUTS: dict[str, np.ndarray] = {
    "z": np.array([7, 8], dtype=np.int64),
    "y": np.array([0.5], dtype=np.float32),
}


def test_outputs_follow_the_request_order_and_flags() -> None:
    request = asking(RequestedOutput("z", False), RequestedOutput("y", True), binary_output=True)
    body, header_length = encode_response("m", "1", "r", OUTS, request, SPECS)
    assert header_length is not None
    head = orjson.loads(body[:header_length])
    assert head == {
        "model_name": "m",
        "model_version": "1",
        "id": "r",
        "outputs": [
            {"name": "z", "datatype": "INT64", "shape": [2], "data": [7, 8]},
            {"name": "y", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 4}},
        ],
    }
    assert body[header_length:] == OUTS["y"].tobytes()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_all_outputs_in_model_order_with_the_request_level_flag(binary: bool) -> None:
    body, header_length = encode_response("m", "1", "r", OUTS, asking(binary_output=binary), SPECS)
    result = triton.InferResult.from_response_body(body, header_length=header_length)
    outputs = result.get_response()["outputs"]
    assert [o["name"] for o in outputs] == ["y", "z"]
    assert all(("data" in o) != binary for o in outputs)
    assert (header_length is not None) == binary
    assert result.as_numpy("z").tolist() == [7, 8]


def test_parameters_appear_only_when_given() -> None:
    request = asking(RequestedOutput("y", False))
    plain, _ = encode_response("m", "1", "r", OUTS, request, SPECS)
    assert "parameters" not in orjson.loads(plain)
    given_, _ = encode_response("m", "1", "r", OUTS, request, SPECS, parameters={"k": 1})
    assert orjson.loads(given_)["parameters"] == {"k": 1}


def test_output_datatype_from_the_spec_else_the_array() -> None:
    outputs = {"y": np.array([1.5, 2.5]), "w": np.array(["a", "b"]), "v": np.array([True])}
    request = asking(*(RequestedOutput(n, False) for n in ("y", "w", "v")))
    body, _ = encode_response("m", "1", "r", outputs, request, SPECS)
    entries = orjson.loads(body)["outputs"]
    assert [(e["datatype"], e["data"]) for e in entries] == [
        ("FP32", [1.5, 2.5]),
        ("BYTES", ["a", "b"]),
        ("BOOL", [True]),
    ]


def test_nested_input_arrays_and_non_contiguous_outputs_encode_flat() -> None:
    wide = np.arange(12, dtype=np.int64).reshape(3, 4)[:, ::2]
    request = asking(RequestedOutput("z", False))
    body, _ = encode_response("m", "1", "r", {"z": wide}, request, SPECS)
    entry = orjson.loads(body)["outputs"][0]
    assert (entry["shape"], entry["data"]) == ([3, 2], [0, 2, 4, 6, 8, 10])


def test_non_utf8_bytes_output_goes_binary() -> None:
    values = np.array([b"\xff\x00", b"ok"], dtype=object)
    body, header_length = encode_response(
        "m", "1", "r", {"s": values}, asking(RequestedOutput("s", False)), {}
    )
    assert header_length is not None
    got = triton.InferResult.from_response_body(body, header_length=header_length).as_numpy("s")
    assert got.tolist() == [b"\xff\x00", b"ok"]


def test_bytes_output_as_json_text() -> None:
    values = np.array([b"caf\xc3\xa9", "x"], dtype=object)
    body, header_length = encode_response(
        "m", "1", "r", {"s": values}, asking(RequestedOutput("s", False)), {}
    )
    assert header_length is None
    assert orjson.loads(body)["outputs"][0]["data"] == ["café", "x"]


def test_non_finite_json_outputs_are_triton_tokens() -> None:
    """test_codec_wire.py tests them in full."""
    values = np.array([np.nan, np.inf, 1.0], dtype=np.float32)
    body, _ = encode_response("m", "1", "r", {"y": values}, asking(RequestedOutput("y", False)), {})
    assert b'"data":[NaN,Infinity,1.0]' in body


@pytest.mark.parametrize(
    "outputs",
    [{}, {"y": np.array([1 + 2j])}, {"y": np.array([object()], dtype=object)}],
    ids=["missing", "complex", "foreign-object"],
)
def test_model_faults_are_server_errors(outputs: dict[str, np.ndarray]) -> None:
    with pytest.raises(GatewayError) as caught:
        encode_response("m", "1", "r", outputs, asking(RequestedOutput("y", False)), {})
    assert caught.value.status == 500


def test_encode_error() -> None:
    message = 'bad "input" \\ é \ud800'
    decoded = orjson.loads(encode_error(message))
    assert list(decoded) == ["error"]
    assert decoded["error"].startswith('bad "input" \\ é ')


# -- properties ----------------------------------------------------------------------------------

FLOAT_WIDTHS: dict[int, Literal[16, 32, 64]] = {2: 16, 4: 32, 8: 64}
SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)


@st.composite
def tensors(draw: st.DrawFn) -> tuple[np.ndarray, str, bool]:
    """A random array, its datatype and a binary flag; JSON cannot carry NaN or infinities."""
    datatype = draw(st.sampled_from(DATATYPES))
    binary = draw(st.booleans())
    dtype = NUMPY_DTYPES[datatype]
    elements: st.SearchStrategy[Any] | None = None
    if datatype == "BYTES":
        elements = st.text(max_size=6)
    elif dtype.kind == "f":
        elements = st.floats(
            width=FLOAT_WIDTHS[dtype.itemsize], allow_nan=binary, allow_infinity=binary
        )
    array = draw(hnp.arrays(dtype, SHAPES, elements=elements))
    return array, datatype, binary


def model_for(array: np.ndarray, datatype: str) -> ModelVersion:
    return one_input(datatype, (-1,) * array.ndim)


@FAST
@given(tensors())
def test_property_encode_then_decode(tensor: tuple[np.ndarray, str, bool]) -> None:
    array, datatype, binary = tensor
    body, header_length = encode_response(
        "m", "1", "r", {"y": array}, asking(RequestedOutput("y", binary)), {}
    )
    decoded = decode_request(*response_as_request(body, header_length), model_for(array, datatype))
    assert_same(decoded.inputs["x"], array)


@FAST
@given(tensors())
def test_property_tritonclient_both_ways(tensor: tuple[np.ndarray, str, bool]) -> None:
    array, datatype, binary = tensor
    shape = list(array.shape)
    sent = triton.InferInput("x", shape, datatype).set_data_from_numpy(array, binary_data=binary)
    body, header_length = triton.InferenceServerClient.generate_request_body([sent])
    decoded = decode_request(body, header_length, model_for(array, datatype))
    assert_same(decoded.inputs["x"], array)
    spec = TensorSpec("y", datatype, (-1,) * array.ndim)
    body, header_length = encode_response(
        "m", "1", "r", {"y": array}, asking(RequestedOutput("y", binary)), {"y": spec}
    )
    got = triton.InferResult.from_response_body(body, header_length=header_length).as_numpy("y")
    if datatype == "BYTES":
        assert [
            v.decode() if isinstance(v, bytes) else v for v in got.ravel()
        ] == array.ravel().tolist()
        assert got.shape == array.shape
    else:
        assert_same(got, array)


def decodes_or_refuses(body: bytes, header_length: int | None, model: ModelVersion) -> None:
    try:
        decoded = decode_request(body, header_length, model)
    except BadRequest as exc:
        assert exc.message
    else:
        assert set(decoded.inputs) == {spec.name for spec in model.inputs}


@FAST
@given(st.binary(max_size=300), st.none() | st.integers(-2, 310))
def test_property_garbage_is_a_bad_request(body: bytes, header_length: int | None) -> None:
    decodes_or_refuses(body, header_length, MODEL)


JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)  # what orjson can write
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=4)
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=12,
)
TYPED_LEAVES: dict[str, st.SearchStrategy[Any]] = {
    **{t: st.integers(-(2**63), 2**64 - 1) | st.integers(-300, 300) for t in DATATYPES},
    **{t: st.floats(allow_nan=False, allow_infinity=False) for t in ("FP16", "FP32", "FP64")},
    "BOOL": st.booleans(),
    "BYTES": st.text(max_size=4),
}


MUTATIONS = ["value", "ragged", "field", "drop-field", "top", "duplicate", "drop"]


def as_binary(x: dict[str, Any], data: st.DataObject) -> bytes:
    """Move x's data to a binary section of about the right size; returns that section."""
    size = math.prod(x["shape"]) * NUMPY_DTYPES[x["datatype"]].itemsize
    tail = data.draw(st.binary(min_size=size, max_size=size) | st.binary(max_size=size + 8))
    declared = st.sampled_from([len(tail), len(tail) + 1, len(tail) - 1]) | JSON_LEAVES
    x["parameters"] = {"binary_data_size": data.draw(declared)}
    del x["data"]
    return tail


def mutate(doc: dict[str, Any], x: dict[str, Any], data: st.DataObject) -> None:
    """Break one thing in a request, in place."""
    kind = data.draw(st.sampled_from(MUTATIONS))
    values = x.get("data")
    inputs = doc["inputs"] if isinstance(doc["inputs"], list) else []
    entries = [e for e in inputs if isinstance(e, dict)] or [x]
    if kind in ("value", "ragged") and isinstance(values, list) and values:
        row = data.draw(st.sampled_from(values)) if isinstance(values[0], list) else values
        if row and kind == "value":
            row[data.draw(st.integers(0, len(row) - 1))] = data.draw(JSON_LEAVES)
        elif row:
            row.pop()
    elif kind in ("field", "drop-field"):
        entry = data.draw(st.sampled_from(entries))
        key = data.draw(st.sampled_from(["name", "shape", "datatype", "data", "parameters"]))
        if kind == "field":
            entry[key] = data.draw(JSON_VALUES)
        else:
            entry.pop(key, None)
    elif kind == "top":
        key = data.draw(st.sampled_from(["inputs", "outputs", "parameters", "id"]))
        doc[key] = data.draw(JSON_VALUES)
    elif kind == "duplicate":
        doc["inputs"] = [*entries, data.draw(st.sampled_from(entries))]
    elif kind == "drop":
        doc["inputs"] = entries[1:]


@FAST
@given(st.sampled_from(DATATYPES), st.data())
def test_property_near_miss_requests_are_bad_requests(datatype: str, data: st.DataObject) -> None:
    """Valid requests with a few things broken, so the garbage reaches every check."""
    model = version(
        [TensorSpec("x", datatype, (-1, 3)), TensorSpec("n", "INT8", (2,))],
        [TensorSpec("y", "FP32", (-1,))],
    )
    rows = data.draw(st.integers(0, 2))
    values = data.draw(st.lists(TYPED_LEAVES[datatype], min_size=3 * rows, max_size=3 * rows))
    if data.draw(st.booleans()):
        values = [values[i : i + 3] for i in range(0, len(values), 3)]
    x = {"name": "x", "shape": [rows, 3], "datatype": datatype, "data": values}
    doc: dict[str, Any] = {"inputs": [x, dict(N)], "outputs": [{"name": "y"}]}
    tail = as_binary(x, data) if data.draw(st.booleans()) else b""
    for _ in range(data.draw(st.integers(0, 2))):
        mutate(doc, x, data)
    head = orjson.dumps(doc, option=orjson.OPT_NON_STR_KEYS)
    header_length = data.draw(st.sampled_from([len(head), None] if not tail else [len(head)]))
    decodes_or_refuses(head + tail, header_length, model)


@FAST
@given(tensors(), st.data())
def test_property_cut_or_misframed_bodies_are_bad_requests(
    tensor: tuple[np.ndarray, str, bool], data: st.DataObject
) -> None:
    array, datatype, _ = tensor
    sent = triton.InferInput("x", list(array.shape), datatype).set_data_from_numpy(array)
    body, header_length = triton.InferenceServerClient.generate_request_body([sent])
    cut = data.draw(st.integers(0, len(body)))
    shift = data.draw(st.integers(-3, 3))
    new_length = None if header_length is None else max(0, header_length + shift)
    model = model_for(array, datatype)
    decodes_or_refuses(body[:cut], new_length, model)
    # the exact body with the exact header length is the only framing guaranteed to decode
    if cut == len(body) and shift == 0:
        assert_same(decode_request(body, header_length, model).inputs["x"], array)


# -- properties: nesting, limits, oversized bodies, the binary header ----------------------------


def nest(values: list[Any], dims: list[int]) -> list[Any]:
    """Group ``values`` into lists of ``dims[-1]``, then of ``dims[-2]``, ... (row-major)."""
    for d in reversed(dims):
        values = [values[i : i + d] for i in range(0, len(values), d)]
    return values


@FAST
@given(tensors(), st.data())
def test_property_data_is_flat_or_nested_exactly_to_the_shape(
    tensor: tuple[np.ndarray, str, bool], data: st.DataObject
) -> None:
    array, datatype, binary = tensor
    assume(not binary)  # JSON: no NaN or infinities
    values = array.ravel().tolist()
    n = len(values)
    divisors = [d for d in range(1, n + 1) if n % d == 0] if n else [1]
    dims = data.draw(st.lists(st.sampled_from(divisors), max_size=3))
    if math.prod(dims) > max(n, 1) or (dims and n % math.prod(dims)):
        dims = []
    x = {"name": "x", "shape": list(array.shape), "datatype": datatype, "data": nest(values, dims)}
    model = model_for(array, datatype)
    exact = dims == list(array.shape[1:])
    if not dims or exact or n == 0:
        # flat, or exactly the shape's nesting (an empty tensor has no nesting to get wrong)
        try:
            assert_same(decode_request(request_body([x]), None, model).inputs["x"], array)
        except BadRequest:
            assert n == 0 and dims  # [[]] for an empty tensor is refused: a non-empty level
        return
    with pytest.raises(BadRequest, match="'x'"):
        decode_request(request_body([x]), None, model)


NEST_FIELDS = [
    '{"id": %s, "inputs": [X, N]}',
    '{"parameters": {"k": %s}, "inputs": [X, N]}',
    '{"unknown": %s, "inputs": [X, N]}',
    '{"inputs": [X, N], "outputs": [{"name": %s}]}',
    '{"inputs": [X, N], "outputs": [{"name": "y", "parameters": %s}]}',
    '{"inputs": [{"name": %s, "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}, N]}',
    '{"inputs": [{"name": "x", "shape": %s, "datatype": "FP32", "data": [1, 2, 3]}, N]}',
    '{"inputs": [{"name": "x", "shape": [1, 3], "datatype": %s, "data": [1, 2, 3]}, N]}',
    '{"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": %s}, N]}',
    '{"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, %s]}, N]}',
    '{"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3], '
    '"parameters": {"binary_data_size": %s}}, N]}',
]


@FAST
@given(st.sampled_from(NEST_FIELDS), st.integers(1, 1030), st.sampled_from("[{"), st.booleans())
def test_property_deep_nesting_anywhere_is_decoded_or_a_bad_request(
    template: str, depth: int, bracket: str, binary: bool
) -> None:
    """Up to orjson's cap of 1024 levels and past it, in every field: values are quoted in
    error messages, so a repr that recursed would end in RecursionError (a 500)."""
    deep = ('{"k": ' * depth + "1" + "}" * depth) if bracket == "{" else "[" * depth + "]" * depth
    x, n = orjson.dumps(X).decode(), orjson.dumps(N).decode()
    head = (template % deep).replace("X", x).replace("N", n).encode()
    with few_frames_left(200):
        decodes_or_refuses(head, len(head) if binary else None, MODEL)


@contextlib.contextmanager
def few_frames_left(spare: int) -> Iterator[None]:
    """Lower the recursion limit to ``spare`` frames above this one. Hypothesis raises the limit
    while a test runs, the gateway runs with Python's default of 1000: without this, a
    recursive repr of a 1000-level value passes here and is a RecursionError there."""
    depth = 0
    frame: FrameType | None = sys._getframe()
    while frame is not None:
        depth, frame = depth + 1, frame.f_back
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(depth + spare)
    try:
        yield
    finally:
        sys.setrecursionlimit(limit)


@FAST
@given(
    st.sampled_from(DATATYPES),
    st.lists(st.integers(0, 2**40) | st.integers(0, 70), min_size=1, max_size=4),
    st.integers(1, 5000),
    st.integers(1, 100),
    st.booleans(),
)
def test_property_element_and_row_limits_hold_before_any_allocation(
    datatype: str, shape: list[int], max_elements: int, max_rows: int, binary: bool
) -> None:
    """Shapes of up to 2**160 elements declared with no data behind them: refused from the
    shape alone, element limit first, then rows; within both, the missing data is the error."""
    model = one_input(datatype, (-1,) * len(shape))
    count = math.prod(shape)
    x: dict[str, Any] = {"name": "x", "shape": shape, "datatype": datatype}
    if binary:
        size = min(count * (4 if datatype == "BYTES" else NUMPY_DTYPES[datatype].itemsize), 2**63)
        body, header_length = binary_body([{**x, "parameters": {"binary_data_size": size}}], b"")
    else:
        body, header_length = request_body([{**x, "data": []}]), None
    if count > max_elements:
        fragment = f"has {count} elements, above the limit of {max_elements}"
    elif max(shape) > max_elements:
        fragment = f"has an axis of {max(shape)}, above the limit of {max_elements} elements"
    elif shape[0] > max_rows:
        fragment = f"{shape[0]} rows, above the limit of {max_rows}"
    elif count == 0:
        decoded = decode_request(body, header_length, model, max_elements, max_rows)
        assert decoded.inputs["x"].shape == tuple(shape)
        return
    else:
        fragment = "binary section" if binary else "data has 0 elements"
    with pytest.raises(BadRequest, match=re.escape(fragment)):
        decode_request(body, header_length, model, max_elements, max_rows)


@FAST
@given(tensors(), st.binary(min_size=1, max_size=64))
def test_property_a_binary_section_longer_than_declared_is_refused(
    tensor: tuple[np.ndarray, str, bool], extra: bytes
) -> None:
    array, datatype, _ = tensor
    sent = triton.InferInput("x", list(array.shape), datatype)
    sent.set_data_from_numpy(array, binary_data=True)
    body, header_length = triton.InferenceServerClient.generate_request_body([sent])
    with pytest.raises(BadRequest, match=r"binary section|bytes remain"):
        decode_request(body + extra, header_length, model_for(array, datatype))


@FAST
@given(st.text(max_size=24) | st.from_regex(r"[ \t]*[0-9]{1,30}[ \t]*", fullmatch=True))
def test_property_the_header_length_header_is_a_number_or_a_bad_request(value: str) -> None:
    try:
        parsed = parse_header_length(value)
    except BadRequest as exc:
        assert exc.message.startswith("Inference-Header-Content-Length: ")
        text = value.strip()
        digits = text.isascii() and text.isdigit()
        assert not digits or len(text) > 19 or int(text) > 1 << 62
    else:
        assert parsed == int(value.strip()) and parsed >= 0


@FAST
@given(tensors(), st.text(max_size=12) | st.integers(-5, 10**6).map(str))
def test_property_any_header_value_on_a_binary_body_decodes_or_is_refused(
    tensor: tuple[np.ndarray, str, bool], value: str
) -> None:
    array, datatype, _ = tensor
    sent = triton.InferInput("x", list(array.shape), datatype)
    sent.set_data_from_numpy(array, binary_data=True)
    body, _ = triton.InferenceServerClient.generate_request_body([sent])
    try:
        header_length = parse_header_length(value)
    except BadRequest:
        return
    decodes_or_refuses(body, header_length, model_for(array, datatype))
