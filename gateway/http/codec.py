"""Open Inference Protocol (KServe V2) REST bodies <-> numpy arrays, checked against TensorSpecs.

Rule: every client mistake raises ``BadRequest`` naming the tensor and what was wrong; no other
exception type escapes ``decode_request`` for bad input. Faults in what the model returned are
plain ``GatewayError`` (500).

BYTES tensors decode to numpy object arrays of ``str``: onnxruntime's tensor(string) takes str
objects and silently stringifies ``bytes`` (``b"a"`` becomes the text ``"b'a'"``). A binary BYTES
tensor with an element that is not UTF-8 decodes to a fixed-width numpy bytes array instead
(``_raw_strings`` says why and when). Outputs may hold ``str`` or ``bytes``.
"""

from __future__ import annotations

import gc
import math
import reprlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import chain
from typing import Any, Final

import numpy as np
import orjson

from gateway.errors import BadRequest, GatewayError, PayloadTooLarge, cut
from gateway.http.fields import integer
from gateway.serving.types import NUMPY_DTYPES, ModelVersion, TensorSpec
from router.state.join import MAX_ID_CHARS

INFERENCE_HEADER: Final = "Inference-Header-Content-Length"
_MAX_HEADER_LENGTH = 1 << 62  # parse_request then holds it to the body's length

_U32: Final = struct.Struct("<I")
_FLOATS: Final = frozenset({"FP16", "FP32", "FP64"})
# Python types that orjson produces and each datatype accepts as JSON elements.
_LEAF_TYPES: Final[Mapping[str, frozenset[type]]] = {
    **{t: frozenset({int}) for t in NUMPY_DTYPES if t.startswith(("INT", "UINT"))},
    **{t: frozenset({int, float}) for t in _FLOATS},
    "BOOL": frozenset({bool}),
    "BYTES": frozenset({str}),
}
_LEAF_WORDS: Final = {frozenset({int}): "integers", frozenset({int, float}): "numbers"}
_JSON_NAMES: Final[Mapping[type, str]] = {
    bool: "boolean",
    int: "integer",
    float: "float",
    str: "string",
    type(None): "null",
    list: "array",
    dict: "object",
}
_DATATYPE_OF: Final = {dtype: name for name, dtype in NUMPY_DTYPES.items()}
# The least magnitude a cast rounds to infinity (round half to even at the largest finite
# value): 2**128 - 2**103 for FP32, 65520 for FP16. Any float64 fits FP64.
_OVERFLOW: Final = {"FP16": 65520.0, "FP32": float(2**128 - 2**103)}
_SMALL: Final = 256  # elements: below this, Python's min and max beat numpy's call overhead
# What one string (or JSON container) costs decoded besides its UTF-8 bytes: a Python str is 49
# bytes of header (sys.getsizeof("")) and its slot in a list or object array 8 more.
STRING_OVERHEAD: Final = 64
# Decoded bytes per element by datatype, a BYTES element counted at its fixed overhead.
_ELEMENT_BYTES: Final = {
    name: STRING_OVERHEAD if name == "BYTES" else dtype.itemsize
    for name, dtype in NUMPY_DTYPES.items()
}
# JSON parts at least this long are counted before they are parsed (a few µs of byte counts);
# smaller ones cannot hold enough strings to matter.
_COUNTED_JSON: Final = 1 << 16
DEFAULT_BUDGET: Final = 128 << 20
_SEQUENCE: Final = frozenset({"sequence_id", "sequence_start", "sequence_end"})


# The per-request types below are slots dataclasses but not frozen: a frozen one takes 1.3 µs to
# build against 0.4 µs (six fields, measured here), and a request builds three.
@dataclass(frozen=True, slots=True)
class RequestedOutput:
    name: str
    binary: bool  # outputs[i].parameters.binary_data, else the request's binary_data_output


@dataclass(slots=True)
class InferRequest:
    """A decoded request. Arrays decoded from the binary section may be read-only views of the
    body; they are always C-contiguous and aligned."""

    id: str | None
    inputs: dict[str, np.ndarray]
    parameters: dict[str, Any]
    outputs: tuple[RequestedOutput, ...]  # () means every model output
    binary_output: bool


@dataclass(slots=True)
class _Input:
    spec: TensorSpec
    shape: tuple[int, ...]
    count: int
    data: list[Any] | None
    binary_size: int | None


def parse_header_length(value: str | None) -> int | None:
    """The ``Inference-Header-Content-Length`` header as an int; None when absent."""
    if value is None:
        return None
    return integer(INFERENCE_HEADER, value, _MAX_HEADER_LENGTH)


