"""Mask post-processing on the model's device, shared by the detector (text, exemplars) and the tracker (objects).

Kept instances are upsampled and thresholded in a few batched ops (consecutive rows of one image size
together, bounded by a pixel budget), then encoded where they are (``worker.device_rle``): RLE runs, area and
bbox always, bit-packed full masks only when the job writes PNG masks or masked images. Everything for the
host goes in one buffer per kind, fetched with one copy: on CUDA non-blocking into pinned memory, followed by
an event. ``start_masks`` is what runs under the model lock; ``PendingMasks.finish`` waits for the copy and
does the host part (pycocotools' string compression, unpacking) once the lock is released.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from sam3_batch.worker.detections import MaskCodes, MaskDelivery, PackedMasks, PromptDetections
from sam3_batch.worker.device_rle import mask_codes, pack_bits
from sam3_batch.worker.encode import rles_from_runs, unpack_masks

# Full-size float probabilities for this many pixels (x4 bytes) are upsampled at once: instances are
# upsampled independently, so grouping them only bounds device memory and never changes a mask.
UPSAMPLE_PIXEL_BUDGET = 64 * 1024 * 1024
# On the CPU smaller groups are cheaper (measured: 20 masks at 1500x1000 one at a time take ~half the CPU
# time of one call, cache-bound): about one full-size photo's mask per call.
CPU_UPSAMPLE_PIXEL_BUDGET = 2 * 1024 * 1024

# Tests set this to run the device encoder (torch) on the CPU through the whole runtime.
TORCH_ENCODER_ON_CPU = False

# Whether whoever asks for detections now hands them to a writer that calls ``materialised()``: then a CPU
# runtime defers the detector's mask post-processing to it (``defer_to_writer``). Off by default, so every
# other caller (the Python API, the visual path, tests, benches) gets finished detections.
_WRITER_MATERIALISES: ContextVar[bool] = ContextVar("writer_materialises", default=False)
# Tests and benches turn the deferral off to compare with the in-process path.
DEFER_ON_CPU = True

# (K, h, w) mask logits, the full size, the mask threshold -> (K, H, W) bool masks on the same device.
Upsampler = Callable[[torch.Tensor, tuple[int, int], float], torch.Tensor]


def sigmoid_then_upsample(logits: torch.Tensor, size_hw: tuple[int, int], threshold: float) -> torch.Tensor:
    """The detector's order, as ``Sam3Processor.post_process_instance_segmentation``: probabilities are upsampled."""
    probabilities = logits.float().sigmoid()
    return F.interpolate(probabilities[None], size=size_hw, mode="bilinear", align_corners=False)[0] > threshold


def upsample_then_sigmoid(logits: torch.Tensor, size_hw: tuple[int, int], threshold: float) -> torch.Tensor:
    """The tracker's order, as ``post_process_masks``: logits are upsampled, then compared as probabilities."""
    upsampled = F.interpolate(logits.float()[None], size=size_hw, mode="bilinear", align_corners=False)[0]
    return upsampled.sigmoid() > threshold


@dataclass(frozen=True)
class RowMasks:
    """One row's instances as the host receives them."""

    codes: MaskCodes
    packed: PackedMasks | None
    masks: npt.NDArray[np.bool_] | None


@dataclass(frozen=True)
class _Group:
    """Consecutive rows of one image size, whose instances were upsampled together."""

    size_hw: tuple[int, int]
    counts: list[int]  # instances per row


class PendingMasks(Protocol):
    """A batch's masks after the device work: ``finish`` waits for them and does the host's part (no lock)."""

    @property
    def bytes_to_host(self) -> int:
        """What the device copies to the host for this batch."""
        ...

    def finish(self) -> list[RowMasks]:
        """Each row's masks, in the order of the rows given to ``start_masks``."""
        ...


