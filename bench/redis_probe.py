"""Redis as the control-plane bench sees it: a private server, a sampler of memory and queue depth,
and snapshots of Redis's own counters (CPU seconds, commands by name) to diff around a phase."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import redis

from sam3_batch.contracts.jobstate import JOBS_INDEX, RedisJobStore
from sam3_batch.contracts.schemas import JobCounters

_START_TIMEOUT_S = 10.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateRedis:
    """A redis-server of our own (no persistence), so INFO figures count the bench and nothing else."""

    def __init__(self, workdir: Path, binary: str = "redis-server") -> None:
        found = shutil.which(binary)
        if found is None:
            raise RuntimeError(f"{binary} not found: install redis-server or pass --redis-server PATH")
        self.binary, self.workdir, self.port = found, workdir, _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PrivateRedis:
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                   "--appendonly", "no", "--dir", str(self.workdir), "--logfile", str(self.workdir / "redis.log")]
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline and self._process.poll() is None:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                time.sleep(0.05)
        self.__exit__(None, None, None)
        raise RuntimeError(f"redis-server did not answer on port {self.port}; see {self.workdir}/redis.log")

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            self._process.wait(timeout=30)
        self._process = None


def used_memory(client: redis.Redis) -> int:
    """INFO memory ``used_memory``: bytes Redis has allocated for data and buffers."""
    info: dict[str, Any] = client.info("memory")
    return int(info["used_memory"])


@dataclass(frozen=True)
class RedisTotals:
    """Redis's cumulative CPU seconds and command calls by name, at one moment."""

    cpu_seconds: float
    calls: dict[str, int]

    @classmethod
    def read(cls, client: redis.Redis) -> RedisTotals:
        cpu: dict[str, Any] = client.info("cpu")
        stats: dict[str, Any] = client.info("commandstats")
        calls = {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}
        return cls(float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]), calls)

    def since(self, earlier: RedisTotals, *, discount: dict[str, int] | None = None) -> RedisTotals:
        """The difference from ``earlier``; ``discount`` removes calls the bench itself made."""
        discount = discount or {}
        names = set(self.calls) | set(earlier.calls)
        calls = {n: self.calls.get(n, 0) - earlier.calls.get(n, 0) - discount.get(n, 0) for n in names}
        # INFO and CONFIG are the bench's own probes, never the product's.
        kept = {n: c for n, c in calls.items() if c > 0 and n != "info" and not n.startswith("config")}
        return RedisTotals(self.cpu_seconds - earlier.cpu_seconds, kept)

    @property
    def commands(self) -> int:
        return sum(self.calls.values())


@dataclass
class Samples:
    """What the sampler saw: peaks, and when the watched job first read complete."""

    peak_memory: int = 0
    max_depth: int = 0
    count: int = 0
    job_id: str | None = None
    completed_at: float | None = None
    counters: JobCounters | None = None
    own_calls: dict[str, int] = field(default_factory=dict)


class Sampler:
    """A thread that reads ``used_memory``, the queue's LLEN and (optionally) the job's counters."""

    def __init__(self, url: str, queue: str, *, interval_s: float = 0.1, watch_job: bool = False) -> None:
        self._client = redis.Redis.from_url(url)
        self._store = RedisJobStore(url, client=self._client)
        self.queue, self.interval_s, self.watch_job = queue, interval_s, watch_job
        self.samples = Samples()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="redis-sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self._client.close()

    def wait_complete(self, timeout_s: float) -> float:
        """Block until the watched job reads complete; returns the perf_counter time it was first seen."""
        deadline = time.monotonic() + timeout_s
        while self.samples.completed_at is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job not complete after {timeout_s:.0f}s: {self.samples.counters}")
            time.sleep(self.interval_s)
        return self.samples.completed_at

    def _count(self, command: str) -> None:
        self.samples.own_calls[command] = self.samples.own_calls.get(command, 0) + 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample_once()
            self._stop.wait(self.interval_s)
        self.sample_once()

    def sample_once(self) -> None:
        """One reading of memory and depth (and of the job's counters when watching one)."""
        memory, depth = used_memory(self._client), int(self._client.llen(self.queue))
        self._count("info")
        self._count("llen")
        found = self.samples
        found.peak_memory, found.max_depth = max(found.peak_memory, memory), max(found.max_depth, depth)
        found.count += 1
        if self.watch_job:
            self._watch()

    def _watch(self) -> None:
        found = self.samples
        if found.job_id is None:
            ids: list[bytes] = self._client.zrange(JOBS_INDEX, 0, 0)  # type: ignore[assignment]
            self._count("zrange")
            found.job_id = ids[0].decode() if ids else None
        if found.job_id is None or found.completed_at is not None:
            return
        found.counters = self._store.counters(found.job_id)
        self._count("hgetall")
        if found.counters.complete:
            found.completed_at = time.perf_counter()