@dataclass(slots=True)
class Envelope:
    """A request whose JSON is parsed but whose tensors are not yet decoded: enough to route
    on (``id``, ``parameters``) before the chosen version's specs are known."""

    doc: dict[str, Any]
    body: bytes
    end: int  # where the binary section starts (len(body) for pure JSON)
    binary: bool
    id: str | None
    parameters: dict[str, Any]


def parse_request(body: bytes, header_length: int | None, budget: int = DEFAULT_BUDGET) -> Envelope:
    """Parse the JSON part of a body (all of it, or its first ``header_length`` bytes).

    Before a large JSON part is parsed its strings and containers are counted from the raw bytes
    (each ``"`` pair is a string, each ``[`` or ``{`` a container): parsed, each takes at least
    ``STRING_OVERHEAD`` bytes, and a request whose count alone exceeds ``budget`` is refused
    with 413 before any of that memory is taken."""
    if header_length is None:
        end = len(body)
    elif header_length == 0:  # Triton's raw form: the body is the one input's bytes
        return Envelope({}, body, 0, True, None, {})
    elif 0 < header_length <= len(body):
        end = header_length
    else:
        raise BadRequest(
            f"{INFERENCE_HEADER} is {header_length} but the body is only {len(body)} bytes"
        )
    if end >= _COUNTED_JSON:
        _check_json_objects(body, end, budget)
    try:
        doc = _loads(body if end == len(body) else memoryview(body)[:end])
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON in the request: {exc}") from None
    if type(doc) is not dict:
        raise BadRequest("the request must be a JSON object")
    request_id = doc.get("id")
    if request_id is not None:
        if type(request_id) is not str:
            raise BadRequest(f'"id" must be a string, got {_show(request_id)}')
        if len(request_id) > MAX_ID_CHARS:  # ids are kept for the feedback join
            raise BadRequest(
                f'"id" must be at most {MAX_ID_CHARS} characters, got {len(request_id)}'
            )
    parameters = _object(doc.get("parameters"), '"parameters"')
    return Envelope(doc, body, end, header_length is not None, request_id, parameters)


def decode_inputs(
    envelope: Envelope,
    model: ModelVersion,
    max_elements: int = 1 << 24,
    max_rows: int = 1 << 16,
    budget: int = DEFAULT_BUDGET,
) -> InferRequest:
    """Decode and check the tensors of a parsed request against ``model``'s specs.

    ``max_elements`` bounds each input's element count and ``max_rows`` the first axis of each
    input whose first axis the model leaves dynamic (the batch); both are checked on the declared
    shape before anything is allocated. ``budget`` bounds the bytes of all the request's decoded
    tensors together: elements times the element size, and a string its UTF-8 bytes plus
    ``STRING_OVERHEAD``. Fixed-size tensors are charged from their declared shapes before any is
    decoded; strings are charged as they are met, before their array is built. Over it: 413
    naming the tensor that crossed it.
    """
    try:
        return _decode(envelope, model, max_elements, max_rows, budget)
    except GatewayError:
        raise
    except (ValueError, TypeError, OverflowError, struct.error) as exc:
        # The checks below name the tensor; this only keeps a missed case a 400.
        raise BadRequest(f"malformed inference request: {exc}") from exc


def decode_request(
    body: bytes,
    header_length: int | None,
    model: ModelVersion,
    max_elements: int = 1 << 24,
    max_rows: int = 1 << 16,
    budget: int = DEFAULT_BUDGET,
) -> InferRequest:
    """``parse_request`` then ``decode_inputs``: a JSON body, or a JSON header of
    ``header_length`` bytes followed by binary tensors."""
    envelope = parse_request(body, header_length, budget)
    return decode_inputs(envelope, model, max_elements, max_rows, budget)


def output_names(request: InferRequest, model: ModelVersion) -> list[str]:
    """The outputs to compute: those requested, else every model output in model order."""
    if request.outputs:
        return [o.name for o in request.outputs]
    return [spec.name for spec in model.outputs]


