"""The model's input as the loader stage makes it: one prepared image, and the type of what prepares it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    import torch
    from PIL import Image


@dataclass(frozen=True)
class PreparedImage:
    """One image after the processor's resize + normalize, ready to stack into a batch.

    The pixels stay a torch tensor: they are the runtime's own input (bfloat16 has no numpy dtype), and a
    tensor crosses from a loader process in shared memory by itself.
    """

    pixel_values: torch.Tensor  # (C, H, W) at the model's input size, in the model's dtype
    original_size_hw: tuple[int, int]


# A decoded RGB image -> the model's input. Picklable: loader processes run it.
Preparer: TypeAlias = "Callable[[Image.Image], PreparedImage]"
