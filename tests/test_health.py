"""Honest probes: /healthz fails for a worker stuck in one chunk, /readyz stays failing while the model loads."""

from __future__ import annotations

import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sam3_batch.contracts.settings import Settings
from sam3_batch.worker.health import Health
from tests.fixtures.services import free_port
from tests.fixtures.workers import run_cli, wait_until


def probe(port: int, path: str) -> tuple[int, str] | None:
    """(status, body) of a probe, or None while nothing listens yet."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return None


@dataclass
class SilentServer:
    port: int
    held: list[socket.socket]


@pytest.fixture
def silent_server() -> Iterator[SilentServer]:
    """A TCP server that accepts connections and never answers: a stalled upstream (image host, model hub)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield SilentServer(listener.getsockname()[1], held)
    stop.set()
    thread.join()
    for connection in held:
        connection.close()
    listener.close()


@pytest.mark.slow
def test_a_worker_stuck_in_one_chunk_fails_healthz_but_stays_ready(
    settings_factory: Callable[..., Settings], tiny_checkpoint: Path, worker_factory: Any, silent_server: SilentServer,
) -> None:
    port = free_port()
    settings = settings_factory(model=str(tiny_checkpoint), device="cpu", metrics_port=port, http_allow_private=True,
                                http_timeout_s=600, health_chunk_limit_s=3, io_mode="threads", io_workers=1)
    worker = worker_factory(settings, pool="threads")
    wait_until(lambda: probe(port, "/readyz") == (200, "model loaded and warm\n"), 180, "the worker to be ready",
               details=lambda: worker.log()[-3000:])
    assert probe(port, "/healthz") == (200, "alive\n")
    assert "sam3_images_total" in (probe(port, "/metrics") or (0, ""))[1]  # /metrics still on the same port

    submitted = run_cli(["submit", f"http://127.0.0.1:{silent_server.port}/stalled.jpg", "--out", "unused-out",
                         "-p", "cat"], settings)
    assert submitted.returncode == 0, submitted.stderr

    _, body = wait_until(lambda: (p := probe(port, "/healthz")) and p[0] == 503 and p, 60,
                              "/healthz to fail", details=lambda: worker.log()[-3000:])
    assert silent_server.held  # the chunk waits on the stalled image host
    assert "one chunk has run for" in body and "limit 3s" in body
    assert probe(port, "/readyz") == (200, "model loaded and warm\n") and worker.alive()


@pytest.mark.slow
def test_a_worker_whose_model_load_hangs_is_alive_but_never_ready(
    settings_factory: Callable[..., Settings], worker_factory: Any, silent_server: SilentServer, tmp_path: Path,
) -> None:
    port = free_port()
    settings = settings_factory(model="example-org/stalled-model", device="cpu", metrics_port=port)
    worker = worker_factory(settings, HF_ENDPOINT=f"http://127.0.0.1:{silent_server.port}", HF_HUB_OFFLINE="0",
                            HF_HUB_ETAG_TIMEOUT="600", HF_HUB_DOWNLOAD_TIMEOUT="600",
                            HF_HOME=str(tmp_path / "hf-home"))

    wait_until(lambda: silent_server.held, 120, "the worker to ask the (stalled) hub for the model",
               details=lambda: worker.log()[-3000:])
    for _ in range(3):  # it keeps loading: never ready, yet alive (a startup probe budgets the load)
        assert probe(port, "/readyz") == (503, "model not loaded yet\n"), worker.log()[-3000:]
        assert probe(port, "/healthz") == (200, "alive\n")
    assert worker.alive() and "worker ready" not in worker.log()


def test_liveness_rules_between_and_inside_chunks() -> None:
    now = [100.0]
    health = Health(stale_s=10, chunk_limit_s=30, clock=lambda: now[0])
    assert health.liveness() == (True, "alive")  # the loop has not started: the model may be loading
    health.beat()
    now[0] += 11
    assert health.liveness() == (False, "consumer loop silent for 11s (limit 10s)")
    with health.chunk("a"):
        assert health.liveness() == (True, "in a chunk for 0s")  # a solo pool's loop waits on the chunk
        now[0] += 31
        assert health.liveness() == (False, "one chunk has run for 31s (limit 30s)")
    assert health.liveness() == (True, "alive")  # the chunk's end counts as a beat
