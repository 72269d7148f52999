"""The demo model repository, built in code with the ``onnx`` helper API (no downloads).

Layout (Triton's)::

    root/<model>/<version>/model.onnx
    root/<model>/<version>/reference.npy    (not for echo)
    root/<model>/<version>/metadata.json

Models: ``fraud`` v1 and v2 (tabular scorer, different weights), ``risk`` v1 (three inputs and
three outputs of different datatypes), ``echo`` v1 (Identity per protocol datatype) and, when
``heavy=True``, ``heavy`` v1 (≈0.5 ms of compute per sample at batch 32 on one core).

Reference contract: ``reference.npy`` is a 2-D array (n_rows, n_features) of rows of the
version's *first* input, in that input's dtype (FP32 for every demo model), drawn from the same
distributions as :func:`sample_inputs`; ``metadata["reference_input"]`` names that input and
``metadata["training_data_sha256"]`` is the sha256 of the ``reference.npy`` file bytes. ``echo``
has no reference (its inputs are protocol fixtures of any width, not a distribution): both keys
are ``null`` there.

Every byte is a function of fixed seeds, so two builds are byte-identical. Writing overwrites
files in place and leaves anything else under ``root`` alone.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
REFERENCE_ROWS = 5000
REFERENCE_SEED = 20240601

FRAUD_FEATURES = 32
RISK_FEATURES = 8
RISK_FLAGS = 4
RISK_SEGMENTS = 5
HEAVY_FEATURES = 256
HEAVY_WIDTH = 1024
HEAVY_LAYERS = 33  # batch-32 per-sample time ≈ 0.5 ms on one AVX-512 core (batch 1: ≈ 2 ms)
HEAVY_DISTINCT = 4  # hidden layers cycle through 4 weight matrices: 18 MB instead of 140 MB
ECHO_WIDTH = 3
# The demo fraud scorer's task: its one output is the probability of fraud (docs/closed-loop.md)
FRAUD_TASK: dict[str, Any] = {"type": "binary", "output": "probability", "threshold": 0.5}

# Echo input suffix -> (ONNX element type, numpy dtype).
ECHO_TYPES: dict[str, tuple[int, np.dtype[Any]]] = {
    "bool": (TensorProto.BOOL, np.dtype(np.bool_)),
    "int8": (TensorProto.INT8, np.dtype(np.int8)),
    "int16": (TensorProto.INT16, np.dtype(np.int16)),
    "int32": (TensorProto.INT32, np.dtype(np.int32)),
    "int64": (TensorProto.INT64, np.dtype(np.int64)),
    "uint8": (TensorProto.UINT8, np.dtype(np.uint8)),
    "uint16": (TensorProto.UINT16, np.dtype(np.uint16)),
    "uint32": (TensorProto.UINT32, np.dtype(np.uint32)),
    "uint64": (TensorProto.UINT64, np.dtype(np.uint64)),
    "fp16": (TensorProto.FLOAT16, np.dtype(np.float16)),
    "fp32": (TensorProto.FLOAT, np.dtype(np.float32)),
    "fp64": (TensorProto.DOUBLE, np.dtype(np.float64)),
    "bytes": (TensorProto.STRING, np.dtype(object)),
}

Arrays = dict[str, np.ndarray[Any, Any]]
Float32 = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class _Artifact:
    model: str
    version: str
    graph: onnx.ModelProto
    description: str
    seed: int
    reference: Float32 | None  # rows of the first input
    config: dict[str, Any] | None = None  # the version's config.json
    task: dict[str, Any] | None = None  # metadata["task"] (gateway.serving.task)


# --- input distributions -------------------------------------------------------------------


def _fraud_inputs(rng: np.random.Generator, n: int) -> Arrays:
    """32 features: 16 normal, 4 lognormal amounts, 6 coded categoricals (≤ 10 levels),
    2 zero-inflated, 2 uniform, 2 small counts."""
    cols: list[npt.NDArray[np.float64]] = []
    means = np.linspace(-2.0, 3.0, 16)
    scales = np.linspace(0.5, 4.0, 16)
    cols.extend(rng.normal(m, s, n) for m, s in zip(means, scales, strict=True))
    cols.extend(
        rng.lognormal(mu, sigma, n)
        for mu, sigma in [(3.0, 1.0), (4.5, 1.2), (2.0, 0.6), (6.0, 1.5)]
    )
    for levels in (2, 3, 4, 5, 7, 10):
        weights = np.arange(levels, 0, -1, dtype=np.float64)
        cols.append(rng.choice(levels, size=n, p=weights / weights.sum()).astype(np.float64))
    for zero_share, scale in [(0.7, 50.0), (0.9, 3.0)]:
        cols.append(np.where(rng.random(n) < zero_share, 0.0, rng.exponential(scale, n)))
    cols.extend(rng.random(n) for _ in range(2))
    cols.extend(rng.poisson(lam, n).astype(np.float64) for lam in (0.5, 3.0))
    return {"input": np.stack(cols, axis=1).astype(np.float32)}


def _risk_inputs(rng: np.random.Generator, n: int) -> Arrays:
    features = rng.normal(np.linspace(-1.0, 1.0, RISK_FEATURES), 1.0, (n, RISK_FEATURES))
    features[:, -1] = rng.lognormal(1.0, 0.8, n)
    segment_p = np.array([0.4, 0.25, 0.15, 0.12, 0.08])
    return {
        "features": features.astype(np.float32),
        "segment": rng.choice(RISK_SEGMENTS, size=(n, 1), p=segment_p).astype(np.int64),
        "flags": rng.random((n, RISK_FLAGS)) < np.array([0.5, 0.2, 0.05, 0.8]),
    }


def _echo_inputs(rng: np.random.Generator, n: int) -> Arrays:
    """Integers over their full range, floats ~ N(0, 100²), BYTES as object arrays of ASCII
    ``bytes`` (0-8 letters)."""
    shape = (n, ECHO_WIDTH)
    out: Arrays = {}
    for suffix, (_, dtype) in ECHO_TYPES.items():
        if dtype == np.bool_:
            out[f"in_{suffix}"] = rng.random(shape) < 0.5
        elif dtype.kind in "iu":
            info = np.iinfo(dtype)
            out[f"in_{suffix}"] = rng.integers(info.min, info.max, shape, dtype, endpoint=True)
        elif dtype.kind == "f":
            out[f"in_{suffix}"] = (rng.standard_normal(shape) * 100.0).astype(dtype)
        else:
            letters = rng.integers(ord("a"), ord("z"), (n * ECHO_WIDTH, 8), endpoint=True)
            lengths = rng.integers(0, 8, n * ECHO_WIDTH, endpoint=True)
            words = [
                bytes(row[:k].astype(np.uint8)) for row, k in zip(letters, lengths, strict=True)
            ]
            cells = np.empty(n * ECHO_WIDTH, dtype=object)
            cells[:] = words
            out[f"in_{suffix}"] = cells.reshape(shape)
    return out


def _heavy_inputs(rng: np.random.Generator, n: int) -> Arrays:
    return {"input": rng.standard_normal((n, HEAVY_FEATURES)).astype(np.float32)}


_SAMPLERS: dict[str, Callable[[np.random.Generator, int], Arrays]] = {
    "fraud": _fraud_inputs,
    "risk": _risk_inputs,
    "echo": _echo_inputs,
    "heavy": _heavy_inputs,
}


def sample_inputs(model: str, n: int, seed: int) -> dict[str, np.ndarray[Any, Any]]:
    """``n`` rows of valid inputs for a demo model, from the distributions of its reference.

    BYTES inputs (echo's ``in_bytes``) are object arrays of ``bytes``, the protocol's form;
    onnxruntime itself wants ``str`` there.
    """
    sampler = _SAMPLERS.get(model)
    if sampler is None:
        raise ValueError(f"unknown demo model {model!r}; expected one of {sorted(_SAMPLERS)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return sampler(np.random.default_rng(seed), n)


# --- graphs ----------------------------------------------------------------------------------


def _model(
    name: str,
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    initializers: Sequence[onnx.TensorProto],
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="turnout demo-repo",
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def _tensor(array: np.ndarray[Any, Any], name: str) -> onnx.TensorProto:
    return numpy_helper.from_array(array, name)


def _normal(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> Float32:
    return (rng.standard_normal(shape) * std).astype(np.float32)


def _fraud(seed: int, reference: Float32) -> onnx.ModelProto:
    """Standardise with the reference's moments, then 32 -> 16 Relu -> 1 Sigmoid."""
    rng = np.random.default_rng(seed)
    hidden = 16
    mean = reference.mean(axis=0, dtype=np.float64).astype(np.float32)
    std = reference.std(axis=0, dtype=np.float64).astype(np.float32)
    inits = [
        _tensor(mean, "mean"),
        _tensor(np.maximum(std, np.float32(1e-6)), "std"),
        _tensor(_normal(rng, (FRAUD_FEATURES, hidden), np.sqrt(2.0 / FRAUD_FEATURES)), "w1"),
        _tensor(_normal(rng, (hidden,), 0.1), "b1"),
        # 1.5x the unit-variance scale spreads probabilities over (0, 1) rather than near 0.5.
        _tensor(_normal(rng, (hidden, 1), 1.5 / np.sqrt(hidden)), "w2"),
        _tensor(np.array([-1.0], dtype=np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("Sub", ["input", "mean"], ["centred"]),
        helper.make_node("Div", ["centred", "std"], ["scaled"]),
        helper.make_node("Gemm", ["scaled", "w1", "b1"], ["z1"]),
        helper.make_node("Relu", ["z1"], ["h1"]),
        helper.make_node("Gemm", ["h1", "w2", "b2"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["probability"]),
    ]
    return _model(
        "fraud",
        nodes,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", FRAUD_FEATURES])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["batch", 1])],
        inits,
    )


def _risk(seed: int) -> onnx.ModelProto:
    """[features, Cast(flags)] -> 12 -> 8 Relu -> 2 logits, plus a per-segment offset (segment
    clipped into range). score = softmax(logits)[:, 1], label = score > 0.5, logits as FP64."""
    rng = np.random.default_rng(seed)
    width = RISK_FEATURES + RISK_FLAGS
    inits = [
        _tensor(_normal(rng, (width, 8), np.sqrt(2.0 / width)), "w1"),
        _tensor(_normal(rng, (8,), 0.1), "b1"),
        _tensor(_normal(rng, (8, 2), 1.0 / np.sqrt(8)), "w2"),
        _tensor(np.zeros(2, dtype=np.float32), "b2"),
        _tensor(_normal(rng, (RISK_SEGMENTS, 2), 0.5), "segment_offsets"),
        _tensor(np.array(0, dtype=np.int64), "segment_min"),
        _tensor(np.array(RISK_SEGMENTS - 1, dtype=np.int64), "segment_max"),
        _tensor(np.array([-1], dtype=np.int64), "flat"),
        _tensor(np.array([1], dtype=np.int64), "one"),
        _tensor(np.array([2], dtype=np.int64), "two"),
        _tensor(np.array([0.5], dtype=np.float32), "threshold"),
    ]
    nodes = [
        helper.make_node("Cast", ["flags"], ["flags_f"], to=TensorProto.FLOAT),
        helper.make_node("Concat", ["features", "flags_f"], ["x"], axis=1),
        helper.make_node("Gemm", ["x", "w1", "b1"], ["z1"]),
        helper.make_node("Relu", ["z1"], ["h1"]),
        helper.make_node("Gemm", ["h1", "w2", "b2"], ["z2"]),
        helper.make_node("Clip", ["segment", "segment_min", "segment_max"], ["segment_c"]),
        helper.make_node("Reshape", ["segment_c", "flat"], ["segment_flat"]),
        helper.make_node("Gather", ["segment_offsets", "segment_flat"], ["offset"], axis=0),
        helper.make_node("Add", ["z2", "offset"], ["z"]),
        helper.make_node("Cast", ["z"], ["logits"], to=TensorProto.DOUBLE),
        helper.make_node("Softmax", ["z"], ["p"], axis=1),
        helper.make_node("Slice", ["p", "one", "two", "one"], ["score"]),
        helper.make_node("Greater", ["score", "threshold"], ["positive"]),
        helper.make_node("Cast", ["positive"], ["label"], to=TensorProto.INT64),
    ]
    vi = helper.make_tensor_value_info
    return _model(
        "risk",
        nodes,
        [
            vi("features", TensorProto.FLOAT, ["batch", RISK_FEATURES]),
            vi("segment", TensorProto.INT64, ["batch", 1]),
            vi("flags", TensorProto.BOOL, ["batch", RISK_FLAGS]),
        ],
        [
            vi("score", TensorProto.FLOAT, ["batch", 1]),
            vi("label", TensorProto.INT64, ["batch", 1]),
            vi("logits", TensorProto.DOUBLE, ["batch", 2]),
        ],
        inits,
    )


def _echo() -> onnx.ModelProto:
    # Separate symbolic dims per input: no input constrains another's shape.
    vi = helper.make_tensor_value_info
    inputs, outputs, nodes = [], [], []
    for suffix, (elem, _) in ECHO_TYPES.items():
        dims = [f"{suffix}_rows", f"{suffix}_cols"]
        inputs.append(vi(f"in_{suffix}", elem, dims))
        outputs.append(vi(f"out_{suffix}", elem, dims))
        nodes.append(helper.make_node("Identity", [f"in_{suffix}"], [f"out_{suffix}"]))
    return _model("echo", nodes, inputs, outputs, [])


def _heavy(seed: int) -> onnx.ModelProto:
    """256 -> 1024 Relu, then HEAVY_LAYERS x (1024 -> 1024 Relu) cycling through
    HEAVY_DISTINCT shared matrices, then 1024 -> 10."""
    rng = np.random.default_rng(seed)
    he = np.sqrt(2.0 / HEAVY_WIDTH)
    inits = [
        _tensor(_normal(rng, (HEAVY_FEATURES, HEAVY_WIDTH), np.sqrt(2.0 / HEAVY_FEATURES)), "w_in")
    ]
    inits += [
        _tensor(_normal(rng, (HEAVY_WIDTH, HEAVY_WIDTH), he), f"w{k}")
        for k in range(HEAVY_DISTINCT)
    ]
    inits.append(_tensor(_normal(rng, (HEAVY_WIDTH, 10), np.sqrt(1.0 / HEAVY_WIDTH)), "w_out"))
    nodes = [
        helper.make_node("MatMul", ["input", "w_in"], ["z0"]),
        helper.make_node("Relu", ["z0"], ["h0"]),
    ]
    for layer in range(1, HEAVY_LAYERS + 1):
        weight = f"w{(layer - 1) % HEAVY_DISTINCT}"
        nodes.append(helper.make_node("MatMul", [f"h{layer - 1}", weight], [f"z{layer}"]))
        nodes.append(helper.make_node("Relu", [f"z{layer}"], [f"h{layer}"]))
    nodes.append(helper.make_node("MatMul", [f"h{HEAVY_LAYERS}", "w_out"], ["output"]))
    return _model(
        "heavy",
        nodes,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", HEAVY_FEATURES])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )


# --- writing ---------------------------------------------------------------------------------


def _reference(model: str) -> Float32:
    first = next(iter(sample_inputs(model, REFERENCE_ROWS, REFERENCE_SEED).values()))
    return first.astype(np.float32, copy=False)


def _artifacts(heavy: bool) -> list[_Artifact]:
    fraud_ref = _reference("fraud")
    out = [
        _Artifact(
            "fraud",
            "1",
            _fraud(101, fraud_ref),
            "Tabular fraud scorer, first training run.",
            101,
            fraud_ref,
            task=FRAUD_TASK,
        ),
        _Artifact(
            "fraud",
            "2",
            _fraud(202, fraud_ref),
            "Tabular fraud scorer retrained with a new seed; its scores differ from v1.",
            202,
            fraud_ref,
            task=FRAUD_TASK,
        ),
        _Artifact(
            "risk",
            "1",
            _risk(301),
            "Risk scorer with FP32, INT64 and BOOL inputs; FP32, INT64 and FP64 outputs.",
            301,
            _reference("risk"),
        ),
        _Artifact("echo", "1", _echo(), "Identity per datatype, for protocol tests.", 0, None),
    ]
    if heavy:
        desc = "Deep MLP, about 0.5 ms of compute per sample on one core, for load tests."
        # One request holds the session for at most about half a second (docs/model-repository.md).
        config = {"max_rows_per_request": 1024}
        out.append(_Artifact("heavy", "1", _heavy(401), desc, 401, _reference("heavy"), config))
    return out


def _write(path: Path, data: bytes) -> None:
    # Replace atomically so a watcher never loads a half-written file.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_demo_repository(root: Path, *, heavy: bool = True) -> list[Path]:
    """Write every demo model under ``root`` and return the version folders written, in order.

    Idempotent: rewrites the same bytes on every run; leaves other files under ``root`` alone.
    """
    folders: list[Path] = []
    for artifact in _artifacts(heavy):
        folder = Path(root) / artifact.model / artifact.version
        folder.mkdir(parents=True, exist_ok=True)
        _write(folder / "model.onnx", artifact.graph.SerializeToString())
        digest: str | None = None
        reference_input: str | None = None
        if artifact.reference is not None:
            buffer = io.BytesIO()
            np.save(buffer, artifact.reference, allow_pickle=False)
            digest = hashlib.sha256(buffer.getvalue()).hexdigest()
            reference_input = artifact.graph.graph.input[0].name
            _write(folder / "reference.npy", buffer.getvalue())
        metadata: dict[str, Any] = {
            "description": artifact.description,
            "owner": "turnout-demo",
            "training_data_sha256": digest,
            "reference_input": reference_input,
            "code_commit": "demo",
            "seed": artifact.seed,
            "reference_seed": None if digest is None else REFERENCE_SEED,
            "created_by": "turnout demo-repo",
        }
        if artifact.task is not None:
            metadata["task"] = artifact.task
        text = json.dumps(metadata, indent=2, sort_keys=True) + "\n"
        _write(folder / "metadata.json", text.encode())
        if artifact.config is not None:
            _write(folder / "config.json", (json.dumps(artifact.config) + "\n").encode())
        folders.append(folder)
    return folders
