"""Read-only http(s) storage: SSRF refusals, redirects, limits and error mapping, against local servers."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sam3_batch.contracts.errors import BadUriError, ForbiddenError, ItemError, NotFoundError, TransientError
from sam3_batch.contracts.settings import Settings
from sam3_batch.contracts.storage import Storage
from sam3_batch.contracts.storage.http import Address, HttpBackend, is_public_address

FILES = {"cat.jpg": b"\xff\xd8 not really a jpeg", "my image €.png": b"png bytes", "big.bin": b"x" * 5000}
LOOPBACK = ipaddress.ip_address("127.0.0.1")


class _Handler(BaseHTTPRequestHandler):
    """Routes: /files/<name>, /stream/<n> (no Content-Length), /redirect?to=<url>,
    /chain/<n> (n redirects, then cat.jpg), /status/<code>, /host (echoes the Host header)."""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.paths_seen.append(self.path)  # type: ignore[attr-defined]
        url = urlsplit(self.path)
        head, _, rest = unquote(url.path).lstrip("/").partition("/")
        if head == "files" and rest in FILES:
            self._send(200, FILES[rest])
        elif head == "stream":
            self._send(200, b"y" * int(rest), with_length=False)
        elif head == "redirect":
            self._redirect(parse_qs(url.query)["to"][0])
        elif head == "chain":
            self._redirect(f"/chain/{int(rest) - 1}" if int(rest) > 1 else "/files/cat.jpg")
        elif head == "status":
            self._send(int(rest), b"status body")
        elif head == "host":
            self._send(200, str(self.headers["Host"]).encode())
        elif head == "drip":
            self._drip(int(rest))
        else:
            self._send(404, b"no such route")

    def _send(self, status: int, body: bytes, *, with_length: bool = True) -> None:
        self.send_response(status)
        if with_length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _drip(self, size: int) -> None:
        """A slowloris body: one byte every 0.1 s (each read gets a byte well within any read timeout)."""
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        try:
            for _ in range(size):
                self.wfile.write(b"d")
                self.wfile.flush()
                time.sleep(0.1)
        except OSError:
            pass  # the client gave up: that is the point

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()


def _serve(server: ThreadingHTTPServer) -> Iterator[ThreadingHTTPServer]:
    server.daemon_threads = True
    server.paths_seen = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def web() -> Iterator[ThreadingHTTPServer]:
    """A plain-http test server on 127.0.0.1."""
    yield from _serve(ThreadingHTTPServer(("127.0.0.1", 0), _Handler))


def _origin(server: ThreadingHTTPServer, host: str = "127.0.0.1", scheme: str = "http") -> str:
    return f"{scheme}://{host}:{server.server_address[1]}"


def _storage(**overrides: object) -> Storage:
    return Storage(Settings(**overrides))  # type: ignore[arg-type]


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _loopback_only_plus_public(ip: Address) -> bool:
    """The default policy, plus the one test server address."""
    return ip == LOOPBACK or is_public_address(ip)


# --- address policy ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1", "127.1.2.3", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254",
        "100.64.0.1", "0.0.0.0", "224.0.0.1", "240.0.0.1", "255.255.255.255", "192.0.2.1",
        "::1", "::", "fe80::1", "fc00::1", "fd12:3456::1", "ff02::1", "::ffff:127.0.0.1",
        "::ffff:169.254.169.254", "2002:7f00:1::1", "2002:a9fe:a9fe::1", "64:ff9b::a9fe:a9fe",
        "2001:db8::1",
    ],
)  # fmt: skip
def test_private_loopback_link_local_multicast_and_reserved_addresses_are_not_public(address: str) -> None:
    assert not is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "151.101.1.69", "2606:4700:4700::1111"])
def test_globally_routable_addresses_are_public(address: str) -> None:
    assert is_public_address(ipaddress.ip_address(address))


# --- refusals before any connection -----------------------------------------------------------


def test_a_loopback_url_is_refused_by_default_with_a_clear_error(web: ThreadingHTTPServer) -> None:
    with pytest.raises(ForbiddenError, match=r"resolves to 127\.0\.0\.1.*http_allow_private"):
        _storage().read_bytes(f"{_origin(web)}/files/cat.jpg")

    assert web.paths_seen == []  # type: ignore[attr-defined]


@pytest.mark.parametrize("host", ["localhost", "2130706433", "0x7f.1", "127.1", "[::1]", "[::ffff:127.0.0.1]"])
def test_other_spellings_of_loopback_are_refused_too(web: ThreadingHTTPServer, host: str) -> None:
    with pytest.raises(ForbiddenError):
        _storage().read_bytes(f"{_origin(web, host)}/files/cat.jpg")

    assert web.paths_seen == []  # type: ignore[attr-defined]


def test_the_cloud_metadata_address_is_refused() -> None:
    with pytest.raises(ForbiddenError, match=r"169\.254\.169\.254"):
        _storage().read_bytes("http://169.254.169.254/latest/meta-data/iam/security-credentials/")


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("ftp://example.com/a.jpg", "unsupported URI scheme 'ftp'"),
        ("http://user:pw@example.com/a.jpg", "credentials in http URLs"),
        ("http://example.com:99999/a.jpg", "malformed URL"),
        ("http:///a.jpg", "without a host"),
    ],
)
def test_malformed_or_unsupported_urls_are_bad_uris(uri: str, message: str) -> None:
    with pytest.raises(BadUriError, match=message) as caught:
        _storage().read_bytes(uri)

    assert "pw@" not in str(caught.value)


def test_http_is_read_only_and_not_listable() -> None:
    storage = _storage()

    with pytest.raises(BadUriError, match="read-only"):
        storage.write_bytes("https://example.com/out.json", b"{}")
    with pytest.raises(BadUriError, match="cannot be listed"):
        storage.list_objects("https://example.com/images/")


# --- fetching with private addresses allowed ----------------------------------------------------


def test_a_private_server_is_read_when_http_allow_private_is_set(web: ThreadingHTTPServer) -> None:
    storage = _storage(http_allow_private=True)

    assert storage.read_bytes(f"{_origin(web)}/files/cat.jpg") == FILES["cat.jpg"]
    assert storage.read_bytes(f"{_origin(web)}/files/my image €.png") == FILES["my image €.png"]


def test_the_host_header_is_the_url_host_not_the_connected_ip(web: ThreadingHTTPServer) -> None:
    storage = _storage(http_allow_private=True)

    assert storage.read_bytes(f"{_origin(web, 'localhost')}/host") == f"localhost:{web.server_address[1]}".encode()


def test_the_host_is_resolved_once_per_hop_and_the_connection_uses_the_checked_ip(
    web: ThreadingHTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    lookups: list[str] = []
    real_getaddrinfo = socket.getaddrinfo

    def counting_getaddrinfo(host: str, *args: object, **kwargs: object) -> object:
        lookups.append(host)
        return real_getaddrinfo(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", counting_getaddrinfo)
    origin = _origin(web, "localhost")

    _storage(http_allow_private=True).read_bytes(f"{origin}/redirect?to={origin}/files/cat.jpg")

    # A second lookup of the name would be a DNS-rebinding window; the connection resolves only the IP.
    assert lookups.count("localhost") == 2  # once for each of the two hops
    assert all(_is_ip_literal(host) for host in lookups if host != "localhost")


def test_when_one_resolved_address_refuses_the_next_is_tried(
    web: ThreadingHTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = web.server_address[1]
    answers = [
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.2", port)),  # nothing listens there
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
    ]
    real_getaddrinfo = socket.getaddrinfo

    def two_answers(host: str, *args: object, **kwargs: object) -> object:
        if host == "images.test":
            return answers
        return real_getaddrinfo(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", two_answers)

    data = _storage(http_allow_private=True).read_bytes(f"http://images.test:{port}/host")

    assert data == f"images.test:{port}".encode()


def test_exists_is_false_for_404_and_true_for_200(web: ThreadingHTTPServer) -> None:
    storage = _storage(http_allow_private=True)

    assert storage.exists(f"{_origin(web)}/files/cat.jpg")
    assert not storage.exists(f"{_origin(web)}/files/missing.jpg")


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (404, NotFoundError), (410, NotFoundError), (401, ForbiddenError), (403, ForbiddenError),
        (500, TransientError), (503, TransientError), (429, TransientError), (400, ItemError),
    ],
)  # fmt: skip
def test_http_statuses_map_to_error_types(web: ThreadingHTTPServer, status: int, error: type[Exception]) -> None:
    with pytest.raises(error, match=f"HTTP {status}"):
        _storage(http_allow_private=True).read_bytes(f"{_origin(web)}/status/{status}")


def test_a_body_larger_than_http_max_bytes_is_refused(web: ThreadingHTTPServer) -> None:
    storage = _storage(http_allow_private=True, http_max_bytes=4096)

    with pytest.raises(ItemError, match="http_max_bytes=4096"):
        storage.read_bytes(f"{_origin(web)}/files/big.bin")
    with pytest.raises(ItemError, match="http_max_bytes=4096"):
        storage.read_bytes(f"{_origin(web)}/stream/100000")  # no Content-Length: stopped while streaming
    assert storage.read_bytes(f"{_origin(web)}/stream/4096") == b"y" * 4096


def test_a_server_that_never_answers_times_out_as_transient() -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the kernel completes the handshake; nobody ever reads or answers
    try:
        storage = _storage(http_allow_private=True, http_timeout_s=0.3)
        with pytest.raises(TransientError, match="timed out"):
            storage.read_bytes(f"http://127.0.0.1:{silent.getsockname()[1]}/a.jpg")
    finally:
        silent.close()


def test_a_server_trickling_one_byte_at_a_time_is_stopped_at_the_whole_download_deadline(
    web: ThreadingHTTPServer,
) -> None:
    storage = _storage(http_allow_private=True, http_timeout_s=0.6)
    started = time.monotonic()

    with pytest.raises(TransientError, match=r"download exceeded http_timeout_s=0\.6"):
        storage.read_bytes(f"{_origin(web)}/drip/300")  # 30 s of body at one byte per 0.1 s
    assert time.monotonic() - started < 3.0
    assert storage.read_bytes(f"{_origin(web)}/drip/3") == b"ddd"  # a short trickle within the deadline is fine


def test_a_refused_connection_is_transient() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    with pytest.raises(TransientError):
        _storage(http_allow_private=True).read_bytes(f"http://127.0.0.1:{port}/a.jpg")


# --- redirects ----------------------------------------------------------------------------------


def test_redirects_are_followed_up_to_five(web: ThreadingHTTPServer) -> None:
    storage = _storage(http_allow_private=True)

    assert storage.read_bytes(f"{_origin(web)}/chain/5") == FILES["cat.jpg"]
    with pytest.raises(ItemError, match="more than 5 redirects"):
        storage.read_bytes(f"{_origin(web)}/chain/6")


def test_a_redirect_to_a_private_address_is_refused(web: ThreadingHTTPServer) -> None:
    backend = HttpBackend(Settings(), address_allowed=_loopback_only_plus_public)
    start = f"{_origin(web)}/redirect?to="

    assert backend.read_bytes(f"{start}{_origin(web)}/files/cat.jpg") == FILES["cat.jpg"]
    with pytest.raises(ForbiddenError, match=r"127\.0\.0\.2"):
        backend.read_bytes(f"{start}{_origin(web, '127.0.0.2')}/files/cat.jpg")
    with pytest.raises(ForbiddenError, match=r"169\.254\.169\.254"):
        backend.read_bytes(f"{start}http://169.254.169.254/latest/meta-data/")


def test_a_redirect_to_another_scheme_is_refused(web: ThreadingHTTPServer) -> None:
    with pytest.raises(BadUriError, match="only http and https"):
        _storage(http_allow_private=True).read_bytes(f"{_origin(web)}/redirect?to=file:///etc/passwd")


# --- https: connect to the checked IP, verify the certificate for the URL's host ---------------


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


@pytest.fixture
def tls_web(tmp_path: Path) -> Iterator[tuple[ThreadingHTTPServer, Path]]:
    """An https test server on 127.0.0.1 with a self-signed certificate for 'localhost'."""
    cert_path, key_path = _self_signed(tmp_path)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    for running in _serve(server):
        yield running, cert_path


def test_https_verifies_the_certificate_against_the_url_host(
    tls_web: tuple[ThreadingHTTPServer, Path],
) -> None:
    server, cert_path = tls_web
    backend = HttpBackend(Settings(http_allow_private=True), ca_certs=str(cert_path))
    port = server.server_address[1]

    assert backend.read_bytes(f"https://localhost:{port}/files/cat.jpg") == FILES["cat.jpg"]
    assert backend.read_bytes(f"https://localhost:{port}/host") == f"localhost:{port}".encode()
    with pytest.raises(ForbiddenError, match="SSL"):
        backend.read_bytes(f"https://127.0.0.1:{port}/files/cat.jpg")  # the cert names localhost only


def test_https_with_an_untrusted_certificate_is_refused(tls_web: tuple[ThreadingHTTPServer, Path]) -> None:
    server, _ = tls_web

    with pytest.raises(ForbiddenError, match="CERTIFICATE_VERIFY_FAILED"):
        _storage(http_allow_private=True).read_bytes(f"https://localhost:{server.server_address[1]}/host")
