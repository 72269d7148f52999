from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from gateway.demo import sample_inputs, write_demo_repository
from gateway.serving.types import NUMPY_DTYPES, ONNX_TO_DATATYPE

Arrays = dict[str, np.ndarray[Any, Any]]
Spec = tuple[str, str, tuple[int, ...]]

ECHO_SUFFIXES = {
    "bool": "BOOL",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "fp16": "FP16",
    "fp32": "FP32",
    "fp64": "FP64",
    "bytes": "BYTES",
}

# model -> (inputs, outputs) as the protocol sees them: name, datatype, shape with -1 dynamic.
DECLARED: dict[str, tuple[list[Spec], list[Spec]]] = {
    "fraud": ([("input", "FP32", (-1, 32))], [("probability", "FP32", (-1, 1))]),
    "risk": (
        [("features", "FP32", (-1, 8)), ("segment", "INT64", (-1, 1)), ("flags", "BOOL", (-1, 4))],
        [("score", "FP32", (-1, 1)), ("label", "INT64", (-1, 1)), ("logits", "FP64", (-1, 2))],
    ),
    "echo": (
        [(f"in_{s}", d, (-1, -1)) for s, d in ECHO_SUFFIXES.items()],
        [(f"out_{s}", d, (-1, -1)) for s, d in ECHO_SUFFIXES.items()],
    ),
    "heavy": ([("input", "FP32", (-1, 256))], [("output", "FP32", (-1, 10))]),
}
LIGHT_VERSIONS = [("fraud", "1"), ("fraud", "2"), ("risk", "1"), ("echo", "1")]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("demo")
    return root, write_demo_repository(root, heavy=False)


def _session(folder: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(
        str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"]
    )


def _specs(args: list[Any]) -> list[Spec]:
    return [
        (a.name, ONNX_TO_DATATYPE[a.type], tuple(d if isinstance(d, int) else -1 for d in a.shape))
        for a in args
    ]


def _feed(inputs: Arrays) -> Arrays:
    """onnxruntime string tensors take ``str``: it would feed ``str(b"x")`` == "b'x'" verbatim."""
    return {
        name: np.vectorize(bytes.decode, otypes=[object])(a) if a.dtype == object else a
        for name, a in inputs.items()
    }


def _run(folder: Path, inputs: Arrays) -> Arrays:
    session = _session(folder)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, _feed(inputs)), strict=True))


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_writes_the_documented_layout(repo: tuple[Path, list[Path]]) -> None:
    root, folders = repo
    assert folders == [root / m / v for m, v in LIGHT_VERSIONS]
    for folder in folders:
        names = {p.name for p in folder.iterdir()}
        metadata = json.loads((folder / "metadata.json").read_text())
        assert metadata["created_by"] == "turnout demo-repo"
        assert metadata["code_commit"] == "demo"
        assert isinstance(metadata["seed"], int)
        assert {"description", "owner"} <= metadata.keys()
        if folder.parent.name == "echo":
            assert names == {"model.onnx", "metadata.json"}
            assert metadata["training_data_sha256"] is None
            assert metadata["reference_input"] is None
            continue
        assert names == {"model.onnx", "metadata.json", "reference.npy"}
        raw = (folder / "reference.npy").read_bytes()
        assert metadata["training_data_sha256"] == hashlib.sha256(raw).hexdigest()
        first_name, _, first_shape = DECLARED[folder.parent.name][0][0]
        assert metadata["reference_input"] == first_name
        reference = np.load(folder / "reference.npy", allow_pickle=False)
        assert reference.dtype == np.float32
        assert reference.shape == (5000, first_shape[1])
        assert np.isfinite(reference).all()


def test_fraud_reference_has_mixed_distributions(repo: tuple[Path, list[Path]]) -> None:
    reference = np.load(repo[0] / "fraud" / "1" / "reference.npy")
    distinct = [len(np.unique(reference[:, j])) for j in range(reference.shape[1])]
    categorical = [j for j, k in enumerate(distinct) if k <= 10]
    assert len(categorical) >= 4
    for j in categorical:
        assert np.array_equal(reference[:, j], np.round(reference[:, j]))
    # A zero-inflated column: at least half zeros yet continuous elsewhere.
    zero_share = (reference == 0).mean(axis=0)
    assert any(z >= 0.5 and k > 100 for z, k in zip(zero_share, distinct, strict=True))
    # A lognormal, amount-like column: positive with mean well above the median.
    skewed = (reference > 0).all(axis=0) & (reference.mean(axis=0) > 1.3 * np.median(reference, 0))
    assert skewed.any()


