"""Models built for tests: same signature as the demo's fraud scorer, different behaviour."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, external_data_helper, helper, numpy_helper

from gateway.demo import FRAUD_TASK


def write_slow_fraud(
    folder: Path, layers: int = 500, width: int = 2048, *, per_row: bool = True
) -> Path:
    """input FP32 [-1, 32] -> probability FP32 [-1, 1], slow: a Loop of ``layers`` width²
    MatMuls per call (about 0.3 to 1 ms each at batch 1 on one core, memory-bound). With
    ``per_row`` the loop runs on every row, so a batch costs more the more rows it has; without,
    on the rows' mean, so every call costs the same whatever its rows (and the load's cost
    measure, 12 calls of 1 and 16 rows, costs 12 single-row calls, not 6 of 16 rows). One
    Loop node rather than ``layers`` MatMul nodes: onnxruntime then prepares the weight once,
    not once per node (5 s of session creation at 500 layers)."""
    rng = np.random.default_rng(7)
    w_in = numpy_helper.from_array(
        (rng.standard_normal((32, width)) / 32).astype(np.float32), "w_in"
    )
    w = numpy_helper.from_array(
        (rng.standard_normal((width, width)) / width).astype(np.float32), "w"
    )
    trips = numpy_helper.from_array(np.array(layers, np.int64), "trips")
    zero = numpy_helper.from_array(np.array(0.0, np.float32), "zero")
    layer = helper.make_graph(
        [
            helper.make_node("MatMul", ["h_in", "w"], ["h_out"]),
            helper.make_node("Identity", ["go_in"], ["go_out"]),
        ],
        "layer",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("go_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_in", TensorProto.FLOAT, ["rows", width]),
        ],
        [
            helper.make_tensor_value_info("go_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_out", TensorProto.FLOAT, ["rows", width]),
        ],
    )
    if per_row:
        nodes = [helper.make_node("Identity", ["input"], ["x"])]
    else:  # one row, the mean; each row's output still depends on its input (times zero)
        nodes = [helper.make_node("ReduceMean", ["input"], ["x"], axes=[0], keepdims=1)]
    nodes += [
        helper.make_node("MatMul", ["x", "w_in"], ["h0"]),
        helper.make_node("Loop", ["trips", "", "h0"], ["h"], body=layer),
        helper.make_node("ReduceMean", ["h"], ["m"], axes=[1], keepdims=1),
        helper.make_node("ReduceMean", ["input"], ["row"], axes=[1], keepdims=1),
        helper.make_node("Mul", ["row", "zero"], ["nothing"]),
        helper.make_node("Add", ["nothing", "m"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["probability"]),
    ]
    graph = helper.make_graph(
        nodes,
        "slow_fraud",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 32])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["batch", 1])],
        initializer=[w_in, w, trips, zero],
    )
    return _save(graph, folder)


def write_failing_fraud(folder: Path, feature: int, limit: float) -> Path:
    """input FP32 [-1, 32] -> probability FP32 [-1, 1] (always 0.5), raising inside onnxruntime
    (a Gather index out of range) for any batch holding a row whose ``feature`` exceeds
    ``limit``."""
    constants = [
        numpy_helper.from_array(np.array([feature], np.int64), "start"),
        numpy_helper.from_array(np.array([feature + 1], np.int64), "end"),
        numpy_helper.from_array(np.array([1], np.int64), "axis"),
        numpy_helper.from_array(np.array(limit, np.float32), "limit"),
        numpy_helper.from_array(np.array([0.5], np.float32), "table"),  # one entry: index 0
    ]
    nodes = [
        helper.make_node("Slice", ["input", "start", "end", "axis"], ["feature"]),
        helper.make_node("Greater", ["feature", "limit"], ["over"]),
        helper.make_node("Cast", ["over"], ["index"], to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "index"], ["probability"], axis=0),
    ]
    graph = helper.make_graph(
        nodes,
        "failing_fraud",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 32])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["batch", 1])],
        initializer=constants,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save(model, path)
    return path


def write_any_width_scorer(folder: Path) -> Path:
    """input FP32 [-1, -1] -> score FP32 [-1, 1], the mean of each row: a model whose feature
    axis is dynamic, so requests may send a width its reference sample does not have."""
    node = helper.make_node("ReduceMean", ["input"], ["score"], axes=[1], keepdims=1)
    graph = helper.make_graph(
        [node],
        "any_width",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", "features"])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch", 1])],
    )
    return _save(graph, folder)


def _save(graph: onnx.GraphProto, folder: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save(model, path)
    return path


def write_external_data_scorer(folder: Path, location: str, target: Path | None = None) -> Path:
    """input FP32 [-1, 32] -> probability FP32 [-1, 1] = sigmoid(input @ w), where ``w`` keeps
    its data in an external file: the model names ``location``; the bytes are written to
    ``target`` (default: ``location`` under ``folder``)."""
    w = numpy_helper.from_array(
        (np.random.default_rng(3).standard_normal((32, 1)) / 32).astype(np.float32), "w"
    )
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "w"], ["logit"]),
            helper.make_node("Sigmoid", ["logit"], ["probability"]),
        ],
        "external_scorer",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 32])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["batch", 1])],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    tensor = model.graph.initializer[0]
    data = tensor.raw_data
    destination = target if target is not None else folder / location
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_bytes(data)
    external_data_helper.set_external_data(tensor, location, offset=0, length=len(data))
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save(model, path)
    return path


def write_expanding(folder: Path) -> Path:
    """size INT64 [1] -> values FP32 [-1], ``size`` ones: a model whose output shape depends on
    an input's value, so a request of a few dozen bytes can ask for any number of elements."""
    node = helper.make_node(
        "ConstantOfShape",
        ["size"],
        ["values"],
        value=numpy_helper.from_array(np.array([1.0], np.float32)),
    )
    graph = helper.make_graph(
        [node],
        "expanding",
        [helper.make_tensor_value_info("size", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("values", TensorProto.FLOAT, ["n"])],
    )
    return _save(graph, folder)


def write_fixed_doubler(folder: Path) -> Path:
    """y = 2x with x FP32 of static shape [2, 3]: its first axis is not dynamic, so requests to
    it are never merged (Triton's max_batch_size 0)."""
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["y"])],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [two],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def write_linear_fraud(
    folder: Path, weights: np.ndarray, mean: np.ndarray, std: np.ndarray, reference: np.ndarray
) -> str:
    """A fraud version as a training pipeline writes one: ``model.onnx`` computing
    probability = sigmoid(((input - mean) / std) @ weights) for input FP32 [-1, 32], the demo's
    binary task in ``metadata.json`` and ``reference`` (its training rows, FP32 [n, 32]) as
    ``reference.npy``. The model file is written last, so a load never sees half a version.
    Returns the model's sha256 (the artifact the audit trail names)."""
    graph = helper.make_graph(
        [
            helper.make_node("Sub", ["input", "mean"], ["centred"]),
            helper.make_node("Div", ["centred", "std"], ["scaled"]),
            helper.make_node("MatMul", ["scaled", "w"], ["logit"]),
            helper.make_node("Sigmoid", ["logit"], ["probability"]),
        ],
        "linear_fraud",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 32])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["batch", 1])],
        initializer=[
            numpy_helper.from_array(np.asarray(mean, np.float32), "mean"),
            numpy_helper.from_array(np.asarray(std, np.float32), "std"),
            numpy_helper.from_array(np.asarray(weights, np.float32).reshape(32, 1), "w"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(reference, np.float32), allow_pickle=False)
    (folder / "reference.npy").write_bytes(buffer.getvalue())
    metadata = {
        "task": FRAUD_TASK,
        "reference_input": "input",
        "training_data_sha256": hashlib.sha256(buffer.getvalue()).hexdigest(),
    }
    (folder / "metadata.json").write_text(json.dumps(metadata))
    data = model.SerializeToString()
    (folder / "model.onnx").write_bytes(data)
    return hashlib.sha256(data).hexdigest()
