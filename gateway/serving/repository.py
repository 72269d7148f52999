"""The on-disk model repository (Triton's layout): DIR/<model>/<version>/model.onnx."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path, PurePath

import onnx

from gateway.errors import BadRequest, LoadError

MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
VERSION_NAME = re.compile(r"[1-9][0-9]{0,17}")


def check_model_name(name: str) -> str:
    if not MODEL_NAME.fullmatch(name) or ".." in name:
        raise BadRequest(f"invalid model name {name!r}: use letters, digits, '_', '.', '-'")
    return name


def check_version_name(version: str) -> str:
    if not VERSION_NAME.fullmatch(version):
        raise BadRequest(f"invalid model version {version!r}: versions are positive integers")
    return version


def version_key(version: str) -> int:
    return int(version)


def list_models(root: Path) -> list[str]:
    """Model folders with a valid name; hidden folders and files are ignored."""
    if not root.is_dir():
        return []
    return sorted(
        p.name
        for p in root.iterdir()
        if p.is_dir() and MODEL_NAME.fullmatch(p.name) and ".." not in p.name
    )


def list_versions(root: Path, model: str) -> list[str]:
    folder = root / check_model_name(model)
    if not folder.is_dir():
        return []
    versions = [p.name for p in folder.iterdir() if p.is_dir() and VERSION_NAME.fullmatch(p.name)]
    return sorted(versions, key=version_key)


def version_folder(root: Path, model: str, version: str) -> Path:
    folder = root / check_model_name(model) / check_version_name(version)
    # Names are checked above; resolving guards against symlinks that leave the repository.
    if not folder.resolve().is_relative_to(root.resolve()):
        raise BadRequest(f"model {model!r} version {version} is outside the repository")
    return folder


def files_inside(root: Path, folder: Path) -> None:
    """Refuse a version whose files (model, reference, metadata, config) link out of the
    repository: the loader reads only what the repository holds."""
    top = root.resolve()
    for path in folder.iterdir():
        if not path.resolve().is_relative_to(top):
            raise LoadError(f"{path.name} links outside the model repository")


def external_data_inside(model_path: Path) -> None:
    """Refuse a model whose tensors keep their data in files outside its version folder: an
    absolute location, a ``..`` part, or a link that resolves outside. onnxruntime reads those
    files when it builds the session, so a model could otherwise read any file the process can
    (its data then shaping what the model answers)."""
    folder = model_path.parent.resolve()
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception:  # DecodeError, OSError, ...: onnxruntime, next, says why it cannot load
        return
    for tensor in _tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        parts = PurePath(location).parts
        inside = (folder / location).resolve().is_relative_to(folder)
        if not location or PurePath(location).is_absolute() or ".." in parts or not inside:
            raise LoadError(
                f"tensor {tensor.name[:80]!r} keeps its data at {location[:120]!r}, outside the "
                "version's folder; external data must be a file inside it"
            )


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor a graph holds: initializers, sparse ones, and tensor attributes of its
    nodes, subgraphs (If, Loop, Scan bodies) included."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _tensors(subgraph)
