"""``sam3-batch dev-stack``: real redis-server and SeaweedFS processes, driven through the CLI as a user would."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import redis
from botocore.exceptions import ClientError

from sam3_batch.processes import pid_alive
from tests.fixtures.services import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
EXPORTED = {"SAM3_BATCH_BROKER_URL", "SAM3_BATCH_S3_ENDPOINT_URL", "SAM3_BATCH_S3_REGION", "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"}


def _command(folder: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "sam3_batch", "dev-stack", *args, "--dir", str(folder)]


def _dev_stack(folder: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_command(folder, *args), capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
                          env=env)


def _parse_exports(lines: list[str]) -> dict[str, str]:
    parsed = [shlex.split(line) for line in lines if line.strip()]
    assert all(words[0] == "export" and len(words) == 2 for words in parsed), lines
    return dict(words[1].split("=", 1) for words in parsed)


def _s3(env: dict[str, str], secret: str | None = None) -> Any:
    return boto3.session.Session().client(
        "s3", endpoint_url=env["SAM3_BATCH_S3_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=secret or env["AWS_SECRET_ACCESS_KEY"],
    )


def _ping(env: dict[str, str]) -> bool:
    client = redis.Redis.from_url(env["SAM3_BATCH_BROKER_URL"], socket_connect_timeout=1)
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False
    finally:
        client.close()


def _ports(redis_port: int, s3_port: int) -> list[str]:
    return ["--redis-port", str(redis_port), "--s3-port", str(s3_port)]


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[Path]:
    """The dev-stack's folder; a detached stack a failed test left running is stopped afterwards."""
    stack = tmp_path / "stack"
    yield stack
    if (stack / "pids.json").exists():
        _dev_stack(stack, "stop")


def test_detached_dev_stack_serves_the_printed_env_until_stopped(folder: Path) -> None:
    started = _dev_stack(folder, "--detach", *_ports(free_port(), free_port()))
    assert started.returncode == 0, started.stderr
    env = _parse_exports(started.stdout.splitlines())
    assert set(env) == EXPORTED
    pids = json.loads((folder / "pids.json").read_text()).values()

    s3 = _s3(env)
    s3.put_object(Bucket="sam3", Key="hello.txt", Body=b"hello")
    assert s3.get_object(Bucket="sam3", Key="hello.txt")["Body"].read() == b"hello"
    with pytest.raises(ClientError, match="SignatureDoesNotMatch"):
        _s3(env, secret="not-the-secret").get_object(Bucket="sam3", Key="hello.txt")
    assert _ping(env)

    again = _dev_stack(folder, "--detach")
    assert again.returncode == 1 and "already running" in again.stderr and "Traceback" not in again.stderr
    assert _parse_exports(_dev_stack(folder, "env").stdout.splitlines()) == env

    stopped = _dev_stack(folder, "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert not any(pid_alive(pid) for pid in pids)
    assert not _ping(env)
    not_running = _dev_stack(folder, "stop")
    assert not_running.returncode == 1 and not_running.stderr.strip() == f"error: no detached dev-stack in {folder}"


def test_foreground_dev_stack_stops_on_ctrl_c_and_its_data_outlives_a_restart(folder: Path) -> None:
    process = subprocess.Popen(_command(folder, *_ports(free_port(), free_port())), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline() for _ in EXPORTED]
        env = _parse_exports(lines)
        _s3(env).put_object(Bucket="sam3", Key="kept.txt", Body=b"still here")
        process.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert not _ping(env)

    restarted = _dev_stack(folder, "--detach")  # the ports and key pair come from the folder
    assert restarted.returncode == 0, restarted.stderr
    assert _parse_exports(restarted.stdout.splitlines()) == env
    assert _s3(env).get_object(Bucket="sam3", Key="kept.txt")["Body"].read() == b"still here"
    assert _dev_stack(folder, "stop").returncode == 0


def test_dev_stack_without_redis_server_says_so_in_one_line(tmp_path: Path) -> None:
    empty_path = tmp_path / "bin"
    empty_path.mkdir()
    env = {**os.environ, "PATH": str(empty_path)}

    result = _dev_stack(tmp_path / "stack", env=env)

    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: redis-server is not installed (apt-get install redis-server, or brew install redis)"
    ]
    assert not (tmp_path / "stack").exists()  # nothing was started or written
