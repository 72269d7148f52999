"""The on-disk model repository (Triton's layout): DIR/<model>/<version>/model.onnx."""

from __future__ import annotations

import re
from pathlib import Path

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
