"""Fitting a version's monitor at load, from its ``reference.npy`` and the outputs the model
computes on it. Blocking: runs on the loader thread, never on the event loop.

Running the reference sample through the model is most of a heavy version's load time (5,000
rows of the demo's heavy model: 3.6 s). With a cache folder, the outputs are kept there under a
key naming the exact model file, reference sample and onnxruntime release, and a later load
reads them back after checking a few rows against the model: a second start skips the work.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from gateway.errors import LoadError
from gateway.serving.types import ModelVersion, Runtime
from monitors import VersionMonitor

log = logging.getLogger("turnout.monitoring")

REFERENCE_FILE = "reference.npy"
# Reference rows run through the model in chunks, so a large sample cannot exhaust memory.
_CHUNK = 4096
# Rows of the reference run again to check cached outputs against the model.
_CHECK_ROWS = 8


def reference_input(info: ModelVersion) -> str | None:
    """The input drift is measured on: ``metadata["reference_input"]``, else the first input."""
    named = info.metadata.get("reference_input")
    if isinstance(named, str) and info.input(named) is not None:
        return named
    return info.inputs[0].name if info.inputs else None


def fit_monitor(
    info: ModelVersion,
    runtime: Runtime,
    folder: Path,
    window_s: float,
    cache: Path | None = None,
) -> VersionMonitor:
    """A monitor with drift profiles when the version has a usable reference sample, else
    latency only. A reference that exists but is unusable fails the load, loudly."""
    path = folder / REFERENCE_FILE
    name = reference_input(info)
    if not path.exists() or name is None:
        return VersionMonitor.fit(None, {}, window_s=window_s)
    try:
        reference = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise LoadError(f"{REFERENCE_FILE} cannot be read: {exc}") from None
    spec = info.input(name)
    assert spec is not None
    if reference.ndim != 2 or len(info.inputs) != 1 or len(spec.shape) != 2:
        # Multi-input models: drift on the named input; outputs need every input, so no
        # prediction drift for them.
        if reference.ndim != 2:
            raise LoadError(f"{REFERENCE_FILE} must be a 2-D (rows, features) array")
        return _fit(reference, {}, info, window_s)
    if spec.shape[1] not in (-1, reference.shape[1]):
        raise LoadError(
            f"{REFERENCE_FILE} has {reference.shape[1]} columns, input {name!r} has {spec.shape[1]}"
        )
    batch = reference.astype(spec.dtype, copy=False)
    names = [o.name for o in info.outputs]
    key = _cache_key(info, name, batch, names)
    outputs = _cached(cache, key, runtime, name, batch, names)
    if outputs is None:
        parts = [
            runtime.run_sync({name: batch[i : i + _CHUNK]}, names)
            for i in range(0, len(batch), _CHUNK)
        ]
        outputs = {n: np.concatenate([p[n] for p in parts]) for n in names}
        if cache is not None:
            _keep(cache, key, [outputs[n] for n in names])
    return _fit(reference, outputs, info, window_s)


def _cache_key(info: ModelVersion, name: str, batch: np.ndarray, names: Sequence[str]) -> str:
    h = hashlib.sha256()
    for part in (info.sha256, ort.__version__, name, str(batch.dtype), str(batch.shape), *names):
        h.update(part.encode() + b"\0")
    h.update(np.ascontiguousarray(batch).tobytes())
    return h.hexdigest()


def _cached(
    cache: Path | None,
    key: str,
    runtime: Runtime,
    name: str,
    batch: np.ndarray,
    names: Sequence[str],
) -> dict[str, np.ndarray] | None:
    """The kept outputs when they are whole and the model still computes them, else None."""
    if cache is None or not (cache / f"{key}.npz").exists():
        return None
    try:
        # opened here: np.load leaks its own handle on a damaged archive
        with (cache / f"{key}.npz").open("rb") as f, np.load(f, allow_pickle=False) as kept:
            outputs = {n: kept[f"arr_{i}"] for i, n in enumerate(names)}  # names: in the key
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        log.warning("reference outputs in %s unreadable, recomputing: %s", cache, exc)
        return None
    if any(len(a) != len(batch) for a in outputs.values()):
        return None
    fresh = runtime.run_sync({name: batch[:_CHECK_ROWS]}, names)
    for n in names:
        a, b = fresh[n], outputs[n][:_CHECK_ROWS]
        same = (
            np.allclose(a, b, rtol=1e-4, atol=1e-6, equal_nan=True)
            if a.dtype.kind in "fc"
            else np.array_equal(a, b)
        )
        if a.shape != b.shape or a.dtype != b.dtype or not same:
            log.warning("cached reference outputs of %s differ from the model's; recomputing", n)
            return None
    return outputs


def _keep(cache: Path, key: str, outputs: list[np.ndarray]) -> None:
    """Write atomically (a reader never sees half a file); a cache that cannot be written only
    costs the next start its time."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache, suffix=".tmp")
    except OSError as exc:
        log.warning("cannot keep reference outputs in %s: %s", cache, exc)
        return
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, *outputs)
        os.replace(tmp, cache / f"{key}.npz")
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        log.warning("cannot keep reference outputs in %s: %s", cache, exc)


def _fit(
    reference: np.ndarray,
    outputs: dict[str, np.ndarray],
    info: ModelVersion,
    window_s: float,
) -> VersionMonitor:
    names = info.metadata.get("feature_names")
    if not (isinstance(names, list) and len(names) == reference.shape[1]):
        names = None
    try:
        return VersionMonitor.fit(reference, outputs, feature_names=names, window_s=window_s)
    except ValueError as exc:
        raise LoadError(f"cannot fit the drift reference: {exc}") from None
