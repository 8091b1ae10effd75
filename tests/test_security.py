"""Security end to end: no pickle, no SSRF, no escaping the output root, no leaked credentials, TLS Redis.

One worker process serves the module's jobs. It runs the way production should: Redis with a password,
an AWS secret key, S3 through the fault proxy. The password and the key are sentinels, so finding
either in a log, an error, an output or the report cannot be a coincidence.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import pickle
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sam3_batch.contracts.jobstate import RedisJobStore
from sam3_batch.contracts.queue import TASK_NAME, make_celery
from sam3_batch.contracts.report import report_uri
from sam3_batch.contracts.schemas import ImageMetadata, JobCounters
from sam3_batch.contracts.settings import Settings
from sam3_batch.contracts.storage import Storage
from tests.fixtures.faulty_proxy import FaultyProxy
from tests.fixtures.images import image_bytes
from tests.fixtures.services import AWS_REGION, RedisServer
from tests.fixtures.workers import (
    WorkerProcess,
    run_cli,
    start_worker_process,
    unacked_ages,
    wait_for_job,
    wait_until,
)

pytestmark = pytest.mark.slow

REDIS_PASSWORD = "SENTINEL-redis-pw-9f3b27c1"
AWS_SECRET = "SENTINEL-aws-secret-4e8a0d55b1"
URL_PASSWORD = "SENTINEL-url-pw-77c2e6"
SECRETS = (REDIS_PASSWORD, AWS_SECRET, URL_PASSWORD)
REFUSED_ADDRESS = "a private, loopback, link-local or reserved address"


@dataclass
class Secured:
    """The module's worker and what it works against."""

    settings: Settings
    worker: WorkerProcess
    proxy: FaultyProxy
    s3: Any
    bucket: str
    workdir: Path

    def cli(self, *args: str) -> Any:
        """Run the CLI with the same secrets as the worker; returns its parsed ``--json`` output."""
        done = run_cli([*args, "--json"], self.settings, AWS_SECRET_ACCESS_KEY=AWS_SECRET)
        assert done.returncode == 0, done.stderr
        for secret in SECRETS:
            assert secret not in done.stdout + done.stderr
        return json.loads(done.stdout)

    def run_job(self, *args: str) -> tuple[str, JobCounters]:
        """Submit a job with prompt 'cat' (``args`` name the inputs and ``--out``); wait for its report."""
        job_id = str(self.cli("submit", "-p", "cat", "--threshold", "0", *args)["job_id"])
        counters = wait_for_job(self.store(), job_id, workers=[self.worker])
        report = report_uri(args[args.index("--out") + 1], job_id)
        storage = Storage(self.settings)
        wait_until(lambda: storage.exists(report), 60, f"the report {report}")  # written just after the last count
        return job_id, counters

    def store(self) -> RedisJobStore:
        return RedisJobStore(self.settings.state_redis_url())

    def put(self, key: str, data: bytes) -> str:
        self.s3.put_object(Bucket=self.bucket, Key=key, Body=data)
        return f"s3://{self.bucket}/{key}"

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [entry["Key"] for page in pages for entry in page.get("Contents", [])]

    def read(self, key: str) -> bytes:
        return bytes(self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read())


@pytest.fixture(scope="module")
def secured(
    tmp_path_factory: pytest.TempPathFactory, moto_reference_s3: str, tiny_checkpoint: Path
) -> Iterator[Secured]:
    """A password-protected Redis, an S3 proxy, a bucket and one worker holding the sentinel secrets.

    S3 is moto here, not SeaweedFS: the escape test needs keys with '..', '.', '//' and '\\' segments stored
    as AWS stores them (SeaweedFS refuses or rewrites them), and the module's one worker serves every test.
    """
    workdir = tmp_path_factory.mktemp("security")
    server = RedisServer(workdir / "redis")
    server.start()
    with redis.Redis.from_url(server.url) as client:
        client.config_set("requirepass", REDIS_PASSWORD)
    proxy = FaultyProxy(moto_reference_s3)
    proxy.start()
    s3 = boto3.session.Session().client("s3", endpoint_url=moto_reference_s3, region_name=AWS_REGION)
    bucket = f"sec-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    settings = Settings(
        broker_url=server.url.replace("redis://", f"redis://:{REDIS_PASSWORD}@"), s3_endpoint_url=proxy.endpoint_url,
        s3_region=AWS_REGION, model=str(tiny_checkpoint), device="cpu", chunk_size=4, batch_size=2,
        s3_max_attempts=2,
    )
    worker = start_worker_process(settings, workdir / "worker.log", "secure", AWS_SECRET_ACCESS_KEY=AWS_SECRET)
    yield Secured(settings, worker, proxy, s3, bucket, workdir)
    worker.kill_with_children()
    proxy.stop()
    server.stop()


