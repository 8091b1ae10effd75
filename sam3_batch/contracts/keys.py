"""Deterministic, safe output keys: a rerun overwrites, never duplicates, and never escapes the root."""

from __future__ import annotations

import hashlib
import unicodedata
from urllib.parse import urlsplit

from sam3_batch.contracts.errors import BadUriError
from sam3_batch.contracts.layout import JOB_DIR
from sam3_batch.contracts.layout import OutputLayout as OutputLayout  # re-exported; the home is contracts.layout
from sam3_batch.contracts.layout import job_dir_uri as job_dir_uri
from sam3_batch.contracts.layout import join_uri as join_uri
from sam3_batch.contracts.layout import out_key_of_metadata as out_key_of_metadata

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"})
_MAX_SEGMENT = 200


def _clean_segment(segment: str) -> str:
    segment = "".join(ch if ch.isprintable() and ch not in "\\" else "_" for ch in segment)
    if segment in ("", ".", ".."):
        return ""
    return segment[:_MAX_SEGMENT]


def _is_already_safe(raw: str) -> bool:
    """True when the slow path below would return ``raw`` unchanged: printable ASCII in clean segments."""
    if not (raw.isascii() and raw.isprintable()) or "\\" in raw:
        return False
    segments = raw.split("/")
    if segments[0] == JOB_DIR:
        return False
    return all(s and s != "." and s != ".." and len(s) <= _MAX_SEGMENT for s in segments)


def safe_relative_key(raw: str) -> str:
    """Normalise an input-derived key so it stays inside the output root.

    NFC-normalises unicode, drops ``.``/``..``/empty segments and control characters, and strips leading
    slashes. When anything had to change, a short hash of the raw key is appended so that distinct raw
    keys never collide on one output.
    """
    if _is_already_safe(raw):  # the common case, checked without normalising or rebuilding the key
        return raw
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
