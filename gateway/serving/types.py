"""Core value types: tensor specs, model versions and the Runtime seam."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from gateway.serving.task import Task

# Open Inference Protocol datatype -> numpy dtype. BYTES tensors are numpy object arrays of str
# (onnxruntime stringifies bytes objects; see gateway/codec.py).
NUMPY_DTYPES: Mapping[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}

# ASGI ``receive``: once the request's body is read, its next message is ``http.disconnect``
# when the client leaves.
Receive = Callable[[], Awaitable[Mapping[str, Any]]]

# onnxruntime's type strings -> protocol datatype.
ONNX_TO_DATATYPE: Mapping[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One model input or output. ``shape`` uses -1 for a dynamic axis."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype[Any]:
        return NUMPY_DTYPES[self.datatype]

    @property
    def batched(self) -> bool:
        """True when the first axis is dynamic, so requests can be stacked along it."""
        return len(self.shape) > 0 and self.shape[0] == -1

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True, slots=True)
class ModelVersion:
    """What was loaded: an exact artifact, identified by its sha256."""

    model: str
    version: str
    path: Path
    sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    metadata: Mapping[str, Any] = field(default_factory=dict)
    # what the output means, from metadata["task"] (gateway.serving.task): None, not declared
    task: Task | None = None
    input_specs: Mapping[str, TensorSpec] = field(init=False, repr=False, compare=False)
    output_specs: Mapping[str, TensorSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Read on every request: built once.
        object.__setattr__(self, "input_specs", {spec.name: spec for spec in self.inputs})
        object.__setattr__(self, "output_specs", {spec.name: spec for spec in self.outputs})

    def input(self, name: str) -> TensorSpec | None:
        return self.input_specs.get(name)


class Runtime(Protocol):
    """Executes one model version. A dynamic batcher is another implementation of this."""

    async def run(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        *,
        deadline: float | None = None,
        receive: Receive | None = None,
    ) -> dict[str, np.ndarray]:
        """Run off the event loop. ``deadline`` (``time.monotonic()``): answer Timeout and do
        not run when it passes first. ``receive`` (the request's ASGI receive): answer
        ClientGone and do not run when it says the client left first."""
        ...

    def run_sync(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
        """Run on the calling thread (shadows use their own threads)."""
        ...

    def close(self) -> None: ...


class Emit(Protocol):
    """Hands one event to the event stream (gateway.background.events): ``kind`` is one of the
    stream's declared kinds (``model.loaded``, ``drift.changed``, ...), ``subject`` what it is
    about (``fraud/2``, ``fraud/2/amount``), ``data`` its JSON-ready body. Never blocks the
    caller and never raises: a full outbox drops the event and counts it."""

    def __call__(self, kind: str, subject: str, data: Mapping[str, Any]) -> None: ...


def emit_nothing(kind: str, subject: str, data: Mapping[str, Any]) -> None:
    """The null ``Emit``: a component built without an event stream (tests, tools) takes it."""