class _CreatesFileWhenUnpickled:
    """A payload that runs code on unpickling: ``open(path, "w")`` creates the marker file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return open, (str(self.path), "w")


def test_a_pickled_message_is_refused_without_running_it_and_the_worker_keeps_working(secured: Secured) -> None:
    armed = secured.workdir / "armed-check"
    pickle.loads(pickle.dumps(_CreatesFileWhenUnpickled(armed)))
    assert armed.exists()  # the payload does run code when anything unpickles it
    marker = secured.workdir / "pickle-ran"
    broker = redis.Redis.from_url(secured.settings.broker_url.get_secret_value())
    app = make_celery(secured.settings, name="attacker")

    app.send_task(TASK_NAME, args=[_CreatesFileWhenUnpickled(marker)], queue=secured.settings.queue,
                  serializer="pickle")
    secured.worker.wait_for_log("Refusing to deserialize untrusted content of type pickle")
    wait_until(lambda: broker.llen(secured.settings.queue) == 0 and not unacked_ages(broker), 60,
               "the pickled message to be taken off the queue")
    secured.put("pickle/in/a.jpg", image_bytes("jpeg"))
    _, counters = secured.run_job(f"s3://{secured.bucket}/pickle/in/", "--out", f"s3://{secured.bucket}/pickle/out")

    assert not marker.exists()
    assert counters.done == 1 and secured.worker.alive()


class _ImageServer(BaseHTTPRequestHandler):
    """Serves a real JPEG for any path and counts requests (none may arrive)."""

    requests = 0

    def do_GET(self) -> None:
        type(self).requests += 1
        body = image_bytes("jpeg")
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""


@pytest.fixture
def local_web() -> Iterator[int]:
    """A web server on 127.0.0.1 that would serve an image to anyone who asked; yields its port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ImageServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


def test_http_inputs_on_loopback_private_and_link_local_addresses_fail_with_a_readable_reason(
    secured: Secured, local_web: int,
) -> None:
    refused = [
        f"http://127.0.0.1:{local_web}/cat.jpg",
        f"http://localhost:{local_web}/cat.jpg",
        f"http://2130706433:{local_web}/cat.jpg",  # 127.0.0.1 spelled as one number
        f"http://[::ffff:127.0.0.1]:{local_web}/cat.jpg",
        f"http://0.0.0.0:{local_web}/cat.jpg",
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",  # the cloud metadata service
        "http://10.1.2.3/cat.jpg",
    ]
    good = secured.put("ssrf/in/ok.jpg", image_bytes("jpeg"))
    lines = [json.dumps({"uri": uri}) for uri in [*refused, good]]
    manifest = secured.put("ssrf/manifest.jsonl", "\n".join(lines).encode())

    job_id, counters = secured.run_job("--manifest", manifest, "--out", f"s3://{secured.bucket}/ssrf/out")

    assert (counters.total, counters.done, counters.failed) == (len(refused) + 1, 1, len(refused))
    reasons = {f.uri: f.reason for f in secured.store().failures(job_id)}
    assert sorted(reasons) == sorted(refused)
    for uri, reason in reasons.items():
        assert reason.startswith("ForbiddenError: ") and REFUSED_ADDRESS in reason, uri
        assert "http_allow_private" in reason  # says how to allow it on purpose
    assert _ImageServer.requests == 0  # nothing was fetched from the private network


def _odd_names() -> list[str]:
    return [
        "cafe\u0301.jpg",  # NFD: normalised to NFC
        "a\u202egpj.exe.png",  # right-to-left override
        "tab\there.jpg",
        " leading space.jpg",
        "back\\slash.jpg",
        "_jobs/fake-report.jpg",  # would land in the job folder
        "nested/deeper/ok.webp",
    ]


