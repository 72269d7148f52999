"""Triton's model configuration and statistics extensions, the repository's refusal of load
overrides, and the model listing: through tritonclient where it has a call, raw HTTP for the
errors. The expected configuration is read from the ONNX files with onnxruntime, not from the
gateway."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as tc  # type: ignore[import-untyped]
from starlette.routing import Route
from tritonclient.utils import InferenceServerException  # type: ignore[import-untyped]

from gateway.app import create_app
from gateway.demo import sample_inputs
from gateway.http.endpoints import EXTENSIONS
from gateway.http.openapi import openapi_document
from gateway.serving.batcher import MAX_BATCH_SIZES
from gateway.settings import Settings
from tests.support.models import write_failing_fraud, write_fixed_doubler
from tests.support.server import ADMIN, InProcessServer

TUNED = {
    "max_batch_size": 8,
    "max_queue_delay_us": 500,
    "max_queue": 7,
    "max_concurrent_batches": 2,
}
ONNX_TYPES = {
    "tensor(float)": "TYPE_FP32",
    "tensor(double)": "TYPE_FP64",
    "tensor(int64)": "TYPE_INT64",
    "tensor(int32)": "TYPE_INT32",
    "tensor(bool)": "TYPE_BOOL",
    "tensor(string)": "TYPE_STRING",
    "tensor(float16)": "TYPE_FP16",
    "tensor(int8)": "TYPE_INT8",
    "tensor(int16)": "TYPE_INT16",
    "tensor(uint8)": "TYPE_UINT8",
    "tensor(uint16)": "TYPE_UINT16",
    "tensor(uint32)": "TYPE_UINT32",
    "tensor(uint64)": "TYPE_UINT64",
}
DEFAULTS = Settings(Path("unused"))  # what a gateway without options runs with


@pytest.fixture(scope="module")
def repo(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("model-info") / "models"
    shutil.copytree(demo_repo, root)
    for name, config in (
        ("tuned", TUNED),
        ("unmerged", {"enabled": False}),
        ("spare", None),
        ("wide", None),
    ):
        shutil.copytree(root / "fraud" / "1", root / name / "1")
        if config is not None:
            (root / name / "1" / "config.json").write_text(json.dumps(config))
    write_fixed_doubler(root / "fixed" / "1")
    write_failing_fraud(root / "failing" / "1", feature=0, limit=0.0)
    (root / "broken" / "1").mkdir(parents=True)
    (root / "broken" / "1" / "model.onnx").write_bytes(b"not a model")
    return root


@pytest.fixture(scope="module")
def gateway(repo: Path) -> Iterator[InProcessServer]:
    with InProcessServer(repo) as s:
        yield s


@pytest.fixture
def client(gateway: InProcessServer) -> tc.InferenceServerClient:
    return tc.InferenceServerClient(gateway.url.removeprefix("http://"))


def session_of(repo: Path, model: str, version: str) -> Any:
    path = repo / model / version / "model.onnx"
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def expected_tensors(args: list[Any], batched: bool) -> list[tuple[str, str, list[int]]]:
    """(name, Triton data type, dims) as onnxruntime reads the file; dims without the first axis
    when the model batches."""
    out = []
    for arg in args:
        shape = [d if isinstance(d, int) else -1 for d in arg.shape]
        out.append((arg.name, ONNX_TYPES[arg.type], shape[1:] if batched else shape))
    return out


def tensors(config: dict[str, Any], key: str) -> list[tuple[str, str, list[int]]]:
    return [(t["name"], t["data_type"], t["dims"]) for t in config[key]]


def infer(client: tc.InferenceServerClient, model: str, rows: int, seed: int = 0) -> None:
    x = sample_inputs("fraud", rows, seed=seed)["input"]
    sent = tc.InferInput("input", list(x.shape), "FP32")
    sent.set_data_from_numpy(x, binary_data=True)
    client.infer(model, [sent])


def error_of(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert list(body) == ["error"] and isinstance(body["error"], str)
    return str(body["error"])


# -- model configuration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "version"), [("fraud", "1"), ("fraud", "2"), ("risk", "1"), ("echo", "1")]
)
def test_tritonclient_reads_the_configuration_of_what_was_loaded(
    repo: Path, client: tc.InferenceServerClient, model: str, version: str
) -> None:
    config = client.get_model_config(model, version)
    session = session_of(repo, model, version)
    batched = all(not isinstance(a.shape[0], int) for a in session.get_inputs())
    assert config["name"] == model
    assert (config["platform"], config["backend"]) == ("onnxruntime_onnx", "onnxruntime")
    assert config["max_batch_size"] == (DEFAULTS.max_batch_size if batched else 0)
    assert tensors(config, "input") == expected_tensors(session.get_inputs(), batched)
    assert tensors(config, "output") == expected_tensors(session.get_outputs(), batched)
    assert config["version_policy"] == {"all": {}}  # every version folder is loaded
    assert config["default_model_filename"] == "model.onnx"
    params = {k: v["string_value"] for k, v in config["parameters"].items()}
    assert params == {
        "intra_op_thread_count": str(DEFAULTS.intra_op_threads),
        "inter_op_thread_count": str(DEFAULTS.inter_op_threads),
        "execution_mode": "0",
        "graph_optimization": DEFAULTS.graph_optimization,
    }
    if batched:
        batching = config["dynamic_batching"]
        assert batching["max_queue_delay_microseconds"] == DEFAULTS.max_queue_delay_us
        assert batching["preferred_batch_size"] == []
        assert batching["default_queue_policy"]["max_queue_size"] == DEFAULTS.max_queue
        timeout_us = DEFAULTS.request_timeout_ms * 1000
        assert batching["default_queue_policy"]["default_timeout_microseconds"] == timeout_us


def test_the_unversioned_configuration_is_the_highest_ready_versions(
    client: tc.InferenceServerClient,
) -> None:
    assert client.get_model_config("fraud") == client.get_model_config("fraud", "2")


def test_batching_comes_from_the_versions_config_json(
    repo: Path, client: tc.InferenceServerClient
) -> None:
    config = client.get_model_config("tuned")
    assert config["max_batch_size"] == TUNED["max_batch_size"]
    batching = config["dynamic_batching"]
    assert batching["max_queue_delay_microseconds"] == TUNED["max_queue_delay_us"]
    assert batching["default_queue_policy"]["max_queue_size"] == TUNED["max_queue"]
    assert [g["count"] for g in config["instance_group"]] == [TUNED["max_concurrent_batches"]]
    assert [g["kind"] for g in config["instance_group"]] == ["KIND_CPU"]


@pytest.mark.parametrize("model", ["unmerged", "fixed"])
def test_a_model_that_is_not_merged_has_max_batch_size_0_and_every_axis(
    repo: Path, client: tc.InferenceServerClient, model: str
) -> None:
    """``unmerged``: batching off in its config.json; ``fixed``: no dynamic first axis."""
    config = client.get_model_config(model)
    session = session_of(repo, model, "1")
    assert config["max_batch_size"] == 0
    assert "dynamic_batching" not in config
    assert tensors(config, "input") == expected_tensors(session.get_inputs(), batched=False)
    assert tensors(config, "output") == expected_tensors(session.get_outputs(), batched=False)


# -- statistics -----------------------------------------------------------------------------------


def one(stats: dict[str, Any]) -> dict[str, Any]:
    (entry,) = stats["model_stats"]
    return dict(entry)


def test_tritonclient_reads_statistics_of_what_ran(
    gateway: InProcessServer, client: tc.InferenceServerClient
) -> None:
    before = one(client.get_inference_statistics("tuned", "1"))
    assert before["inference_count"] == 0 and before["last_inference"] == 0
    rows = [1, 3, 3, 5, 2]
    started_ms = time.time() * 1000
    for i, n in enumerate(rows):
        infer(client, "tuned", n, seed=i)
    ended_ms = time.time() * 1000
    stats = one(client.get_inference_statistics("tuned", "1"))
    assert (stats["name"], stats["version"]) == ("tuned", "1")
    assert stats["inference_count"] == sum(rows)  # each row is an inference (Triton's rule)
    assert stats["execution_count"] == len(rows)  # one after the other: nothing merged
    figures = stats["inference_stats"]
    for key in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        assert figures[key]["count"] == len(rows), key
    assert figures["fail"] == {"count": 0, "ns": 0}
    assert figures["compute_infer"]["ns"] > 0
    parts = sum(figures[k]["ns"] for k in ("queue", "compute_input", "compute_infer"))
    # the parts lie within each request's time in the runtime (each figure rounds to 1 ns)
    assert parts + figures["compute_output"]["ns"] <= figures["success"]["ns"] + 4
    # last_inference is wall-clock ms, converted from the monotonic clock: within the window
    # (1 ms either side for the conversion's rounding)
    assert started_ms - 1 <= stats["last_inference"] <= ended_ms + 1
    sizes = {b["batch_size"]: b["compute_infer"]["count"] for b in stats["batch_stats"]}
    assert sizes == {1: 1, 2: 1, 3: 2, 5: 1}
    total = sum(b["compute_infer"]["ns"] for b in stats["batch_stats"])
    assert total == pytest.approx(figures["compute_infer"]["ns"], abs=len(rows))  # ns rounding


def test_failures_are_counted_apart_from_successes(
    gateway: InProcessServer, client: tc.InferenceServerClient
) -> None:
    x = sample_inputs("fraud", 2, seed=1)["input"]
    x[:, 0] = 1.0  # over the failing model's limit: onnxruntime raises
    sent = tc.InferInput("input", list(x.shape), "FP32")
    sent.set_data_from_numpy(x)
    for _ in range(3):
        with pytest.raises(InferenceServerException) as caught:
            client.infer("failing", [sent])
        assert caught.value.status() == "500"
    x[:, 0] = -1.0
    sent.set_data_from_numpy(x)
    client.infer("failing", [sent])
    stats = one(client.get_inference_statistics("failing"))
    assert stats["inference_stats"]["fail"]["count"] == 3
    assert stats["inference_stats"]["fail"]["ns"] > 0
    assert stats["inference_stats"]["success"]["count"] == 1
    assert stats["inference_count"] == 2
    assert stats["execution_count"] == 4  # the failed runs ran too


def test_a_model_that_is_not_batched_counts_one_inference_per_request(
    client: tc.InferenceServerClient,
) -> None:
    x = np.ones((2, 3), dtype=np.float32)
    sent = tc.InferInput("x", [2, 3], "FP32")
    sent.set_data_from_numpy(x)
    for _ in range(2):
        client.infer("fixed", [sent])
    stats = one(client.get_inference_statistics("fixed"))
    assert stats["inference_count"] == 2
    assert [(b["batch_size"], b["compute_infer"]["count"]) for b in stats["batch_stats"]] == [
        (1, 2)
    ]


def test_statistics_cover_every_loaded_version(client: tc.InferenceServerClient) -> None:
    everything = client.get_inference_statistics()["model_stats"]
    index = client.get_model_repository_index(headers=dict(ADMIN))
    ready = sorted((e["name"], e["version"]) for e in index if e["state"] == "READY")
    assert sorted((s["name"], s["version"]) for s in everything) == ready
    fraud = client.get_inference_statistics("fraud")["model_stats"]
    assert [(s["name"], s["version"]) for s in fraud] == [("fraud", "1"), ("fraud", "2")]


def test_batch_sizes_past_the_cap_are_counted_as_unlisted(
    gateway: InProcessServer, client: tc.InferenceServerClient
) -> None:
    """Each request above max_batch_size runs alone at its client's size: a client sending new
    sizes cannot grow the statistics past 128 sizes; what is left out is counted."""
    sizes = range(1, MAX_BATCH_SIZES + 6)
    for n in sizes:
        infer(client, "wide", n, seed=n)
    stats = one(client.get_inference_statistics("wide"))
    assert len(stats["batch_stats"]) == MAX_BATCH_SIZES
    assert stats["execution_count"] == len(sizes)
    assert stats["inference_count"] == sum(sizes)
    metrics = httpx.get(gateway.url + "/metrics").text
    line = 'turnout_batch_sizes_unlisted_total{model="wide",version="1"} 5.0'
    assert line in metrics.splitlines()


# -- errors: unknown and hostile names ----------------------------------------------------------

PATHS = [
    "/v2/models/{m}/config",
    "/v2/models/{m}/stats",
    "/v2/models/fraud/versions/{v}/config",
    "/v2/models/fraud/versions/{v}/stats",
]


@pytest.mark.parametrize(
    ("model", "version"),
    [
        ("nope", "9"),
        ("x" * 20_000, "1" * 20_000),
        ("%C3%A9t%C3%A9%00", "%E2%80%A4"),
        ("%2E%2E%2Fetc", "..%2f1"),
        ("stats2", "01"),
    ],
    ids=["unknown", "long", "unicode", "traversal", "leading-zero"],
)
def test_unknown_or_hostile_names_get_404_in_the_protocols_format(
    gateway: InProcessServer, model: str, version: str
) -> None:
    for template in PATHS:
        path = template.format(m=model, v=version)
        message = error_of(httpx.get(gateway.url + path), 404)
        assert len(message) < 400, (path, message)  # a client's value is shown cut
        assert "Traceback" not in message


def test_an_unknown_scope_is_400(gateway: InProcessServer) -> None:
    r = httpx.get(gateway.url + "/v2/models/fraud/stats?scope=" + "x" * 1000)
    assert error_of(r, 400) == "scope: one of process, group, fleet"
    r = httpx.get(gateway.url + "/v2/models/fraud/stats?scope=process")
    assert [s["version"] for s in r.json()["model_stats"]] == ["1", "2"]


def test_a_known_model_without_a_ready_version_is_503(gateway: InProcessServer) -> None:
    for path in ("/v2/models/broken/config", "/v2/models/broken/stats"):
        assert "no ready version" in error_of(httpx.get(gateway.url + path), 503)
    message = error_of(httpx.get(gateway.url + "/v2/models/broken/versions/1/config"), 503)
    assert "failed" in message


# -- repository: load overrides are refused, by name ---------------------------------------------


def index(client: tc.InferenceServerClient) -> list[dict[str, str]]:
    return list(client.get_model_repository_index(headers=dict(ADMIN)))


def test_tritonclient_load_with_a_config_override_gets_400_naming_it(
    client: tc.InferenceServerClient,
) -> None:
    before = index(client)
    with pytest.raises(InferenceServerException) as caught:
        client.load_model("fraud", headers=dict(ADMIN), config=json.dumps({"max_batch_size": 2}))
    assert caught.value.status() == "400"
    assert "'parameters.config'" in caught.value.message()
    assert index(client) == before
    assert client.get_model_config("fraud")["max_batch_size"] == DEFAULTS.max_batch_size


def test_tritonclient_load_with_files_gets_400_naming_each_override(
    client: tc.InferenceServerClient,
) -> None:
    before = index(client)
    files = {"file:1/model.onnx": b"\x08\x07", "file:1/extra.bin": b"\x00"}
    with pytest.raises(InferenceServerException) as caught:
        client.load_model("fraud", headers=dict(ADMIN), config="{}", files=files)
    assert caught.value.status() == "400"
    message = caught.value.message()
    for name in ("config", "file:1/model.onnx", "file:1/extra.bin"):
        assert f"'parameters.{name}'" in message
    assert index(client) == before


@pytest.mark.parametrize(
    ("parameters", "named"),
    [
        ({"config": "{}"}, "'parameters.config'"),
        ({"file:1/model.onnx": "CAc="}, "'parameters.file:1/model.onnx'"),
        ({"versions": ["1"], "config": "{}"}, "'parameters.config'"),
        ({"verions": ["1"]}, "'parameters.verions': unknown parameter"),
        ({"unload_dependents": True}, "'parameters.unload_dependents'"),
        ({"p" * 10_000: 1}, "more characters]"),
        ({f"file:{i}": "" for i in range(10_000)}, "and 9997 more"),
    ],
    ids=["config", "file", "with-versions", "typo", "unload-only", "long-name", "many"],
)
def test_load_refuses_any_parameter_it_would_not_honour(
    gateway: InProcessServer, parameters: dict[str, Any], named: str
) -> None:
    r = httpx.post(
        gateway.url + "/v2/repository/models/fraud/load",
        json={"parameters": parameters},
        headers=ADMIN,
    )
    message = error_of(r, 400)
    assert named in message
    assert len(message) < 600


def test_unload_takes_tritonclients_unload_dependents(
    gateway: InProcessServer, client: tc.InferenceServerClient
) -> None:
    r = httpx.post(
        gateway.url + "/v2/repository/models/spare/unload",
        json={"parameters": {"unload_dependents": "yes"}},
        headers=ADMIN,
    )
    assert "unload_dependents" in error_of(r, 400)
    assert client.is_model_ready("spare")
    assert "spare" in httpx.get(gateway.url + "/v2/models").json()["models"]
    client.unload_model("spare", headers=dict(ADMIN))  # sends unload_dependents: false
    assert not client.is_model_ready("spare")
    assert "spare" not in httpx.get(gateway.url + "/v2/models").json()["models"]
    client.load_model("spare", headers=dict(ADMIN))
    assert client.is_model_ready("spare")


# -- listing and the extensions declared ---------------------------------------------------------


def test_the_listing_names_the_models_with_a_ready_version(
    gateway: InProcessServer, client: tc.InferenceServerClient
) -> None:
    listed = httpx.get(gateway.url + "/v2/models").json()
    ready = sorted({e["name"] for e in index(client) if e["state"] == "READY"})
    assert listed == {"models": ready}
    assert "broken" not in listed["models"]  # it failed to load


def test_every_extension_declared_is_served(
    gateway: InProcessServer, client: tc.InferenceServerClient
) -> None:
    declared = client.get_server_metadata()["extensions"]
    assert declared == EXTENSIONS
    assert sorted(declared) == sorted(
        ["binary_tensor_data", "model_repository", "model_configuration", "statistics"]
    )
    # each one answers through tritonclient
    infer(client, "fraud", 2)  # binary_tensor_data: the input was sent in binary
    assert index(client)  # model_repository
    assert client.get_model_config("fraud")["name"] == "fraud"  # model_configuration
    assert client.get_inference_statistics("fraud")["model_stats"]  # statistics


def test_every_route_the_app_serves_is_in_the_openapi_document(tmp_path: Path) -> None:
    app = create_app(Settings(tmp_path))
    paths = openapi_document()["paths"]
    served = [
        (route.path, method.lower())
        for route in app.routes
        if isinstance(route, Route)
        for method in sorted(route.methods or ())
        if method != "HEAD"
    ]
    assert len(served) > 30
    assert [(p, m) for p, m in served if m not in paths.get(p, {})] == []
