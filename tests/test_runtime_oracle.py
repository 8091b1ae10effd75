"""The resident runtime gives exactly what a plain transformers SAM 3 call gives, only faster."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Sam3Model, Sam3Processor

from bench.common import bare_forward
from sam3_batch.contracts.schemas import Thresholds
from sam3_batch.worker.detections import PromptDetections
from sam3_batch.worker.runtime import PreparedImage, Sam3Runtime
from sam3_batch.worker.tiny_model import (
    TINY_RANDOM,
    build_checkpoint,
    build_tiny_checkpoint,
    build_tokenizer,
    resolve_model,
)
from tests.fixtures.model import BATCHED_MASK_TOLERANCE, SCENE_SIZES_HW, assert_same_detections, scene_image

PROMPTS = ("cat", "a red car", "person on a bicycle", "blue sky")
# Random weights score every query at ~0.05-0.25: these keep all, some, and a few of them.
THRESHOLDS = (Thresholds(score=0.0, mask=0.5), Thresholds(score=0.1, mask=0.3), Thresholds(score=0.15, mask=0.7))

Oracle = Callable[[int, str, Thresholds], PromptDetections]


@pytest.fixture(scope="module")
def scenes() -> list[Image.Image]:
    return [scene_image(size, variant) for variant, size in enumerate(SCENE_SIZES_HW)]


@pytest.fixture(scope="module")
def oracle(tiny_checkpoint: Path, scenes: list[Image.Image]) -> Oracle:
    """SAM 3 the documented way: processor + model + post_process_instance_segmentation, one pair at a time.

    Called with a scene's index; the model's raw outputs are kept per (scene, prompt) across thresholds.
    """
    model: Any = Sam3Model.from_pretrained(tiny_checkpoint, attn_implementation="sdpa")
    model.eval()
    processor: Any = Sam3Processor.from_pretrained(tiny_checkpoint)
    raw_outputs: dict[tuple[int, str], Any] = {}

    def run(index: int, prompt: str, thresholds: Thresholds) -> PromptDetections:
        if (index, prompt) not in raw_outputs:
            inputs = processor(images=scenes[index], text=prompt, return_tensors="pt")
            with torch.inference_mode():
                raw_outputs[index, prompt] = model(**inputs)
        outputs = raw_outputs[index, prompt]
        size_hw = (scenes[index].height, scenes[index].width)
        found = processor.post_process_instance_segmentation(
            outputs, threshold=thresholds.score, mask_threshold=thresholds.mask, target_sizes=[size_hw]
        )[0]
        masks = found["masks"].numpy().astype(bool)
        return PromptDetections(
            prompt=prompt,
            presence_score=float(outputs.presence_logits.sigmoid()[0, 0]),
            scores=found["scores"].numpy(),
            boxes_xyxy=found["boxes"].numpy(),
            masks=masks if len(masks) else np.zeros((0, *size_hw), dtype=bool),
        )

    return run


def _pairs(images: list[Any], prompt_lists: list[list[str]]) -> Iterator[tuple[int, int, str]]:
    for i, _ in enumerate(images):
        for j, prompt in enumerate(prompt_lists[i]):
            yield i, j, prompt


@pytest.mark.parametrize("thresholds", THRESHOLDS, ids=lambda t: f"score{t.score}-mask{t.mask}")
def test_one_image_one_prompt_equals_the_plain_transformers_call(
    tiny_runtime: Sam3Runtime, oracle: Oracle, scenes: list[Image.Image], thresholds: Thresholds
) -> None:
    compared = 0
    for index, image in enumerate(scenes):
        for prompt in PROMPTS[:2]:
            found = tiny_runtime.segment([tiny_runtime.prepare(image)], [[prompt]], thresholds)[0][0]
            assert_same_detections(found, oracle(index, prompt, thresholds), f"image {index} {prompt!r}")
            compared += len(found)
    assert compared > 0, "no instances passed the thresholds: the comparison would prove nothing"


@pytest.mark.parametrize("thresholds", THRESHOLDS, ids=lambda t: f"score{t.score}-mask{t.mask}")
def test_batch_of_images_with_their_own_prompts_equals_the_plain_transformers_call(
    tiny_runtime: Sam3Runtime, oracle: Oracle, scenes: list[Image.Image], thresholds: Thresholds
) -> None:
    prompt_lists = [list(PROMPTS[: 1 + i % len(PROMPTS)]) for i in range(len(scenes))]
    prepared = [tiny_runtime.prepare(image) for image in scenes]
    results = tiny_runtime.segment(prepared, prompt_lists, thresholds)

    assert [len(per_image) for per_image in results] == [len(p) for p in prompt_lists]
    compared = 0
    for i, j, prompt in _pairs(scenes, prompt_lists):
        expected = oracle(i, prompt, thresholds)
        assert_same_detections(results[i][j], expected, f"image {i} {prompt!r}", BATCHED_MASK_TOLERANCE)
        compared += len(results[i][j])
    assert compared > 0


def test_batched_multi_prompt_call_equals_one_image_and_one_prompt_at_a_time(
    tiny_runtime: Sam3Runtime, scenes: list[Image.Image]
) -> None:
    thresholds = Thresholds(score=0.05, mask=0.5)
    prompt_lists = [list(PROMPTS), ["blue sky", "cat"], ["person on a bicycle"], list(PROMPTS[::-1]), ["cat"]]
    prepared = [tiny_runtime.prepare(image) for image in scenes]

    batched = tiny_runtime.segment(prepared, prompt_lists, thresholds)

    compared = 0
    for i, j, prompt in _pairs(prepared, prompt_lists):
        single = tiny_runtime.segment([prepared[i]], [[prompt]], thresholds)[0][0]
        assert_same_detections(batched[i][j], single, f"image {i} {prompt!r}", BATCHED_MASK_TOLERANCE)
        compared += len(single)
    assert compared > 0


def test_detections_are_at_the_original_image_size_with_float32_scores_and_a_presence_score(
    tiny_runtime: Sam3Runtime, scenes: list[Image.Image]
) -> None:
    results = tiny_runtime.segment(
        [tiny_runtime.prepare(image) for image in scenes], [["cat"]] * len(scenes), Thresholds(score=0.0)
    )

    for image, [found] in zip(scenes, results, strict=True):
        assert found.masks.shape == (5, image.height, image.width)  # the tiny model has 5 queries
        assert found.masks.dtype == np.bool_
        assert found.scores.dtype == np.float32 and found.boxes_xyxy.dtype == np.float32
        assert found.presence_score is not None and 0.0 < found.presence_score < 1.0
        assert np.all(found.scores <= found.presence_score)  # score = sigmoid(logit) * presence
        assert 0 < found.masks.sum() < found.masks.size


def test_score_threshold_keeps_exactly_the_instances_scoring_above_it(
    tiny_runtime: Sam3Runtime, scenes: list[Image.Image]
) -> None:
    prepared = [tiny_runtime.prepare(image) for image in scenes]
    everything = tiny_runtime.segment(prepared, [list(PROMPTS)] * len(prepared), Thresholds(score=0.0))
    all_scores = np.concatenate([found.scores for per_image in everything for found in per_image])
    cut = float(np.median(all_scores))

    filtered = tiny_runtime.segment(prepared, [list(PROMPTS)] * len(prepared), Thresholds(score=cut))

    for i, j, _ in _pairs(prepared, [list(PROMPTS)] * len(prepared)):
        keep = everything[i][j].scores > cut
        np.testing.assert_array_equal(filtered[i][j].scores, everything[i][j].scores[keep])
        np.testing.assert_array_equal(filtered[i][j].masks, everything[i][j].masks[keep])
    kept = sum(len(found) for per_image in filtered for found in per_image)
    assert 0 < kept < len(all_scores)


def test_a_higher_mask_threshold_gives_masks_inside_the_lower_thresholds_masks(
    tiny_runtime: Sam3Runtime, scenes: list[Image.Image]
) -> None:
    prepared = [tiny_runtime.prepare(image) for image in scenes[:2]]
    loose = tiny_runtime.segment(prepared, [["cat"], ["cat"]], Thresholds(score=0.0, mask=0.2))
    strict = tiny_runtime.segment(prepared, [["cat"], ["cat"]], Thresholds(score=0.0, mask=0.8))

    for [wide], [narrow] in zip(loose, strict, strict=True):
        assert not np.any(narrow.masks & ~wide.masks)
        assert narrow.masks.sum() < wide.masks.sum()


def test_text_embeddings_are_computed_once_per_prompt_for_the_life_of_the_runtime(
    tiny_checkpoint: Path, scenes: list[Image.Image], monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = Sam3Runtime.load(str(tiny_checkpoint), None, device="cpu")
    encoded: list[int] = []
    original = runtime.model.get_text_features

    def counting(*args: Any, **kwargs: Any) -> Any:
        encoded.append(kwargs["input_ids"].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(runtime.model, "get_text_features", counting)
    image = runtime.prepare(scenes[0])

    first = runtime.segment([image, image], [["cat", "dog"], ["dog"]], Thresholds(score=0.0))
    assert encoded == [2]  # both new prompts in one text-encoder call
    second = runtime.segment([image], [["dog", "cat", "tree"]], Thresholds(score=0.0))
    assert encoded == [2, 1]  # only "tree" was new
    runtime.segment([image], [["tree", "cat"]], Thresholds(score=0.0))
    assert encoded == [2, 1]
    assert_same_detections(second[0][1], first[0][0], "cached 'cat'", BATCHED_MASK_TOLERANCE)


def test_prepare_from_many_threads_equals_prepare_one_by_one(
    tiny_runtime: Sam3Runtime, scenes: list[Image.Image]
) -> None:
    sequential = [tiny_runtime.prepare(image) for image in scenes * 3]
    with ThreadPoolExecutor(6) as pool:
        threaded = list(pool.map(tiny_runtime.prepare, scenes * 3))

    for one, other in zip(sequential, threaded, strict=True):
        assert one.original_size_hw == other.original_size_hw
        assert torch.equal(one.pixel_values, other.pixel_values)
    assert sequential[1].pixel_values.shape == (3, 224, 224)
    assert sequential[1].original_size_hw == (300, 400)


def test_an_image_without_prompts_gets_no_detections_and_the_others_still_do(
    tiny_runtime: Sam3Runtime, scenes: list[Image.Image]
) -> None:
    prepared = [tiny_runtime.prepare(image) for image in scenes[:2]]
    results = tiny_runtime.segment(prepared, [[], ["cat"]], Thresholds(score=0.0))
    assert results[0] == [] and len(results[1][0]) == 5
    assert tiny_runtime.segment(prepared, [[], []], Thresholds()) == [[], []]


def test_a_prompt_longer_than_the_text_encoder_window_is_truncated_instead_of_failing(
    tiny_runtime: Sam3Runtime, scenes: list[Image.Image]
) -> None:
    long_prompt = "the small striped cat sleeping under a wooden garden chair beside the old brick wall"
    assert len(tiny_runtime.processor.tokenizer(long_prompt)["input_ids"]) > 32
    [[found]] = tiny_runtime.segment([tiny_runtime.prepare(scenes[0])], [[long_prompt]], Thresholds(score=0.0))
    assert found.prompt == long_prompt and len(found) == 5


def test_mismatched_images_and_prompt_lists_are_refused(tiny_runtime: Sam3Runtime) -> None:
    image = PreparedImage(pixel_values=torch.zeros(3, 224, 224), original_size_hw=(224, 224))
    with pytest.raises(ValueError, match="2 images but 1 prompt lists"):
        tiny_runtime.segment([image, image], [["cat"]], Thresholds())


def test_tiny_checkpoint_is_deterministic_for_a_seed_and_differs_across_seeds(tmp_path: Path) -> None:
    first = build_tiny_checkpoint(tmp_path / "a", seed=3)
    again = build_tiny_checkpoint(tmp_path / "b", seed=3)
    other = build_tiny_checkpoint(tmp_path / "c", seed=4)

    weights = "model.safetensors"
    assert (first / weights).read_bytes() == (again / weights).read_bytes()
    assert (first / weights).read_bytes() != (other / weights).read_bytes()
    assert Sam3Processor.from_pretrained(first).image_processor.size["height"] == 224


def test_tiny_tokenizer_encodes_any_english_prompt_without_unknown_tokens() -> None:
    tokenizer = build_tokenizer()
    ids = tokenizer("A café's 2 red cars, parked (badly) near the zebra-crossing!")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids[1:-1]
    assert all(0 <= i < len(tokenizer) for i in ids)
    assert len(tokenizer("a red car")["input_ids"]) == 5  # common words are single tokens


def test_tiny_random_resolves_to_a_checkpoint_built_once_and_other_ids_pass_through(tmp_path: Path) -> None:
    path = Path(resolve_model(TINY_RANDOM, tmp_path))
    built_at = (path / "model.safetensors").stat().st_mtime_ns

    assert Path(resolve_model(TINY_RANDOM, tmp_path)) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == built_at
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no staging leftovers
    config: Any = Sam3Model.from_pretrained(path).config
    assert config.detr_decoder_config.num_queries == 5
    assert resolve_model("facebook/sam3", tmp_path) == "facebook/sam3"


def test_a_bench_sized_checkpoint_with_the_full_models_feature_pyramid_segments_at_full_size(tmp_path: Path) -> None:
    path = build_checkpoint(
        tmp_path / "bench", hidden=48, layers=2, image_size=224, num_queries=7, scale_factors=(4.0, 2.0, 1.0, 0.5)
    )
    runtime = Sam3Runtime.load(str(path), None, device="cpu")
    image = scene_image((300, 400))

    [[found]] = runtime.segment([runtime.prepare(image)], [["cat"]], Thresholds(score=0.0))

    assert found.masks.shape == (7, 300, 400)
    bare_forward(runtime, [runtime.prepare(image)] * 2, "cat")  # the bench's ceiling runs on it too


@pytest.mark.parametrize(
    "shape",
    [{"hidden": 40}, {"image_size": 225}, {"scale_factors": (3.0, 1.0)}, {"layers": 0}],
    ids=["hidden-not-multiple-of-16", "image-not-multiple-of-patch", "unknown-scale", "no-layers"],
)
def test_checkpoint_shapes_the_model_cannot_run_are_refused(tmp_path: Path, shape: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must be"):
        build_checkpoint(tmp_path / "bad", **shape)
    assert not (tmp_path / "bad").exists()
