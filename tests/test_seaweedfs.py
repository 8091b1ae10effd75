"""The suite's S3 server (``sam3_batch.seaweedfs``): ready means writable, authentication is real, a server
that cannot start says so."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from sam3_batch.seaweedfs import LocalServiceError, SeaweedFS, WeedPorts
from tests.fixtures.services import AWS_ACCESS_KEY_ID, AWS_REGION, AWS_SECRET_ACCESS_KEY


def _client(endpoint_url: str, secret: str = AWS_SECRET_ACCESS_KEY) -> Any:
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint_url, region_name=AWS_REGION, aws_access_key_id=AWS_ACCESS_KEY_ID,
        aws_secret_access_key=secret, config=Config(retries={"max_attempts": 1, "mode": "standard"}),
    )


def test_a_started_server_takes_its_first_write_without_a_retry(tmp_path: Path) -> None:
    server = SeaweedFS(tmp_path / "weed", AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)
    server.start()
    try:
        # The S3 gateway answers before the volume server registers; start() waits for both.
        s3 = _client(server.endpoint_url)
        s3.create_bucket(Bucket="first")
        s3.put_object(Bucket="first", Key="a.json", Body=b"{}")
        assert s3.get_object(Bucket="first", Key="a.json")["Body"].read() == b"{}"
    finally:
        server.stop(grace_s=5)
    assert server.process is None


def test_requests_signed_with_a_wrong_secret_are_refused(s3_server: str, s3_bucket: str) -> None:
    with pytest.raises(ClientError, match="SignatureDoesNotMatch"):
        _client(s3_server, secret="not-the-test-secret").list_objects_v2(Bucket=s3_bucket)

    assert _client(s3_server).list_objects_v2(Bucket=s3_bucket)["KeyCount"] == 0


def test_a_server_that_cannot_bind_its_port_fails_naming_its_log(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = WeedPorts.pick(s3=int(taken.getsockname()[1]))
        server = SeaweedFS(tmp_path / "weed", AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ports=ports)

        with pytest.raises(LocalServiceError, match="did not come up") as raised:
            server.start(timeout_s=30)

    assert str(server.log_path) in str(raised.value)
    assert server.process is None
