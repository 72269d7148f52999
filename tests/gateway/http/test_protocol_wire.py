"""Request and response encodings end to end (issue 16, items 3-6 and sequence parameters): a real
gateway, real tritonclient where it sends the form, raw httpx where it does not."""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import orjson
import pytest
import tritonclient.http as tc  # type: ignore[import-untyped]
from onnx import TensorProto, helper, numpy_helper

from gateway.demo import sample_inputs
from gateway.http.inflate import ACCEPTED, ON_LOOP
from tests.gateway.http.test_inflate import gzip_of_zeros
from tests.gateway.http.test_server import (
    infer_with_triton,
    json_body,
    output_array,
    reference_outputs,
)
from tests.support.server import GatewayServer, InProcessServer

INFER = "/v2/models/fraud/versions/1/infer"


def error_of(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    message: str = r.json()["error"]
    return message


# -- compressed requests (item 3) ----------------------------------------------------------------
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_tritonclient_compressed_requests(
    server: GatewayServer, demo_repo: Path, algorithm: str, binary: bool
) -> None:
    inputs = sample_inputs("risk", 5, seed=21)
    result = infer_with_triton(
        server, "risk", inputs, binary, request_compression_algorithm=algorithm
    )
    for name, array in reference_outputs(demo_repo, "risk", "1", inputs).items():
        np.testing.assert_array_equal(result.as_numpy(name), array)


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [
        ("x-gzip", gzip.compress),
        ("GZIP", gzip.compress),
        ("identity", lambda b: b),
        ("deflate", lambda b: zlib.compress(b)[2:-4]),  # raw deflate, as some clients send it
    ],
    ids=["x-gzip", "upper-case", "identity", "raw-deflate"],
)
def test_other_spellings_of_the_codings(
    server: GatewayServer, demo_repo: Path, encoding: str, compress: Any
) -> None:
    inputs = sample_inputs("fraud", 2, seed=3)
    r = httpx.post(
        server.url + INFER,
        content=compress(json_body(inputs)),
        headers={"Content-Encoding": encoding},
    )
    assert r.status_code == 200, r.text
    expected = reference_outputs(demo_repo, "fraud", "1", inputs)["probability"]
    np.testing.assert_array_equal(output_array(r.json(), "probability"), expected)


def test_a_large_compressed_body_is_inflated_off_the_loop_and_answered(
    server: GatewayServer, demo_repo: Path
) -> None:
    """2 MB of JSON inflated: past ON_LOOP, so the rest is inflated on the decode pool."""
    inputs = sample_inputs("fraud", 4000, seed=9)
    body = json_body(inputs)
    assert len(body) > 3 * ON_LOOP // 2
    r = httpx.post(
        server.url + INFER, content=gzip.compress(body), headers={"Content-Encoding": "gzip"}
    )
    assert r.status_code == 200, r.text
    expected = reference_outputs(demo_repo, "fraud", "1", inputs)["probability"]
    np.testing.assert_allclose(output_array(r.json(), "probability"), expected, rtol=1e-6)


def test_a_streamed_gzip_bomb_gets_413_and_the_gateway_keeps_serving(
    server: GatewayServer,
) -> None:
    """1 GiB of zeros in about 1 MB of gzip, streamed: cut off at the 16 MiB cap."""

    def bomb() -> Iterator[bytes]:
        yield from gzip_of_zeros(1 << 30)

    r = httpx.post(server.url + INFER, content=bomb(), headers={"Content-Encoding": "gzip"})
    assert "inflates to more than the limit of" in error_of(r, 413)
    ok = httpx.post(server.url + INFER, content=json_body(sample_inputs("fraud", 1, seed=1)))
    assert ok.status_code == 200


def test_the_cap_and_the_decoded_budget_apply_to_the_inflated_body(demo_repo: Path) -> None:
    small = json_body(sample_inputs("fraud", 3, seed=2))  # 384 bytes decoded
    large = json_body(sample_inputs("fraud", 10, seed=2))  # 1,280 bytes decoded
    args = ["--max-body-bytes", str(len(large)), "--max-decoded-bytes", "1024"]
    with InProcessServer(demo_repo, args=args) as gateway:
        gz = {"Content-Encoding": "gzip"}
        r = httpx.post(gateway.url + INFER, content=gzip.compress(small), headers=gz)
        assert r.status_code == 200, r.text
        over = httpx.post(gateway.url + INFER, content=gzip.compress(large + b" "), headers=gz)
        assert f"limit of {len(large)} bytes" in error_of(over, 413)
        at_cap = httpx.post(gateway.url + INFER, content=gzip.compress(large), headers=gz)
        assert "budget of 1024 bytes" in error_of(at_cap, 413)


