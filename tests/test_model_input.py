"""What a loader hands the model: big JPEGs decoded at draft scale with their full size kept, and 8-bit pixels
that the device finishes exactly as the processor would have on the host."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sam3_batch.contracts.schemas import Thresholds, WorkItem
from sam3_batch.contracts.settings import Settings
from sam3_batch.worker.decode import decode_for_model, decode_image
from sam3_batch.worker.io_stages import LoadedImage, LoaderSetup, load_image
from sam3_batch.worker.model_input import PreparedImage
from sam3_batch.worker.runtime import Sam3Runtime
from tests.fixtures.model import SCENE_SIZES_HW, assert_same_detections, scene_image

MAX_PIXELS = 50_000_000
ORIENTATION_TAG = 0x0112


def _jpeg(image: Image.Image, orientation: int | None = None) -> bytes:
    exif = Image.Exif()
    if orientation is not None:
        exif[ORIENTATION_TAG] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92, exif=exif.tobytes())
    return buffer.getvalue()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_large_jpeg_is_decoded_at_the_smallest_draft_scale_still_covering_the_model_input() -> None:
    data = _jpeg(scene_image((1200, 1600)))

    found = decode_for_model(data, max_pixels=MAX_PIXELS, at_least_wh=(224, 224))

    # 1/4 scale (400x300) is the last one that still has 224 pixels each way; 1/8 (200x150) would not.
    assert found.image.size == (400, 300)
    assert found.size_wh == (1600, 1200)
    full = decode_image(data, max_pixels=MAX_PIXELS).resize((400, 300), Image.Resampling.BOX)
    difference = np.abs(np.asarray(found.image, dtype=np.int16) - np.asarray(full, dtype=np.int16))
    assert difference.mean() < 3.0  # the same picture, decoded small


def test_draft_decoding_keeps_exif_orientation_and_reports_the_upright_full_size() -> None:
    stored = scene_image((1200, 1600))  # landscape as stored; orientation 6 shows it as portrait
    data = _jpeg(stored, orientation=6)

    found = decode_for_model(data, max_pixels=MAX_PIXELS, at_least_wh=(224, 224))

    assert found.size_wh == (1200, 1600)
    assert found.image.size == (300, 400)
    upright = decode_image(data, max_pixels=MAX_PIXELS).resize((300, 400), Image.Resampling.BOX)
    difference = np.abs(np.asarray(found.image, dtype=np.int16) - np.asarray(upright, dtype=np.int16))
    assert difference.mean() < 3.0


@pytest.mark.parametrize("encode", [_png, lambda image: _jpeg(image)], ids=["png", "small-jpeg"])
def test_images_that_cannot_or_need_not_be_reduced_are_decoded_whole(encode: object) -> None:
    image = scene_image((300, 400))
    assert callable(encode)

    found = decode_for_model(encode(image), max_pixels=MAX_PIXELS, at_least_wh=(224, 224))

    assert found.image.size == found.size_wh == (400, 300)


def test_the_pixel_limit_still_applies_to_draft_decoding() -> None:
    from sam3_batch.contracts.errors import BadImageError

    with pytest.raises(BadImageError, match="too large"):
        decode_for_model(_jpeg(scene_image((1200, 1600))), max_pixels=1_000_000, at_least_wh=(224, 224))


def test_a_loaded_draft_decoded_image_keeps_its_full_size_for_the_masks(
    tiny_runtime: Sam3Runtime, tmp_path: Path
) -> None:
    path = tmp_path / "big.jpg"
    path.write_bytes(_jpeg(scene_image((1200, 1600)), orientation=6))
    loader = LoaderSetup(Settings(), tiny_runtime.preparer)(False)
    item = WorkItem(uri=str(path), out_key="big")

    loaded = load_image(loader, item, False, None)
    with_pixels = load_image(loader, item, True, None)

    assert isinstance(loaded, LoadedImage) and isinstance(with_pixels, LoadedImage)
    assert loaded.size_wh == with_pixels.size_wh == (1200, 1600)
    assert loaded.prepared.original_size_hw == (1600, 1200)
    assert with_pixels.rgb is not None and with_pixels.rgb.shape == (1600, 1200, 3)  # full pixels when kept
    assert set(loaded.cpu_ms) == {"download", "decode", "preprocess"}
    [found] = tiny_runtime.segment([loaded.prepared], [["cat"]], Thresholds(score=0.0, mask=0.5))[0]
    assert found.masks.shape[1:] == (1600, 1200)


def test_uint8_hand_off_is_normalised_on_the_device_to_exactly_the_processors_pixels(
    tiny_runtime: Sam3Runtime,
) -> None:
    normalized = replace(tiny_runtime.preparer, hand_off="normalized")
    for variant, size_hw in enumerate(SCENE_SIZES_HW):
        image = scene_image(size_hw, variant)
        handed = tiny_runtime.preparer(image)

        assert handed.pixel_values.dtype == torch.uint8
        assert handed.original_size_hw == size_hw
        expected = normalized(image).pixel_values
        assert torch.equal(tiny_runtime._stack([handed])[0], expected)


def test_8_bit_pixels_in_either_memory_layout_become_one_contiguous_batch_of_the_processors_pixels(
    tiny_runtime: Sam3Runtime,
) -> None:
    normalized = replace(tiny_runtime.preparer, hand_off="normalized")
    image = scene_image(SCENE_SIZES_HW[0], 0)
    handed = tiny_runtime.preparer(image).pixel_values
    assert handed.permute(1, 2, 0).is_contiguous()  # the resize leaves height x width x channel in memory
    rows = [handed, handed.contiguous()]  # and a loader that handed over channel planes

    batch = tiny_runtime._stack([PreparedImage(pixels, SCENE_SIZES_HW[0]) for pixels in rows])

    assert batch.is_contiguous()
    expected = normalized(image).pixel_values
    assert torch.equal(batch[0], expected) and torch.equal(batch[1], expected)


@pytest.mark.parametrize("hand_off", ["uint8", "normalized"])
def test_pixels_staged_before_the_models_turn_give_what_segment_gives(tiny_runtime: Sam3Runtime, hand_off: str) -> None:
    preparer = replace(tiny_runtime.preparer, hand_off=hand_off)
    images = [preparer(scene_image(size_hw, variant)) for variant, size_hw in enumerate(SCENE_SIZES_HW)]
    prompts = [["cat", "dog"]] * len(images)
    thresholds = Thresholds(score=0.0, mask=0.5)

    staged = tiny_runtime.stage(images)
    found = tiny_runtime.start_segment(images, prompts, thresholds, "full", staged)()

    assert staged.shape[0] == len(images)
    expected = tiny_runtime.segment(images, prompts, thresholds)
    for per_image, expected_per_image in zip(found, expected, strict=True):
        for got, want in zip(per_image, expected_per_image, strict=True):
            assert_same_detections(got, want)


def test_segmenting_uint8_hand_offs_equals_segmenting_the_processors_pixels(tiny_runtime: Sam3Runtime) -> None:
    scenes = [scene_image(size_hw, variant) for variant, size_hw in enumerate(SCENE_SIZES_HW)]
    normalized = replace(tiny_runtime.preparer, hand_off="normalized")
    thresholds, prompts = Thresholds(score=0.0, mask=0.5), [["cat", "a red car"]] * len(scenes)

    handed = tiny_runtime.segment([tiny_runtime.preparer(s) for s in scenes], prompts, thresholds)
    expected = tiny_runtime.segment([normalized(s) for s in scenes], prompts, thresholds)

    compared = 0
    for i, (ours, theirs) in enumerate(zip(handed, expected, strict=True)):
        for j, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            assert_same_detections(a, b, f"image {i} prompt {j}")
            compared += len(a)
    assert compared > 0


def test_8_bit_pixels_not_at_the_model_input_size_are_refused_with_the_sizes_named(
    tiny_runtime: Sam3Runtime,
) -> None:
    odd = replace(tiny_runtime.preparer(scene_image((300, 400))), pixel_values=torch.zeros(3, 100, 120,
                                                                                             dtype=torch.uint8))

    with pytest.raises(ValueError, match=r"input size \(224, 224\), got \(100, 120\)"):
        tiny_runtime._stack([odd])
