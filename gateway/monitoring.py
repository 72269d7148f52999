"""Fitting a version's monitor at load, from its ``reference.npy`` and the outputs the model
computes on it. Blocking: runs on the loader thread, never on the event loop."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from gateway.models import ModelVersion, Runtime
from gateway.runtime import LoadError
from monitors import VersionMonitor

log = logging.getLogger("turnout.monitoring")

REFERENCE_FILE = "reference.npy"
# Reference rows run through the model in chunks, so a large sample cannot exhaust memory.
_CHUNK = 4096


def reference_input(info: ModelVersion) -> str | None:
    """The input drift is measured on: ``metadata["reference_input"]``, else the first input."""
    named = info.metadata.get("reference_input")
    if isinstance(named, str) and info.input(named) is not None:
        return named
    return info.inputs[0].name if info.inputs else None


def fit_monitor(
    info: ModelVersion, runtime: Runtime, folder: Path, window_s: float
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
    parts = [
        runtime.run_sync({name: batch[i : i + _CHUNK]}, names) for i in range(0, len(batch), _CHUNK)
    ]
    outputs = {n: np.concatenate([p[n] for p in parts]) for n in names}
    return _fit(reference, outputs, info, window_s)


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
