"""Detections waiting for their writer are bounded: a slow store makes the model wait, not masks pile up."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from sam3_batch.contracts.schemas import ChunkMessage, JobSpec, Thresholds
from sam3_batch.contracts.settings import Settings
from sam3_batch.contracts.storage import Storage
from sam3_batch.worker.detections import MaskDelivery, PromptDetections
from sam3_batch.worker.pipeline import ChunkContext, pending_writes_limit, process_chunk
from sam3_batch.worker.runtime import Sam3Runtime
from sam3_batch.worker.stage_pools import StagePool
from tests.fixtures.model import scene_items

IMAGES = 6
BOUND = 2
GATE_FALLBACK_S = 5.0  # only reached when the bound holds: the model is waiting and no write can finish


class GatedStorage(Storage):
    """Local storage whose writes wait until the gate opens: an upload that has stalled."""

    def __init__(self, settings: Settings, gate: threading.Event) -> None:
        super().__init__(settings)
        self.gate = gate

    def write_bytes(self, uri: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self.gate.wait()
        super().write_bytes(uri, data, content_type)


class GateOpeningRuntime:
    """The real runtime; its call number ``BOUND + 2`` opens the gate, which only an unbounded queue reaches."""

    def __init__(self, runtime: Sam3Runtime, gate: threading.Event) -> None:
        self.inner, self.gate = runtime, gate
        self.model_id, self.revision = runtime.model_id, runtime.revision
        self.calls = 0

    @property
    def preparer(self) -> Any:
        return self.inner.preparer

    def segment(
        self, images: list[Any], prompts: list[list[str]], thresholds: Thresholds,
        masks: MaskDelivery = "full",
    ) -> list[list[PromptDetections]]:
        self.calls += 1
        if self.calls == BOUND + 2:
            self.gate.set()
        return self.inner.segment(images, prompts, thresholds, masks)


def test_no_more_than_the_bound_of_images_wait_for_a_stalled_writer(
    tiny_runtime: Sam3Runtime, tmp_path: Path
) -> None:
    settings = Settings(device="cpu", batch_size=1, io_workers=1, io_mode="threads", max_pending_writes=BOUND)
    gate = threading.Event()
    items = scene_items(tmp_path / "in", [(120, 160)] * IMAGES, prefix="")
    spec = JobSpec(job_id="bounded", prompts=["cat"], thresholds=Thresholds(score=0.0),
                   output_root=f"file://{tmp_path / 'out'}")
    runtime = GateOpeningRuntime(tiny_runtime, gate)
    context = ChunkContext.create(runtime, Storage(settings), settings)
    context.writers.close()  # the writers upload through the gate: a stalled upload
    context.writers = StagePool("writer", lambda _own_process: GatedStorage(settings, gate), mode="threads", workers=1)
    outstanding, most = 0, 0
    lock = threading.Lock()
    start = context.writers.start

    def counting_start(fn: Any, *args: Any) -> Future[Any]:
        nonlocal outstanding, most
        future = start(fn, *args)
        with lock:
            outstanding += 1
            most = max(most, outstanding)
        future.add_done_callback(lambda _f: _finished())  # runs before the pipeline frees the slot
        return future

    def _finished() -> None:
        nonlocal outstanding
        with lock:
            outstanding -= 1

    context.writers.start = counting_start  # type: ignore[method-assign]
    fallback = threading.Timer(GATE_FALLBACK_S, gate.set)
    fallback.start()
    try:
        result = process_chunk(ChunkMessage(job_id="bounded", chunk_id="c0", items=items), spec, context)
    finally:
        fallback.cancel()
        context.close()

    assert [o.status for o in result.outcomes] == ["done"] * IMAGES
    assert most == BOUND  # reached, never passed: an unbounded queue holds BOUND + 1 when call BOUND + 2 comes
    assert runtime.calls == IMAGES


@pytest.mark.parametrize(("setting", "batch", "expected"), [(0, 8, 16), (0, 0, 2), (5, 64, 5)])
def test_the_pending_write_limit_is_the_setting_or_two_batches(setting: int, batch: int, expected: int) -> None:
    assert pending_writes_limit(Settings(max_pending_writes=setting, batch_size=batch)) == expected
