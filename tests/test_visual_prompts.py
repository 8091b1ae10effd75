"""Visual prompts (exemplar boxes, point/box objects) give what plain transformers calls give, batched."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from sam3_batch.contracts.schemas import ConceptPrompt, ObjectPrompt, PromptSpec, Thresholds
from sam3_batch.worker.runtime import Sam3Runtime
from sam3_batch.worker.tiny_model import TINY_RANDOM, TRACKER_SUBDIR, resolve_tracker
from sam3_batch.worker.tracker_adapter import embeddings_from_detector, embeddings_from_pixels
from sam3_batch.worker.visual_prompts import VisualRequest
from tests.fixtures.model import SCENE_SIZES_HW, scene_image
from tests.fixtures.visual import VisualOracle, assert_matches_oracle

THRESHOLDS = Thresholds(score=0.0, mask=0.5)  # score 0 keeps every query: all instances are compared


def _box(image: Image.Image, x0: float, y0: float, x1: float, y1: float) -> tuple[float, float, float, float]:
    """A box given in fractions of the image, in pixels."""
    return (x0 * image.width, y0 * image.height, x1 * image.width, y1 * image.height)


def _point(image: Image.Image, x: float, y: float) -> tuple[float, float]:
    return (x * image.width, y * image.height)


def concept_kinds(image: Image.Image) -> dict[str, ConceptPrompt]:
    """Text + boxes, boxes alone, and positive + negative boxes, around the scene's disc and rectangle."""
    disc, rect = _box(image, 0.15, 0.3, 0.55, 0.85), _box(image, 0.6, 0.1, 0.92, 0.45)
    return {
        "text+boxes": ConceptPrompt(text="a red disc", boxes=[disc]),
        "boxes only": ConceptPrompt(boxes=[disc, rect]),
        "negative boxes": ConceptPrompt(text="shape", boxes=[disc, rect], box_labels=[1, 0]),
    }


def object_kinds(image: Image.Image) -> dict[str, ObjectPrompt]:
    """Points only (one negative), a box only, and points + box."""
    return {
        "points only": ObjectPrompt(points=[_point(image, 0.35, 0.6), _point(image, 0.8, 0.3)], point_labels=[1, 0]),
        "box only": ObjectPrompt(box=_box(image, 0.6, 0.1, 0.92, 0.45)),
        "points+box": ObjectPrompt(points=[_point(image, 0.3, 0.5)], box=_box(image, 0.1, 0.25, 0.6, 0.9)),
    }


@pytest.fixture(scope="module")
def oracle(tiny_checkpoint: Path) -> VisualOracle:
    return VisualOracle(tiny_checkpoint)


@pytest.fixture(scope="module")
def scenes() -> list[Image.Image]:
    return [scene_image(size, variant) for variant, size in enumerate(SCENE_SIZES_HW[:4])]


@pytest.mark.parametrize("kind", ["text+boxes", "boxes only", "negative boxes"])
def test_a_concept_prompt_with_exemplar_boxes_equals_the_plain_transformers_call(
    tiny_runtime: Sam3Runtime, oracle: VisualOracle, scenes: list[Image.Image], kind: str
) -> None:
    compared = 0
    for index, image in enumerate(scenes):
        prompt = concept_kinds(image)[kind]
        [result] = tiny_runtime.segment_visual([tiny_runtime.prepare(image)], [VisualRequest([prompt], [])], THRESHOLDS)
        expected = oracle.concept(image, prompt, 0, THRESHOLDS)
        assert_matches_oracle(result.concepts[0], expected, f"image {index} {kind}")
        compared += len(expected)
    assert compared > 0, "no instances: the comparison would prove nothing"


@pytest.mark.parametrize("kind", ["points only", "box only", "points+box"])
def test_an_object_prompt_equals_the_plain_transformers_tracker_call(
    tiny_runtime: Sam3Runtime, oracle: VisualOracle, scenes: list[Image.Image], kind: str
) -> None:
    for index, image in enumerate(scenes):
        obj = object_kinds(image)[kind]
        [result] = tiny_runtime.segment_visual([tiny_runtime.prepare(image)], [VisualRequest([], [obj])], THRESHOLDS)
        [found] = result.objects
        assert len(found) == 1 and found.masks.any(), "one non-empty mask per object"
        assert_matches_oracle(found, oracle.object(image, obj, 0), f"image {index} {kind}")


def test_a_batch_mixing_every_kind_over_several_images_equals_one_call_per_prompt(
    tiny_runtime: Sam3Runtime, oracle: VisualOracle, scenes: list[Image.Image]
) -> None:
    requests = []
    for index, image in enumerate(scenes):
        prompts: list[PromptSpec] = ["cat", *list(concept_kinds(image).values())[index % 3 :]]
        requests.append(VisualRequest(prompts, list(object_kinds(image).values())[: 1 + index % 3]))
    results = tiny_runtime.segment_visual([tiny_runtime.prepare(image) for image in scenes], requests, THRESHOLDS)

    for index, (image, request, result) in enumerate(zip(scenes, requests, results, strict=True)):
        assert len(result.concepts) == len(request.prompts) and len(result.objects) == len(request.objects)
        for j, prompt in enumerate(request.prompts):
            expected = oracle.concept(image, prompt, j, THRESHOLDS)
            assert_matches_oracle(result.concepts[j], expected, f"image {index} prompt {j}")
        for k, obj in enumerate(request.objects):
            assert_matches_oracle(result.objects[k], oracle.object(image, obj, k), f"image {index} object {k}")
    assert results[1].concepts[1].prompt == "exemplar:1", "a prompt of boxes alone is named by its index"


def test_the_tracker_reuses_the_detectors_vision_pass_and_gets_its_own_embeddings_exactly(
    tiny_runtime: Sam3Runtime, scenes: list[Image.Image]
) -> None:
    tracker = tiny_runtime.visual.tracker()
    assert tiny_runtime.visual.shares_vision, "the tiny tracker's ViT is the detector's, as in facebook/sam3"
    pixels = tiny_runtime._stack([tiny_runtime.prepare(image) for image in scenes])
    with torch.inference_mode():
        shared = embeddings_from_detector(tracker, tiny_runtime.model.get_vision_features(pixel_values=pixels))
        own = embeddings_from_pixels(tracker, pixels)
    assert [s.shape for s in shared] == [o.shape for o in own]
    for level, (s, o) in enumerate(zip(shared, own, strict=True)):
        torch.testing.assert_close(s, o, rtol=1e-5, atol=1e-5, msg=f"level {level}")


def test_tiny_random_includes_a_tracker_beside_the_detector(tmp_path: Path) -> None:
    tracker = resolve_tracker(TINY_RANDOM, tmp_path)
    assert isinstance(tracker, Path) and tracker.name == TRACKER_SUBDIR
    assert (tracker / "config.json").is_file() and (tracker / "model.safetensors").is_file()
    assert resolve_tracker("facebook/sam3", tmp_path) == "facebook/sam3", "hub checkpoints hold both models"
    detector_only = tmp_path / "detector-only"
    detector_only.mkdir()
    (detector_only / "config.json").write_text('{"model_type": "sam3"}')
    assert resolve_tracker(str(detector_only), tmp_path) is None, "never a tracker built from a detector config"
