"""Mask post-processing, before and after it moved onto the device: host CPU ms and bytes device->host per image.

Synthetic mask logits at the full model's mask resolution (288x288, blob-shaped objects with ragged edges)
are upsampled to the image size and thresholded, then turned into what the writer needs (RLE, area, bbox;
with PNG masks or a masked image, the full masks too):

- before: the old ``to_detections`` loop, one row (prompt) at a time: upsample + threshold, a blocking copy
  of the (N, H, W) bool masks to the host, pycocotools ``encode`` + ``area`` + ``toBbox`` on the host;
- after: ``worker.device_post.start_masks`` (batched upsample + threshold, RLE runs / area / bbox on the
  device, optional bit-packing), then ``PendingMasks.finish`` on the host (pycocotools string compression
  of the runs; ``packed``: the writer's unpacking too).

On this machine the "device" is the CPU, so the device part is CPU time as well: it is reported apart
("device ms") from the host part ("host ms"), which is what stays on the host CPU when the device is a GPU.
Both are process CPU time (the machine is shared), torch on one thread; with ``--device cuda`` the device part
is GPU wall time (synchronised). Bytes device->host are the sizes
of the tensors copied. ``--quick`` runs fewer repeats.

    python -m bench.postprocess [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from sam3_batch.worker.detections import MaskDelivery
from sam3_batch.worker.device_post import RowMasks, sigmoid_then_upsample, start_masks
from sam3_batch.worker.encode import encode_rle_batch, rle_area, rle_bbox

MASK_SIDE = 288  # the full SAM 3's mask resolution
THRESHOLD = 0.5
PROMPTS = 4  # rows per image: the instances are spread over this many prompts


@dataclass(frozen=True)
class Case:
    name: str
    size_hw: tuple[int, int]
    instances: int


CASES = (Case("1500x1000, 20 instances", (1000, 1500), 20), Case("640x480, 50 instances (crowded)", (480, 640), 50))


def synthetic_logits(count: int, seed: int) -> torch.Tensor:
    """(count, 288, 288) mask logits shaped like objects: ellipses of logit +8 inside, -8 outside, noisy edges."""
    generator = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, MASK_SIDE), torch.linspace(0, 1, MASK_SIDE), indexing="ij")
    centres = torch.rand((count, 2), generator=generator)
    radii = 0.03 + 0.25 * torch.rand((count, 2), generator=generator)
    distance = ((ys - centres[:, 0, None, None]) / radii[:, 0, None, None]) ** 2 + (
        (xs - centres[:, 1, None, None]) / radii[:, 1, None, None]) ** 2
    noise = torch.randn((count, MASK_SIDE, MASK_SIDE), generator=generator)
    return (8.0 * (1.0 - distance) + 2.0 * noise).clamp(-12, 12)


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if k < total % parts else 0) for k in range(parts)]


@dataclass(frozen=True)
class Figures:
    device_ms: float
    host_ms: float
    bytes_to_host: int


def _device_seconds(device: torch.device) -> float:
    """CPU time on the CPU; on CUDA, wall time after a sync (the GPU's time, the host merely waits)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return time.process_time()


def before(logits: torch.Tensor, case: Case) -> Figures:
    """The old path: per row upsample + threshold, bool masks to the host, RLE/area/bbox by pycocotools.

    The full masks always crossed, so PNG masks and masked images cost the writer nothing more here.
    """
    device = host = 0.0
    moved = 0
    first = 0
    for count in _split(case.instances, PROMPTS):
        start = _device_seconds(logits.device)
        probabilities = logits[first : first + count].float().sigmoid()
        masks = F.interpolate(probabilities[None], size=case.size_hw, mode="bilinear", align_corners=False)[0] > 0.5
        middle = _device_seconds(logits.device)
        host_start = time.process_time()
        on_host = masks.cpu().numpy()
        rles = encode_rle_batch(on_host)
        _ = [(rle_area(rle), rle_bbox(rle)) for rle in rles]
        device, host = device + middle - start, host + time.process_time() - host_start
        moved += on_host.nbytes
        first += count
    return Figures(1000 * device, 1000 * host, moved)


def after(logits: torch.Tensor, case: Case, delivery: MaskDelivery, on_device: bool = True) -> Figures:
    """The new path: one batched device pass for the image's rows, then the host's share in ``finish``."""
    rows = [(case.size_hw, count) for count in _split(case.instances, PROMPTS)]
    start = _device_seconds(logits.device)
    pending = start_masks(logits, rows, THRESHOLD, delivery, sigmoid_then_upsample, encode_on_device=on_device)
    middle = _device_seconds(logits.device)
    host_start = time.process_time()
    found = pending.finish()
    if delivery == "packed":
        _ = [row.packed.unpacked() for row in found if row.packed is not None]  # as the writer does
    end = time.process_time()
    return Figures(1000 * (middle - start), 1000 * (end - host_start), pending.bytes_to_host)


def python_leb(runs: list[int]) -> bytes:
    """pycocotools' ``rleToString`` in pure Python (for the measurement of the alternative only)."""
    out = bytearray()
    for index, count in enumerate(runs):
        value = count - runs[index - 2] if index > 2 else count
        more = True
        while more:
            char = value & 0x1F
            value >>= 5
            more = value != -1 if char & 0x10 else value != 0
            out.append((char | 0x20 if more else char) + 48)
    return bytes(out)


def compression_ms(found: list[RowMasks], runs: list[list[int]], size_hw: tuple[int, int]) -> tuple[float, float]:
    """Host ms for the counts string of every mask: pycocotools' frPyObjects vs the same encoding in Python."""
    height, width = size_hw
    start = time.process_time()
    coded = mask_utils.frPyObjects([{"size": [height, width], "counts": r} for r in runs], height, width)
    middle = time.process_time()
    python = [python_leb(r) for r in runs]
    end = time.process_time()
    assert [c["counts"] for c in coded] == python == [rle.counts.encode() for row in found for rle in row.codes.rles]
    return 1000 * (middle - start), 1000 * (end - middle)


def _runs_of(found: list[RowMasks]) -> list[list[int]]:
    decoded = []
    for row in found:
        for rle in row.codes.rles:
            coco = {"size": list(rle.size), "counts": rle.counts.encode()}
            mask = mask_utils.decode(coco)
            decoded.append(_uncompressed_runs(mask))
    return decoded


def _uncompressed_runs(mask: np.ndarray) -> list[int]:
    flat = np.asarray(mask, dtype=np.uint8).ravel(order="F")
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat]))) if flat.size else np.array([], dtype=np.int64)
    bounds = np.concatenate([[0], changes, [flat.size]])
    return [int(v) for v in np.diff(bounds)]


