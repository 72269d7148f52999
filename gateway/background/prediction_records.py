"""Queued prediction references -> JSON lines, on the prediction log's writer thread.

The writer does per record as little Python as it can. Records of one model version whose
tensors have the same names, shapes and dtypes (nearly all of a batch) are encoded by columns: each
scalar field of the group is one ``orjson.dumps`` of a list, each tensor one ``dumps`` of the
group's arrays concatenated, and every output is cut at its element boundaries (which JSON
makes unambiguous: inside a string every '"' is escaped, and a 2-D numeric array has no other
'],['); a record's line is then one ``bytes % tuple`` of its pieces into the group's template.
That costs about a tenth of building a dict per record for orjson (loadtests/
prediction_log_cost.py). String tensors, and shapes that do not stack, take the plain path:
one dict and one ``dumps`` per record. Both paths write the same bytes for the same record.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from operator import attrgetter, itemgetter
from typing import Any

import numpy as np
import orjson

from gateway.serving.types import NUMPY_DTYPES, TensorSpec

# The queued tuple, as PredictionLog.offer builds it.
ID, TIME, INFO, ROLE, REVISION, PROPENSITY, INPUTS, OUTPUTS, PRINCIPAL, SIZE = range(10)
Queued = tuple[Any, ...]

_DATATYPE_OF = {dtype: name for name, dtype in NUMPY_DTYPES.items() if name != "BYTES"}
_SHAPE = attrgetter("shape")
_DTYPE = attrgetter("dtype")


def _default(value: Any) -> Any:
    """What orjson cannot write itself: string tensors, non-native arrays, bytes."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot log a {type(value).__name__}")


def dumps(value: Any) -> bytes:
    return orjson.dumps(value, default=_default, option=orjson.OPT_SERIALIZE_NUMPY)


def propensity(t: Queued) -> float | None:
    """No policy: the one version answers every request (1); pinned by the client: none."""
    p = t[PROPENSITY]
    return 1.0 if p is None and t[ROLE] == "default" else p


def record(t: Queued) -> dict[str, Any]:
    """One queued tuple as the record's fields, in the order of the file."""
    info = t[INFO]
    return {
        "id": t[ID],
        "time": t[TIME],
        "model": info.model,
        "version": info.version,
        "policy_revision": t[REVISION],
        "route_role": t[ROLE],
        "propensity": propensity(t),
        "principal": t[PRINCIPAL],
        "inputs": [_tensor(n, a, info.input_specs) for n, a in t[INPUTS].items()],
        "outputs": [_tensor(n, a, info.output_specs) for n, a in t[OUTPUTS].items()],
    }


def encode(taken: Sequence[Queued]) -> list[bytes]:
    """One JSON line (ending in a newline) per queued tuple, in their order."""
    by_version: dict[int, list[int]] = {}
    for i, t in enumerate(taken):
        members = by_version.get(id(t[INFO]))
        if members is None:
            by_version[id(t[INFO])] = [i]
        else:
            members.append(i)
    lines = [b""] * len(taken)
    for members in by_version.values():
        group = [taken[i] for i in members]
        encoded = _by_columns(group) if len(group) > 1 else None
        if encoded is not None:
            for i, line in zip(members, encoded, strict=True):
                lines[i] = line
            continue
        # Tensors of several shapes (batch sizes) for one version: by columns, shape by shape.
        by_layout: dict[tuple[Any, ...], list[int]] = {}
        for i in members:
            by_layout.setdefault(_layout(taken[i]), []).append(i)
        for same in by_layout.values():
            layout_group = [taken[i] for i in same]
            encoded = _by_columns(layout_group) if len(layout_group) > 1 else None
            if encoded is None:
                encoded = [dumps(record(t)) + b"\n" for t in layout_group]
            for i, line in zip(same, encoded, strict=True):
                lines[i] = line
    return lines


def _layout(t: Queued) -> tuple[Any, ...]:
    inputs, outputs = t[INPUTS], t[OUTPUTS]
    return (tuple(inputs), tuple(map(_SHAPE, inputs.values())),
            tuple(outputs), tuple(map(_SHAPE, outputs.values())))  # fmt: skip


def _tensor(name: str, array: np.ndarray, specs: Mapping[str, TensorSpec]) -> dict[str, Any]:
    return {"name": name, "datatype": _datatype(name, array, specs), "shape": array.shape,
            "data": array.reshape(-1)}  # fmt: skip


def _datatype(name: str, array: np.ndarray, specs: Mapping[str, TensorSpec]) -> str:
    spec = specs.get(name)
    if spec is not None:
        return spec.datatype
    if array.dtype.kind in "OUS":
        return "BYTES"
    return _DATATYPE_OF.get(array.dtype.newbyteorder("="), str(array.dtype))


def _const(value: Any) -> bytes:
    """A constant of a template: JSON, with '%' doubled for ``bytes %``."""
    return dumps(value).replace(b"%", b"%%")


def _strings(values: list[Any], n: int) -> list[bytes] | None:
    """The JSON text of each string, without its quotes: one dumps, cut at '","'."""
    parts = dumps(values)[2:-2].split(b'","')
    return parts if len(parts) == n else None


def _scalars(values: list[Any], n: int) -> list[bytes] | None:
    parts = dumps(values)[1:-1].split(b",")
    return parts if len(parts) == n else None


def _by_columns(group: list[Queued]) -> list[bytes] | None:
    """The lines of records of one version with the same tensor names, shapes and dtypes; None when
    they cannot be encoded by columns (string tensors, arrays that do not stack)."""
    n = len(group)
    first = group[0]
    info = first[INFO]
    data: list[list[bytes] | None] = []  # each tensor's elements, record by record
    tensors: list[bytes] = []
    for side, specs in ((INPUTS, info.input_specs), (OUTPUTS, info.output_specs)):
        pieces = []
        if len(set(map(len, map(itemgetter(side), group)))) != 1:
            return None  # not the same tensors
        for name, array in first[side].items():
            if array.dtype.kind in "OUSV" or array.ndim == 0 or array.size == 0:
                return None
            try:
                arrays = [t[side][name] for t in group]
            except KeyError:
                return None
            if len(set(map(_SHAPE, arrays))) != 1 or len(set(map(_DTYPE, arrays))) != 1:
                return None
            stacked = np.concatenate(arrays).reshape(n, -1)
            text = dumps(stacked)
            data.append(text[2:-2].split(b"],[") if text.startswith(b"[[") else None)
            pieces.append(
                b'{"name":' + _const(name) + b',"datatype":'
                + _const(_datatype(name, array, specs)) + b',"shape":'
                + _const(list(array.shape)) + b',"data":[%s]}'
            )  # fmt: skip
        tensors.append(b",".join(pieces))
    columns = [
        _strings([t[ID] for t in group], n),
        _scalars([t[TIME] for t in group], n),
        _scalars([t[REVISION] for t in group], n),
        _strings([t[ROLE] for t in group], n),
        _scalars([propensity(t) for t in group], n),
        _strings([t[PRINCIPAL] for t in group], n),
        *data,
    ]
    if any(column is None or len(column) != n for column in columns):
        return None
    template = (
        b'{"id":"%s","time":%s,"model":' + _const(info.model) + b',"version":'
        + _const(info.version) + b',"policy_revision":%s,"route_role":"%s","propensity":%s,'
        b'"principal":"%s","inputs":[' + tensors[0] + b'],"outputs":[' + tensors[1] + b"]}\n"
    )  # fmt: skip
    return [template % row for row in zip(*columns, strict=True)]