def _files_outside(root: Path, inside: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and inside not in p.parents}


def _assert_inside(out_dir: Path, written: list[Path]) -> None:
    for path in written:
        assert ".." not in path.relative_to(out_dir).parts, path
        assert out_dir.resolve() in path.resolve().parents, path


def test_output_keys_never_escape_a_local_output_root(secured: Secured) -> None:
    base = secured.workdir / "keys-local"
    in_dir, out_dir, victim = base / "in", base / "out", base / "victim"
    for name in _odd_names():
        (in_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (in_dir / name).write_bytes(image_bytes("png" if name.endswith(".png") else "jpeg"))
    victim.mkdir()
    traversals = [f"{in_dir}/../victim/../in/{_odd_names()[0]}", f"file://{in_dir}/nested/../{_odd_names()[3]}",
                  f"{in_dir}/./nested/deeper/ok.webp"]
    manifest = base / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps({"uri": uri}) for uri in traversals))
    before = _files_outside(base, out_dir)

    _, listed = secured.run_job(str(in_dir), "--out", str(out_dir))
    _, from_manifest = secured.run_job("--manifest", str(manifest), "--out", str(out_dir))

    assert (listed.done, from_manifest.done) == (len(_odd_names()), len(traversals))
    assert _files_outside(base, out_dir) == {**before}  # nothing written outside the output root
    written = [p for p in out_dir.rglob("*") if p.is_file()]
    _assert_inside(out_dir, written)
    metadata = [ImageMetadata.model_validate_json(p.read_bytes()) for p in written
                if p.name.endswith(".json") and "_jobs" not in p.relative_to(out_dir).parts[:1]]
    assert len({m.image.uri for m in metadata}) == len(metadata) == len(_odd_names()) + len(traversals)
    assert not (out_dir / "_jobs" / "fake-report.jpg.json").exists()


def test_output_keys_never_escape_an_s3_output_root(secured: Secured) -> None:
    hostile = ["../escape.jpg", "../../other-root/x.jpg", "./dot.jpg", "/lead.jpg", "a//double.jpg", "..",
               *_odd_names()]
    for name in hostile:
        secured.put(f"keys/in/{name}", image_bytes("jpeg"))
    before = set(secured.keys())

    job_id, counters = secured.run_job(f"s3://{secured.bucket}/keys/in/", "--out", f"s3://{secured.bucket}/keys/out")

    images = [n for n in hostile if n.rsplit(".", 1)[-1] in ("jpg", "png", "webp")]
    assert (counters.total, counters.done) == (len(images), len(images))
    new = set(secured.keys()) - before
    assert new and all(k.startswith("keys/out/") for k in new), sorted(new)
    assert all(".." not in k.split("/") and "//" not in k for k in new), sorted(new)
    metadata_keys = [k for k in new if k.endswith(".json") and not k.startswith("keys/out/_jobs/")]
    assert len(metadata_keys) == len(images)  # distinct inputs never share an output
    assert f"keys/out/_jobs/{job_id}/report.json" in new


def test_credentials_never_appear_in_logs_errors_outputs_job_state_or_the_report(secured: Secured) -> None:
    secured.put("creds/in/ok.jpg", image_bytes("jpeg"))
    denied = secured.put("creds/in/denied.jpg", image_bytes("jpeg"))
    # A server that echoes the secret back in its error message.
    secured.proxy.add_fault("GET", "/creds/in/denied.jpg", "403", message=f"bad signature for {AWS_SECRET}")
    lines = [json.dumps({"uri": u}) for u in (f"s3://{secured.bucket}/creds/in/ok.jpg", denied,
                                              f"http://user:{URL_PASSWORD}@example.com/cat.jpg")]
    manifest = secured.put("creds/manifest.jsonl", "\n".join(lines).encode())

    job_id, counters = secured.run_job("--manifest", manifest, "--out", f"s3://{secured.bucket}/creds/out")
    failures = secured.cli("failures", job_id)
    status = secured.cli("status", job_id)

    assert (counters.done, counters.failed) == (1, 2)
    reasons = {f["uri"]: f["reason"] for f in failures}
    assert "bad signature for ***" in reasons[denied]
    assert "credentials in URLs are not supported" in reasons["http://user:***@example.com/cat.jpg"]
    assert status["state"] == "complete"
    texts = {"worker log": secured.worker.log(), "failures": json.dumps(failures), "status": json.dumps(status)}
    texts |= {key: secured.read(key).decode("utf-8", "replace") for key in secured.keys("creds/out/")}
    texts |= {"redis": _dump_redis(secured.settings)}
    assert report_uri("creds/out", job_id) in texts
    for where, text in texts.items():
        for secret in SECRETS:
            assert secret not in text, f"{secret} found in {where}"


