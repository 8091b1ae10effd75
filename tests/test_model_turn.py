"""The model's turn covers the model's part of a batch only: its pixels are stacked before (``stage``) and its
results assembled after (``start_segment``) while another chunk's batch runs on the model; outputs are the same."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from sam3_batch.contracts.schemas import ChunkMessage, JobSpec, Thresholds
from sam3_batch.contracts.settings import Settings
from sam3_batch.contracts.storage import Storage
from sam3_batch.worker.detections import MaskDelivery, PromptDetections
from sam3_batch.worker.pipeline import ChunkContext, process_chunk
from sam3_batch.worker.runtime import Sam3Runtime
from tests.fixtures.model import scene_items

WAIT_S = 60.0  # only reached when the turn is held through the host's part: then the test fails, not hangs


class OverlapRuntime:
    """The real runtime; the host's part of the first batch waits until a second batch has started."""

    def __init__(self, runtime: Sam3Runtime) -> None:
        self.inner = runtime
        self.model_id, self.revision = runtime.model_id, runtime.revision
        self.second_started = threading.Event()
        self.starts = 0
        self.overlapped = False
        self.staged: list[int] = []

    @property
    def preparer(self) -> Any:
        return self.inner.preparer

    def segment(self, *args: Any) -> list[list[PromptDetections]]:
        raise AssertionError("the pipeline should take the two-part path")

    def stage(self, images: list[Any]) -> torch.Tensor:
        self.staged.append(len(images))
        return self.inner.stage(images)

    def start_segment(
        self, images: list[Any], prompts: list[list[str]], thresholds: Thresholds, masks: MaskDelivery = "full",
        staged: torch.Tensor | None = None,
    ) -> Callable[[], list[list[PromptDetections]]]:
        assert staged is not None and staged.shape[0] == len(images)  # stacked before the model's turn
        self.starts += 1
        first = self.starts == 1
        if not first:
            self.second_started.set()
        finish = self.inner.start_segment(images, prompts, thresholds, masks, staged)

        def finished() -> list[list[PromptDetections]]:
            if first:
                self.overlapped = self.second_started.wait(WAIT_S)
            return finish()

        return finished


def _chunk(tmp_path: Path, name: str, count: int) -> ChunkMessage:
    return ChunkMessage(job_id="turns", chunk_id=name, items=scene_items(tmp_path / "in", [(120, 160)] * count, name))


def test_a_second_chunks_batch_has_the_model_while_the_first_ones_results_are_assembled(
    tiny_runtime: Sam3Runtime, tmp_path: Path
) -> None:
    settings = Settings(device="cpu", batch_size=2, io_workers=1, io_mode="threads")
    chunks = [_chunk(tmp_path, "a", 2), _chunk(tmp_path, "b", 2)]
    runtime = OverlapRuntime(tiny_runtime)
    context = ChunkContext.create(runtime, Storage(settings), settings)

    def run(chunk: ChunkMessage) -> list[dict[str, Any]]:
        spec = JobSpec(job_id="turns", prompts=["cat"], thresholds=Thresholds(score=0.0),
                       output_root=f"file://{tmp_path / 'out'}")
        result = process_chunk(chunk, spec, context)
        assert [outcome.status for outcome in result.outcomes] == ["done", "done"]
        return sorted((m.model_dump(exclude={"timings_ms", "processed_at"}) for m in result.metadata),
                      key=lambda m: str(m["image"]["uri"]))

    try:
        with ThreadPoolExecutor(2) as both:
            together = list(both.map(run, chunks))
        alone = [run(chunk) for chunk in chunks]  # one at a time: nothing to overlap with
    finally:
        context.close()

    assert runtime.overlapped
    assert runtime.staged == [2, 2, 2, 2]  # every batch's pixels stacked before its turn
    assert together == alone
    assert sum(len(m["annotations"]) for per_chunk in alone for m in per_chunk) > 0