def encode_response(
    model_name: str,
    model_version: str,
    request_id: str,
    outputs: Mapping[str, np.ndarray],
    request: InferRequest,
    specs: Mapping[str, TensorSpec],
    parameters: Mapping[str, Any] | None = None,
) -> tuple[bytes, int | None]:
    """The response body and the JSON header length (None when the body is pure JSON).

    Outputs come in the requested order, else in ``specs`` order (then any others). Non-finite
    floats in JSON outputs are the tokens ``NaN``, ``Infinity`` and ``-Infinity``, as Triton
    writes them and Python's json and tritonclient read them. A BYTES output holding non-UTF-8
    bytes cannot be JSON text and is sent binary even if JSON was asked.
    """
    if request.outputs:
        wanted = [(o.name, o.binary) for o in request.outputs]
    else:
        names = [n for n in specs if n in outputs] + [n for n in outputs if n not in specs]
        wanted = [(n, request.binary_output) for n in names]
    entries: list[dict[str, Any]] = []
    chunks: list[bytes | memoryview] = []
    json_floats = False  # a float output written as JSON numbers, which may be non-finite
    for name, binary in wanted:
        if name not in outputs:
            raise GatewayError(f"the model returned no output {name!r}")
        entry, chunk = _encode_tensor(name, outputs[name], specs.get(name), binary)
        entries.append(entry)
        if chunk is not None:
            chunks.append(chunk)
        elif entry["datatype"] in _FLOATS:
            json_floats = True
    head: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    head["id"] = request_id
    if parameters is not None:
        head["parameters"] = dict(parameters)
    head["outputs"] = entries
    try:
        header = orjson.dumps(head, option=orjson.OPT_SERIALIZE_NUMPY)
        # orjson writes NaN and ±Inf as null; "null" appears in no other response but one
        # quoting it in a string, so finite outputs cost one search of the bytes here (find:
        # ``in`` first tries the needle as an int, raising and clearing a TypeError, 3x slower).
        if json_floats and header.find(b"null") != -1 and _non_finite_as_tokens(entries):
            header = orjson.dumps(head, option=orjson.OPT_SERIALIZE_NUMPY)
    except TypeError as exc:
        raise GatewayError(f"cannot encode the response: {exc}") from exc
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


def _non_finite_as_tokens(entries: list[dict[str, Any]]) -> bool:
    """Give each JSON float output holding NaN or ±Inf its data as JSON text with the tokens;
    True when any was found."""
    found = False
    for entry in entries:
        data = entry.get("data")
        if entry["datatype"] not in _FLOATS or data is None:
            continue
        finite = np.isfinite(data)
        if finite.all():
            continue
        found = True
        # Finite values as orjson writes them (shortest round-trip for their width), the
        # others replaced in the text: a float's JSON never holds a comma.
        parts = orjson.dumps(np.where(finite, data, 0), option=orjson.OPT_SERIALIZE_NUMPY)[
            1:-1
        ].split(b",")
        for i in np.flatnonzero(~finite).tolist():
            value = data[i]
            parts[i] = b"NaN" if value != value else b"Infinity" if value > 0 else b"-Infinity"
        entry["data"] = orjson.Fragment(b"[" + b",".join(parts) + b"]")
    return found


def output_bytes(outputs: Mapping[str, np.ndarray], limit: int) -> int:
    """The outputs' size as tensors: elements × element size, a BYTES element its UTF-8 bytes
    plus the 4 of its length prefix in the binary encoding. Strings are counted only until the
    total passes ``limit`` (the answer is then a lower bound), so a huge string output costs no
    more than ``limit / 4`` elements."""
    total = 0
    strings = []
    for array in outputs.values():
        if array.dtype.kind == "O":
            strings.append(array)
            total += 4 * array.size
        else:
            total += array.nbytes
    for array in strings:
        for element in array.flat:
            if total > limit:
                return total
            if type(element) is str:
                total += (
                    len(element) if element.isascii() else len(element.encode("utf-8", "replace"))
                )
            else:
                total += len(element)
    return total


def encode_error(message: str) -> bytes:
    # "replace" keeps a message with lone surrogates encodable.
    return orjson.dumps({"error": message.encode("utf-8", "replace").decode("utf-8")})


# -- decoding ------------------------------------------------------------------------------------


def _decode(
    envelope: Envelope, model: ModelVersion, max_elements: int, max_rows: int, budget: int
) -> InferRequest:
    doc, parameters = envelope.doc, envelope.parameters
    if envelope.end == 0 and envelope.binary:
        return _raw(envelope.body, model, max_elements, max_rows, _Spent(budget))
    binary_output = parameters.get("binary_data_output", False)
    if type(binary_output) is not bool:
        raise BadRequest('"parameters.binary_data_output" must be true or false')
    if parameters and not _SEQUENCE.isdisjoint(parameters):
        _refuse_sequence(parameters, model)
    outputs = _requested_outputs(doc.get("outputs"), model, binary_output)
    headers = _input_headers(doc.get("inputs"), model, envelope.binary, max_elements, max_rows)
    spent = _Spent(budget)
    for h in headers:  # every fixed cost first: nothing is decoded for a request over budget
        spent.total += h.count * _ELEMENT_BYTES[h.spec.datatype]
    if spent.total > budget:
        spent.total = 0
        for h in headers:  # again, to name the input that crosses the budget
            spent.charge(h.spec.name, h.count * _ELEMENT_BYTES[h.spec.datatype])
    return InferRequest(
        id=envelope.id,
        inputs=_input_arrays(headers, envelope.body, envelope.end, spent),
        parameters=parameters,
        outputs=outputs,
        binary_output=binary_output,
    )


