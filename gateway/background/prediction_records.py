"""Queued prediction references -> a packed batch (the gateway's writer thread) -> JSON lines
(the writer process, gateway.background.prediction_writer).

``pack`` does as little per record as it can, because it holds the gateway's GIL: records of one
model version whose tensors have the same names, shapes and dtypes (nearly all of a batch) become
one ``Group`` of columns, each field a tuple (one ``zip`` transposes them) and each tensor the
group's arrays concatenated into one (n, elements) array. A ``Batch`` is plain data: it pickles
as raw array bytes and a few lists, for the writer process. String tensors, and shapes that do
not stack, travel as one record dict each.

``encode`` turns a batch into lines: each scalar field of a group is one ``orjson.dumps`` of its
column and each tensor one ``dumps`` of its stacked array, cut at its element boundaries (which
JSON makes unambiguous: inside a string every '"' is escaped, and a 2-D numeric array has no
other '],['); a record's line is then one ``bytes % tuple`` of its pieces into the group's
template. Both paths write the same bytes for the same record.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
_INFO = itemgetter(INFO)


@dataclass(frozen=True, slots=True)
class Tensor:
    """One tensor of every record of a group: ``data`` is (records, elements of one)."""

    name: str
    datatype: str
    shape: tuple[int, ...]  # of one record's tensor
    data: np.ndarray


@dataclass(frozen=True, slots=True)
class Group:
    """Records of one version with the same tensor names, shapes and dtypes, by columns."""

    model: str
    version: str
    rows: Sequence[int]  # their places in the batch
    ids: Sequence[str]
    times: Sequence[float]
    roles: Sequence[str]
    revisions: Sequence[int | None]
    propensities: Sequence[float | None]  # as routed (``propensity`` decides what is written)
    principals: Sequence[str]
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]


@dataclass(frozen=True, slots=True)
class Batch:
    """What the writer thread takes in one period, packed; ``records``: (row, fields) of the
    records that do not stack."""

    size: int
    groups: list[Group]
    records: list[tuple[int, dict[str, Any]]]

    def events(self) -> list[tuple[str, float, str]]:
        """(id, time, ``model/version``) of each record, in order (a CloudEvent's envelope)."""
        out: list[tuple[str, float, str]] = [("", 0.0, "")] * self.size
        for g in self.groups:
            subject = f"{g.model}/{g.version}"
            for row, ident, at in zip(g.rows, g.ids, g.times, strict=True):
                out[row] = (ident, at, subject)
        for row, fields in self.records:
            out[row] = (fields["id"], fields["time"], f"{fields['model']}/{fields['version']}")
        return out


def _default(value: Any) -> Any:
    """What orjson cannot write itself: string tensors, strided arrays, bytes. A strided
    numeric array is written as a contiguous copy, so its floats keep their own shortest text
    (float32: ``0.2``, not ``tolist``'s float64 ``0.20000000298023224``)."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "biuf" and not value.flags.c_contiguous:
            return np.ascontiguousarray(value)
        return value.tolist()
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot log a {type(value).__name__}")


def dumps(value: Any) -> bytes:
    return orjson.dumps(value, default=_default, option=orjson.OPT_SERIALIZE_NUMPY)


def propensity(role: str, p: float | None) -> float | None:
    """No policy: the one version answers every request (1); pinned by the client: none."""
    return 1.0 if p is None and role == "default" else p


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
        "propensity": propensity(t[ROLE], t[PROPENSITY]),
        "principal": t[PRINCIPAL],
        "inputs": [_tensor(n, a, info.input_specs) for n, a in t[INPUTS].items()],
        "outputs": [_tensor(n, a, info.output_specs) for n, a in t[OUTPUTS].items()],
    }


# -- the writer thread: pack -------------------------------------------------------------------


def pack(taken: Sequence[Queued]) -> Batch:
    """The queued tuples of one period as a batch, in their order (holds the GIL: kept short)."""
    infos = list(map(_INFO, taken))
    if infos.count(infos[0]) == len(infos):  # one version (identity first: no field compared)
        group = _group(taken, range(len(taken)))
        if group is not None:
            return Batch(len(taken), [group], [])
    by_version: dict[int, list[int]] = {}
    for i, t in enumerate(taken):
        members = by_version.get(id(t[INFO]))
        if members is None:
            by_version[id(t[INFO])] = [i]
        else:
            members.append(i)
    groups: list[Group] = []
    records: list[tuple[int, dict[str, Any]]] = []
    for members in by_version.values():
        group = _group(taken, members)
        if group is not None:
            groups.append(group)
            continue
        # Tensors of several shapes (batch sizes) for one version: by columns, shape by shape.
        by_layout: dict[tuple[Any, ...], list[int]] = {}
        for i in members:
            by_layout.setdefault(_layout(taken[i]), []).append(i)
        for same in by_layout.values():
            group = _group(taken, same)
            if group is None:
                records += [(i, record(taken[i])) for i in same]
            else:
                groups.append(group)
    return Batch(len(taken), groups, records)


def _layout(t: Queued) -> tuple[Any, ...]:
    inputs, outputs = t[INPUTS], t[OUTPUTS]
    return (tuple(inputs), tuple(map(_SHAPE, inputs.values())),
            tuple(outputs), tuple(map(_SHAPE, outputs.values())))  # fmt: skip


def _group(taken: Sequence[Queued], rows: Sequence[int]) -> Group | None:
    """The records at ``rows`` (of one version) as columns; None when their tensors do not
    stack (string tensors, other names, shapes or dtypes)."""
    members = taken if len(rows) == len(taken) else [taken[i] for i in rows]
    ids, times, infos, roles, revisions, props, inputs, outputs, principals, _ = zip(
        *members, strict=True
    )
    info = infos[0]
    n = len(rows)
    sides = []
    for column, specs in ((inputs, info.input_specs), (outputs, info.output_specs)):
        first: Mapping[str, np.ndarray] = column[0]
        if len(set(map(len, column))) != 1:
            return None  # not the same tensors
        tensors = []
        for name, array in first.items():
            if array.dtype.kind in "OUSV" or array.ndim == 0 or array.size == 0:
                return None
            try:
                arrays = [d[name] for d in column]
            except KeyError:
                return None
            if len(set(map(_SHAPE, arrays))) != 1 or len(set(map(_DTYPE, arrays))) != 1:
                return None
            stacked = np.concatenate(arrays).reshape(n, -1)
            tensors.append(Tensor(name, _datatype(name, array, specs), array.shape, stacked))
        sides.append(tuple(tensors))
    return Group(info.model, info.version, rows, ids, times, roles, revisions, props, principals,
                 sides[0], sides[1])  # fmt: skip


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


# -- the writer process: encode ----------------------------------------------------------------


def encode(batch: Batch) -> list[bytes]:
    """One JSON line (ending in a newline) per record of the batch, in their order."""
    lines = [b""] * batch.size
    for group in batch.groups:
        for row, line in zip(group.rows, _lines(group), strict=True):
            lines[row] = line
    for row, fields in batch.records:
        lines[row] = dumps(fields) + b"\n"
    return lines


def _const(value: Any) -> bytes:
    """A constant of a template: JSON, with '%' doubled for ``bytes %``."""
    return dumps(value).replace(b"%", b"%%")


def _strings(values: Sequence[Any], n: int) -> list[bytes] | None:
    """The JSON text of each string, without its quotes: one dumps, cut at '","'."""
    parts = dumps(values)[2:-2].split(b'","')
    return parts if len(parts) == n else None


def _scalars(values: Sequence[Any], n: int) -> list[bytes] | None:
    parts = dumps(values)[1:-1].split(b",")
    return parts if len(parts) == n else None


def _lines(g: Group) -> list[bytes]:
    n = len(g.rows)
    data: list[list[bytes] | None] = []  # each tensor's elements, record by record
    sides = []
    for tensors in (g.inputs, g.outputs):
        pieces = []
        for t in tensors:
            text = dumps(t.data)
            data.append(text[2:-2].split(b"],[") if text.startswith(b"[[") else None)
            pieces.append(
                b'{"name":' + _const(t.name) + b',"datatype":' + _const(t.datatype)
                + b',"shape":' + _const(list(t.shape)) + b',"data":[%s]}'
            )  # fmt: skip
        sides.append(b",".join(pieces))
    columns = [
        _strings(g.ids, n),
        _scalars(g.times, n),
        _scalars(g.revisions, n),
        _strings(g.roles, n),
        _scalars(list(map(propensity, g.roles, g.propensities)), n),
        _strings(g.principals, n),
        *data,
    ]
    if any(column is None or len(column) != n for column in columns):
        return [dumps(fields) + b"\n" for fields in _fields(g)]
    template = (
        b'{"id":"%s","time":%s,"model":' + _const(g.model) + b',"version":'
        + _const(g.version) + b',"policy_revision":%s,"route_role":"%s","propensity":%s,'
        b'"principal":"%s","inputs":[' + sides[0] + b'],"outputs":[' + sides[1] + b"]}\n"
    )  # fmt: skip
    return [template % row for row in zip(*columns, strict=True)]


def _fields(g: Group) -> list[dict[str, Any]]:
    """The group's records one by one (when its columns cannot be cut)."""

    def tensors(side: tuple[Tensor, ...], i: int) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": t.datatype, "shape": t.shape, "data": t.data[i]}
                for t in side]  # fmt: skip

    return [
        {"id": g.ids[i], "time": g.times[i], "model": g.model, "version": g.version,
         "policy_revision": g.revisions[i], "route_role": g.roles[i],
         "propensity": propensity(g.roles[i], g.propensities[i]), "principal": g.principals[i],
         "inputs": tensors(g.inputs, i), "outputs": tensors(g.outputs, i)}
        for i in range(len(g.rows))
    ]  # fmt: skip
