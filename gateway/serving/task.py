"""A version's task, declared in its ``metadata.json`` under ``"task"``: what its output means,
so that the gateway can judge it against the labels that arrive later (docs/model-repository.md).

    {"type": "binary", "output": "probability", "threshold": 0.5, "positive_index": 1}
    {"type": "multiclass", "output": "probabilities", "classes": 3}   (or a list of names)
    {"type": "regression", "output": "price"}

One value per served row is what the quality accumulators need: the positive-class score of a
binary classifier, the predicted class index of a multiclass one (the argmax of a score row, or
the output itself when it is one integer per row), the prediction of a regression. Labels are
checked against the task (``label``) before anything is recorded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, get_args

import numpy as np

TaskType = Literal["binary", "multiclass", "regression"]
TASK_TYPES: tuple[TaskType, ...] = get_args(TaskType)
MAX_CLASSES = 1000  # monitors.quality.MAX_CLASSES
MAX_CLASS_NAME_CHARS = 100
# A regression label or prediction beyond this is refused: its square would lose every digit of
# a realistic error, and the accumulators refuse |error| > 1e60 anyway.
MAX_REGRESSION_ABS = 1e15
_NUMERIC = frozenset(
    f"{kind}{bits}" for kind, sizes in (("INT", "8 16 32 64"), ("UINT", "8 16 32 64"),
    ("FP", "16 32 64")) for bits in sizes.split()
)  # fmt: skip
_KEYS = {
    "binary": ("type", "output", "threshold", "positive_index"),
    "multiclass": ("type", "output", "classes"),
    "regression": ("type", "output"),
}


class OutputSpec(Protocol):
    """What a task needs to know of an output (gateway.serving.types.TensorSpec)."""

    @property
    def name(self) -> str: ...

    @property
    def datatype(self) -> str: ...

    @property
    def shape(self) -> tuple[int, ...]: ...


class TaskError(ValueError):
    """A task declaration that cannot be used; the message names the field (``task.output``)."""


@dataclass(frozen=True, slots=True)
class Task:
    type: TaskType
    output: str
    threshold: float = 0.5
    # binary: the column of the positive class in a (batch, k) output; None: the output has one
    # value per row
    positive_index: int | None = None
    # multiclass: the number of classes, their names ("" when declared by number), and whether
    # the output is one class index per row (else a row of scores: its argmax)
    classes: int = 0
    names: tuple[str, ...] = ()
    indices: bool = False

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type, "output": self.output}
        if self.type == "binary":
            out["threshold"] = self.threshold
            if self.positive_index is not None:
                out["positive_index"] = self.positive_index
        elif self.type == "multiclass":
            out["classes"] = list(self.names) if self.names else self.classes
        return out

    def one(self, array: np.ndarray) -> float | None:
        """The value of a one-row output (``array.shape[0] == 1``), the request path's usual
        case, without the arrays ``values`` makes; None when not shaped as declared."""
        if self.type == "binary" and self.positive_index is not None:
            if array.ndim != 2 or array.shape[1] <= self.positive_index:
                return None
            return float(array[0, self.positive_index])
        if self.type == "multiclass" and not self.indices:
            if array.ndim != 2 or array.shape[1] != self.classes:
                return None
            return float(array.argmax())
        return float(array.item()) if array.size == 1 else None

    def values(self, outputs: Mapping[str, np.ndarray]) -> np.ndarray | None:
        """One value per row of a response's outputs (see the module); None when the output is
        missing (not asked for) or not shaped as declared. The request path calls this."""
        array = outputs.get(self.output)
        if array is None or array.ndim == 0:
            return None
        rows = array.shape[0]
        if self.type == "binary":
            if self.positive_index is not None:
                if array.ndim != 2 or array.shape[1] <= self.positive_index:
                    return None
                return array[:, self.positive_index]
            return array.reshape(rows) if array.size == rows else None
        if self.type == "multiclass" and not self.indices:
            if array.ndim != 2 or array.shape[1] != self.classes or rows == 0:
                return None
            predicted: np.ndarray = array.argmax(axis=1)
            return predicted
        return array.reshape(rows) if array.size == rows else None

    def label(self, raw: Any) -> float:
        """A label as the accumulators take it; TaskError (client's fault) says why not."""
        if self.type == "binary":
            if raw is True or raw is False:
                return float(raw)
            if type(raw) in (int, float) and raw in (0, 1):
                return float(raw)
            raise TaskError(f"a binary label is 0, 1, true or false, got {_shown(raw)}")
        if self.type == "multiclass":
            if isinstance(raw, str) and self.names:
                try:
                    return float(self.names.index(raw))
                except ValueError:
                    raise TaskError(f"unknown class {_shown(raw)}") from None
            if type(raw) is int and 0 <= raw < self.classes:
                return float(raw)
            if type(raw) is float and raw.is_integer() and 0 <= raw < self.classes:
                return raw
            named = " or a class name" if self.names else ""
            raise TaskError(
                f"a multiclass label is a class index in [0, {self.classes}){named}, "
                f"got {_shown(raw)}"
            )
        if type(raw) not in (int, float) or not abs(raw) <= MAX_REGRESSION_ABS:  # NaN too
            raise TaskError(
                f"a regression label is a finite number within ±{MAX_REGRESSION_ABS:g}, "
                f"got {_shown(raw)}"
            )
        return float(raw)


def _shown(raw: Any) -> str:
    text = repr(raw)
    return text if len(text) <= 40 else text[:37] + "..."


def parse_task(raw: Any, outputs: Sequence[OutputSpec]) -> Task | None:
    """The ``task`` of a version's metadata (None: none declared), checked against the
    version's outputs; TaskError names the field."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise TaskError('task: must be an object, e.g. {"type": "binary", "output": "probability"}')
    kind = raw.get("type")
    if kind not in TASK_TYPES:
        raise TaskError(f"task.type: one of {', '.join(TASK_TYPES)}, got {_shown(kind)}")
    unknown = [k for k in raw if k not in _KEYS[kind]]
    if unknown:
        allowed = ", ".join(_KEYS[kind])
        raise TaskError(f"task.{_shown(unknown[0])}: unknown field for {kind} (allowed: {allowed})")
    name = raw.get("output")
    specs = {spec.name: spec for spec in outputs}
    if not isinstance(name, str) or name not in specs:
        have = ", ".join(sorted(specs))
        raise TaskError(
            f"task.output: the name of one of the model's outputs ({have}), got {_shown(name)}"
        )
    spec = specs[name]
    if spec.datatype not in _NUMERIC:
        raise TaskError(f"task.output: {name!r} is {spec.datatype}; a task needs a numeric output")
    if not spec.shape:
        raise TaskError(f"task.output: {name!r} is a scalar; a task needs one row per input row")
    width = spec.shape[1] if len(spec.shape) == 2 else None
    one_per_row = len(spec.shape) == 1 or (len(spec.shape) == 2 and width == 1)
    if kind == "binary":
        threshold = raw.get("threshold", 0.5)
        if type(threshold) not in (int, float) or not 0.0 <= threshold <= 1.0:
            raise TaskError(f"task.threshold: a number in [0, 1], got {_shown(threshold)}")
        index = raw.get("positive_index")
        if index is None and not one_per_row:
            index = 1 if width == 2 else None
            if index is None:
                raise TaskError(
                    f"task.positive_index: required, {name!r} has shape {list(spec.shape)}: "
                    "the column of the positive class"
                )
        if index is not None:
            if type(index) is not int or index < 0 or len(spec.shape) != 2:
                raise TaskError(
                    f"task.positive_index: a column of a 2-D output, got {_shown(index)} for "
                    f"shape {list(spec.shape)}"
                )
            if width is not None and width != -1 and index >= width:
                raise TaskError(
                    f"task.positive_index: {index} is beyond {name!r}'s {width} columns"
                )
        return Task("binary", name, float(threshold), index)
    if kind == "multiclass":
        classes = raw.get("classes")
        names: tuple[str, ...] = ()
        if isinstance(classes, list):
            if not all(isinstance(c, str) and 0 < len(c) <= MAX_CLASS_NAME_CHARS for c in classes):
                raise TaskError(
                    f"task.classes: names of 1 to {MAX_CLASS_NAME_CHARS} characters, or a number"
                )
            if len(set(classes)) != len(classes):
                raise TaskError("task.classes: the names must differ")
            names, classes = tuple(classes), len(classes)
        if type(classes) is not int or not 2 <= classes <= MAX_CLASSES:
            raise TaskError(
                f"task.classes: a number of classes in [2, {MAX_CLASSES}] or their names, "
                f"got {_shown(raw.get('classes'))}"
            )
        if one_per_row:
            if spec.datatype.startswith("FP"):
                raise TaskError(
                    f"task.output: {name!r} has one {spec.datatype} per row; a multiclass output "
                    "is a row of class scores or one integer class index per row"
                )
            return Task("multiclass", name, classes=classes, names=names, indices=True)
        if len(spec.shape) != 2 or width not in (classes, -1):
            raise TaskError(
                f"task.classes: {name!r} has shape {list(spec.shape)}, not (batch, {classes})"
            )
        return Task("multiclass", name, classes=classes, names=names)
    if not one_per_row:
        raise TaskError(
            f"task.output: {name!r} has shape {list(spec.shape)}; a regression output has one "
            "value per row"
        )
    return Task("regression", name)