def best(repeats: int, run: Callable[[], Figures]) -> Figures:
    """The run with the least CPU time (device + host): the machine is shared."""
    return min((run() for _ in range(repeats)), key=lambda f: f.device_ms + f.host_ms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 repeats instead of 5")
    parser.add_argument("--device", default="cpu", help="where the masks are made: cpu (default) or cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(1)
    repeats = 2 if args.quick else 5
    print("| case | path | device ms | host ms | bytes device->host |")
    print("| --- | --- | ---: | ---: | ---: |")
    for case in CASES:
        logits = synthetic_logits(case.instances, seed=case.instances).to(device)
        variants: list[tuple[str, Callable[[], Figures]]] = [
            ("before: row by row, bool masks to the host", lambda: before(logits, case)),  # noqa: B023
            ("after, device encoder: RLE only", lambda: after(logits, case, "none")),  # noqa: B023
            ("after, device encoder: + packed masks (PNG/masked)", lambda: after(logits, case, "packed")),  # noqa: B023
        ]
        if device.type == "cpu":  # what the CPU runs now: batched upsampling, pycocotools after the lock
            variants.append(("after, CPU: pycocotools encoder", lambda: after(logits, case, "none", False)))  # noqa: B023
        for label, run in variants:
            figures = best(repeats, run)
            print(f"| {case.name} | {label} | {figures.device_ms:.1f} | {figures.host_ms:.1f} | "
                  f"{figures.bytes_to_host / 1e6:.3f} MB |")
        found = start_masks(logits, [(case.size_hw, case.instances)], THRESHOLD, "none",
                            sigmoid_then_upsample, encode_on_device=True).finish()
        library, python = compression_ms(found, _runs_of(found), case.size_hw)
        print(f"| {case.name} | counts string: pycocotools frPyObjects / pure Python | | "
              f"{library:.2f} / {python:.2f} | |")


if __name__ == "__main__":
    main()