class DeviceEncodedMasks:
    """Runs, areas, bboxes (and packed bits) encoded on the device, in one buffer each, on their way to the host."""

    def __init__(self, groups: list[_Group], codes: torch.Tensor, bits: torch.Tensor | None,
                 delivery: MaskDelivery, copied: torch.cuda.Event | None) -> None:
        self._groups, self._codes, self._bits = groups, codes, bits
        self._delivery, self._copied = delivery, copied

    @property
    def bytes_to_host(self) -> int:
        """What the device copies to the host for this batch."""
        return self._codes.nbytes + (self._bits.nbytes if self._bits is not None else 0)

    def finish(self) -> list[RowMasks]:
        """Each row's masks, in the order of the rows given to ``start_masks``."""
        if self._copied is not None:
            self._copied.synchronize()
        codes = self._codes.numpy()
        total = sum(sum(group.counts) for group in self._groups)
        run_counts, areas = codes[:total], codes[total : 2 * total].astype(np.int64)
        bboxes = codes[2 * total : 6 * total].reshape(total, 4).astype(np.float64)
        runs = codes[6 * total :]
        bits = self._bits.numpy() if self._bits is not None else None
        rows: list[RowMasks] = []
        first = first_run = first_byte = 0
        for group in self._groups:
            count = sum(group.counts)
            group_runs = int(run_counts[first : first + count].sum())
            rles = rles_from_runs(runs[first_run : first_run + group_runs], run_counts[first : first + count],
                                  group.size_hw)
            codes_of_group = MaskCodes(group.size_hw, rles, areas[first : first + count], bboxes[first : first + count])
            row_bytes = -(-group.size_hw[0] * group.size_hw[1] // 8)
            group_bits = (bits[first_byte : first_byte + count * row_bytes].reshape(count, row_bytes)
                          if bits is not None else None)
            rows += _split_rows(group, codes_of_group, group_bits, None, self._delivery)
            first, first_run, first_byte = first + count, first_run + group_runs, first_byte + count * row_bytes
        return rows


class HostEncodedMasks:
    """Masks thresholded on the CPU: there the "device" is the host, and pycocotools' C encoder (in ``finish``,
    outside the model lock) costs less CPU than the torch encoder, so the masks stay bool until then."""

    def __init__(self, groups: list[_Group], masks: list[list[npt.NDArray[np.bool_]]], delivery: MaskDelivery) -> None:
        self._groups, self._masks, self._delivery = groups, masks, delivery

    @property
    def bytes_to_host(self) -> int:
        return 0  # the masks never left the host

    def finish(self) -> list[RowMasks]:
        rows: list[RowMasks] = []
        for group, slices in zip(self._groups, self._masks, strict=True):
            codes = [MaskCodes.of_masks(part) for part in slices]  # slice by slice: no copy of the masks
            merged = MaskCodes(group.size_hw, [rle for c in codes for rle in c.rles],
                               np.concatenate([c.areas for c in codes]), np.concatenate([c.bboxes_xywh for c in codes]))
            # Bool masks go to the writer as they are (shared memory): packing would cost as much as it saves.
            full = (np.concatenate(slices) if len(slices) != 1 else slices[0]) if self._delivery != "none" else None
            rows += _split_rows(group, merged, None, full, self._delivery)
        return rows


def _split_rows(group: _Group, codes: MaskCodes, bits: npt.NDArray[np.uint8] | None,
                masks: npt.NDArray[np.bool_] | None, delivery: MaskDelivery) -> list[RowMasks]:
    """A group's instances, row by row; ``full`` delivery unpacks the bits here."""
    rows, start = [], 0
    for count in group.counts:
        part = slice(start, start + count)
        row_codes = MaskCodes(group.size_hw, codes.rles[part], codes.areas[part], codes.bboxes_xywh[part])
        row_bits = np.ascontiguousarray(bits[part]) if bits is not None else None
        row_masks = masks[part] if masks is not None else None
        if delivery == "full" and row_masks is None and row_bits is not None:
            row_masks = unpack_masks(row_bits, group.size_hw)
        packed = PackedMasks(row_bits, group.size_hw) if delivery == "packed" and row_bits is not None else None
        rows.append(RowMasks(row_codes, packed, row_masks))
        start += count
    return rows


def start_masks(
    logits: torch.Tensor,
    rows: Sequence[tuple[tuple[int, int], int]],
    threshold: float,
    delivery: MaskDelivery,
    upsample: Upsampler,
    *,
    encode_on_device: bool | None = None,
) -> PendingMasks:
    """Queue the post-processing of (K, h, w) instance ``logits``, split into ``rows`` of (size_hw, count).

    ``encode_on_device`` (default: unless the device is the CPU) chooses the torch encoder over pycocotools.
    """
    if encode_on_device is None:
        encode_on_device = logits.device.type != "cpu" or TORCH_ENCODER_ON_CPU
    on_device = encode_on_device
    groups = _consecutive_sizes(rows)
    parts: list[tuple[torch.Tensor, ...]] = []
    bits: list[torch.Tensor] = []
    host_masks: list[list[npt.NDArray[np.bool_]]] = []
    first = 0
    budget = UPSAMPLE_PIXEL_BUDGET if logits.device.type != "cpu" else CPU_UPSAMPLE_PIXEL_BUDGET
    for group in groups:
        count = sum(group.counts)
        height, width = group.size_hw
        step = max(1, budget // max(height * width, 1))
        host_masks.append([])
        for start in range(first, first + count, step):
            masks = upsample(logits[start : min(start + step, first + count)], group.size_hw, threshold)
            if not on_device:
                host_masks[-1].append(masks.cpu().numpy())
                continue
            found = mask_codes(masks)
            parts.append((found.run_counts, found.areas, found.bboxes_xywh.flatten(), found.runs))
            if delivery != "none":
                bits.append(pack_bits(masks).flatten())
        if not host_masks[-1]:
            host_masks[-1].append(np.zeros((0, height, width), dtype=np.bool_))
        first += count
    if not on_device:
        return HostEncodedMasks(groups, host_masks, delivery)
    codes = torch.cat([torch.cat([part[k] for part in parts]).to(torch.int32) for k in range(4)]) if parts \
        else torch.zeros(0, dtype=torch.int32, device=logits.device)
    packed = None
    if delivery != "none":
        packed = torch.cat(bits) if bits else torch.zeros(0, dtype=torch.uint8, device=logits.device)
    return _fetch(groups, codes, packed, delivery)


def _fetch(groups: list[_Group], codes: torch.Tensor, bits: torch.Tensor | None,
           delivery: MaskDelivery) -> PendingMasks:
    if codes.device.type != "cuda":
        return DeviceEncodedMasks(groups, codes.cpu(), None if bits is None else bits.cpu(), delivery, None)
    # Page-locked destinations (torch's host allocator caches them) make the copies asynchronous; the
    # event marks when both have landed, so the caller can release the model before waiting.
    host_codes = torch.empty(codes.shape, dtype=codes.dtype, pin_memory=True)
    host_codes.copy_(codes, non_blocking=True)
    host_bits = None
    if bits is not None:
        host_bits = torch.empty(bits.shape, dtype=bits.dtype, pin_memory=True)
        host_bits.copy_(bits, non_blocking=True)
    copied = torch.cuda.Event()  # type: ignore[no-untyped-call]
    copied.record()
    return DeviceEncodedMasks(groups, host_codes, host_bits, delivery, copied)


def _consecutive_sizes(rows: Sequence[tuple[tuple[int, int], int]]) -> list[_Group]:
    """Rows of one image are consecutive: their instances go through one upsampling call."""
    groups: list[_Group] = []
    for size_hw, count in rows:
        if groups and groups[-1].size_hw == size_hw:
            groups[-1].counts.append(count)
        else:
            groups.append(_Group(size_hw, [count]))
    return groups


class PendingDetections:
    """Detections whose masks are still on their way to the host; ``finish`` waits and assembles them."""

    def __init__(self, masks: PendingMasks, assemble: Callable[[list[RowMasks]], list[PromptDetections]]) -> None:
        self._masks, self._assemble = masks, assemble

    def finish(self) -> list[PromptDetections]:
        return self._assemble(self._masks.finish())


class DeferredDetections(PendingDetections):
    """Detections whose masks a writer post-processes (``PromptDetections.deferred``): nothing to wait for."""

    def __init__(self, detections: list[PromptDetections]) -> None:
        self._detections = detections

    def finish(self) -> list[PromptDetections]:
        return self._detections


@contextmanager
def defer_to_writer() -> Iterator[None]:
    """Within this block, the detections asked for go to a writer that materialises them."""
    token = _WRITER_MATERIALISES.set(True)
    try:
        yield
    finally:
        _WRITER_MATERIALISES.reset(token)


def defers_on(device: torch.device) -> bool:
    """Whether the detector's mask post-processing is left to the writer: on a CPU device, when one materialises.

    On a CPU the "device" is the model's own core: the writer processes have the other cores. On a GPU the
    device post-processing stays (only run lengths cross to the host).
    """
    return device.type == "cpu" and DEFER_ON_CPU and _WRITER_MATERIALISES.get()


def deferred_logits(logits: torch.Tensor) -> npt.NDArray[np.generic]:
    """(K, h, w) instance logits as a host array for the writer: the model's dtype if numpy has it."""
    if logits.dtype not in (torch.float32, torch.float16):
        logits = logits.float()  # bfloat16 -> float32 is exact, and upsampling starts with .float() anyway
    # A copy outside inference mode: the writer's transport moves the array's storage into shared memory.
    return np.array(logits.cpu().numpy(), copy=True)


def materialised(detections: list[PromptDetections]) -> list[PromptDetections]:
    """One image's detections with their deferred masks post-processed as the runtime does on the CPU.

    The deferred rows' instances go through one ``start_masks`` call, as the runtime's rows of one image
    do, with the runtime's torch threads: the same upsampling calls, so the same masks (byte for byte).
    Detections without deferred masks are returned as they are.
    """
    parts = [found.deferred for found in detections if found.deferred is not None]
    if not parts:
        return detections
    first = parts[0]
    if any((part.threshold, part.delivery, part.threads) != (first.threshold, first.delivery, first.threads)
           for part in parts):
        raise ValueError("deferred detections of one image must come from one runtime call")
    if torch.get_num_threads() != first.threads:
        torch.set_num_threads(first.threads)  # a writer process: it post-processes for this runtime only
    logits = torch.from_numpy(np.concatenate([part.logits for part in parts]))
    finished = iter(start_masks(logits, [(part.size_hw, len(part.logits)) for part in parts], first.threshold,
                                first.delivery, sigmoid_then_upsample, encode_on_device=False).finish())
    done: list[PromptDetections] = []
    for found in detections:
        if found.deferred is None:
            done.append(found)
            continue
        row = next(finished)
        done.append(replace(found, masks=row.masks, codes=row.codes, packed=row.packed, deferred=None))
    return done
