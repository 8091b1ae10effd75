"""Operating a big job: the id first, progress while feeding and off a terminal, lifecycle ends, exit codes."""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from sam3_batch.contracts.jobstate import RedisJobStore, job_key
from sam3_batch.contracts.report import report_uri
from sam3_batch.contracts.schemas import JobReport
from sam3_batch.contracts.settings import Settings
from tests.fixtures.metrics import sample_value, scrape
from tests.fixtures.services import free_port
from tests.fixtures.workers import run_cli, start_cli, wait_for_job, wait_until


class Lines:
    """Collects a pipe's lines in a thread, each with the time it arrived."""

    def __init__(self, pipe: Any) -> None:
        self.items: queue.Queue[tuple[float, str]] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, args=(pipe,), daemon=True).start()

    def _read(self, pipe: Any) -> None:
        for line in pipe:
            self.items.put((time.time(), line.rstrip("\n")))

    def next(self, timeout: float) -> tuple[float, str]:
        arrived, line = self.items.get(timeout=timeout)
        self.seen.append(line)
        return arrived, line

    def wait_for(self, predicate: Callable[[str], bool], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                _, line = self.next(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                break
            if predicate(line):
                return line
        pytest.fail(f"no matching line within {timeout}s; seen: {self.seen}")


def _put_images(s3_client: Any, bucket: str, count: int, image: bytes) -> None:
    for index in range(count):
        s3_client.put_object(Bucket=bucket, Key=f"in/{index:03d}.jpg", Body=image)


def _report(s3_client: Any, out_root: str, job_id: str) -> JobReport:
    bucket, key = report_uri(out_root, job_id).removeprefix("s3://").split("/", 1)
    return JobReport.model_validate_json(s3_client.get_object(Bucket=bucket, Key=key)["Body"].read())


@pytest.mark.parametrize("log_json", [False, True], ids=["plain", "json-logs"])
def test_job_id_is_the_first_line_and_progress_shows_while_the_full_queue_holds_the_producer(
    log_json: bool, settings_factory: Callable[..., Settings], s3_client: Any, s3_bucket: str,
    image_bytes_factory: Callable[[str], bytes],
) -> None:
    settings = settings_factory(chunk_size=1, queue_high_water=1, queue_low_water=0, progress_interval_s=0.3,
                                log_json=log_json)
    _put_images(s3_client, s3_bucket, 3, image_bytes_factory("jpeg"))
    producer = start_cli(["submit", f"s3://{s3_bucket}/in/", "--out", f"s3://{s3_bucket}/out", "-p", "cat"],
                         settings)
    try:
        stdout, stderr = Lines(producer.stdout), Lines(producer.stderr)
        arrived, job_id = stdout.next(timeout=60)
        store = RedisJobStore(settings.state_redis_url())
        assert arrived - store.stats(job_id).started_at < 1.0  # printed within a second of the job's creation
        # The counting pass knows the total long before the blocked listing does.
        feeding = stderr.wait_for(lambda line: "feeding" in line and ("of ~3" in line or '"expected_total": 3' in line)
                                  and "enqueued 0" not in line and '"enqueued": 0' not in line, 60)
        if log_json:
            assert json.loads(feeding) == {**json.loads(feeding), "job_id": job_id, "listed": 1, "enqueued": 1,
                                           "expected_total": 3, "eta_seconds": None}  # nothing done: no rate yet
            assert all(json.loads(line) for line in stderr.seen)  # every stderr line is JSON
            assert any(job_id in json.loads(line).get("message", "") for line in stderr.seen)
        else:
            assert feeding.startswith(
                f"{job_id}  feeding  listed 1 of ~3  enqueued 1 (1 chunks)  done 0  failed 0  0.0 img/s  ETA -")
        status = json.loads(run_cli(["status", job_id, "--json"], settings).stdout)
        assert (status["expected_total"], status["listing_complete"], status["total"]) == (3, False, 1)
        # Still blocked by backpressure: nobody consumes, the listing is not finished.
        assert producer.poll() is None and not store.counters(job_id).listing_complete
        assert redis.Redis.from_url(settings.broker_url.get_secret_value()).llen(settings.queue) == 1

        assert run_cli(["cancel", job_id], settings).returncode == 0
        assert producer.wait(timeout=60) == 0  # the cancel releases the waiting producer
    finally:
        producer.kill()
        producer.wait()


def test_a_producer_held_by_backpressure_exports_what_it_listed_enqueued_and_how_long_it_waited(
    settings_factory: Callable[..., Settings], s3_client: Any, s3_bucket: str,
    image_bytes_factory: Callable[[str], bytes],
) -> None:
    settings = settings_factory(chunk_size=1, queue_high_water=1, queue_low_water=0)
    _put_images(s3_client, s3_bucket, 3, image_bytes_factory("jpeg"))
    port = free_port()
    producer = start_cli(["submit", f"s3://{s3_bucket}/in/", "--out", f"s3://{s3_bucket}/out", "-p", "cat",
                          "--metrics-port", str(port)], settings)
    try:
        job_id = Lines(producer.stdout).next(timeout=60)[1]

        def waited_a_while() -> Any:
            try:
                found = scrape(port)
            except OSError:  # not listening yet
                return None
            return found if sample_value(found, "sam3_producer_backpressure_wait_seconds_total") > 1.0 else None

        samples = wait_until(waited_a_while, 60, "the producer to report time held by backpressure")
        # One chunk of one image went out; the second waits for room (nobody consumes).
        assert sample_value(samples, "sam3_producer_listed_images_total") == 1
        assert sample_value(samples, "sam3_producer_enqueued_images_total") == 1
        assert sample_value(samples, "sam3_producer_enqueued_chunks_total") == 1
        assert sample_value(samples, "sam3_producer_skipped_images_total") == 0
        assert sample_value(samples, "sam3_producer_listing_complete") == 0
        assert run_cli(["cancel", job_id], settings).returncode == 0
        assert producer.wait(timeout=60) == 0
    finally:
        producer.kill()
        producer.wait()


def test_dry_run_lists_and_plans_without_creating_a_job(
    settings_factory: Callable[..., Settings], tmp_path: Path, image_bytes_factory: Callable[[str], bytes],
) -> None:
    settings = settings_factory(chunk_size=2)
    folder = tmp_path / "in"
    folder.mkdir()
    for index in range(3):
        (folder / f"{index}.png").write_bytes(image_bytes_factory("png"))
    total_bytes = sum(p.stat().st_size for p in folder.iterdir())

    done = run_cli(["submit", str(folder), "--out", str(tmp_path / "out"), "-p", "cat", "--dry-run",
                    "--rate", "2", "--json"], settings)

    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert (plan["images"], plan["chunks"], plan["bytes"], plan["estimate_from"]) == (3, 2, total_bytes, "--rate")
    assert plan["gpu_hours"] == pytest.approx(3 / 2 / 3600)
    assert RedisJobStore(settings.state_redis_url()).job_ids() == []
    plain = run_cli(["submit", str(folder), "--out", str(tmp_path / "out"), "-p", "cat", "--dry-run"], settings)
    assert plain.stdout.startswith("dry run: 3 images") and "GPU-hours unknown" in plain.stdout


def test_piped_status_watch_prints_lines_while_running_and_agrees_with_the_end(
    settings_factory: Callable[..., Settings], s3_client: Any, s3_bucket: str,
    image_bytes_factory: Callable[[str], bytes],
) -> None:
    settings = settings_factory(chunk_size=2)
    _put_images(s3_client, s3_bucket, 3, image_bytes_factory("jpeg"))
    submitted = run_cli(["submit", f"s3://{s3_bucket}/in/", "--out", f"s3://{s3_bucket}/out", "-p", "cat"],
                        settings)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.splitlines()[0]
    watcher = start_cli(["status", job_id, "--watch", "--progress-every", "0.2"], settings)
    try:
        lines = Lines(watcher.stdout)
        first = lines.next(timeout=60)[1]
        second = lines.next(timeout=30)[1]
        for line in (first, second):  # one plain line per tick, not a bar waiting for the end
            assert line.startswith(f"{job_id}  running  total 3  done 0  failed 0"), line
        assert run_cli(["cancel", job_id], settings).returncode == 0
        assert watcher.wait(timeout=60) == 3  # as `submit --wait` on a cancelled job
        assert lines.wait_for(lambda line: "cancelled" in line, 10).startswith(f"{job_id}  cancelled")
    finally:
        watcher.kill()
        watcher.wait()


def test_piped_failures_keep_one_line_and_two_tab_separated_fields_per_failure(
    settings_factory: Callable[..., Settings], s3_client: Any, s3_bucket: str,
) -> None:
    settings = settings_factory()
    name = "manifests/" + "a-rather-long-folder-name-" * 4 + "list.jsonl"
    s3_client.put_object(Bucket=s3_bucket, Key=name, Body=b"not json\n{\"no_uri\": 1}\n")
    submitted = run_cli(["submit", "--manifest", f"s3://{s3_bucket}/{name}", "--out", f"s3://{s3_bucket}/out",
                         "-p", "cat"], settings)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.splitlines()[0]

    shown = run_cli(["failures", job_id], settings)

    lines = shown.stdout.splitlines()
    assert len(lines) == 2 and all(len(line) > 120 for line in lines)  # wider than any terminal default
    assert [line.split("\t")[0] for line in lines] == [f"s3://{s3_bucket}/{name} line {n}" for n in (1, 2)]
    assert all(len(line.split("\t")) == 2 and "malformed manifest line" in line for line in lines)
    status = run_cli(["status", job_id], settings).stdout
    assert status.count("\n") == 1 and status.startswith(f"{job_id}  complete  total 2")


def test_a_source_that_cannot_be_opened_fails_the_job_which_then_ends_expires_and_can_be_deleted(
    settings_factory: Callable[..., Settings], s3_client: Any, s3_bucket: str,
) -> None:
    settings = settings_factory()
    out_root = f"s3://{s3_bucket}/out"
    submitted = run_cli(["submit", "gs://bucket/images/", "--out", out_root, "-p", "cat"], settings)

    assert submitted.returncode == 1 and "unsupported input scheme 'gs'" in submitted.stderr
    assert "Traceback" not in submitted.stderr
    job_id = submitted.stdout.splitlines()[0]
    watched = run_cli(["status", job_id, "--watch"], settings, timeout=30)
    assert watched.returncode == 3 and f"{job_id}  failed" in watched.stdout
    report = _report(s3_client, out_root, job_id)
    assert report.state == "failed" and report.error is not None and "gs" in report.error
    ttl = redis.Redis.from_url(settings.state_redis_url()).ttl(job_key(job_id, "spec"))
    assert 0 < ttl <= settings.finished_job_ttl_s

    cancelled = run_cli(["cancel", job_id], settings)
    assert cancelled.returncode == 0 and "already ended (failed): nothing to cancel" in cancelled.stdout
    assert json.loads(run_cli(["status", job_id, "--json"], settings).stdout)["state"] == "failed"

    assert run_cli(["delete", job_id], settings).returncode == 0
    assert json.loads(run_cli(["jobs", "--json"], settings).stdout) == []
    gone = run_cli(["status", job_id], settings)
    assert gone.returncode == 1 and f"unknown job {job_id}" in gone.stderr


def test_delete_refuses_a_running_job_without_force(
    settings_factory: Callable[..., Settings], s3_client: Any, s3_bucket: str,
    image_bytes_factory: Callable[[str], bytes],
) -> None:
    settings = settings_factory()
    _put_images(s3_client, s3_bucket, 1, image_bytes_factory("jpeg"))
    job_id = run_cli(["submit", f"s3://{s3_bucket}/in/", "--out", f"s3://{s3_bucket}/out", "-p", "cat"],
                     settings).stdout.splitlines()[0]

    refused = run_cli(["delete", job_id], settings)

    assert refused.returncode != 0 and "cancel it first" in refused.stderr and "Traceback" not in refused.stderr
    assert run_cli(["delete", job_id, "--force"], settings).returncode == 0
    assert RedisJobStore(settings.state_redis_url()).job_ids() == []


@pytest.mark.slow
def test_max_failed_fraction_sets_the_same_exit_code_for_submit_wait_and_status_watch(
    settings_factory: Callable[..., Settings], tiny_checkpoint: Path, s3_client: Any, s3_bucket: str,
    image_bytes_factory: Callable[[str], bytes], worker_factory: Any,
) -> None:
    settings = settings_factory(model=str(tiny_checkpoint), device="cpu", chunk_size=4, batch_size=2,
                                progress_interval_s=0.5)
    _put_images(s3_client, s3_bucket, 3, image_bytes_factory("jpeg"))
    s3_client.put_object(Bucket=s3_bucket, Key="in/corrupt.jpg", Body=b"not an image")
    worker = worker_factory(settings)
    args = ["submit", f"s3://{s3_bucket}/in/", "--out", f"s3://{s3_bucket}/out", "-p", "cat", "--wait"]

    tolerant = run_cli([*args, "--max-failed-fraction", "0.25"], settings, timeout=240)

    assert tolerant.returncode == 0, tolerant.stderr + worker.log()[-3000:]
    job_id = tolerant.stdout.splitlines()[0]
    counters = wait_for_job(RedisJobStore(settings.state_redis_url()), job_id, workers=[worker])
    assert (counters.done, counters.failed) == (3, 1)
    assert "complete" in tolerant.stderr  # progress lines reached the pipe
    watch = ["status", job_id, "--watch"]
    assert run_cli([*watch, "--max-failed-fraction", "0.25"], settings).returncode == 0
    assert run_cli([*watch, "--max-failed-fraction", "0.2"], settings).returncode == 2
    strict = run_cli(args, settings, timeout=240)
    assert strict.returncode == 2, strict.stderr