@pytest.mark.parametrize(
    "encoding", ["gzip, gzip", "deflate, gzip", "br", "zstd", "compress", "x" * 5000]
)
def test_unsupported_and_nested_encodings_are_415_with_accept_encoding(
    server: GatewayServer, encoding: str
) -> None:
    body = json_body(sample_inputs("fraud", 1, seed=1))
    r = httpx.post(
        server.url + INFER, content=gzip.compress(body), headers={"Content-Encoding": encoding}
    )
    message = error_of(r, 415)
    assert r.headers["accept-encoding"] == ACCEPTED
    assert "Content-Encoding" in message and len(message) < 300


def test_repeated_content_encoding_headers_add_up(server: GatewayServer) -> None:
    body = gzip.compress(gzip.compress(json_body(sample_inputs("fraud", 1, seed=1))))
    headers = [("Content-Encoding", "gzip"), ("Content-Encoding", "gzip")]
    r = httpx.post(server.url + INFER, content=body, headers=headers)
    assert "applies 2 codings" in error_of(r, 415)
    once = [("Content-Encoding", "identity"), ("Content-Encoding", "gzip")]
    r = httpx.post(server.url + INFER, content=gzip.decompress(body), headers=once)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("encoding", "mangle", "says"),
    [
        ("gzip", lambda gz: gz[: len(gz) // 2], "ends before its stream does"),
        ("gzip", lambda gz: gz[:-8] + bytes(8), "corrupt"),
        ("gzip", lambda gz: b"plain text, not gzip", "corrupt"),
        ("deflate", lambda gz: zlib.compress(gzip.decompress(gz))[:-3], "ends before"),
        ("gzip", lambda gz: b"", "ends before its stream does"),
    ],
    ids=["truncated", "bad-trailer", "not-gzip", "truncated-deflate", "empty"],
)
def test_corrupt_and_truncated_streams_are_400(
    server: GatewayServer, encoding: str, mangle: Any, says: str
) -> None:
    gz = gzip.compress(json_body(sample_inputs("fraud", 1, seed=1)))
    r = httpx.post(server.url + INFER, content=mangle(gz), headers={"Content-Encoding": encoding})
    assert says in error_of(r, 400)


def test_the_inference_header_length_counts_the_inflated_body(server: GatewayServer) -> None:
    row = sample_inputs("fraud", 1, seed=5)["input"]
    head = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": [1, 32],
                    "parameters": {"binary_data_size": row.nbytes},
                }
            ]
        }
    )
    r = httpx.post(
        server.url + INFER,
        content=gzip.compress(head + row.tobytes()),
        headers={"Content-Encoding": "gzip", "Inference-Header-Content-Length": str(len(head))},
    )
    assert r.status_code == 200, r.text


# -- raw binary requests (item 4; tritonclient does not send them) -------------------------------
def raw(server: GatewayServer, body: bytes, path: str = INFER, length: str = "0") -> httpx.Response:
    return httpx.post(
        server.url + path,
        content=body,
        headers={
            "Inference-Header-Content-Length": length,
            "Content-Type": "application/octet-stream",
        },
    )


def test_a_raw_binary_request_is_the_models_one_input(
    server: GatewayServer, demo_repo: Path
) -> None:
    inputs = sample_inputs("fraud", 7, seed=13)
    r = raw(server, inputs["input"].astype("<f4").tobytes())
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    expected = reference_outputs(demo_repo, "fraud", "1", inputs)["probability"]
    np.testing.assert_array_equal(output_array(r.json(), "probability"), expected)


def test_a_raw_binary_request_can_be_compressed_too(server: GatewayServer, demo_repo: Path) -> None:
    inputs = sample_inputs("fraud", 2, seed=14)
    r = httpx.post(
        server.url + INFER,
        content=gzip.compress(inputs["input"].tobytes()),
        headers={"Inference-Header-Content-Length": "0", "Content-Encoding": "gzip"},
    )
    assert r.status_code == 200, r.text
    expected = reference_outputs(demo_repo, "fraud", "1", inputs)["probability"]
    np.testing.assert_array_equal(output_array(r.json(), "probability"), expected)


def test_a_raw_request_to_a_model_with_several_inputs_is_a_400(server: GatewayServer) -> None:
    r = raw(server, b"\x00" * 64, "/v2/models/risk/infer")
    message = error_of(r, 400)
    assert "exactly one input" in message and "send a JSON header" in message


@pytest.mark.parametrize("size", [1, 3, 4 * 33, 4 * 32 * 2 + 4])
def test_a_raw_body_that_is_not_whole_rows_is_a_400(server: GatewayServer, size: int) -> None:
    message = error_of(raw(server, b"\x00" * size), 400)
    assert f"raw binary body of {size} bytes does not fit input 'input'" in message


@pytest.mark.parametrize(
    "length", ["9" * 30, str(1 << 62), str((1 << 62) + 1), "129", "-0", "0x10", "0 0"]
)
def test_huge_or_malformed_header_lengths_are_400(server: GatewayServer, length: str) -> None:
    message = error_of(raw(server, b"\x00" * 128, length=length), 400)
    assert "Inference-Header-Content-Length" in message