def _refuse_sequence(parameters: dict[str, Any], model: ModelVersion) -> None:
    """Triton's sequence-batching parameters ask for state kept between requests, which no
    model here has: a 400 naming the first that asks, rather than a 200 that ignores it. Their
    "no sequence" values (an id of 0 or "", false flags) ask for nothing and pass."""
    for key in sorted(_SEQUENCE & parameters.keys()):
        value = parameters[key]
        if value is False or value == "" or (type(value) is int and value == 0):
            continue
        raise BadRequest(
            f'"parameters.{key}": model {model.model!r} is not stateful (Turnout has no '
            f"sequence batching), so it cannot take part in a sequence; send the request "
            f"without {key}"
        )


def _raw(
    body: bytes, model: ModelVersion, max_elements: int, max_rows: int, spent: _Spent
) -> InferRequest:
    """A raw binary request (``Inference-Header-Content-Length: 0``): the whole body is the
    model's one input, its datatype and shape the model's, the one dynamic axis inferred from
    the length. Outputs: all of them, in JSON."""
    if len(model.inputs) != 1:
        raise BadRequest(
            f"a raw binary request ({INFERENCE_HEADER}: 0) carries exactly one input, but model "
            f"{model.model!r} has {len(model.inputs)}: {_names(model.inputs)}; send a JSON "
            "header that names them"
        )
    spec = model.inputs[0]
    name, dims = spec.name, spec.shape
    free = [axis for axis, d in enumerate(dims) if d < 0]
    if len(free) > 1:
        raise BadRequest(
            f"input {name!r} has shape {list(dims)}: a raw binary request ({INFERENCE_HEADER}: "
            "0) cannot say the size of more than one dynamic axis; send a JSON header with the "
            "shape"
        )
    fixed = math.prod(d for d in dims if d >= 0)  # elements per step of the dynamic axis
    if spec.datatype == "BYTES":
        count, whole = _count_strings(body, name, max_elements), True
        unit = "length-prefixed elements"
    else:
        size = spec.dtype.itemsize
        count, whole = len(body) // size, len(body) % size == 0
        unit = f"elements of {size} bytes"
    if not whole or (count % fixed if fixed else count) or (not free and count != fixed):
        raise BadRequest(
            f"a raw binary body of {len(body)} bytes does not fit input {name!r} "
            f"({spec.datatype}, shape {list(dims)}), which takes {fixed} {unit} per "
            f"{'row' if free else 'request'}"
        )
    shape = list(dims)
    if free:
        shape[free[0]] = count // fixed if fixed else 0
    if count > max_elements:
        raise BadRequest(
            f"input {name!r}: a raw body of {count} elements, above the limit of {max_elements}"
        )
    if shape and dims[0] < 0 and shape[0] > max_rows:
        raise BadRequest(
            f"input {name!r}: {shape[0]} rows, above the limit of {max_rows} per request"
        )
    if spec.datatype != "BYTES":
        spent.charge(name, len(body))
    h = _Input(spec, tuple(shape), count, None, len(body))
    return InferRequest(
        id=None,
        inputs={name: _from_binary(h, body, 0, len(body), spent)},
        parameters={},
        outputs=(),
        binary_output=False,
    )


def _count_strings(body: bytes, name: str, max_elements: int) -> int:
    """The BYTES elements in a raw body (each a 4-byte length, then its bytes)."""
    count = offset = 0
    end = len(body)
    while offset < end:
        if count == max_elements:
            raise BadRequest(
                f"input {name!r}: a raw body of more than {max_elements} BYTES elements"
            )
        if offset + 4 > end:
            raise BadRequest(f"input {name!r}: BYTES binary data ends inside element {count}")
        offset += 4 + _U32.unpack_from(body, offset)[0]
        count += 1
    if offset != end:
        raise BadRequest(f"input {name!r}: BYTES binary data ends inside element {count - 1}")
    return count


class _Spent:
    """The decoded bytes charged to one request so far."""

    __slots__ = ("budget", "total")

    def __init__(self, budget: int) -> None:
        self.budget, self.total = budget, 0

    def charge(self, name: str, size: int) -> None:
        self.total += size
        if self.total > self.budget:
            raise PayloadTooLarge(
                f"input {name!r} takes the request's decoded tensors to at least {self.total} "
                f"bytes, above the budget of {self.budget} bytes per request (strings count "
                f"their UTF-8 bytes plus {STRING_OVERHEAD} each); send fewer elements"
            )


