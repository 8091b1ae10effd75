"""The model's input as the loader stage makes it: one prepared image, the type of what prepares it, and the
device-side half of preparing when the loader hands over 8-bit pixels."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeAlias

import torch

if TYPE_CHECKING:
    from PIL import Image

# What crosses from a loader process to the model, per image:
#   "normalized": the processor's output, resized and normalised, in the model's dtype (12 MB at 1008 px
#                 in float32, 6 MB in bf16);
#   "uint8":      resized on the host with the processor's own resize, 8-bit (3 MB); normalised on the device:
#                 the same pixels as "normalized", bit for bit.
# (Resizing on the device too was measured and dropped: its float resize differs from torchvision's uint8 one
# by a level here and there, which moves scores by ~1e-3, and the loaders then hand over more bytes.)
PixelHandOff = Literal["normalized", "uint8"]


@dataclass(frozen=True)
class PreparedImage:
    """One image after the processor's resize + normalize (or its 8-bit pixels: see ``PixelHandOff``).

    The pixels stay a torch tensor: they are the runtime's own input (bfloat16 has no numpy dtype), and a
    tensor crosses from a loader process in shared memory by itself.
    """

    pixel_values: torch.Tensor  # (C, H, W): normalised in the model's dtype, or uint8 (device-side normalising)
    original_size_hw: tuple[int, int]


# A decoded RGB image -> the model's input. Picklable: loader processes run it.
Preparer: TypeAlias = "Callable[[Image.Image], PreparedImage]"


@dataclass(frozen=True)
class DeviceNormalizer:
    """The processor's rescale + normalise of 8-bit pixels already at the model's input size, on its device."""

    side_hw: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale: float  # 1/255

    def staged(self, pixels: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
        """The host's half: uint8 (3, H, W) images at the input size -> one uint8 (N, 3, H, W) batch on
        ``device``, in the loaders' memory layout."""
        for image in pixels:
            if tuple(image.shape[-2:]) != self.side_hw:
                raise ValueError(f"8-bit pixels must be at the model's input size {self.side_hw}, got "
                                 f"{tuple(image.shape[-2:])}")
        # Stacked in the loaders' layout: their resize leaves each image height x width x channel in memory, so
        # the host copies whole images (a transposing copy cost ~4x more CPU); the device transposes.
        return stacked_on([image.permute(1, 2, 0) for image in pixels], device).permute(0, 3, 1, 2)

    def normalised(self, batch: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A stacked (N, 3, H, W) uint8 batch on the device, in any memory layout -> the model's input,
        contiguous (the device-side half: kernels only)."""
        # The processor's fused form: (x - mean / rescale) / (std / rescale), in float32, then the model's dtype.
        mean = torch.tensor(self.mean, device=batch.device).view(1, 3, 1, 1) * (1.0 / self.rescale)
        std = torch.tensor(self.std, device=batch.device).view(1, 3, 1, 1) * (1.0 / self.rescale)
        values = batch.to(torch.float32, memory_format=torch.contiguous_format)
        return ((values - mean) / std).to(dtype)


def stacked_on(pixels: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Same-shape images as one batch on ``device``; to a GPU through pinned memory, one asynchronous copy."""
    if device.type != "cuda":
        return torch.stack(pixels).to(device)
    # Stacked into page-locked memory (torch's host allocator caches it): the pixels arrive from loader
    # processes in shared memory, not pinned.
    staged = torch.empty((len(pixels), *pixels[0].shape), dtype=pixels[0].dtype, pin_memory=True)
    torch.stack(pixels, out=staged)
    return staged.to(device, non_blocking=True)
