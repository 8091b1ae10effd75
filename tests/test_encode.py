"""Mask encoders: COCO RLE round-trips exactly, PNG masks and masked images keep what they should."""

from __future__ import annotations

import io
import json

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from sam3_batch.contracts.schemas import RLE
from sam3_batch.worker.encode import (
    box_xyxy_to_xywh,
    decode_rle,
    encode_masked_image,
    encode_png_mask,
    encode_rle,
    encode_rle_batch,
    rle_area,
    union_of,
)

Mask = npt.NDArray[np.bool_]
SHAPES = [(1, 1), (37, 53), (53, 37), (480, 640)]  # (H, W); non-square both ways


def _random_masks(n: int, shape: tuple[int, int], seed: int) -> Mask:
    rng = np.random.default_rng(seed)
    density = rng.uniform(0.05, 0.95, size=(n, 1, 1))
    masks: Mask = rng.random((n, *shape)) < density
    return masks


def _blob(shape: tuple[int, int], box: tuple[int, int, int, int]) -> Mask:
    """A filled ellipse inside box (x0, y0, x1, y1): the shape of a typical instance mask."""
    height, width = shape
    x0, y0, x1, y1 = box
    ys, xs = np.mgrid[0:height, 0:width]
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    inside: Mask = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1.0
    return inside


