"""Keep credentials out of logs, error reasons, metadata and reports."""

from __future__ import annotations

import re
import threading

_URL_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]+)@")
# Names of query parameters whose value is a credential: signed-URL parts (AWS X-Amz-Signature/Credential/
# Security-Token, GCS X-Goog-Signature, Azure SAS sig), and token/key/secret/password/auth-style parameters.
_SECRET_NAME = r"[\w.-]*(?:signature|credential|token|secret|password|passwd|sig|accesskeyid|key|auth)[\w.-]*"
_QUERY_SECRET = re.compile(rf"(?i)(?<![\w.-])(?P<k>{_SECRET_NAME})=(?P<v>[^&\s\"']+)")
_secrets: set[str] = set()
_lock = threading.Lock()


def register_secret(value: str | None) -> None:
    """Remember a secret value (e.g. an AWS secret key) so that ``redact`` masks it wherever it appears."""
    if value and len(value) >= 4:
        with _lock:
            _secrets.add(value)


def valid_text(text: str) -> str:
    """``text`` as valid UTF-8: bytes of a non-UTF-8 file name (surrogate escapes) are shown as ``\\xNN``."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # surrogates that are not escaped bytes
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def redact(text: str) -> str:
    """Mask URL passwords, signed-URL parameters and every registered secret in ``text`` (made valid UTF-8)."""
    text = valid_text(text)
    text = _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    text = _QUERY_SECRET.sub(lambda m: f"{m['k']}=***", text)
    with _lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        text = text.replace(secret, "***")
    return text

_SECRET_PARAM = re.compile(rf"(?i){_SECRET_NAME}")


def display_uri(uri: str) -> str:
    """The one form in which a URI is shown or stored (outputs, reports, job state, logs, the CLI).

    The real URI travels only in the queue message. Here the password and the value of every
    credential-like query parameter (``X-Amz-Signature``, ``X-Amz-Credential``, ``token``, ``sig`` ...)
    become ``***``, and bytes that are not UTF-8 (from file names) are shown as ``\\xNN``.
    """
    text = valid_text(uri)
    text = _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    head, sep, query = text.partition("?")
    if sep:
        fragment_sep = "#" if "#" in query else ""
        query, _, fragment = query.partition("#")
        params = [_mask_param(p) for p in query.split("&")]
        text = f"{head}?{'&'.join(params)}{fragment_sep}{fragment}"
    return redact(text)


def _mask_param(param: str) -> str:
    name, sep, value = param.partition("=")
    return f"{name}=***" if sep and value and _SECRET_PARAM.fullmatch(name) else param