def _check_json_objects(body: bytes, end: int, budget: int) -> None:
    # By slices: each count holds the GIL, and this runs beside the event loop on large bodies.
    quotes = containers = 0
    for start in range(0, end, _COUNTED_JSON):
        stop = min(start + _COUNTED_JSON, end)
        quotes += body.count(b'"', start, stop)
        containers += body.count(b"[", start, stop) + body.count(b"{", start, stop)
    objects = quotes // 2 + containers
    if objects * STRING_OVERHEAD > budget:
        raise PayloadTooLarge(
            f"the request's JSON holds about {objects} strings, arrays and objects; parsed they "
            f"take at least {objects * STRING_OVERHEAD} bytes, above the budget of {budget} "
            "bytes per request (send large tensors in binary, or fewer elements)"
        )


def _loads(data: bytes | memoryview) -> Any:
    """orjson.loads with the cyclic collector paused: parsing builds no cycles, and a body of
    many small objects (half a million inputs entries in 30 MB) otherwise triggers collection
    after collection, 3.1 s instead of 0.5 s on the event loop."""
    if not gc.isenabled():
        return orjson.loads(data)
    gc.disable()
    try:
        return orjson.loads(data)
    finally:
        gc.enable()


def _requested_outputs(
    raw: Any, model: ModelVersion, default_binary: bool
) -> tuple[RequestedOutput, ...]:
    if raw is None:
        return ()
    if type(raw) is not list:
        raise BadRequest('"outputs" must be a JSON array')
    known = {spec.name for spec in model.outputs}
    result: list[RequestedOutput] = []
    for i, entry in enumerate(raw):
        if type(entry) is not dict or type(entry.get("name")) is not str:
            raise BadRequest(f"outputs[{i}] must be a JSON object with a string name")
        name = entry["name"]
        if name not in known:
            raise BadRequest(
                f"unknown output {_show(name)}; model {model.model!r} has {_names(model.outputs)}"
            )
        if any(o.name == name for o in result):
            raise BadRequest(f"output {_show(name)} is requested twice")
        params = _object(entry.get("parameters"), f"output {_show(name)} parameters")
        if params.get("classification"):
            raise BadRequest("the classification extension is not supported")
        if "shared_memory_region" in params:
            raise BadRequest(f"output {_show(name)}: shared memory is not supported")
        binary = params.get("binary_data", default_binary)
        if type(binary) is not bool:
            raise BadRequest(f"output {_show(name)}: binary_data must be true or false")
        result.append(RequestedOutput(name, binary))
    return tuple(result)


def _input_headers(
    raw: Any, model: ModelVersion, has_binary: bool, max_elements: int, max_rows: int
) -> list[_Input]:
    if type(raw) is not list:
        raise BadRequest('"inputs" must be a JSON array of input tensors')
    specs = model.input_specs
    result: dict[str, _Input] = {}
    # Each entry beyond the model's inputs is unknown or a duplicate, so a huge list stops early.
    for i, entry in enumerate(raw):
        if type(entry) is not dict or type(entry.get("name")) is not str:
            raise BadRequest(f"inputs[{i}] must be a JSON object with a string name")
        name: str = entry["name"]
        spec = specs.get(name)
        if spec is None:
            raise BadRequest(
                f"inputs[{i}]: unknown input {_show(name)}; model {model.model!r} expects "
                f"{_names(model.inputs)}"
            )
        if name in result:
            raise BadRequest(f"inputs[{i}]: input {name!r} is given twice")
        datatype = entry.get("datatype")
        if datatype != spec.datatype:
            raise BadRequest(
                f"input {name!r}: datatype must be {spec.datatype}, got {_show(datatype)}"
            )
        shape = _shape(entry.get("shape"), spec)
        count = math.prod(shape)
        if count > max_elements:
            raise BadRequest(
                f"input {name!r}: shape {list(shape)} has {count} elements, "
                f"above the limit of {max_elements}"
            )
        # An empty tensor can still declare an absurd axis (a non-empty one's axes are at most
        # its count).
        if count == 0 and (widest := max(shape, default=0)) > max_elements:
            raise BadRequest(
                f"input {name!r}: shape {list(shape)} has an axis of {widest}, above the "
                f"limit of {max_elements} elements"
            )
        if shape and spec.shape[0] < 0 and shape[0] > max_rows:
            raise BadRequest(
                f"input {name!r}: {shape[0]} rows, above the limit of {max_rows} per request"
            )
        params = _object(entry.get("parameters"), f"input {name!r} parameters")
        if "shared_memory_region" in params:
            raise BadRequest(f"input {name!r}: shared memory is not supported")
        size = params.get("binary_data_size")
        data = entry.get("data")
        if size is not None:
            _check_binary_size(spec, count, size, data, has_binary)
        elif data is None:
            raise BadRequest(f"input {name!r} has neither data nor parameters.binary_data_size")
        elif type(data) is not list:
            raise BadRequest(f"input {name!r}: data must be a JSON array")
        result[name] = _Input(spec, shape, count, data, size)
    if len(result) != len(specs):  # each entry is a distinct input of the model
        missing = [spec for spec in model.inputs if spec.name not in result]
        raise BadRequest(f"missing input(s) {_names(missing)} for model {model.model!r}")
    return list(result.values())


