"""Read-only http(s) backend that cannot be turned against private networks (SSRF-safe fetches).

Each hop resolves the host once, checks every answer, and connects to the checked IP itself (no DNS
rebinding window) while sending the original Host header and TLS SNI/certificate hostname.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, IPv6Network, ip_address
from urllib.parse import urljoin, urlsplit

import urllib3
from urllib3.exceptions import DecodeError, HTTPError, LocationValueError, NewConnectionError, SSLError

from sam3_batch.contracts.errors import BadUriError, ForbiddenError, ItemError, NotFoundError, TransientError
from sam3_batch.contracts.redact import redact
from sam3_batch.contracts.settings import Settings
from sam3_batch.contracts.storage.base import ObjectInfo

Address = IPv4Address | IPv6Address
AddressPolicy = Callable[[Address], bool]

MAX_REDIRECTS = 5
_REDIRECT_STATUSES = {301, 302, 303, 307, 308}
_TRANSIENT_STATUSES = {408, 425, 429}
_CHUNK_BYTES = 64 * 1024
_MAX_POOLS = 64
_POOL_CONNECTIONS = 32
_NAT64 = IPv6Network("64:ff9b::/96")
_USER_AGENT = "sam3-batch"


def is_public_address(ip: Address) -> bool:
    """True for globally routable unicast addresses; IPv6 forms that embed an IPv4 address are checked too."""
    embedded = _embedded_ipv4(ip) if isinstance(ip, IPv6Address) else None
    if embedded is not None and not is_public_address(embedded):
        return False
    special = (
        ip.is_private,
        ip.is_loopback,
        ip.is_link_local,
        ip.is_multicast,
        ip.is_reserved,
        ip.is_unspecified,
    )
    return ip.is_global and not any(special)


def _embedded_ipv4(ip: IPv6Address) -> IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _allow_any(ip: Address) -> bool:
    return True


@dataclass(frozen=True)
class _Target:
    """One request target, split the way the connection needs it."""

    url: str
    scheme: str
    hostname: str  # ASCII (IDNA) form, no brackets
    port: int
    host_header: str
    path: str

    @classmethod
    def parse(cls, url: str) -> _Target:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise BadUriError(redact(f"malformed URL {url!r}: {exc}")) from exc
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise BadUriError(redact(f"only http and https URLs can be fetched, not {url!r}"))
        if parts.username is not None or parts.password is not None:
            raise BadUriError(redact(f"credentials in http URLs are not supported: {url!r}"))
        if not parts.hostname:
            raise BadUriError(f"URL without a host: {url!r}")
        try:
            hostname = parts.hostname.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise BadUriError(f"invalid host name in {url!r}") from exc
        port = port or (443 if scheme == "https" else 80)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        bracketed = f"[{hostname}]" if ":" in hostname else hostname
        default_port = (scheme, port) in (("http", 80), ("https", 443))
        host_header = bracketed if default_port else f"{bracketed}:{port}"
        return cls(url, scheme, hostname, port, host_header, path)


class _PoolCache:
    """A small LRU of connection pools keyed by (scheme, checked IP, port, hostname); thread-safe."""

    def __init__(self, factory: Callable[[_Target, str], urllib3.HTTPConnectionPool]) -> None:
        self._factory = factory
        self._pools: OrderedDict[tuple[str, str, int, str], urllib3.HTTPConnectionPool] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, target: _Target, ip: str) -> urllib3.HTTPConnectionPool:
        key = (target.scheme, ip, target.port, target.hostname)
        with self._lock:
            pool = self._pools.get(key)
            if pool is None:
                pool = self._pools[key] = self._factory(target, ip)
                if len(self._pools) > _MAX_POOLS:
                    self._pools.popitem(last=False)[1].close()
            self._pools.move_to_end(key)
            return pool

    def close(self) -> None:
        with self._lock:
            for pool in self._pools.values():
                pool.close()
            self._pools.clear()


class HttpBackend:
    """GET-only access to http(s) URLs with address checks, redirect limits, size and time limits.

    ``address_allowed`` overrides the address policy (default: public addresses only, or any address
    when ``settings.http_allow_private``); ``ca_certs`` is an optional CA bundle path for https.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        address_allowed: AddressPolicy | None = None,
        ca_certs: str | None = None,
    ) -> None:
        default_policy = _allow_any if settings.http_allow_private else is_public_address
        self._address_allowed = address_allowed or default_policy
        self._max_bytes = settings.http_max_bytes
        self._timeout_s = settings.http_timeout_s
        self._ca_certs = ca_certs
        self._pools = _PoolCache(self._new_pool)

    def read_bytes(self, uri: str) -> bytes:
        """The body of a 2xx response after at most 5 redirects; larger than http_max_bytes is an error."""
        deadline = time.monotonic() + self._timeout_s
        response = self._open(uri, deadline)
        try:
            data = self._read_limited(response, uri, deadline)
        except BaseException:
            _discard(response)  # the connection has unread bytes: never reuse it
            raise
        response.release_conn()
        return data

    def write_bytes(self, uri: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Always refused: http(s) is an input-only scheme."""
        raise BadUriError(f"http(s) URIs are read-only; cannot write {redact(uri)}")

    def exists(self, uri: str) -> bool:
        """True when a GET answers 2xx (the body is not read); 404/410 is False."""
        try:
            response = self._open(uri, time.monotonic() + self._timeout_s)
        except NotFoundError:
            return False
        _discard(response)
        return True

    def list_objects(self, prefix_uri: str, start_after: str | None = None) -> Iterator[ObjectInfo]:
        """Always refused: http(s) has no listing."""
        raise BadUriError(f"http(s) URIs cannot be listed: {redact(prefix_uri)}")

    def close(self) -> None:
        """Close pooled connections."""
        self._pools.close()

    def _open(self, uri: str, deadline: float) -> urllib3.BaseHTTPResponse:
        """Follow redirects (re-checking every hop) and return an unread 2xx response."""
        url = uri
        for _ in range(MAX_REDIRECTS + 1):
            target = _Target.parse(url)
            response = self._request_first_reachable(target, self._checked_ips(target), deadline)
            location = response.headers.get("Location")
            if response.status not in _REDIRECT_STATUSES or not location:
                _check_status(response, uri)
                return response
            _discard(response)
            url = urljoin(url, location)
        raise ItemError(redact(f"{uri}: more than {MAX_REDIRECTS} redirects"))

    def _checked_ips(self, target: _Target) -> list[str]:
        """Resolve once; only the allowed answers are ever connected to."""
        addresses = _resolve(target)
        allowed = [str(ip) for ip in addresses if self._address_allowed(ip)]
        if not allowed:
            raise ForbiddenError(
                redact(
                    f"{target.url}: {target.hostname} resolves to {addresses[0]}, a private, loopback, "
                    "link-local or reserved address (set http_allow_private to fetch it)"
                )
            )
        return allowed

    def _request_first_reachable(
        self, target: _Target, ips: list[str], deadline: float
    ) -> urllib3.BaseHTTPResponse:
        """Try the checked addresses in resolver order ('localhost' may be ::1 first, served on IPv4)."""
        refused: list[NewConnectionError] = []
        for ip in ips:
            try:
                return self._request(target, ip, deadline)
            except NewConnectionError as exc:
                refused.append(exc)
        raise _mapped_transport_error(refused[-1], target.url) from refused[-1]

    def _request(self, target: _Target, ip: str, deadline: float) -> urllib3.BaseHTTPResponse:
        remaining = max(deadline - time.monotonic(), 0.001)
        headers = {"Host": target.host_header, "User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
        pool = self._pools.get(target, ip)
        try:
            return pool.urlopen(
                "GET",
                target.path,
                headers=headers,
                redirect=False,
                retries=False,
                preload_content=False,
                assert_same_host=False,
                timeout=urllib3.Timeout(connect=remaining, read=remaining),
            )
        except NewConnectionError:
            raise  # the caller may try the next address
        except HTTPError as exc:
            raise _mapped_transport_error(exc, target.url) from exc

    def _new_pool(self, target: _Target, ip: str) -> urllib3.HTTPConnectionPool:
        if target.scheme == "http":
            return urllib3.HTTPConnectionPool(ip, target.port, maxsize=_POOL_CONNECTIONS, block=False)
        # Connect to the checked IP, but do SNI and certificate checks against the URL's hostname.
        return urllib3.HTTPSConnectionPool(
            ip,
            target.port,
            maxsize=_POOL_CONNECTIONS,
            block=False,
            cert_reqs="CERT_REQUIRED",
            ca_certs=self._ca_certs,
            server_hostname=target.hostname,
            assert_hostname=target.hostname,
        )

    def _read_limited(self, response: urllib3.BaseHTTPResponse, uri: str, deadline: float) -> bytes:
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > self._max_bytes:
            raise ItemError(redact(f"{uri}: {declared} bytes exceeds http_max_bytes={self._max_bytes}"))
        chunks: list[bytes] = []
        total = 0
        try:
            for chunk in self._chunks_until(response, uri, deadline):
                total += len(chunk)
                if total > self._max_bytes:
                    raise ItemError(redact(f"{uri}: body exceeds http_max_bytes={self._max_bytes}"))
                chunks.append(chunk)
        except HTTPError as exc:
            raise _mapped_transport_error(exc, uri) from exc
        return b"".join(chunks)

    def _chunks_until(self, response: urllib3.BaseHTTPResponse, uri: str, deadline: float) -> Iterator[bytes]:
        """The body as it arrives, stopped at the deadline of the whole download.

        ``read1`` returns whatever one receive brings, so a server that trickles one byte at a time is
        stopped at the deadline too (a read timeout alone would restart with every byte).
        """
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TransientError(redact(f"{uri}: download exceeded http_timeout_s={self._timeout_s}"))
            _set_read_timeout(response, remaining)
            chunk = response.read1(_CHUNK_BYTES)
            if not chunk:
                return
            yield chunk


def _resolve(target: _Target) -> list[Address]:
    try:
        infos = socket.getaddrinfo(target.hostname, target.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        message = redact(f"{target.url}: cannot resolve {target.hostname}: {exc.strerror}")
        if exc.errno == socket.EAI_AGAIN:
            raise TransientError(message) from exc
        raise NotFoundError(message) from exc
    except UnicodeError as exc:
        raise BadUriError(redact(f"{target.url}: invalid host name")) from exc
    return [ip_address(info[4][0]) for info in infos]


def _check_status(response: urllib3.BaseHTTPResponse, uri: str) -> None:
    status = response.status
    if 200 <= status < 300:
        return
    _discard(response)
    message = redact(f"{uri}: HTTP {status} {response.reason or ''}".strip())
    if status in (404, 410):
        raise NotFoundError(message)
    if status in (401, 403):
        raise ForbiddenError(message)
    if status >= 500 or status in _TRANSIENT_STATUSES:
        raise TransientError(message)
    raise ItemError(message)


def _mapped_transport_error(exc: HTTPError, uri: str) -> Exception:
    message = redact(f"{uri}: {exc.__class__.__name__}: {exc}")
    if isinstance(exc, SSLError):
        return ForbiddenError(message)
    if isinstance(exc, LocationValueError):
        return BadUriError(message)
    if isinstance(exc, DecodeError):
        return ItemError(message)
    return TransientError(message)  # timeouts, refused connections, resets, protocol errors


def _set_read_timeout(response: urllib3.BaseHTTPResponse, seconds: float) -> None:
    """Make the next receive on the response's socket wait at most ``seconds``."""
    connection = getattr(response, "connection", None)
    sock = getattr(connection, "sock", None)
    if sock is not None:
        sock.settimeout(max(seconds, 0.001))


def _discard(response: urllib3.BaseHTTPResponse) -> None:
    """Close without reading the rest (it may be huge) and hand the connection back to its pool."""
    response.close()
    response.release_conn()
