"""The model's input as the loader stage makes it: one prepared image, the type of what prepares it, and the
device-side half of preparing when the loader hands over 8-bit pixels."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeAlias

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from PIL import Image

# What crosses from a loader process to the model, per image:
#   "normalized": the processor's output, resized and normalised, in the model's dtype (12 MB at 1008 px
#                 in float32, 6 MB in bf16);
#   "uint8":      resized on the host with the processor's own resize, 8-bit (3 MB); normalised on the device;
#   "uint8-full": the decoded image itself, 8-bit at its (possibly JPEG-draft-reduced) size; resized and
#                 normalised on the device.
PixelHandOff = Literal["normalized", "uint8", "uint8-full"]
PIXEL_HAND_OFFS: tuple[PixelHandOff, ...] = ("normalized", "uint8", "uint8-full")


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
    """The processor's resize (bilinear, antialiased) and rescale + normalise, run on the model's device."""

    side_hw: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale: float  # 1/255

    def __call__(self, pixels: Sequence[torch.Tensor], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """uint8 (3, h, w) images -> one (N, 3, H, W) batch on ``device`` in ``dtype``."""
        batch = torch.stack([self._resized(_to_device(p, device)) for p in pixels])
        # The processor's fused form: (x - mean / rescale) / (std / rescale), in float32, then the model's dtype.
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1) * (1.0 / self.rescale)
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1) * (1.0 / self.rescale)
        return ((batch.float() - mean) / std).to(dtype)

    def _resized(self, image: torch.Tensor) -> torch.Tensor:
        if tuple(image.shape[-2:]) == self.side_hw:
            return image
        # torchvision's uint8 resize (what the processor runs on the host) rounds a float32 bilinear result.
        scaled = F.interpolate(image[None].float(), size=self.side_hw, mode="bilinear", align_corners=False,
                               antialias=True)[0]
        return scaled.round_().clamp_(0, 255).to(torch.uint8)


def _to_device(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return pixels
    # From shared memory through page-locked memory (torch caches it): the copy can then run asynchronously.
    return pixels.pin_memory().to(device, non_blocking=True)
