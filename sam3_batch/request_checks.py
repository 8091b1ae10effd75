"""Checks of a job request made before anything is loaded: a bad request fails in a second, not after the model."""

from __future__ import annotations

import tempfile
from pathlib import Path

from sam3_batch.contracts.errors import BadUriError, RequestError
from sam3_batch.contracts.redact import display_uri
from sam3_batch.contracts.storage.local import local_path
from sam3_batch.contracts.storage.router import scheme_of


def check_output_root(output_root: str) -> None:
    """The output root is named, and a local one is a folder this process can write (created if missing)."""
    if not output_root.strip():
        raise RequestError("--out must name an output root (a folder or s3://bucket/prefix/), not an empty string")
    try:
        scheme = scheme_of(output_root)
    except BadUriError as exc:
        raise RequestError(f"--out: {exc}") from exc
    if scheme in ("http", "https"):
        raise RequestError(f"--out {display_uri(output_root)}: http(s) is read-only; use a folder or s3://")
    if scheme == "file":
        _check_local_root(output_root)


def _check_local_root(output_root: str) -> None:
    try:
        path = local_path(output_root)
    except BadUriError as exc:
        raise RequestError(f"--out: {exc}") from exc
    shown = display_uri(output_root)
    if path.exists() and not path.is_dir():
        raise RequestError(f"--out {shown} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".sam3-write-check-"):
            pass
    except OSError as exc:
        raise RequestError(f"cannot write to the output root {shown}: {exc.strerror or exc}") from exc


def looks_like_local_path(model: str) -> bool:
    """True for a model named by a filesystem path rather than a hub id such as ``facebook/sam3``."""
    return model.startswith(("/", "./", "../", "~", "file://")) or model.count("/") > 1


def check_model_path(model: str) -> None:
    """A model given as a path must be an existing folder (hub ids are checked when they load)."""
    if model == "tiny-random" or not looks_like_local_path(model):
        return
    path = Path(model.removeprefix("file://")).expanduser()
    if not path.is_dir():
        raise RequestError(f"model path {display_uri(model)} does not exist or is not a folder")
