"""Deterministic, safe output keys: a rerun overwrites, never duplicates, and never escapes the root."""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass
from urllib.parse import urlsplit

from sam3_batch.contracts.errors import BadUriError

JOB_DIR = "_jobs"
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"})
METADATA_SUFFIX = ".json"
_MAX_SEGMENT = 200


def join_uri(root: str, key: str) -> str:
    """``root`` (s3://b/p, file:///p or a path) joined with a relative '/'-separated key."""
    return f"{root.rstrip('/')}/{key.lstrip('/')}"


def _clean_segment(segment: str) -> str:
    segment = "".join(ch if ch.isprintable() and ch not in "\\" else "_" for ch in segment)
    if segment in ("", ".", ".."):
        return ""
    return segment[:_MAX_SEGMENT]


def safe_relative_key(raw: str) -> str:
    """Normalise an input-derived key so it stays inside the output root.

    NFC-normalises unicode, drops ``.``/``..``/empty segments and control characters, and strips leading
    slashes. When anything had to change, a short hash of the raw key is appended so that distinct raw
    keys never collide on one output.
    """
    normalised = unicodedata.normalize("NFC", raw)
    segments = [_clean_segment(s) for s in normalised.replace("\\", "/").split("/")]
    cleaned = "/".join(s for s in segments if s)
    if not cleaned:
        raise BadUriError(f"cannot derive an output key from {raw!r}")
    if cleaned.startswith(JOB_DIR + "/") or cleaned == JOB_DIR:
        cleaned = "_" + cleaned
    if cleaned != raw:
        digest = hashlib.sha1(raw.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        cleaned = f"{cleaned}~{digest}"
    return cleaned


def key_from_uri(uri: str) -> str:
    """An output key for an input given by URI alone (manifest lines, http URLs): host/bucket + path."""
    try:
        parts = urlsplit(uri)
    except ValueError as exc:  # e.g. "Invalid IPv6 URL"
        raise BadUriError(f"malformed URI {uri!r}: {exc}") from exc
    if parts.scheme in ("s3", "http", "https"):
        raw = f"{parts.netloc}/{parts.path.lstrip('/')}"
        if parts.query:
            raw += "_" + hashlib.sha1(parts.query.encode()).hexdigest()[:8]
        return safe_relative_key(raw)
    if parts.scheme in ("", "file"):
        return safe_relative_key(parts.path if parts.scheme else uri)
    raise BadUriError(f"unsupported URI scheme {parts.scheme!r} in {uri!r}")


@dataclass(frozen=True)
class OutputLayout:
    """Where everything for one image goes under the output root."""

    output_root: str
    out_key: str

    @property
    def metadata_uri(self) -> str:
        return join_uri(self.output_root, self.out_key + METADATA_SUFFIX)

    def mask_png_uri(self, prompt_index: int, instance_index: int) -> str:
        return join_uri(self.output_root, f"{self.out_key}.masks/p{prompt_index:02d}_i{instance_index:03d}.png")

    def masked_image_uri(self, output_format: str) -> str:
        return join_uri(self.output_root, f"{self.out_key}.masked.{output_format}")


def job_dir_uri(output_root: str, job_id: str) -> str:
    """The folder under the output root that holds a job's report and index parts."""
    return join_uri(output_root, f"{JOB_DIR}/{job_id}")


def out_key_of_metadata(relative_key: str) -> str | None:
    """Inverse of ``OutputLayout.metadata_uri`` for a listed relative key; None for other objects."""
    if relative_key.startswith(JOB_DIR + "/") or not relative_key.endswith(METADATA_SUFFIX):
        return None
    return relative_key[: -len(METADATA_SUFFIX)]