@pytest.mark.parametrize(("model", "version"), LIGHT_VERSIONS, ids=str)
def test_models_declare_and_return_their_specs(
    repo: tuple[Path, list[Path]], model: str, version: str
) -> None:
    folder = repo[0] / model / version
    session = _session(folder)
    declared_inputs, declared_outputs = DECLARED[model]
    assert _specs(session.get_inputs()) == declared_inputs
    assert _specs(session.get_outputs()) == declared_outputs
    inputs = sample_inputs(model, 7, seed=3)
    result = _run(folder, inputs)
    for name, datatype, (_, width) in declared_outputs:
        assert result[name].dtype == NUMPY_DTYPES[datatype]
        if width == -1:  # echo: the dynamic width follows the matching input
            width = inputs[name.replace("out_", "in_")].shape[1]
        assert result[name].shape == (7, width)


def test_sample_inputs_match_declared_inputs() -> None:
    for model, (inputs, _) in DECLARED.items():
        rows = sample_inputs(model, 5, seed=1)
        assert list(rows) == [name for name, _, _ in inputs]
        for name, datatype, shape in inputs:
            assert rows[name].dtype == NUMPY_DTYPES[datatype]
            assert rows[name].shape[0] == 5
            assert all(d in (-1, got) for d, got in zip(shape, rows[name].shape, strict=True))
        again = sample_inputs(model, 5, seed=1)
        for name in rows:
            np.testing.assert_array_equal(rows[name], again[name])


def test_sample_inputs_rejects_unknown_model_and_negative_n() -> None:
    with pytest.raises(ValueError, match="unknown demo model 'nope'"):
        sample_inputs("nope", 1, seed=0)
    with pytest.raises(ValueError, match="n must be >= 0"):
        sample_inputs("fraud", -1, seed=0)


def test_fraud_versions_score_differently(repo: tuple[Path, list[Path]]) -> None:
    inputs = sample_inputs("fraud", 2000, seed=11)
    v1 = _run(repo[0] / "fraud" / "1", inputs)["probability"]
    v2 = _run(repo[0] / "fraud" / "2", inputs)["probability"]
    assert ((v1 > 0) & (v1 < 1)).all()
    assert v1.std() > 0.05 and v2.std() > 0.05  # scores spread, not collapsed to a constant
    # Seeded weights, so this is fixed, not statistical: the versions differ by ~0.1 on average,
    # far from the 1e-7 float32 noise two equal models would show.
    assert np.abs(v1 - v2).mean() > 0.05


def test_risk_outputs_are_consistent(repo: tuple[Path, list[Path]]) -> None:
    inputs = sample_inputs("risk", 500, seed=5)
    inputs["segment"][:3, 0] = [-4, 99, 4]  # out-of-range segments are clipped, not errors
    out = _run(repo[0] / "risk" / "1", inputs)
    logits = out["logits"]
    softmax_1 = 1.0 / (1.0 + np.exp(logits[:, :1] - logits[:, 1:]))
    np.testing.assert_allclose(out["score"], softmax_1, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out["label"], (out["score"] > 0.5).astype(np.int64))
    assert 0 < out["label"].sum() < len(out["label"])


def test_two_builds_are_byte_identical(
    repo: tuple[Path, list[Path]], tmp_path_factory: pytest.TempPathFactory
) -> None:
    other = tmp_path_factory.mktemp("demo_again")
    write_demo_repository(other, heavy=False)
    first = _files(repo[0])
    assert first == _files(other)
    write_demo_repository(other, heavy=False)  # overwriting in place changes nothing
    assert first == _files(other)


def test_echo_returns_every_datatype_exactly(repo: tuple[Path, list[Path]]) -> None:
    inputs = sample_inputs("echo", 50, seed=9)
    out = _run(repo[0] / "echo" / "1", inputs)
    for suffix, datatype in ECHO_SUFFIXES.items():
        sent, got = inputs[f"in_{suffix}"], out[f"out_{suffix}"]
        assert got.dtype == NUMPY_DTYPES[datatype]
        if datatype == "BYTES":
            got = np.vectorize(str.encode, otypes=[object])(got)
        np.testing.assert_array_equal(got, sent, strict=True)
    # Full-range integers really are exercised, not just small values.
    assert inputs["in_uint64"].max() > np.iinfo(np.int64).max
    assert inputs["in_int64"].min() < np.iinfo(np.int32).min


def test_heavy_model_declares_its_shapes(tmp_path: Path) -> None:
    folders = write_demo_repository(tmp_path)
    folder = tmp_path / "heavy" / "1"
    assert folders[-1] == folder
    assert (folder / "model.onnx").stat().st_size < 40 * 2**20
    session = _session(folder)
    inputs, outputs = DECLARED["heavy"]
    assert _specs(session.get_inputs()) == inputs
    assert _specs(session.get_outputs()) == outputs
    out = _run(folder, sample_inputs("heavy", 4, seed=2))["output"]
    assert out.shape == (4, 10)
    assert np.isfinite(out).all()
    assert np.load(folder / "reference.npy").shape == (5000, 256)