def _photo(shape: tuple[int, int]) -> Image.Image:
    height, width = shape
    ys, xs = np.mgrid[0:height, 0:width]
    rgb = np.stack([xs * 255 // width, ys * 255 // height, np.full_like(xs, 180)], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


@pytest.mark.parametrize("shape", SHAPES)
def test_rle_round_trips_random_masks_exactly(shape: tuple[int, int]) -> None:
    for mask in _random_masks(4, shape, seed=shape[0] * 1000 + shape[1]):
        rle = encode_rle(mask)
        assert isinstance(rle, RLE)
        assert rle.size == shape  # COCO order: (height, width)
        decoded = decode_rle(rle)
        assert decoded.dtype == np.bool_
        assert np.array_equal(decoded, mask)


@pytest.mark.parametrize("fill", [False, True])
def test_empty_and_full_masks_round_trip_with_area_zero_and_everything(fill: bool) -> None:
    mask = np.full((30, 70), fill, dtype=bool)
    rle = encode_rle(mask)
    assert np.array_equal(decode_rle(rle), mask)
    assert rle_area(rle) == (30 * 70 if fill else 0)


@pytest.mark.parametrize("shape", SHAPES)
def test_rle_area_equals_the_number_of_pixels_set(shape: tuple[int, int]) -> None:
    for mask in _random_masks(3, shape, seed=7):
        area = rle_area(encode_rle(mask))
        assert isinstance(area, int)
        assert area == int(mask.sum())


def test_rle_counts_is_a_string_that_survives_json_and_pycocotools() -> None:
    mask = _blob((120, 90), (10, 20, 70, 100))
    rle = encode_rle(mask)
    assert isinstance(rle.counts, str)
    # What a consumer of the metadata JSON does: load it and hand the dict to pycocotools as is.
    loaded = json.loads(rle.model_dump_json())
    assert np.array_equal(mask_utils.decode(loaded).astype(bool), mask)


def test_batch_encoder_equals_the_single_encoder() -> None:
    masks = _random_masks(6, (45, 61), seed=3)
    assert encode_rle_batch(masks) == [encode_rle(mask) for mask in masks]


def test_batch_encoder_accepts_views_that_are_not_contiguous() -> None:
    masks = _random_masks(5, (40, 40), seed=11)
    transposed = masks.transpose(0, 2, 1)
    assert encode_rle_batch(transposed) == [encode_rle(np.ascontiguousarray(m)) for m in transposed]


def test_batch_encoder_of_no_masks_is_an_empty_list() -> None:
    assert encode_rle_batch(np.zeros((0, 12, 9), dtype=bool)) == []


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.zeros((4, 5), dtype=np.uint8), "mask must be bool, got uint8"),
        (np.zeros((2, 4, 5), dtype=bool), r"mask must be a \(H, W\) array, got \(2, 4, 5\)"),
    ],
)
def test_single_encoder_rejects_masks_of_the_wrong_type_or_shape(bad: Mask, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode_rle(bad)


def test_batch_encoder_rejects_a_single_mask() -> None:
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        encode_rle_batch(np.zeros((4, 5), dtype=bool))


def test_box_xyxy_becomes_coco_xywh() -> None:
    assert box_xyxy_to_xywh((10.0, 20.0, 30.5, 60.0)) == (10.0, 20.0, 20.5, 40.0)
    assert box_xyxy_to_xywh(np.array([1, 2, 4, 8], dtype=np.float32)) == (1.0, 2.0, 3.0, 6.0)
    with pytest.raises(ValueError, match="4 values"):
        box_xyxy_to_xywh((1.0, 2.0, 3.0))


def test_union_of_masks_is_their_pixelwise_or() -> None:
    masks = _random_masks(3, (20, 30), seed=5)
    assert np.array_equal(union_of(masks), masks[0] | masks[1] | masks[2])


def test_union_of_no_masks_is_all_false_at_the_image_size() -> None:
    union = union_of(np.zeros((0, 20, 30), dtype=bool))
    assert union.shape == (20, 30)
    assert union.dtype == np.bool_
    assert not union.any()


@pytest.mark.parametrize("shape", SHAPES)
def test_png_mask_decodes_back_to_the_same_mask(shape: tuple[int, int]) -> None:
    for mask in _random_masks(2, shape, seed=17):
        decoded = Image.open(io.BytesIO(encode_png_mask(mask)))
        assert decoded.format == "PNG"
        assert decoded.size == (shape[1], shape[0])
        assert np.array_equal(np.asarray(decoded.convert("1")), mask)


def test_png_mask_of_a_typical_instance_is_one_bit_and_small() -> None:
    mask = _blob((600, 800), (100, 50, 500, 450))
    data = encode_png_mask(mask)
    assert Image.open(io.BytesIO(data)).mode == "1"
    assert len(data) < mask.size // 8 // 10  # well under a tenth of the raw bit-packed size


def test_masked_png_is_transparent_outside_the_mask_and_original_inside() -> None:
    shape = (90, 120)
    image = _photo(shape)
    mask = _blob(shape, (20, 10, 100, 80))
    decoded = Image.open(io.BytesIO(encode_masked_image(image, mask, "png")))
    assert decoded.mode == "RGBA"
    rgba = np.asarray(decoded)
    assert np.all(rgba[..., 3][~mask] == 0)
    assert np.all(rgba[..., 3][mask] == 255)
    assert np.array_equal(rgba[..., :3][mask], np.asarray(image)[mask])
    assert not rgba[..., :3][~mask].any()  # hidden pixels do not leak through the colour planes


def test_masked_jpg_is_black_outside_the_mask() -> None:
    shape = (160, 200)
    image = _photo(shape)
    mask = np.zeros(shape, dtype=bool)
    mask[40:120, 48:152] = True
    decoded = Image.open(io.BytesIO(encode_masked_image(image, mask, "jpg")))
    assert decoded.format == "JPEG"
    assert decoded.size == image.size
    pixels = np.asarray(decoded.convert("RGB")).astype(np.int16)
    original = np.asarray(image).astype(np.int16)
    far_outside = np.ones(shape, dtype=bool)
    far_outside[32:128, 40:160] = False  # JPEG rings for a few pixels around the mask edge
    assert pixels[far_outside].max() <= 8
    assert np.abs(pixels[48:112, 56:144] - original[48:112, 56:144]).mean() < 3


def test_masked_image_of_an_empty_union_hides_everything() -> None:
    image = _photo((30, 40))
    rgba = np.asarray(Image.open(io.BytesIO(encode_masked_image(image, np.zeros((30, 40), bool), "png"))))
    assert not rgba.any()


def test_masked_image_rejects_a_mask_of_another_size() -> None:
    with pytest.raises(ValueError, match="mask is 40x30"):
        encode_masked_image(_photo((31, 40)), np.zeros((30, 40), dtype=bool), "png")


def test_masked_image_rejects_an_unknown_format() -> None:
    with pytest.raises(ValueError, match="output_format"):
        encode_masked_image(_photo((3, 4)), np.ones((3, 4), dtype=bool), "gif")  # type: ignore[arg-type]