def _shape(raw: Any, spec: TensorSpec) -> tuple[int, ...]:
    if type(raw) is list and len(raw) == len(spec.shape):
        for got, want in zip(raw, spec.shape, strict=True):  # one pass for the usual, valid case
            if type(got) is not int or got < 0 or (want >= 0 and got != want):
                break
        else:
            return tuple(raw)
    name = spec.name
    if type(raw) is not list or any(type(d) is not int or d < 0 for d in raw):
        raise BadRequest(
            f"input {name!r}: shape must be an array of non-negative integers, got {_show(raw)}"
        )
    if len(raw) != len(spec.shape):
        raise BadRequest(
            f"input {name!r}: shape {_show(raw)} has rank {len(raw)}, the model expects "
            f"rank {len(spec.shape)} {list(spec.shape)}"
        )
    axis = next(a for a, (g, w) in enumerate(zip(raw, spec.shape, strict=True)) if 0 <= w != g)
    raise BadRequest(
        f"input {name!r}: shape {_show(raw)} does not match the model's {list(spec.shape)} "
        f"at axis {axis}"
    )


def _check_binary_size(
    spec: TensorSpec, count: int, size: Any, data: Any, has_binary: bool
) -> None:
    name = spec.name
    if data is not None:
        raise BadRequest(f"input {name!r} has both data and parameters.binary_data_size")
    if not has_binary:
        raise BadRequest(
            f"input {name!r} sets binary_data_size but the request has no {INFERENCE_HEADER}"
        )
    if type(size) is not int or size < 0:
        raise BadRequest(f"input {name!r}: binary_data_size must be a non-negative integer")
    need = 4 * count if spec.datatype == "BYTES" else count * spec.dtype.itemsize
    if spec.datatype == "BYTES" and size < need:
        raise BadRequest(
            f"input {name!r}: binary_data_size {size} is too small for {count} BYTES elements"
        )
    if spec.datatype != "BYTES" and size != need:
        raise BadRequest(
            f"input {name!r}: binary_data_size is {size} but {count} {spec.datatype} elements "
            f"take {need} bytes"
        )


def _input_arrays(
    headers: list[_Input], body: bytes, start: int, spent: _Spent
) -> dict[str, np.ndarray]:
    expected = sum(h.binary_size for h in headers if h.binary_size is not None)
    if len(body) - start != expected:
        raise BadRequest(
            f"the binary section after the {start}-byte JSON header is {len(body) - start} bytes, "
            f"but the inputs' binary_data_size add up to {expected}"
        )
    arrays: dict[str, np.ndarray] = {}
    offset = start
    for h in headers:
        if h.binary_size is None:
            arrays[h.spec.name] = _from_json(h, spent)
        else:
            arrays[h.spec.name] = _from_binary(h, body, offset, offset + h.binary_size, spent)
            offset += h.binary_size
    return arrays


def _from_json(h: _Input, spent: _Spent) -> np.ndarray:
    spec, name = h.spec, h.spec.name
    assert h.data is not None
    flat = _flatten(h.data, h.shape, name)
    if len(flat) != h.count:
        raise BadRequest(
            f"input {name!r}: data has {len(flat)} elements but shape {list(h.shape)} "
            f"needs {h.count}"
        )
    allowed = _LEAF_TYPES[spec.datatype]
    bad = set(map(type, flat)) - allowed
    if bad:
        sample = next(v for v in flat if type(v) in bad)
        want = {"BOOL": "true/false", "BYTES": "strings"}.get(spec.datatype)
        raise BadRequest(
            f"input {name!r}: {spec.datatype} data must be {want or _LEAF_WORDS[allowed]}, "
            f"got {_JSON_NAMES.get(type(sample), 'value')} {_show(sample)}"
        )
    if spec.datatype == "BYTES":
        # orjson refuses lone surrogates, so every str here encodes
        spent.charge(name, sum(map(len, map(str.encode, flat))))
        arr = np.empty(h.count, dtype=object)
        arr[:] = flat
    elif spec.datatype == "BOOL":
        arr = np.array(flat, dtype=np.bool_)
    elif spec.datatype in _FLOATS:
        arr = _floats(flat, spec)
    else:
        arr = _integers(flat, spec)
    return arr.reshape(h.shape)


