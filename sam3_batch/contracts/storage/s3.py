"""S3 (and S3-compatible) backend on one thread-safe boto3 client; botocore does the retrying."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NoReturn

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from sam3_batch.contracts.errors import (
    BadUriError,
    ForbiddenError,
    ItemError,
    NotFoundError,
    Sam3BatchError,
    TransientError,
    is_transient,
)
from sam3_batch.contracts.redact import redact, register_secret
from sam3_batch.contracts.settings import Settings
from sam3_batch.contracts.storage.base import ObjectInfo

_PREFIX = "s3://"
_NOT_FOUND_CODES = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}
_FORBIDDEN_CODES = {"401", "403", "AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId"}
_MIN_POOL = 32  # I/O thread pools of several chunks share this client


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key); the key may be empty."""
    if not uri.startswith(_PREFIX):
        raise BadUriError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len(_PREFIX) :].partition("/")
    if not bucket:
        raise BadUriError(f"s3 URI without a bucket: {uri!r}")
    return bucket, key


def _object_key(uri: str) -> tuple[str, str]:
    bucket, key = split_s3_uri(uri)
    if not key or key.endswith("/"):
        raise BadUriError(f"s3 URI does not name an object: {uri!r}")
    return bucket, key


def _folder_prefix(key: str) -> str:
    """Listing treats the prefix as a folder, as the local backend does: 'a/b' lists 'a/b/...'."""
    return key if not key or key.endswith("/") else key + "/"


def build_client(settings: Settings) -> Any:
    """A boto3 S3 client from settings; credentials come from boto's usual chain (env, profile, role)."""
    session = boto3.session.Session()  # our own session: the default one is not thread-safe
    credentials = session.get_credentials()
    if credentials is not None:
        frozen = credentials.get_frozen_credentials()
        register_secret(frozen.secret_key)
        register_secret(frozen.token)
    config = Config(
        region_name=settings.s3_region,
        # total_max_attempts counts the first request, as AWS_MAX_ATTEMPTS does; the dict key
        # "max_attempts" would count retries only (8 would mean 9 requests).
        retries={"mode": settings.s3_retry_mode, "total_max_attempts": settings.s3_max_attempts},
        connect_timeout=settings.s3_connect_timeout_s,
        read_timeout=settings.s3_read_timeout_s,
        max_pool_connections=max(_MIN_POOL, 2 * settings.io_worker_count()),
        # S3-compatible stores behind a custom endpoint (MinIO, moto, Ceph) rarely have wildcard DNS.
        s3={"addressing_style": "path"} if settings.s3_endpoint_url else None,
    )
    return session.client("s3", endpoint_url=settings.s3_endpoint_url, config=config)


def _raise_mapped(exc: Exception, uri: str) -> NoReturn:
    """Re-raise a botocore failure as one of our error types, with a readable, credential-free message."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        detail = redact(f"{uri}: {code or status} {error.get('Message', '')}".strip())
        if code in _NOT_FOUND_CODES or status == 404:
            raise NotFoundError(detail) from exc
        if code in _FORBIDDEN_CODES or status in (401, 403):
            raise ForbiddenError(detail) from exc
        if is_transient(exc):
            raise TransientError(f"{detail} (after retries)") from exc
        raise ItemError(detail) from exc
    detail = redact(f"{uri}: {exc.__class__.__name__}: {exc}")
    if is_transient(exc):
        raise TransientError(f"{detail} (after retries)") from exc
    raise Sam3BatchError(detail) from exc


class S3Backend:
    """``s3://bucket/key`` objects; ``page_size`` is the ListObjectsV2 page size (S3's maximum is 1000)."""

    def __init__(self, settings: Settings, *, page_size: int = 1000, client: Any = None) -> None:
        self._client = client if client is not None else build_client(settings)
        self._page_size = page_size

    def read_bytes(self, uri: str) -> bytes:
        """The whole object."""
        bucket, key = _object_key(uri)
        try:
            response = self._client.get_object(Bucket=bucket, Key=key)
            data: bytes = response["Body"].read()
        except (ClientError, BotoCoreError) as exc:
            _raise_mapped(exc, uri)
        except OSError as exc:  # a reset while streaming the body surfaces from urllib3 unwrapped
            raise TransientError(redact(f"{uri}: {exc.__class__.__name__}: {exc}")) from exc
        return data

    def write_bytes(self, uri: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """One PutObject: S3 makes it visible all at once."""
        bucket, key = _object_key(uri)
        try:
            self._client.put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type)
        except (ClientError, BotoCoreError) as exc:
            _raise_mapped(exc, uri)

    def exists(self, uri: str) -> bool:
        """HeadObject; a 404 is False, a 403 raises ForbiddenError."""
        bucket, key = _object_key(uri)
        try:
            self._client.head_object(Bucket=bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            try:
                _raise_mapped(exc, uri)
            except NotFoundError:
                return False
        return True

    def list_objects(self, prefix_uri: str, start_after: str | None = None) -> Iterator[ObjectInfo]:
        """Objects under the folder ``prefix_uri`` in the server's key order, one page at a time.

        AWS orders keys as UTF-8 bytes; SeaweedFS folder by folder ('a/x' before 'a-b'). Either way the
        server applies ``start_after`` in its own order, which is all a resumed listing needs.
        """
        bucket, key = split_s3_uri(prefix_uri)
        prefix = _folder_prefix(key)
        params: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
        if start_after:
            params["StartAfter"] = prefix + start_after
        pages = self._client.get_paginator("list_objects_v2").paginate(
            **params, PaginationConfig={"PageSize": self._page_size}
        )
        base_uri = f"{_PREFIX}{bucket}/{prefix}"
        try:
            for page in pages:
                yield from _page_objects(page, prefix, base_uri)
        except (ClientError, BotoCoreError) as exc:
            _raise_mapped(exc, prefix_uri)


def _page_objects(page: dict[str, Any], prefix: str, base_uri: str) -> Iterator[ObjectInfo]:
    for item in page.get("Contents", []):
        key = str(item["Key"])
        if key.endswith("/"):  # console-made "folder" markers are not objects
            continue
        relative_key = key[len(prefix) :]
        yield ObjectInfo(uri=base_uri + relative_key, relative_key=relative_key, size=int(item["Size"]))
