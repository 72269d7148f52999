"""The serving core end to end: a real gateway (in process), real clients, real onnxruntime."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import orjson
import pytest
import tritonclient.http as tc  # type: ignore[import-untyped]
from starlette.routing import Route
from tritonclient.utils import np_to_triton_dtype  # type: ignore[import-untyped]

from gateway.app import create_app
from gateway.demo import sample_inputs, write_demo_repository
from gateway.settings import Settings
from tests.support.server import GatewayServer, InProcessServer


def reference_outputs(
    repo: Path, model: str, version: str, inputs: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(
        str(repo / model / version / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs), strict=True))


def json_body(inputs: dict[str, np.ndarray], **extra: Any) -> bytes:
    datatypes = {"float32": "FP32", "int64": "INT64", "bool": "BOOL"}
    return orjson.dumps(
        {
            "inputs": [
                {
                    "name": n,
                    "shape": list(a.shape),
                    "datatype": datatypes[a.dtype.name],
                    "data": a.ravel().tolist(),
                }
                for n, a in inputs.items()
            ],
            **extra,
        }
    )


def output_array(body: dict[str, Any], name: str) -> np.ndarray:
    (out,) = [o for o in body["outputs"] if o["name"] == name]
    dtype = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "BOOL": np.bool_}[
        out["datatype"]
    ]
    return np.asarray(out["data"], dtype=dtype).reshape(out["shape"])


# -- health and metadata ----------------------------------------------------------------------
def test_health_endpoints_answer_with_json_bodies(server: GatewayServer) -> None:
    live = httpx.get(server.url + "/v2/health/live")
    ready = httpx.get(server.url + "/v2/health/ready")
    assert (live.status_code, live.json()) == (200, {"live": True})
    assert (ready.status_code, ready.json()) == (200, {"ready": True})


def test_server_metadata_lists_extensions(server: GatewayServer) -> None:
    meta = httpx.get(server.url + "/v2").json()
    assert meta["name"] == "turnout"
    assert {"binary_tensor_data", "model_repository"} <= set(meta["extensions"])


def test_model_metadata_reads_the_graph(server: GatewayServer, demo_repo: Path) -> None:
    meta = httpx.get(server.url + "/v2/models/fraud").json()
    assert meta["name"] == "fraud"
    assert meta["versions"] == ["1", "2"]
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 32]}]
    assert meta["outputs"] == [{"name": "probability", "datatype": "FP32", "shape": [-1, 1]}]
    import hashlib

    pinned = httpx.get(server.url + "/v2/models/fraud/versions/1").json()
    assert pinned["versions"] == ["1"]
    assert (
        pinned["turnout"]["sha256"]
        == hashlib.sha256((demo_repo / "fraud/1/model.onnx").read_bytes()).hexdigest()
    )
    assert pinned["turnout"]["metadata"]["owner"]


def test_model_readiness(server: GatewayServer) -> None:
    assert httpx.get(server.url + "/v2/models/fraud/ready").json() == {
        "name": "fraud",
        "ready": True,
    }
    assert httpx.get(server.url + "/v2/models/fraud/versions/2/ready").status_code == 200
    missing = httpx.get(server.url + "/v2/models/nope/ready")
    assert missing.status_code == 404 and "nope" in missing.json()["error"]


def test_openapi_describes_every_route(server: GatewayServer, demo_repo: Path) -> None:
    doc = httpx.get(server.url + "/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    app = create_app(Settings(model_repository=demo_repo))
    for route in app.routes:
        assert isinstance(route, Route)
        described = doc["paths"].get(route.path)
        assert described is not None, route.path
        for method in route.methods or ():
            if method != "HEAD":
                assert method.lower() in described, (method, route.path)


# -- inference over JSON -----------------------------------------------------------------------
@pytest.mark.parametrize("version", ["1", "2"])
def test_pinned_json_inference_equals_onnxruntime(
    server: GatewayServer, demo_repo: Path, version: str
) -> None:
    inputs = sample_inputs("fraud", 7, seed=3)
    r = httpx.post(
        f"{server.url}/v2/models/fraud/versions/{version}/infer",
        content=json_body(inputs, id="req-1"),
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model_name"], body["model_version"], body["id"]) == ("fraud", version, "req-1")
    expected = reference_outputs(demo_repo, "fraud", version, inputs)["probability"]
    np.testing.assert_array_equal(output_array(body, "probability"), expected)


def test_unpinned_inference_serves_the_highest_ready_version_and_generates_an_id(
    server: GatewayServer,
) -> None:
    r = httpx.post(
        server.url + "/v2/models/fraud/infer", content=json_body(sample_inputs("fraud", 1, seed=1))
    )
    body = r.json()
    assert body["model_version"] == "2"
    assert isinstance(body["id"], str) and len(body["id"]) >= 16


def test_versions_give_different_outputs(server: GatewayServer) -> None:
    content = json_body(sample_inputs("fraud", 16, seed=5))
    a = httpx.post(server.url + "/v2/models/fraud/versions/1/infer", content=content).json()
    b = httpx.post(server.url + "/v2/models/fraud/versions/2/infer", content=content).json()
    assert not np.allclose(output_array(a, "probability"), output_array(b, "probability"))


def test_multi_input_model_with_output_selection_and_parameters(
    server: GatewayServer, demo_repo: Path
) -> None:
    inputs = sample_inputs("risk", 5, seed=2)
    content = json_body(
        inputs, outputs=[{"name": "label"}, {"name": "score"}], parameters={"trace": "abc"}
    )
    r = httpx.post(server.url + "/v2/models/risk/infer", content=content)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [o["name"] for o in body["outputs"]] == ["label", "score"]
    expected = reference_outputs(demo_repo, "risk", "1", inputs)
    np.testing.assert_array_equal(output_array(body, "label"), expected["label"])
    np.testing.assert_array_equal(output_array(body, "score"), expected["score"])


def test_nested_data_is_accepted(server: GatewayServer) -> None:
    x = sample_inputs("fraud", 3, seed=9)["input"]
    flat = httpx.post(
        server.url + "/v2/models/fraud/versions/1/infer", content=json_body({"input": x})
    ).json()
    nested = orjson.dumps(
        {"inputs": [{"name": "input", "shape": [3, 32], "datatype": "FP32", "data": x.tolist()}]}
    )
    r = httpx.post(server.url + "/v2/models/fraud/versions/1/infer", content=nested).json()
    assert r["outputs"] == flat["outputs"]


# -- tritonclient, JSON and binary ------------------------------------------------------------
def infer_with_triton(
    server: GatewayServer, model: str, inputs: dict[str, np.ndarray], binary: bool, **kwargs: Any
) -> Any:
    """tritonclient's ``infer`` of ``inputs`` on version 1 of ``model``, in JSON or binary."""
    client = tc.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    try:
        wire = []
        for name, array in inputs.items():
            i = tc.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            i.set_data_from_numpy(array, binary_data=binary)
            wire.append(i)
        return client.infer(model, wire, model_version="1", **kwargs)
    finally:
        client.close()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("model", ["fraud", "risk"])
