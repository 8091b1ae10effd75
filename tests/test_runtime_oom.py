"""Out of GPU memory: a batch's images are split in halves (vision encoder), its (image, prompt) rows into
slices (detector) whose size the runtime remembers; the vision encoder still runs once per batch."""

from __future__ import annotations

import pytest
import torch
from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

from sam3_batch.contracts.schemas import ConceptPrompt, ObjectPrompt, PromptSpec, Thresholds
from sam3_batch.worker.detections import MaskDelivery
from sam3_batch.worker.device_post import PendingDetections
from sam3_batch.worker.runtime import PreparedImage, Sam3Runtime, _Rows
from sam3_batch.worker.visual_prompts import VisualRequest
from tests.fixtures.model import BATCHED_MASK_TOLERANCE, SCENE_SIZES_HW, assert_same_detections, scene_image

THRESHOLDS = Thresholds(score=0.05, mask=0.5)


class MemoryCappedRuntime(Sam3Runtime):
    """The real runtime, except that the vision encoder over more than ``max_images`` images, or the
    detector over more than ``max_rows`` (image, prompt) rows, runs out of memory."""

    max_images = 2
    max_rows = 1_000_000
    attempts: list[int]
    row_attempts: list[int]

    def _vision_features(self, pixel_values: torch.Tensor) -> Sam3VisionEncoderOutput:
        self.attempts.append(pixel_values.shape[0])
        if pixel_values.shape[0] > self.max_images:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return super()._vision_features(pixel_values)

    def _detect_rows(
        self, vision: Sam3VisionEncoderOutput, rows: _Rows, thresholds: Thresholds, masks: MaskDelivery
    ) -> PendingDetections:
        self.row_attempts.append(len(rows.prompts))
        if len(rows.prompts) > self.max_rows:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return super()._detect_rows(vision, rows, thresholds, masks)


def _capped(runtime: Sam3Runtime, max_images: int, max_rows: int = 1_000_000) -> MemoryCappedRuntime:
    capped = MemoryCappedRuntime(
        runtime.model,
        runtime.processor,
        model_id=runtime.model_id,
        revision=runtime.revision,
        device=runtime.device,
        dtype=runtime.dtype,
    )
    capped.max_images, capped.max_rows = max_images, max_rows
    capped.attempts, capped.row_attempts = [], []
    capped.visual.use_tracker(runtime.visual.tracker())  # the same tracker: its ViT is the model's
    return capped


def _visual_requests(sizes_hw: list[tuple[int, int]]) -> list[VisualRequest]:
    """Per image: a text prompt, an exemplar prompt (one negative box), and a box object and a click object."""
    requests = []
    for h, w in sizes_hw:
        disc, rect = (0.15 * w, 0.3 * h, 0.55 * w, 0.85 * h), (0.6 * w, 0.1 * h, 0.92 * w, 0.45 * h)
        prompts: list[PromptSpec] = ["cat", ConceptPrompt(text="shape", boxes=[disc, rect], box_labels=[1, 0])]
        objects = [ObjectPrompt(box=rect), ObjectPrompt(points=[(0.35 * w, 0.6 * h)])]
        requests.append(VisualRequest(prompts, objects))
    return requests


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


def test_a_64_prompt_job_runs_the_vision_encoder_once_per_batch_and_equals_the_unsliced_result(
    tiny_runtime: Sam3Runtime, five_images: list[PreparedImage]
) -> None:
    prompts = [[f"thing number {k}" for k in range(64)]] * 2  # 128 rows for 2 images
    expected = tiny_runtime.segment(five_images[:2], prompts, THRESHOLDS)
    capped = _capped(tiny_runtime, max_images=8, max_rows=40)
    encoder_calls: list[int] = []
    hook = capped.model.vision_encoder.register_forward_hook(
        lambda _module, args, _output: encoder_calls.append(args[0].shape[0])
    )
    try:
        results = capped.segment(five_images[:2], prompts, THRESHOLDS)
        again = capped.segment(five_images[2:4], prompts, THRESHOLDS)
    finally:
        hook.remove()

    assert encoder_calls == [2, 2]  # once per batch, never again after a detector slice ran out of memory
    assert capped.row_attempts[:3] == [128, 64, 32]  # halved until a slice fits ...
    assert capped.row_limit == 32 and max(capped.row_attempts[3:]) == 32  # ... and remembered after
    assert sum(capped.row_attempts) - 128 - 64 == 2 * 128
    compared = 0
    for i, per_image in enumerate(expected):
        assert [d.prompt for d in results[i]] == prompts[i]
        for j, found in enumerate(per_image):
            assert_same_detections(results[i][j], found, f"image {i} prompt {j}", BATCHED_MASK_TOLERANCE)
            compared += len(found)
    assert compared > 0 and len(again) == 2


def test_one_row_that_runs_out_of_memory_raises(tiny_runtime: Sam3Runtime, five_images: list[PreparedImage]) -> None:
    capped = _capped(tiny_runtime, max_images=8, max_rows=0)

    with pytest.raises(torch.OutOfMemoryError):
        capped.segment(five_images[:1], [["cat", "dog"]], THRESHOLDS)
    assert capped.row_attempts == [2, 1]


def test_a_visual_prompt_batch_that_runs_out_of_memory_is_split_like_text_and_gives_the_same_results(
    tiny_runtime: Sam3Runtime, five_images: list[PreparedImage]
) -> None:
    requests = _visual_requests([image.original_size_hw for image in five_images])
    expected = tiny_runtime.segment_visual(five_images, requests, THRESHOLDS)
    capped = _capped(tiny_runtime, max_images=2)

    results = capped.segment_visual(five_images, requests, THRESHOLDS)

    assert capped.attempts == [5, 2, 3, 1, 2]  # halves, as the text path does; never one image at a time
    compared = 0
    for i, (found, wanted) in enumerate(zip(results, expected, strict=True)):
        assert len(found.concepts) == 2 and len(found.objects) == 2
        for j, detections in enumerate(found.concepts + found.objects):
            reference = (wanted.concepts + wanted.objects)[j]
            assert_same_detections(detections, reference, f"image {i} prompt {j}", BATCHED_MASK_TOLERANCE)
            compared += len(reference)
    assert compared > 0


def test_a_single_image_with_visual_prompts_that_runs_out_of_memory_raises(
    tiny_runtime: Sam3Runtime, five_images: list[PreparedImage]
) -> None:
    capped = _capped(tiny_runtime, max_images=0)

    with pytest.raises(torch.OutOfMemoryError):
        capped.segment_visual(five_images[:3], _visual_requests([i.original_size_hw for i in five_images[:3]]),
                              THRESHOLDS)
    assert capped.attempts == [3, 1]
