"""Diagnosable workers: honest /healthz and /readyz probes, and transient errors that say what and why."""

from __future__ import annotations

import multiprocessing
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sam3_batch.contracts.jobstate import RedisJobStore
from sam3_batch.contracts.settings import Settings
from sam3_batch.worker.health import ForkedReadiness, Health
from sam3_batch.worker.tasks import retry_countdown
from tests.fixtures.faulty_proxy import FaultyProxy
from tests.fixtures.metrics import sample_value, scrape
from tests.fixtures.services import free_port
from tests.fixtures.workers import run_cli, wait_for_job, wait_until


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


def _ready_child(forked: ForkedReadiness) -> None:
    forked.mark_ready(os.getpid())
    time.sleep(120)  # a pool child holding its model; the test kills it


def test_a_prefork_parent_is_ready_only_while_every_child_has_loaded_its_model() -> None:
    health = Health(stale_s=10, chunk_limit_s=30)
    forked = health.expect_children(2)  # before the fork, as the worker command does
    assert health.readiness() == (False, "model loaded and warm in 0 of 2 pool processes")
    context = multiprocessing.get_context("fork")
    children = [context.Process(target=_ready_child, args=(forked,), daemon=True) for _ in range(2)]
    try:
        children[0].start()
        wait_until(lambda: forked.ready_children() == 1, 30, "the first child to report ready")
        assert health.readiness() == (False, "model loaded and warm in 1 of 2 pool processes")
        children[1].start()
        wait_until(lambda: health.readiness()[0], 30, "both children to report ready")
        assert health.readiness() == (True, "model loaded and warm in 2 of 2 pool processes")
        children[0].kill()
        children[0].join(10)
        # A replacement child would still be loading: the parent is not ready until it is warm too.
        assert health.readiness() == (False, "model loaded and warm in 1 of 2 pool processes")
    finally:
        for child in children:
            if child.is_alive():
                child.kill()
            child.join(10)


@pytest.mark.slow
def test_a_prefork_worker_is_ready_when_its_child_has_loaded_the_model_and_not_while_the_load_hangs(
    settings_factory: Callable[..., Settings], tiny_checkpoint: Path, worker_factory: Any,
    silent_server: SilentServer, tmp_path: Path,
) -> None:
    hung_port, port = free_port(), free_port()
    hung = worker_factory(settings_factory(model="example-org/stalled-model", device="cpu", metrics_port=hung_port),
                          name="hung", pool="prefork", HF_ENDPOINT=f"http://127.0.0.1:{silent_server.port}",
                          HF_HUB_OFFLINE="0", HF_HUB_ETAG_TIMEOUT="600", HF_HUB_DOWNLOAD_TIMEOUT="600",
                          HF_HOME=str(tmp_path / "hf-home"))
    worker_factory(settings_factory(model=str(tiny_checkpoint), device="cpu", metrics_port=port), pool="prefork")

    wait_until(lambda: probe(port, "/readyz") == (200, "model loaded and warm in 1 of 1 pool processes\n"), 180,
               "the prefork worker's child to load its model")
    wait_until(lambda: silent_server.held, 120, "the hung worker's child to ask the (stalled) hub for the model",
               details=lambda: hung.log()[-3000:])
    for _ in range(3):  # the parent answers the probes, and its only child is still loading
        assert probe(hung_port, "/readyz") == (503, "model loaded and warm in 0 of 1 pool processes\n")
        assert probe(hung_port, "/healthz") == (200, "alive\n")


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


@pytest.mark.slow
def test_transient_errors_are_logged_with_uri_operation_and_cause_counted_and_retried_with_jitter(
    settings_factory: Callable[..., Settings], tiny_checkpoint: Path, faulty_s3: FaultyProxy, s3_client: Any,
    s3_bucket: str, image_bytes_factory: Callable[[str], bytes], worker_factory: Any,
) -> None:
    port = free_port()
    settings = settings_factory(model=str(tiny_checkpoint), device="cpu", chunk_size=2, batch_size=2,
                                metrics_port=port, s3_endpoint_url=faulty_s3.endpoint_url, s3_max_attempts=1)
    for name in ("a.jpg", "b.jpg"):
        s3_client.put_object(Bucket=s3_bucket, Key=f"in/{name}", Body=image_bytes_factory("jpeg"))
    faulty_s3.add_fault("GET", f"/{s3_bucket}/in/a.jpg", "slowdown", times=2)
    worker = worker_factory(settings)

    submitted = run_cli(["submit", f"s3://{s3_bucket}/in/", "--out", f"s3://{s3_bucket}/out", "-p", "cat"],
                        settings)
    assert submitted.returncode == 0, submitted.stderr
    counters = wait_for_job(RedisJobStore(settings.state_redis_url()), submitted.stdout.splitlines()[0],
                            workers=[worker])

    assert (counters.done, counters.failed) == (2, 0)
    line = f"transient error in load of s3://{s3_bucket}/in/a.jpg: "
    worker.wait_for_log(line, count=2, timeout=10)
    assert "SlowDown" in worker.log().split(line, 1)[1].splitlines()[0]
    samples = scrape(port)
    assert sample_value(samples, "sam3_transient_errors_total", operation="load") == 2
    assert sample_value(samples, "sam3_task_retries_total") == 2


def test_task_retry_countdowns_grow_exponentially_with_jitter_and_a_cap() -> None:
    for retries, cap in ((0, 2), (1, 4), (2, 8), (10, 60)):
        drawn = [retry_countdown(retries) for _ in range(400)]
        assert min(drawn) >= 0 and max(drawn) <= cap
        assert len(set(drawn)) > 1  # jitter: a fleet hit by one outage does not retry in lockstep