def test_tritonclient_round_trip(
    server: GatewayServer, demo_repo: Path, model: str, binary: bool
) -> None:

    inputs = sample_inputs(model, 4, seed=11)
    client = tc.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(model)
        meta = client.get_model_metadata(model)
        wire = []
        for name, array in inputs.items():
            i = tc.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            i.set_data_from_numpy(array, binary_data=binary)
            wire.append(i)
        outs = [tc.InferRequestedOutput(o["name"], binary_data=binary) for o in meta["outputs"]]
        result = client.infer(model, wire, outputs=outs, model_version="1", request_id="triton-7")
    finally:
        client.close()
    expected = reference_outputs(demo_repo, model, "1", inputs)
    assert result.get_response()["id"] == "triton-7"
    for name, array in expected.items():
        np.testing.assert_array_equal(result.as_numpy(name), array)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_every_datatype_through_echo(server: GatewayServer, binary: bool) -> None:

    inputs = sample_inputs("echo", 3, seed=4)
    outs = [
        tc.InferRequestedOutput("out_" + n.removeprefix("in_"), binary_data=binary) for n in inputs
    ]
    result = infer_with_triton(server, "echo", inputs, binary, outputs=outs)
    for name, array in inputs.items():
        got = result.as_numpy("out_" + name.removeprefix("in_"))
        assert got is not None and got.shape == array.shape, name
        if array.dtype == object:
            assert [bytes(v) if not isinstance(v, str) else v.encode() for v in got.ravel()] == [
                v if isinstance(v, bytes) else str(v).encode() for v in array.ravel()
            ]
        else:
            assert got.dtype == array.dtype, name
            np.testing.assert_array_equal(got, array)