# -- NaN and ±Inf in JSON outputs (item 6) ------------------------------------------------------
def test_tritonclient_reads_back_nan_and_the_sign_of_infinity(server: GatewayServer) -> None:
    """Sent in binary (JSON requests cannot carry them), answered in JSON through echo."""
    inputs = sample_inputs("echo", 2, seed=6)
    specials = [np.nan, np.inf, -np.inf, 1.5, -0.0, 2.0]
    for suffix in ("fp16", "fp32", "fp64"):
        array = inputs[f"in_{suffix}"]
        inputs[f"in_{suffix}"] = np.resize(np.array(specials, array.dtype), array.shape)
    outs = [
        tc.InferRequestedOutput(f"out_{s}", binary_data=False) for s in ("fp16", "fp32", "fp64")
    ]
    result = infer_with_triton(server, "echo", inputs, binary=True, outputs=outs)
    for suffix in ("fp16", "fp32", "fp64"):
        got, sent = result.as_numpy(f"out_{suffix}"), inputs[f"in_{suffix}"]
        assert got.dtype == sent.dtype
        np.testing.assert_array_equal(got, sent)
        assert (np.isposinf(got) == np.isposinf(sent)).all()
        assert (np.isneginf(got) == np.isneginf(sent)).all() and np.isneginf(got).any()


# -- BYTES elements that are not UTF-8 (item 5) --------------------------------------------------
SECRET = b"\xff\xfe-not-text"


def write_matcher(folder: Path) -> None:
    """text BYTES [-1] -> match BOOL [-1]: whether each element is SECRET's exact bytes."""
    constant = numpy_helper.from_array(np.array([SECRET], dtype=object), "secret")
    graph = helper.make_graph(
        [helper.make_node("Equal", ["text", "secret"], ["match"])],
        "matcher",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["n"])],
        [helper.make_tensor_value_info("match", TensorProto.BOOL, ["n"])],
        initializer=[constant],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9  # Equal takes strings from opset 19
    folder.mkdir(parents=True)
    onnx.save(model, folder / "model.onnx")


@pytest.fixture(scope="module")
def matcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    root = tmp_path_factory.mktemp("bytes") / "models"
    write_matcher(root / "matcher" / "1")
    with InProcessServer(root) as s:
        yield s


def test_bytes_that_are_not_utf8_reach_the_model_exactly(matcher: InProcessServer) -> None:
    sent = [SECRET, SECRET[:-1], b"\xff\xfe", b"ok", SECRET + b"x", "é".encode(), SECRET]
    text = tc.InferInput("text", [len(sent)], "BYTES")
    text.set_data_from_numpy(np.array(sent, dtype=object), binary_data=True)
    client = tc.InferenceServerClient(url=f"127.0.0.1:{matcher.port}")
    try:
        result = client.infer("matcher", [text])
    finally:
        client.close()
    assert result.as_numpy("match").tolist() == [item == SECRET for item in sent]


def test_bytes_that_are_not_utf8_cannot_come_back_out_of_onnxruntime(
    server: GatewayServer,
) -> None:
    """echo would return them as a string tensor, which onnxruntime cannot hand back."""
    inputs = sample_inputs("echo", 1, seed=2)
    inputs["in_bytes"] = np.array([[b"\xff\xfe"] * inputs["in_bytes"].shape[1]], dtype=object)
    with pytest.raises(tc.InferenceServerException) as exc:
        infer_with_triton(server, "echo", inputs, binary=True)
    assert exc.value.status() == "400"
    assert "onnxruntime returns string tensors only as UTF-8 text" in exc.value.message()
    assert "'in_bytes'" in exc.value.message()


def test_a_json_body_that_is_not_utf8_is_a_400(server: GatewayServer) -> None:
    entry = b'{"name": "in_bytes", "datatype": "BYTES", "shape": [1, 1], "data": ["\xff"]}'
    body = b'{"inputs": [' + entry + b"]}"
    assert "malformed JSON" in error_of(
        httpx.post(server.url + "/v2/models/echo/infer", content=body), 400
    )


# -- sequence-batching parameters (item 7, its sequence part) ------------------------------------
@pytest.mark.parametrize("start", [True, False])
def test_tritonclient_sequence_requests_are_refused_naming_the_parameter(
    server: GatewayServer, start: bool
) -> None:
    with pytest.raises(tc.InferenceServerException) as exc:
        infer_with_triton(
            server,
            "fraud",
            sample_inputs("fraud", 1, seed=1),
            binary=True,
            sequence_id=42,
            sequence_start=start,
        )
    assert exc.value.status() == "400"
    assert exc.value.message().startswith(
        "\"parameters.sequence_id\": model 'fraud' is not stateful"
    )
