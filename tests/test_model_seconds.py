"""A chunk's ``model_seconds`` is the time the model spent on its batches, not time spent waiting for the
model while another chunk had it (two chunks in flight, as the threads pool runs them)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path

from sam3_batch.contracts.schemas import ChunkMessage, JobSpec, Thresholds
from sam3_batch.contracts.settings import Settings
from sam3_batch.contracts.storage import Storage
from sam3_batch.worker.detections import MaskDelivery, PromptDetections
from sam3_batch.worker.model_input import PreparedImage, Preparer
from sam3_batch.worker.pipeline import ChunkContext, ChunkResult, process_chunk
from sam3_batch.worker.runtime import Sam3Runtime
from tests.fixtures.model import scene_items

CHUNKS, IMAGES_PER_CHUNK = 2, 4


class TimedRuntime:
    """The real runtime; each segment call's start and end, by the thread (chunk) that made it."""

    def __init__(self, runtime: Sam3Runtime) -> None:
        self.inner = runtime
        self.model_id, self.revision = runtime.model_id, runtime.revision
        self.calls: list[tuple[str, float, float]] = []

    @property
    def preparer(self) -> Preparer:
        return self.inner.preparer

    def segment(
        self, images: list[PreparedImage], prompts: list[list[str]], thresholds: Thresholds,
        masks: MaskDelivery = "full",
    ) -> list[list[PromptDetections]]:
        start = time.perf_counter()
        found = self.inner.segment(images, prompts, thresholds, masks)
        self.calls.append((threading.current_thread().name, start, time.perf_counter()))
        return found


def _chunks(folder: Path) -> list[ChunkMessage]:
    items = scene_items(folder, [(240, 320)] * (CHUNKS * IMAGES_PER_CHUNK))
    return [ChunkMessage(job_id="model-seconds", chunk_id=f"c{n}", items=items[n::CHUNKS]) for n in range(CHUNKS)]


def test_two_chunks_in_flight_take_turns_on_the_model_and_count_only_their_own_model_time(
    tiny_runtime: Sam3Runtime, tmp_path: Path
) -> None:
    settings = Settings(device="cpu", batch_size=1, io_mode="threads", io_workers=2)
    runtime = TimedRuntime(tiny_runtime)
    context = ChunkContext.create(runtime, Storage(settings), settings)
    spec = JobSpec(job_id="model-seconds", prompts=["a red disc"], output_root=f"file://{tmp_path}/out")
    chunks = _chunks(tmp_path)

    def run(chunk: ChunkMessage) -> tuple[str, ChunkResult]:
        return threading.current_thread().name, process_chunk(chunk, spec, context)

    try:
        with ThreadPoolExecutor(CHUNKS, thread_name_prefix="chunk") as threads:
            results = dict(threads.map(run, chunks))
    finally:
        context.close()

    spans = sorted((start, end) for _, start, end in runtime.calls)
    assert len(spans) == CHUNKS * IMAGES_PER_CHUNK and len(results) == CHUNKS
    assert all(end <= next_start for (_, end), (next_start, _) in pairwise(spans))
    shortest = min(end - start for start, end in spans)
    for thread, result in results.items():
        own = sum(end - start for name, start, end in runtime.calls if name == thread)
        # Waiting for the other chunk's turn would add whole model calls; the timer's own overhead is microseconds.
        assert own <= result.model_seconds < own + shortest / 2