def test_request_without_content_type_is_accepted(server: GatewayServer) -> None:
    content = json_body(sample_inputs("fraud", 1, seed=0))
    r = httpx.post(
        server.url + "/v2/models/fraud/infer", content=content, headers={"content-type": ""}
    )
    assert r.status_code == 200, r.text


# -- errors ----------------------------------------------------------------------------------------
def _fraud(data: Any, shape: Any = (1, 32), datatype: str = "FP32", name: str = "input") -> bytes:
    return orjson.dumps(
        {"inputs": [{"name": name, "shape": list(shape), "datatype": datatype, "data": data}]}
    )


ROW = [0.5] * 32
ERRORS = [
    ("malformed-json", b'{"inputs": [', 400, "json"),
    ("not-an-object", b"[1, 2]", 400, "object"),
    ("unknown-input", _fraud(ROW, name="nope"), 400, "nope"),
    ("missing-input", orjson.dumps({"inputs": []}), 400, "input"),
    ("wrong-datatype", _fraud([1] * 32, datatype="INT64"), 400, "FP32"),
    ("wrong-rank", _fraud(ROW, shape=(32,)), 400, "shape"),
    ("wrong-fixed-dim", _fraud([0.5] * 31, shape=(1, 31)), 400, "shape"),
    ("data-length", _fraud([0.5] * 31), 400, "32"),
    ("non-numeric", _fraud(["a"] * 32), 400, "input"),
    ("numeric-strings", _fraud(["1.5"] * 32), 400, "input"),
    ("fp32-overflow", _fraud([1e300] * 32), 400, "overflows"),
    ("unknown-output", orjson.dumps({
        "inputs": [{"name": "input", "shape": [1, 32], "datatype": "FP32", "data": ROW}],
        "outputs": [{"name": "zzz"}],
    }), 400, "zzz"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "status", "fragment"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS]
)
def test_client_mistakes_get_a_clear_4xx(
    server: GatewayServer, body: bytes, status: int, fragment: str
) -> None:
    r = httpx.post(server.url + "/v2/models/fraud/versions/1/infer", content=body)
    assert r.status_code == status, r.text
    assert fragment.lower() in r.json()["error"].lower()


def test_out_of_range_integers_are_refused(server: GatewayServer) -> None:
    body = orjson.dumps({"inputs": [
        {"name": "features", "shape": [1, 8], "datatype": "FP32", "data": [0.0] * 8},
        {"name": "segment", "shape": [1, 1], "datatype": "INT64", "data": [2**63]},
        {"name": "flags", "shape": [1, 4], "datatype": "BOOL", "data": [True] * 4},
    ]})  # fmt: skip
    r = httpx.post(server.url + "/v2/models/risk/infer", content=body)
    assert r.status_code == 400 and "segment" in r.json()["error"]