def _flatten(data: list[Any], shape: tuple[int, ...], name: str) -> list[Any]:
    """Row-major leaves of ``data``: flat as sent, or nested exactly to ``shape``."""
    if len(shape) < 2 or not data or type(data[0]) is not list:
        return data
    level = data
    for dim in shape[1:]:
        if set(map(type, level)) - {list} or set(map(len, level)) - {dim}:
            raise BadRequest(
                f"input {name!r}: nested data is ragged or does not match shape {list(shape)}"
            )
        level = list(chain.from_iterable(level))
    if len(data) != shape[0]:
        raise BadRequest(f"input {name!r}: nested data does not match shape {list(shape)}")
    return level


def _integers(flat: list[Any], spec: TensorSpec) -> np.ndarray:
    info = np.iinfo(spec.dtype)
    if not flat:
        return np.empty(0, dtype=spec.dtype)
    wide = np.array(flat)
    if wide.dtype.kind in "iu" and info.min <= int(wide.min()) and int(wide.max()) <= info.max:
        return wide.astype(spec.dtype, copy=False)
    # Rare: numpy infers float64 for ints mixing int64 and uint64 ranges, so look at each value.
    bad = next((v for v in flat if not info.min <= v <= info.max), None)
    if bad is None:
        return np.array(flat, dtype=spec.dtype)
    raise BadRequest(
        f"input {spec.name!r}: {_show(bad)} is out of range for {spec.datatype} "
        f"[{info.min}, {info.max}]"
    )


def _floats(flat: list[Any], spec: TensorSpec) -> np.ndarray:
    # JSON has no infinity or NaN, so the one way to a non-finite value is an overflow.
    limit = _OVERFLOW.get(spec.datatype)
    if limit is not None and flat:
        if len(flat) <= _SMALL:  # two C loops, and no errstate (2.5 µs) around the cast
            overflows = max(flat) >= limit or min(flat) <= -limit
        else:
            overflows = bool(np.abs(np.array(flat, dtype=np.float64)).max() >= limit)
        if overflows:
            bad = next(v for v in flat if abs(v) >= limit)
            raise BadRequest(f"input {spec.name!r}: {_show(bad)} overflows {spec.datatype}")
    return np.array(flat, dtype=spec.dtype)


def _from_binary(h: _Input, body: bytes, start: int, end: int, spent: _Spent) -> np.ndarray:
    spec, name = h.spec, h.spec.name
    if spec.datatype == "BYTES":
        # the length prefixes aside, the section is the strings' bytes (checked as they are read)
        spent.charge(name, max(0, end - start - 4 * h.count))
        return _strings_from_binary(body, start, end, h.count, name, spent).reshape(h.shape)
    if h.count == 0:
        return np.empty(h.shape, dtype=spec.dtype)
    if spec.datatype == "BOOL":
        raw = np.frombuffer(body, dtype=np.uint8, count=h.count, offset=start)
        if (raw > 1).any():
            raise BadRequest(f"input {name!r}: BOOL bytes must be 0 or 1")
        arr = raw.view(np.bool_)
    else:
        arr = np.frombuffer(body, dtype=spec.dtype.newbyteorder("<"), count=h.count, offset=start)
        if not arr.dtype.isnative:
            arr = arr.astype(spec.dtype)
        if not arr.flags.aligned:
            arr = arr.copy()
    return arr.reshape(h.shape)


def _strings_from_binary(
    body: bytes, start: int, end: int, count: int, name: str, spent: _Spent
) -> np.ndarray:
    """BYTES elements as an object array of str; when one is not UTF-8, as raw bytes
    (``_raw_strings``)."""
    items: list[str] = []
    raw: list[bytes] | None = None  # every element as bytes, from the first that is not UTF-8
    offset = start
    for i in range(count):
        if offset + 4 > end:
            raise BadRequest(f"input {name!r}: BYTES binary data ends inside element {i}")
        (length,) = _U32.unpack_from(body, offset)
        offset += 4
        if offset + length > end:
            raise BadRequest(f"input {name!r}: BYTES binary data ends inside element {i}")
        element = body[offset : offset + length]
        offset += length
        if raw is not None:
            raw.append(element)
            continue
        try:
            items.append(element.decode("utf-8"))
        except UnicodeDecodeError:
            raw = [*map(str.encode, items), element]
    if offset != end:
        raise BadRequest(
            f"input {name!r}: {end - offset} bytes remain after its {count} BYTES elements"
        )
    if raw is not None:
        return _raw_strings(raw, len(items), name, spent)
    arr = np.empty(count, dtype=object)
    arr[:] = items
    return arr


