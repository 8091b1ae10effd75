"""The masked image, both renderings, checked pixel by pixel: overlay (as apply_mask) and cut-out."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from sam3_batch.contracts.layout import OutputLayout
from sam3_batch.contracts.schemas import JobSpec, OutputOptions, WorkItem
from sam3_batch.contracts.settings import Settings
from sam3_batch.contracts.storage import Storage
from sam3_batch.worker.detections import PromptDetections
from sam3_batch.worker.encode import OVERLAY_ALPHA, encode_overlay_image, overlay_colour
from sam3_batch.worker.writer import WriteRequest, write_image_outputs

Mask = npt.NDArray[np.bool_]
SHAPE = (40, 60)  # (H, W)


def _photo() -> Image.Image:
    rng = np.random.default_rng(7)
    return Image.fromarray(rng.integers(0, 256, size=(*SHAPE, 3), dtype=np.uint8))


def _box(x0: int, y0: int, x1: int, y1: int) -> Mask:
    mask = np.zeros(SHAPE, dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _blend(pixels: npt.NDArray[np.uint8], *colours: tuple[int, int, int]) -> npt.NDArray[np.uint8]:
    """The oracle: (1 - a) * pixel + a * colour for each colour in turn, rounded to the nearest integer once."""
    blended = pixels.astype(np.float64)
    for colour in colours:
        blended = (1 - OVERLAY_ALPHA) * blended + OVERLAY_ALPHA * np.array(colour, np.float64)
    return np.rint(blended).astype(np.uint8)


def test_overlay_blends_each_prompt_in_its_own_colour_and_leaves_the_rest_untouched() -> None:
    image = _photo()
    original = np.asarray(image)
    dog_a, dog_b, cat = _box(0, 0, 20, 20), _box(10, 10, 30, 30), _box(40, 5, 55, 35)
    masks = [np.stack([dog_a, dog_b]), cat[None]]

    pixels = np.asarray(Image.open(io.BytesIO(encode_overlay_image(image, masks, "png"))))

    dogs = dog_a | dog_b
    outside = ~(dogs | cat)
    assert overlay_colour(0) != overlay_colour(1)
    assert np.array_equal(pixels[outside], original[outside])
    # overlapping instances of one prompt are blended once, not twice
    assert np.array_equal(pixels[dogs], _blend(original[dogs], overlay_colour(0)))
    assert np.array_equal(pixels[cat], _blend(original[cat], overlay_colour(1)))


def test_overlay_draws_a_later_prompt_over_an_earlier_one() -> None:
    image = _photo()
    original = np.asarray(image)
    first, second = _box(0, 0, 30, 30), _box(20, 20, 50, 40)
    both = first & second

    pixels = np.asarray(Image.open(io.BytesIO(encode_overlay_image(image, [first[None], second[None]], "png"))))

    assert np.array_equal(pixels[both], _blend(original[both], overlay_colour(0), overlay_colour(1)))


def test_overlay_rejects_masks_of_another_size() -> None:
    with pytest.raises(ValueError, match="masks are 60x39"):
        encode_overlay_image(_photo(), [np.zeros((1, 39, 60), dtype=bool)], "png")


def _write(tmp_path: Path, style: str) -> Image.Image:
    """Write one image's outputs through the real writer with the given rendering; the masked PNG read back."""
    image = _photo()
    spec = JobSpec(job_id="job1", prompts=["dog", "cat"], output_root=str(tmp_path),
                   outputs=OutputOptions(masked_image=True, masked_style=style, output_format="png"))  # type: ignore[arg-type]
    detections = [
        PromptDetections("dog", 0.9, np.array([0.8], np.float32), np.array([[0, 0, 20, 20]], np.float32),
                         _box(0, 0, 20, 20)[None]),
        PromptDetections("cat", 0.7, np.array([0.6], np.float32), np.array([[40, 5, 55, 35]], np.float32),
                         _box(40, 5, 55, 35)[None]),
    ]
    item = WorkItem(uri="in/photo.png", out_key="photo.png")
    job = WriteRequest.of_image(spec, "c0", item, image, detections, {})
    metadata = write_image_outputs(job, Storage(Settings()))
    assert metadata.masked_image == OutputLayout(str(tmp_path), "photo.png").masked_image_uri("png")
    return Image.open(metadata.masked_image)


def test_writer_renders_the_overlay_when_asked(tmp_path: Path) -> None:
    original = np.asarray(_photo())
    dog, cat = _box(0, 0, 20, 20), _box(40, 5, 55, 35)

    rendered = _write(tmp_path, "overlay")

    pixels = np.asarray(rendered)
    assert rendered.mode == "RGB"
    assert np.array_equal(pixels[dog], _blend(original[dog], overlay_colour(0)))
    assert np.array_equal(pixels[cat], _blend(original[cat], overlay_colour(1)))
    assert np.array_equal(pixels[~(dog | cat)], original[~(dog | cat)])


def test_writer_renders_the_cutout_by_default(tmp_path: Path) -> None:
    original = np.asarray(_photo())
    union = _box(0, 0, 20, 20) | _box(40, 5, 55, 35)

    rendered = _write(tmp_path, "cutout")

    rgba = np.asarray(rendered)
    assert rendered.mode == "RGBA" and OutputOptions().masked_style == "cutout"
    assert np.array_equal(rgba[..., :3][union], original[union]) and np.all(rgba[..., 3][union] == 255)
    assert not rgba[~union].any()