@pytest.mark.parametrize(
    ("path", "status", "fragment"),
    [
        ("/v2/models/nope/infer", 404, "nope"),
        ("/v2/models/fraud/versions/9/infer", 404, "9"),
        ("/v2/models/fraud/versions/abc/infer", 404, "abc"),
        ("/v2/models/..%2F..%2Fetc/infer", 404, "no route"),
    ],
    ids=["unknown-model", "unknown-version", "bad-version", "traversal"],
)
def test_unknown_models_and_versions_are_404(
    server: GatewayServer, path: str, status: int, fragment: str
) -> None:
    r = httpx.post(server.url + path, content=_fraud(ROW))
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]


def test_unknown_route_is_a_protocol_error(server: GatewayServer) -> None:
    r = httpx.get(server.url + "/v2/nothing/here")
    assert r.status_code == 404 and "error" in r.json()


def test_bad_binary_header_is_400(server: GatewayServer) -> None:
    r = httpx.post(
        server.url + "/v2/models/fraud/infer",
        content=_fraud(ROW),
        headers={"Inference-Header-Content-Length": "-3"},
    )
    assert (
        r.status_code == 400
        and "Inference-Header-Content-Length".lower() in r.json()["error"].lower()
    )


def test_body_over_the_cap_is_refused_before_it_is_read(demo_repo: Path) -> None:
    with InProcessServer(demo_repo, args=["--max-body-bytes", "4096"]) as small:
        big = _fraud([0.5] * 32 * 200, shape=(200, 32))
        r = httpx.post(small.url + "/v2/models/fraud/infer", content=big)
        assert r.status_code == 413 and "4096" in r.json()["error"]

        def chunks() -> Any:
            yield from (big[i : i + 1000] for i in range(0, len(big), 1000))

        chunked = httpx.post(small.url + "/v2/models/fraud/infer", content=chunks())
        assert chunked.status_code == 413
        ok = httpx.post(small.url + "/v2/models/fraud/infer", content=_fraud(ROW))
        assert ok.status_code == 200


def test_a_client_mistake_does_not_affect_other_requests(server: GatewayServer) -> None:
    good = json_body(sample_inputs("fraud", 2, seed=8))

    async def run() -> list[int]:
        import asyncio

        async with httpx.AsyncClient(base_url=server.url) as client:
            reqs = [
                client.post("/v2/models/fraud/infer", content=good if i % 2 else b"{bad")
                for i in range(100)
            ]
            return [r.status_code for r in await asyncio.gather(*reqs)]

    import asyncio

    codes = asyncio.run(run())
    assert codes == [400 if i % 2 == 0 else 200 for i in range(100)]


def test_inference_during_the_start_up_load_answers_503_not_404(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # The heavy demo model makes the start-up load last seconds (its reference sample runs
    # through it); uvicorn accepts connections meanwhile, for liveness.
    root = tmp_path_factory.mktemp("slow-start") / "models"
    write_demo_repository(root, heavy=True)
    # risk loads last (models load in name order), after heavy's seconds
    tensors = [
        {
            "name": n,
            "shape": list(a.shape),
            "datatype": np_to_triton_dtype(a.dtype),
            "data": a.tolist(),
        }
        for n, a in sample_inputs("risk", 1, seed=5).items()
    ]
    body = orjson.dumps({"inputs": tensors})
    statuses: list[int] = []
    with InProcessServer(root, wait_ready=False) as gateway, httpx.Client(timeout=10) as client:
        deadline = time.monotonic() + 120
        while not statuses or statuses[-1] != 200:
            assert time.monotonic() < deadline, statuses[-5:]
            time.sleep(0.01)
            try:
                r = client.post(gateway.url + "/v2/models/risk/infer", content=body)
            except httpx.TransportError:  # not listening yet
                continue
            statuses.append(r.status_code)
            if r.status_code == 503:  # not reached yet, or reached and loading
                assert re.search("still loading|no ready version", r.json()["error"]), r.text
        gateway.wait_until_ready()  # the whole repository is loaded: now unknown means 404
        assert client.post(gateway.url + "/v2/models/nope/infer", content=body).status_code == 404
    assert set(statuses) == {503, 200}, statuses[:5]
