"""The loader and writer stage processes: a dead one costs no image, and none outlives its worker.

Real parts: the SeaweedFS S3 server behind the fault proxy (which holds a request so that a process can be
killed in the middle of it), the tiny SAM 3 checkpoint, real stage processes, real SIGKILLs.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from sam3_batch.contracts.jobstate import RedisJobStore
from sam3_batch.contracts.schemas import ChunkMessage, JobSpec, OutputOptions, Thresholds, WorkItem
from sam3_batch.contracts.settings import Settings
from sam3_batch.contracts.storage import Storage
from sam3_batch.worker.pipeline import ChunkContext, ChunkResult, process_chunk
from sam3_batch.worker.runtime import Sam3Runtime
from sam3_batch.worker.stage_pools import STAGE_NICENESS
from tests.fixtures.faulty_proxy import FaultyProxy
from tests.fixtures.workers import descendant_pids, wait_until

IMAGES = ["in/b0.jpg", "in/b1.jpg", "in/b2.jpg"]
KILLED = "in/b1.jpg"


@pytest.fixture
def stage_settings(settings_factory: Callable[..., Settings], faulty_s3: FaultyProxy) -> Settings:
    # One worker per stage: the process holding the held request is the only one there is.
    return settings_factory(
        device="cpu", batch_size=2, io_mode="processes", io_workers=1,
        s3_endpoint_url=faulty_s3.endpoint_url, s3_read_timeout_s=300.0,
    )


@pytest.fixture
def photos(s3_client: Any, s3_bucket: str, image_bytes_factory: Callable[[str], bytes]) -> list[WorkItem]:
    for key in IMAGES:
        s3_client.put_object(Bucket=s3_bucket, Key=key, Body=image_bytes_factory("jpeg"))
    return [WorkItem(uri=f"s3://{s3_bucket}/{key}", out_key=key.removeprefix("in/")) for key in IMAGES]


@pytest.fixture
def context(stage_settings: Settings, tiny_runtime: Sam3Runtime) -> Iterator[ChunkContext]:
    ctx = ChunkContext.create(tiny_runtime, Storage(stage_settings), stage_settings)
    yield ctx
    ctx.close()


def _spec(bucket: str) -> JobSpec:
    return JobSpec(job_id="stage-processes", prompts=["a red disc"], thresholds=Thresholds(score=0.0),
                   outputs=OutputOptions(png_masks=True), output_root=f"s3://{bucket}/out/")


def _start(
    context: ChunkContext, spec: JobSpec, items: list[WorkItem]
) -> tuple[ThreadPoolExecutor, Future[ChunkResult]]:
    runner = ThreadPoolExecutor(1)
    chunk = ChunkMessage(job_id=spec.job_id, chunk_id="chunk-0", items=items)
    return runner, runner.submit(process_chunk, chunk, spec, context)


def _held(proxy: FaultyProxy, method: str, key: str, times: int = 1) -> None:
    wait_until(lambda: proxy.count(method, key, faulted=True) >= times, 120, f"{method} {key} held (#{times})")


def _kill(pids: list[int]) -> None:
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


def _statuses(result: ChunkResult) -> dict[str, str]:
    return {outcome.out_key: outcome.status for outcome in result.outcomes}


def test_a_loader_process_killed_mid_download_costs_no_image(
    context: ChunkContext, photos: list[WorkItem], faulty_s3: FaultyProxy, s3_bucket: str, s3_client: Any,
) -> None:
    faulty_s3.add_fault("GET", KILLED, "delay", times=1)
    runner, running = _start(context, _spec(s3_bucket), photos)
    _held(faulty_s3, "GET", KILLED)
    killed = context.loaders.worker_pids()
    assert len(killed) == 1

    _kill(killed)
    result = running.result(timeout=180)
    runner.shutdown()

    assert _statuses(result) == {"b0.jpg": "done", "b1.jpg": "done", "b2.jpg": "done"}
    assert result.retry_later == []
    assert faulty_s3.dropped("GET", KILLED) == 1  # it really died in the middle of the download
    assert context.loaders.worker_pids() and set(context.loaders.worker_pids()).isdisjoint(killed)
    stored = s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="out/")["Contents"]
    assert {o["Key"] for o in stored if o["Key"].endswith(".json")} == {f"out/b{i}.jpg.json" for i in range(3)}


def test_an_image_that_kills_its_loader_every_time_fails_alone_with_a_reason(
    context: ChunkContext, photos: list[WorkItem], faulty_s3: FaultyProxy, s3_bucket: str,
) -> None:
    """As a decoder crash on one poisoned file would: first in the chunk, then twice alone in a fresh pool."""
    faulty_s3.add_fault("GET", KILLED, "delay", times=None)
    runner, running = _start(context, _spec(s3_bucket), photos)
    for attempt in (1, 2, 3):
        _held(faulty_s3, "GET", KILLED, times=attempt)
        _kill(context.loaders.worker_pids())
    result = running.result(timeout=180)
    runner.shutdown()

    assert _statuses(result) == {"b0.jpg": "done", "b1.jpg": "failed", "b2.jpg": "done"}
    [failed] = [o for o in result.outcomes if o.status == "failed"]
    assert failed.reason is not None and failed.reason.startswith("StageProcessDied: the loader process died")
    assert faulty_s3.count("GET", KILLED) == 3


def test_a_writer_process_killed_mid_upload_costs_no_image(
    context: ChunkContext, photos: list[WorkItem], faulty_s3: FaultyProxy, s3_bucket: str, s3_client: Any,
) -> None:
    faulty_s3.add_fault("PUT", "/out/b1.jpg.json", "delay", times=1)  # the done marker, written last
    runner, running = _start(context, _spec(s3_bucket), photos)
    _held(faulty_s3, "PUT", "/out/b1.jpg.json")
    killed = context.writers.worker_pids()

    _kill(killed)
    result = running.result(timeout=180)
    runner.shutdown()

    assert _statuses(result) == {"b0.jpg": "done", "b1.jpg": "done", "b2.jpg": "done"}
    assert faulty_s3.dropped("PUT", "/out/b1.jpg.json") == 1
    assert s3_client.head_object(Bucket=s3_bucket, Key="out/b1.jpg.json")["ContentLength"] > 0
    assert set(context.writers.worker_pids()).isdisjoint(killed)


def test_a_loader_process_that_died_between_chunks_is_replaced_for_the_next_chunk(
    context: ChunkContext, photos: list[WorkItem], s3_bucket: str,
) -> None:
    """An idle stage process killed (the OOM killer picks it, say): the next chunk still runs whole."""
    spec = _spec(s3_bucket)
    first = process_chunk(ChunkMessage(job_id=spec.job_id, chunk_id="c0", items=photos[:1]), spec, context)
    killed = context.loaders.worker_pids()
    _kill(killed)
    wait_until(lambda: not any(_alive(pid) for pid in killed), 30, "the killed loader to be gone")

    second = process_chunk(ChunkMessage(job_id=spec.job_id, chunk_id="c1", items=photos[1:]), spec, context)

    assert _statuses(first) == {"b0.jpg": "done"}
    assert _statuses(second) == {"b1.jpg": "done", "b2.jpg": "done"}
    assert context.loaders.worker_pids() and set(context.loaders.worker_pids()).isdisjoint(killed)


def test_stage_processes_yield_the_cpu_to_the_model_process(
    context: ChunkContext, photos: list[WorkItem], s3_bucket: str,
) -> None:
    spec = _spec(s3_bucket)
    result = process_chunk(ChunkMessage(job_id=spec.job_id, chunk_id="c0", items=photos), spec, context)

    assert _statuses(result) == {"b0.jpg": "done", "b1.jpg": "done", "b2.jpg": "done"}
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    stage_pids = context.loaders.worker_pids() + context.writers.worker_pids()
    assert len(stage_pids) == 2
    assert [os.getpriority(os.PRIO_PROCESS, pid) for pid in stage_pids] == [min(19, ours + STAGE_NICENESS)] * 2


def test_stage_processes_exit_when_their_worker_is_killed(
    settings_factory: Callable[..., Settings], tiny_checkpoint: Path, faulty_s3: FaultyProxy,
    photos: list[WorkItem], s3_bucket: str, worker_factory: Any,
) -> None:
    """A SIGKILLed worker (OOM killer, lost node) leaves no loader or writer process behind."""
    settings = settings_factory(
        model=str(tiny_checkpoint), device="cpu", io_workers=2, s3_endpoint_url=faulty_s3.endpoint_url,
        s3_read_timeout_s=300.0,
    )
    faulty_s3.add_fault("GET", KILLED, "delay", times=None)
    worker = worker_factory(settings, "stages")
    store = RedisJobStore(settings.state_redis_url())
    from sam3_batch.jobs import JobRequest, submit

    submit(JobRequest(inputs=[f"s3://{s3_bucket}/in/"], prompts=["cat"], output_root=f"s3://{s3_bucket}/out/"),
           settings)
    _held(faulty_s3, "GET", KILLED)
    stage_pids = wait_until(lambda: descendant_pids(worker.process.pid) or None, 60, "the worker's stage processes")
    assert len(stage_pids) >= 2  # the forkserver and at least one loader (and multiprocessing's helpers)

    worker.kill()  # the worker process alone: its descendants must notice by themselves
    faulty_s3.release()

    wait_until(lambda: not any(_alive(pid) for pid in stage_pids), 60, "every stage process to exit",
               details=lambda: str([pid for pid in stage_pids if _alive(pid)]))
    store.client.close()


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status

