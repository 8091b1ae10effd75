"""The one structure model output is turned into before anything else looks at it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from sam3_batch.contracts.schemas import RLE
from sam3_batch.worker.encode import decode_rle, encode_rle_batch, rle_area, rle_bbox, unpack_masks

# What of the full-size masks crosses to the host: nothing (RLE, area and bbox only), bit-packed masks (8x
# fewer bytes, unpacked where they are used: PNG masks, the masked image), or bool masks (tests, benches).
MaskDelivery = Literal["none", "packed", "full"]


@dataclass(frozen=True)
class MaskCodes:
    """Each instance's COCO RLE, area and bbox (x, y, w, h), as pycocotools computes them."""

    size_hw: tuple[int, int]  # the image's, known even when there are no instances
    rles: list[RLE]
    areas: npt.NDArray[np.int64]  # (N,)
    bboxes_xywh: npt.NDArray[np.float64]  # (N, 4)

    @classmethod
    def of_masks(cls, masks: npt.NDArray[np.bool_]) -> MaskCodes:
        """Encoded on the host with pycocotools (masks made without the device path: stand-ins, tests)."""
        rles = encode_rle_batch(masks)
        size_hw = (int(masks.shape[1]), int(masks.shape[2]))
        return cls(size_hw, rles, np.array([rle_area(r) for r in rles], dtype=np.int64).reshape(-1),
                   np.array([rle_bbox(r) for r in rles], dtype=np.float64).reshape(-1, 4))

    def __len__(self) -> int:
        return len(self.rles)


@dataclass(frozen=True)
class PackedMasks:
    """(N, H, W) bool masks as (N, ceil(H*W/8)) bytes in np.packbits' layout."""

    bits: npt.NDArray[np.uint8]
    size_hw: tuple[int, int]

    def unpacked(self) -> npt.NDArray[np.bool_]:
        return unpack_masks(self.bits, self.size_hw)


@dataclass(frozen=True)
class DeferredMasks:
    """Kept instances' low-resolution mask logits, post-processed later by whoever writes them.

    On a CPU "device" the model's core would otherwise upsample, threshold and encode every full-size mask;
    deferred, the writer (a stage process) runs the same ``worker.device_post`` functions on these logits.
    The logits stay in the model's dtype when numpy has it (upsampling starts with ``.float()``, so the
    masks are identical); bfloat16 comes as float32, which is exact.
    """

    logits: npt.NDArray[Any]  # (N, h, w) at the model's mask resolution
    size_hw: tuple[int, int]  # the image's full size the masks are made at
    threshold: float  # the mask threshold (on probabilities, upsampled as the detector does)
    delivery: MaskDelivery  # what of the full masks the writer needs besides RLE, area, bbox
    # The deferring process's torch threads: CPU bilinear upsampling picks its kernel by thread and channel
    # count (1 thread, 3 masks per call: another rounding), so the writer upsamples with as many threads
    # and the same groups of masks as the runtime would have, for identical masks.
    threads: int


@dataclass(frozen=True)
class PromptDetections:
    """Every instance found for one prompt on one image, at the image's full resolution.

    The masks come as any of: ``codes`` (RLE + area + bbox, computed on the device), ``packed`` full masks,
    or ``masks`` (bool); ``mask_codes()`` and ``full_masks()`` give either form from what is there.
    Or, from a CPU runtime whose writer post-processes, ``deferred`` logits: ``device_post.materialised`` turns them
    into codes (and masks), as the runtime would have.
    """

    prompt: str
    presence_score: float | None
    scores: npt.NDArray[np.float32]  # (N,)
    boxes_xyxy: npt.NDArray[np.float32]  # (N, 4) pixels, x0 y0 x1 y1
    masks: npt.NDArray[np.bool_] | None = None  # (N, H, W)
    codes: MaskCodes | None = None
    packed: PackedMasks | None = None
    deferred: DeferredMasks | None = None

    def __post_init__(self) -> None:
        n = self.scores.shape[0] if self.scores.ndim == 1 else -1
        if n < 0:
            raise ValueError(f"scores must be 1-D (N,), got shape {self.scores.shape}")
        if self.boxes_xyxy.shape != (n, 4):
            raise ValueError(f"boxes_xyxy must have shape ({n}, 4), got {self.boxes_xyxy.shape}")
        if self.masks is None and self.codes is None and self.deferred is None:
            raise ValueError("detections need their masks: bool masks, mask codes (RLE, area, bbox) or mask logits")
        if self.deferred is not None and self.deferred.logits.shape[0] != n:
            raise ValueError(f"deferred mask logits must hold {n} instances, got {self.deferred.logits.shape[0]}")
        if self.masks is not None:
            if self.masks.ndim != 3 or self.masks.shape[0] != n:
                raise ValueError(f"masks must have shape ({n}, H, W), got {self.masks.shape}")
            if self.masks.dtype != np.bool_:
                raise ValueError(f"masks must be bool, got {self.masks.dtype}")
        if self.codes is not None and len(self.codes) != n:
            raise ValueError(f"mask codes must describe {n} instances, got {len(self.codes)}")
        if self.packed is not None and self.packed.bits.shape[0] != n:
            raise ValueError(f"packed masks must hold {n} instances, got {self.packed.bits.shape[0]}")

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def _check_not_deferred(self) -> None:
        if self.deferred is not None:
            raise ValueError("these detections' masks were deferred to the writer: "
                             "post-process them with worker.device_post.materialised first")

    def mask_codes(self) -> MaskCodes:
        """RLE, area and bbox per instance: as computed on the device, else encoded from the masks here."""
        self._check_not_deferred()
        if self.codes is not None:
            return self.codes
        assert self.masks is not None  # __post_init__ requires one of the two
        return MaskCodes.of_masks(self.masks)

    def full_masks(self) -> npt.NDArray[np.bool_]:
        """(N, H, W) bool masks: as given, unpacked from bits, or decoded from the RLEs."""
        self._check_not_deferred()
        if self.masks is not None:
            return self.masks
        if self.packed is not None:
            return self.packed.unpacked()
        assert self.codes is not None
        if not self.codes.rles:
            return np.zeros((0, *self.codes.size_hw), dtype=np.bool_)
        return np.stack([decode_rle(rle) for rle in self.codes.rles])
