"""COCO RLE run lengths, areas, bounding boxes and bit-packed masks, computed where the masks are (the GPU).

Full-size bool masks are large (20 instances at 1500x1000 are 30 MB) and their RLE is tiny, so the run
lengths are found on the device and only they cross to the host, where pycocotools turns them into its
compressed string (``worker.encode.rles_from_runs``). Runs follow pycocotools' ``rleEncode``: column-major
order, starting with the count of zeros (0 when the first pixel is set), the last run always included.
Nothing here syncs with the host except ``torch.nonzero`` (its output size is data-dependent).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# np.packbits' bit order: the first pixel is the most significant bit of its byte.
_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)


@dataclass(frozen=True)
class MaskCodesOnDevice:
    """Per mask: its RLE runs (all masks' runs concatenated), run count, area and COCO bbox (x, y, w, h)."""

    runs: torch.Tensor  # (sum of run_counts,) int32
    run_counts: torch.Tensor  # (N,) int64
    areas: torch.Tensor  # (N,) int64
    bboxes_xywh: torch.Tensor  # (N, 4) int64: pycocotools' toBbox, which is integral


def mask_codes(masks: torch.Tensor) -> MaskCodesOnDevice:
    """RLE runs, areas and bboxes of (N, H, W) bool masks, on their device.

    Areas and bboxes come from the runs (as pycocotools computes them), which are far fewer than the pixels.
    """
    runs, run_counts = rle_runs_of(masks)
    count, height, _width = masks.shape
    if count == 0 or runs.shape[0] == count:  # no masks, or no pixels: nothing is set anywhere
        areas = torch.zeros(count, dtype=torch.int64, device=masks.device)
        return MaskCodesOnDevice(runs, run_counts, areas, areas.new_zeros((count, 4)))
    # output_size: known on the host, so CUDA needs no sync to size the result.
    mask_of_run = torch.repeat_interleave(torch.arange(count, device=masks.device), run_counts,
                                          output_size=runs.shape[0])
    first_of_mask = run_counts.cumsum(0) - run_counts
    slot = torch.arange(runs.shape[0], device=masks.device) - first_of_mask[mask_of_run]
    ends = runs.to(torch.int64).cumsum(0)
    ends = ends - (ends - runs)[first_of_mask][mask_of_run]  # one past each run's last pixel, within its mask
    ones = (slot % 2 == 1) & (runs > 0)  # runs alternate zeros, ones, zeros, ...
    areas = torch.zeros(count, dtype=torch.int64, device=masks.device).index_add_(
        0, mask_of_run[ones], runs[ones].to(torch.int64))
    return MaskCodesOnDevice(runs, run_counts, areas, _bboxes_of_runs(ends[ones] - runs[ones], ends[ones] - 1,
                                                                      mask_of_run[ones], count, height))


def _bboxes_of_runs(first: torch.Tensor, last: torch.Tensor, mask: torch.Tensor, count: int,
                    height: int) -> torch.Tensor:
    """pycocotools' ``rleToBbox`` from the runs of ones (column-major pixel indices of each run's ends)."""
    x_first, y_first = first // height, first % height
    x_last, y_last = last // height, last % height
    # A run that wraps into the next column covers the column's end and the next one's start.
    wraps = x_last > x_first
    y_low = torch.where(wraps, 0, y_first)
    y_high = torch.where(wraps, height - 1, y_last)
    big = torch.iinfo(torch.int64).max
    device = first.device
    x0 = torch.full((count,), big, dtype=torch.int64, device=device).scatter_reduce(0, mask, x_first, "amin")
    y0 = torch.full((count,), big, dtype=torch.int64, device=device).scatter_reduce(0, mask, y_low, "amin")
    x1 = torch.full((count,), -1, dtype=torch.int64, device=device).scatter_reduce(0, mask, x_last, "amax")
    y1 = torch.full((count,), -1, dtype=torch.int64, device=device).scatter_reduce(0, mask, y_high, "amax")
    boxes = torch.stack([x0, y0, x1 - x0 + 1, y1 - y0 + 1], dim=1)
    return boxes.masked_fill((x1 < 0)[:, None], 0)  # an empty mask has no run of ones: pycocotools gives zeros


def rle_runs_of(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pycocotools' uncompressed RLE counts of each (H, W) mask: every mask's runs concatenated, and their numbers."""
    _check_masks(masks)
    count, height, width = masks.shape
    pixels = height * width
    device = masks.device
    if count == 0:
        return torch.zeros(0, dtype=torch.int32, device=device), torch.zeros(0, dtype=torch.int64, device=device)
    if pixels == 0:  # pycocotools emits one run of 0
        return (torch.zeros(count, dtype=torch.int32, device=device),
                torch.ones(count, dtype=torch.int64, device=device))
    column_major = masks.transpose(1, 2).reshape(count, pixels)
    # A run starts wherever a pixel differs from the one before; before the first pixel is a virtual 0.
    starts = torch.empty_like(column_major)
    starts[:, 0] = column_major[:, 0]
    torch.ne(column_major[:, 1:], column_major[:, :-1], out=starts[:, 1:])
    mask_of_start, position = starts.nonzero(as_tuple=True)  # row-major, so each mask's starts in order
    # The initial run (of zeros, maybe empty) plus one per start; counted from the starts, not the pixels.
    run_counts = torch.bincount(mask_of_start, minlength=count) + 1
    ends = run_counts.cumsum(0)  # one past each mask's last run in the flat list
    # Each run's end: the next run's start, or the mask's last pixel; the k-th start of mask i (in the flat
    # nonzero order) ends the run in slot k + i, since masks before i each have one more run than starts.
    run_ends = torch.empty(int(position.shape[0]) + count, dtype=torch.int64, device=device)
    run_ends[ends - 1] = pixels
    run_ends[torch.arange(position.shape[0], device=device) + mask_of_start] = position
    run_begins = run_ends.roll(1)
    run_begins[ends - run_counts] = 0
    return (run_ends - run_begins).to(torch.int32), run_counts


def pack_bits(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool masks as (N, ceil(H*W/8)) uint8 in np.packbits' layout (row-major, MSB first)."""
    _check_masks(masks)
    count, height, width = masks.shape
    pixels = height * width
    padded = torch.zeros((count, -(-pixels // 8) * 8), dtype=torch.uint8, device=masks.device)
    padded[:, :pixels] = masks.reshape(count, pixels)
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=masks.device)
    # A byte's 8 weighted bits are distinct powers of two: their sum never exceeds 255.
    return (padded.view(count, -1, 8) * weights).sum(dim=2, dtype=torch.uint8)


def _check_masks(masks: torch.Tensor) -> None:
    if masks.ndim != 3 or masks.dtype != torch.bool:
        raise ValueError(f"masks must be a (N, H, W) bool tensor, got {tuple(masks.shape)} {masks.dtype}")