def _dump_redis(settings: Settings) -> str:
    """Every key and value in the Redis, as text."""
    client = redis.Redis.from_url(settings.broker_url.get_secret_value())
    parts: list[str] = []
    for key in client.scan_iter():
        kind = client.type(key).decode()
        value: Any = {"string": client.get, "hash": client.hgetall, "list": lambda k: client.lrange(k, 0, -1),
                      "set": client.smembers, "zset": lambda k: client.zrange(k, 0, -1)}.get(kind, lambda k: b"")(key)
        parts.append(f"{key!r} {value!r}")
    return "\n".join(parts)


def _self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (its own CA) and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sam3-batch test redis")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "redis.crt", directory / "redis.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class TlsRedisServer(RedisServer):
    """A redis-server that speaks TLS only (no plain port) and wants a password."""

    def __init__(self, workdir: Path, cert: Path, key: Path) -> None:
        super().__init__(workdir)
        self.cert, self.key = cert, key
        self.url = f"rediss://:{REDIS_PASSWORD}@127.0.0.1:{self.port}/0"

    def _command(self, binary: str) -> list[str]:
        command = super()._command(binary)
        command[command.index("--port") + 1] = "0"
        return [*command, "--tls-port", str(self.port), "--tls-cert-file", str(self.cert),
                "--tls-key-file", str(self.key), "--tls-auth-clients", "no", "--requirepass", REDIS_PASSWORD]

    def client_options(self) -> dict[str, Any]:
        return {"ssl_ca_certs": str(self.cert), "socket_connect_timeout": 0.5}


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[TlsRedisServer]:
    """A TLS-only redis-server with a self-signed certificate (fails if this redis-server has no TLS)."""
    cert, key = _self_signed_cert(tmp_path)
    server = TlsRedisServer(tmp_path / "tls-redis", cert, key)
    try:
        server.start()
    except RuntimeError as exc:
        pytest.fail(f"redis-server --tls-port did not start (built without TLS?): {exc}", pytrace=False)
    yield server
    server.stop()


def test_a_job_runs_end_to_end_over_tls_redis_with_a_password_and_verified_certificates(
    tls_redis: TlsRedisServer, settings_factory: Callable[..., Settings], tiny_checkpoint: Path,
    s3_client: Any, s3_bucket: str, worker_factory: Any,
) -> None:
    settings = settings_factory(broker_url=tls_redis.url, model=str(tiny_checkpoint), device="cpu")
    trust = {"SSL_CERT_FILE": str(tls_redis.cert)}  # how a private CA is trusted: OpenSSL's own variable
    for name in ("a.jpg", "b.png"):
        s3_client.put_object(Bucket=s3_bucket, Key=f"in/{name}", Body=image_bytes("jpeg"))
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        redis.Redis.from_url(tls_redis.url).ping()  # certificates are checked: an unknown CA is refused
    worker = worker_factory(settings, **trust)

    submitted = run_cli(["submit", f"s3://{s3_bucket}/in/", "--out", f"s3://{s3_bucket}/out", "-p", "cat",
                         "--json"], settings, **trust)
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["job_id"]
    store = RedisJobStore(f"{tls_redis.url}?ssl_ca_certs={tls_redis.cert}")
    counters = wait_for_job(store, job_id, workers=[worker])

    assert (counters.total, counters.done, counters.failed) == (2, 2, 0)
    status = run_cli(["status", job_id, "--json"], settings, **trust)
    assert status.returncode == 0 and json.loads(status.stdout)["state"] == "complete", status.stderr
    assert "Connected to rediss://" in worker.log()
    assert REDIS_PASSWORD not in worker.log() + submitted.stdout + submitted.stderr
