"""onnxruntime sessions behind the Runtime seam: load (with checks and a warm-up) and run."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from gateway.errors import BadRequest, GatewayError, LoadError, ModelError, Timeout
from gateway.serving.repository import external_data_inside
from gateway.serving.task import TaskError, parse_task
from gateway.serving.types import (
    NUMPY_DTYPES,
    ONNX_TO_DATATYPE,
    ModelVersion,
    Receive,
    TensorSpec,
)
from gateway.settings import Settings

_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class SessionRuntime:
    """Runs one onnxruntime session on an executor thread, so the event loop keeps serving."""

    def __init__(self, session: Any, executor: Executor) -> None:
        self._session = session
        self._executor = executor
        # Measured at load: (seconds per one-row run, seconds per extra row).
        self.cost = (0.0, 0.0)
        # The C++ session's run, without the Python wrapper's per-call checks (input names,
        # graph capture, OrtValue ownership): they cost 1.7 µs of a light model's 7 µs run,
        # and every caller passes checked inputs (the codec, the batcher, warm-up). The
        # public method if a release renames the attribute; both take (names, feed, options).
        inner = getattr(session, "_sess", None)
        self._run = getattr(inner, "run", None) or session.run

    def run_sync(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
        names = outputs if type(outputs) is list else list(outputs)
        try:
            results = self._run(names, inputs if type(inputs) is dict else dict(inputs), None)
        except UnicodeDecodeError:
            raise _not_text(inputs) from None
        except Exception as exc:  # onnxruntime raises its own pybind types; translate them here
            raise ModelError(f"model execution failed: {exc}") from None
        return dict(zip(names, results, strict=True))

    async def run(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        *,
        deadline: float | None = None,
        receive: Receive | None = None,  # not watched: nothing queues here
    ) -> dict[str, np.ndarray]:
        if deadline is not None and time.monotonic() >= deadline:
            raise Timeout("the request's deadline passed before it could run")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.run_sync, inputs, outputs)

    def close(self) -> None:
        self._session = self._run = None


def _not_text(inputs: Mapping[str, np.ndarray]) -> GatewayError:
    """A string output that is not UTF-8, which onnxruntime cannot return (it hands strings to
    Python as str). The client's doing when it sent bytes that are not UTF-8 (the codec's
    fixed-width bytes arrays); else the model's."""
    why = "onnxruntime returns string tensors only as UTF-8 text"
    sent = [name for name, array in inputs.items() if array.dtype.kind == "S"]
    if sent:
        return BadRequest(
            f"a string output of the model is not UTF-8 ({why}): it carries bytes of input "
            f"{sent[0]!r}, which are not UTF-8; such bytes can go into a model but not come "
            "back out of it"
        )
    return ModelError(f"model execution failed: a string output is not UTF-8 ({why})")


def session_options(settings: Settings) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.intra_op_threads
    options.inter_op_num_threads = settings.inter_op_threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = _OPT_LEVELS[settings.graph_optimization]
    options.log_severity_level = 3
    return options


def load_version(
    model: str, version: str, folder: Path, settings: Settings, executor: Executor
) -> tuple[ModelVersion, SessionRuntime]:
    """Read, check and warm one version. Blocking: call it off the event loop."""
    path = folder / "model.onnx"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LoadError(f"cannot read {path.name}: {exc.strerror or exc}") from None
    metadata = _read_metadata(folder)
    external_data_inside(path)
    try:
        # By path, so that external data resolves against the model's folder (checked above),
        # never against the process's working directory.
        session = ort.InferenceSession(
            str(path), sess_options=session_options(settings), providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        raise LoadError(f"onnxruntime could not load the model: {exc}") from None
    outputs = tuple(_spec(arg) for arg in session.get_outputs())
    try:
        task = parse_task(metadata.get("task"), outputs)
    except TaskError as exc:
        raise LoadError(f"metadata.json: {exc}") from None
    mv = ModelVersion(
        model=model,
        version=version,
        path=path,
        sha256=hashlib.sha256(data).hexdigest(),
        inputs=tuple(_spec(arg) for arg in session.get_inputs()),
        outputs=outputs,
        metadata=metadata,
        task=task,
    )
    runtime = SessionRuntime(session, executor)
    try:
        runtime.cost = measure_cost(runtime, mv)
    except ModelError as exc:
        raise LoadError(f"warm-up inference failed: {exc.message}") from None
    return mv, runtime


def measure_cost(runtime: SessionRuntime, mv: ModelVersion, repeat: int = 5) -> tuple[float, float]:
    """(seconds per run at one row, seconds per extra row), medians of ``repeat`` warm runs.
    The first run is the warm-up and is not counted."""
    outputs = [o.name for o in mv.outputs]

    def median_run(rows: int) -> float:
        inputs = warmup_inputs(mv.inputs, rows)
        times = []
        for _ in range(repeat + 1):
            start = time.perf_counter()
            runtime.run_sync(inputs, outputs)
            times.append(time.perf_counter() - start)
        return sorted(times[1:])[repeat // 2]

    one = median_run(1)
    if not (mv.inputs and all(spec.batched for spec in mv.inputs)):
        return one, one
    many = 16
    return one, max(0.0, (median_run(many) - one) / (many - 1))


def inline_rows(cost: tuple[float, float], threshold_s: float) -> int:
    """The most rows a request may have to be estimated under ``threshold_s`` (0: none)."""
    one, per_row = cost
    if threshold_s <= 0 or one > threshold_s:
        return 0
    if per_row <= 0:
        return 1 << 20
    return 1 + int((threshold_s - one) / per_row)


def warmup_inputs(specs: Sequence[TensorSpec], rows: int = 1) -> dict[str, np.ndarray]:
    """Zeros (empty strings for BYTES): ``rows`` on a dynamic first axis, other dynamic axes 1."""
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        shape = tuple((rows if i == 0 else 1) if d < 0 else d for i, d in enumerate(spec.shape))
        if spec.datatype == "BYTES":
            out[spec.name] = np.full(shape, "", dtype=object)
        else:
            out[spec.name] = np.zeros(shape, dtype=spec.dtype)
    return out


def _spec(arg: Any) -> TensorSpec:
    datatype = ONNX_TO_DATATYPE.get(arg.type)
    if datatype is None or datatype not in NUMPY_DTYPES:
        raise LoadError(f"tensor {arg.name!r} has unsupported type {arg.type}")
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape)
    return TensorSpec(arg.name, datatype, shape)


def _read_metadata(folder: Path) -> dict[str, Any]:
    path = folder / "metadata.json"
    if not path.exists():
        return {}
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LoadError(f"metadata.json is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise LoadError("metadata.json must hold a JSON object")
    return value