def _raw_strings(items: list[bytes], bad: int, name: str, spent: _Spent) -> np.ndarray:
    """BYTES elements, element ``bad`` the first that is not UTF-8, exactly, as a fixed-width
    numpy bytes array one byte wider than the longest element. onnxruntime reads each element
    of such an array up to its first NUL byte (which the extra byte guarantees) and takes bytes
    objects in an object array as their repr, so this is the one form that carries arbitrary
    bytes into a model, and only bytes without NUL in them."""
    nul = next((i for i, item in enumerate(items) if b"\0" in item), None)
    if nul is not None:
        raise BadRequest(
            f"input {name!r}: BYTES element {bad} is not UTF-8 and element {nul} holds a NUL "
            "byte; onnxruntime string tensors take bytes that are not UTF-8 only without NUL "
            "bytes (send UTF-8 text, or no NUL)"
        )
    width = max(map(len, items)) + 1
    spent.charge(name, len(items) * width)  # the fixed-width copy, besides the section's bytes
    return np.array(items, dtype=f"S{width}")


# -- encoding ------------------------------------------------------------------------------------


def _encode_tensor(
    name: str, array: np.ndarray, spec: TensorSpec | None, binary: bool
) -> tuple[dict[str, Any], bytes | memoryview | None]:
    datatype = spec.datatype if spec is not None else _datatype_of(name, array)
    dtype = NUMPY_DTYPES[datatype]
    try:
        arr = np.asarray(array, dtype=dtype, order="C")
    except (ValueError, TypeError, OverflowError) as exc:
        raise GatewayError(f"output {name!r} cannot be encoded as {datatype}: {exc}") from exc
    entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
    if datatype == "BYTES":
        return _encode_strings(name, arr, entry, binary)
    if binary:
        raw = arr.reshape(-1).astype(dtype.newbyteorder("<"), copy=False).view(np.uint8)
        entry["parameters"] = {"binary_data_size": raw.nbytes}
        return entry, raw.data
    entry["data"] = arr.reshape(-1)  # orjson writes every numeric dtype natively
    return entry, None


def _encode_strings(
    name: str, arr: np.ndarray, entry: dict[str, Any], binary: bool
) -> tuple[dict[str, Any], bytes | None]:
    items: list[Any] = arr.reshape(-1).tolist()
    kinds = set(map(type, items))
    if kinds - {str, bytes}:
        raise GatewayError(f"output {name!r}: BYTES elements must be str or bytes, got {kinds}")
    if not binary:
        if bytes not in kinds:
            entry["data"] = items
            return entry, None
        try:
            entry["data"] = [v.decode("utf-8") if type(v) is bytes else v for v in items]
            return entry, None
        except UnicodeDecodeError:
            pass
    try:
        encoded = [v.encode("utf-8") if type(v) is str else v for v in items]
    except UnicodeEncodeError as exc:
        raise GatewayError(f"output {name!r} holds a string that is not UTF-8: {exc}") from exc
    chunk = b"".join(
        chain.from_iterable(zip(map(_U32.pack, map(len, encoded)), encoded, strict=True))
    )
    entry["parameters"] = {"binary_data_size": len(chunk)}
    return entry, chunk


def _datatype_of(name: str, array: np.ndarray) -> str:
    dtype = np.asarray(array).dtype
    if dtype.kind in "OUS":
        return "BYTES"
    datatype = _DATATYPE_OF.get(dtype.newbyteorder("="))
    if datatype is None:
        raise GatewayError(f"output {name!r} has dtype {dtype}, which the protocol cannot carry")
    return datatype


# -- helpers -------------------------------------------------------------------------------------


def _object(raw: Any, what: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if type(raw) is not dict:
        raise BadRequest(f"{what} must be a JSON object")
    return raw


def _names(specs: Any) -> str:
    return ", ".join(repr(spec.name) for spec in specs) or "none"


# Bounded in depth and width: reprlib does not recurse past maxlevel, so a value nested a
# thousand levels deep (orjson allows 1024) cannot exhaust the stack.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring = 3, 6, 4, 60


def _show(value: Any, limit: int = 60) -> str:
    """repr of a client-supplied value, cut short so one message cannot echo a whole body."""
    return cut(_REPR.repr(value), limit)
