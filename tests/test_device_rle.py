"""RLE, area and bbox computed with torch (on the masks' device) equal pycocotools' byte for byte."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
import torch
from pycocotools import mask as mask_utils

from sam3_batch.worker.device_rle import mask_codes, pack_bits
from sam3_batch.worker.encode import encode_rle_batch, rle_area, rle_bbox, rles_from_runs, unpack_masks

Masks = npt.NDArray[np.bool_]


def _random_masks(n: int, shape: tuple[int, int], seed: int) -> Masks:
    rng = np.random.default_rng(seed)
    density = rng.uniform(0.01, 0.99, size=(n, 1, 1))
    masks: Masks = rng.random((n, *shape)) < density
    return masks


def _blobs(n: int, shape: tuple[int, int], seed: int) -> Masks:
    """Masks shaped like objects (long runs), as SAM 3 gives them, some touching the image edges."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[: shape[0], : shape[1]]
    masks = np.zeros((n, *shape), dtype=bool)
    for k in range(n):
        cy, cx = rng.uniform(-0.2, 1.2) * shape[0], rng.uniform(-0.2, 1.2) * shape[1]
        ry, rx = rng.uniform(0.05, 0.8) * shape[0] + 1, rng.uniform(0.05, 0.8) * shape[1] + 1
        masks[k] = ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 < 1
    return masks


def _on_device(masks: Masks) -> tuple[list[tuple[str, int, tuple[float, ...]]], list[int]]:
    """(counts string, area, bbox) per mask as the device path gives them, and the run counts."""
    codes = mask_codes(torch.from_numpy(masks))
    rles = rles_from_runs(codes.runs.numpy(), codes.run_counts.numpy(), masks.shape[1:])
    found = [
        (rle.counts, int(area), tuple(float(v) for v in box))
        for rle, area, box in zip(rles, codes.areas.tolist(), codes.bboxes_xywh.tolist(), strict=True)
    ]
    assert all(rle.size == masks.shape[1:] for rle in rles)
    return found, codes.run_counts.tolist()


def _by_pycocotools(masks: Masks) -> list[tuple[str, int, tuple[float, ...]]]:
    return [(rle.counts, rle_area(rle), rle_bbox(rle)) for rle in encode_rle_batch(masks)]


def _corner_pixels(shape: tuple[int, int]) -> Masks:
    height, width = shape
    masks = np.zeros((4, height, width), dtype=bool)
    for k, (y, x) in enumerate([(0, 0), (0, width - 1), (height - 1, 0), (height - 1, width - 1)]):
        masks[k, y, x] = True
    return masks


@pytest.mark.parametrize("shape", [(1, 1), (1, 17), (23, 1), (2, 3), (37, 29), (64, 48), (101, 203)])
def test_device_rle_equals_pycocotools_on_random_and_object_shaped_masks(shape: tuple[int, int]) -> None:
    seed = shape[0] * 1000 + shape[1]
    masks = np.concatenate([_random_masks(5, shape, seed), _blobs(5, shape, seed)])
    assert _on_device(masks)[0] == _by_pycocotools(masks)


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1), (5, 7), (480, 640)])
def test_all_zero_and_all_one_masks_give_pycocotools_counts_area_and_box(shape: tuple[int, int]) -> None:
    masks = np.stack([np.zeros(shape, dtype=bool), np.ones(shape, dtype=bool)])
    found, run_counts = _on_device(masks)
    assert found == _by_pycocotools(masks)
    assert run_counts == [1, 2]  # all zeros: one run; all ones: an empty run of zeros, then the ones
    assert found[0][1:] == (0, (0.0, 0.0, 0.0, 0.0))
    assert found[1][1:] == (shape[0] * shape[1], (0.0, 0.0, float(shape[1]), float(shape[0])))


@pytest.mark.parametrize("shape", [(1, 1), (1, 6), (6, 1), (3, 4), (31, 17)])
def test_a_single_pixel_at_each_corner_is_encoded_like_pycocotools(shape: tuple[int, int]) -> None:
    masks = _corner_pixels(shape)
    found = _on_device(masks)[0]
    assert found == _by_pycocotools(masks)
    assert [area for _, area, _ in found] == [1, 1, 1, 1]


def test_masks_of_many_sizes_in_one_call_keep_their_own_runs() -> None:
    # Masks with very different run counts side by side: each one's runs land in its own slots.
    masks = np.stack([np.zeros((30, 20), bool), _random_masks(1, (30, 20), 1)[0], np.ones((30, 20), bool),
                      _corner_pixels((30, 20))[3], _blobs(1, (30, 20), 2)[0]])
    assert _on_device(masks)[0] == _by_pycocotools(masks)


def test_no_masks_give_no_rles() -> None:
    codes = mask_codes(torch.zeros((0, 12, 9), dtype=torch.bool))
    assert rles_from_runs(codes.runs.numpy(), codes.run_counts.numpy(), (12, 9)) == []
    assert codes.areas.shape == (0,) and codes.bboxes_xywh.shape == (0, 4)


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (3, 5), (8, 8), (37, 29)])
def test_bit_packed_masks_unpack_to_the_same_masks_with_8x_fewer_bytes(shape: tuple[int, int]) -> None:
    masks = np.concatenate([_random_masks(3, shape, 5), _corner_pixels(shape)])
    packed = pack_bits(torch.from_numpy(masks)).numpy()
    np.testing.assert_array_equal(packed, np.packbits(masks.reshape(len(masks), -1), axis=1))
    np.testing.assert_array_equal(unpack_masks(packed, shape), masks)
    assert packed.shape[1] == -(-shape[0] * shape[1] // 8)


def test_unpacking_rejects_bytes_that_do_not_fit_the_size() -> None:
    with pytest.raises(ValueError, match=r"must be \(N, 2\) uint8"):
        unpack_masks(np.zeros((1, 3), dtype=np.uint8), (3, 5))


def test_non_bool_masks_are_refused_with_their_shape_and_dtype() -> None:
    with pytest.raises(ValueError, match="bool tensor"):
        mask_codes(torch.zeros((2, 3, 4), dtype=torch.uint8))


def test_runs_decode_back_to_the_mask_through_pycocotools() -> None:
    masks = _blobs(3, (50, 70), 9)
    codes = mask_codes(torch.from_numpy(masks))
    for mask, rle in zip(masks, rles_from_runs(codes.runs.numpy(), codes.run_counts.numpy(), (50, 70)), strict=True):
        decoded = mask_utils.decode({"size": [50, 70], "counts": rle.counts.encode()})
        np.testing.assert_array_equal(decoded.astype(bool), mask)
