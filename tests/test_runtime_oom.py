"""A batch that runs out of GPU memory is split in halves and retried, down to a single image."""

from __future__ import annotations

import pytest
import torch
from transformers.models.sam3.modeling_sam3 import Sam3ImageSegmentationOutput

from sam3_batch.contracts.schemas import Thresholds
from sam3_batch.worker.runtime import PreparedImage, Sam3Runtime
from tests.fixtures.model import BATCHED_MASK_TOLERANCE, SCENE_SIZES_HW, assert_same_detections, scene_image

THRESHOLDS = Thresholds(score=0.05, mask=0.5)


class MemoryCappedRuntime(Sam3Runtime):
    """The real runtime, except that a forward over more than ``max_images`` images runs out of memory."""

    max_images = 2
    attempts: list[int]

    def _forward_batch(self, pixel_values: torch.Tensor, prompts: list[list[str]]) -> Sam3ImageSegmentationOutput:
        self.attempts.append(pixel_values.shape[0])
        if pixel_values.shape[0] > self.max_images:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return super()._forward_batch(pixel_values, prompts)


def _capped(runtime: Sam3Runtime, max_images: int) -> MemoryCappedRuntime:
    capped = MemoryCappedRuntime(
        runtime.model,
        runtime.processor,
        model_id=runtime.model_id,
        revision=runtime.revision,
        device=runtime.device,
        dtype=runtime.dtype,
    )
    capped.max_images = max_images
    capped.attempts = []
    return capped


@pytest.fixture(scope="module")
def five_images(tiny_runtime: Sam3Runtime) -> list[PreparedImage]:
    return [tiny_runtime.prepare(scene_image(size, variant)) for variant, size in enumerate(SCENE_SIZES_HW)]


def test_a_batch_of_five_that_runs_out_of_memory_is_split_and_gives_the_same_results(
    tiny_runtime: Sam3Runtime, five_images: list[PreparedImage]
) -> None:
    prompts = [["cat", "blue sky"], ["cat"], ["a red car", "cat", "blue sky"], ["blue sky"], ["cat", "a red car"]]
    expected = tiny_runtime.segment(five_images, prompts, THRESHOLDS)
    capped = _capped(tiny_runtime, max_images=2)

    results = capped.segment(five_images, prompts, THRESHOLDS)

    assert capped.attempts == [5, 2, 3, 1, 2]  # halves, recursively, until each part fits
    assert [len(per_image) for per_image in results] == [len(p) for p in prompts]
    compared = 0
    for i, per_image in enumerate(expected):
        for j, found in enumerate(per_image):
            assert_same_detections(results[i][j], found, f"image {i} prompt {j}", BATCHED_MASK_TOLERANCE)
            compared += len(found)
    assert compared > 0


def test_a_single_image_that_runs_out_of_memory_raises(
    tiny_runtime: Sam3Runtime, five_images: list[PreparedImage]
) -> None:
    capped = _capped(tiny_runtime, max_images=0)

    with pytest.raises(torch.OutOfMemoryError):
        capped.segment(five_images[:1], [["cat"]], THRESHOLDS)
    assert capped.attempts == [1]


def test_a_batch_that_runs_out_of_memory_even_one_image_at_a_time_raises(
    tiny_runtime: Sam3Runtime, five_images: list[PreparedImage]
) -> None:
    capped = _capped(tiny_runtime, max_images=0)

    with pytest.raises(torch.OutOfMemoryError):
        capped.segment(five_images[:3], [["cat"]] * 3, THRESHOLDS)
    assert capped.attempts == [3, 1]  # the first half's single image fails; nothing more is tried
