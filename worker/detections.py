"""The one structure model output is turned into before anything else looks at it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class PromptDetections:
    """Every instance found for one prompt on one image, at the image's full resolution."""

    prompt: str
    presence_score: float | None
    scores: npt.NDArray[np.float32]  # (N,)
    boxes_xyxy: npt.NDArray[np.float32]  # (N, 4) pixels, x0 y0 x1 y1
    masks: npt.NDArray[np.bool_]  # (N, H, W)

    def __post_init__(self) -> None:
        n = self.scores.shape[0] if self.scores.ndim == 1 else -1
        if n < 0:
            raise ValueError(f"scores must be 1-D (N,), got shape {self.scores.shape}")
        if self.boxes_xyxy.shape != (n, 4):
            raise ValueError(f"boxes_xyxy must have shape ({n}, 4), got {self.boxes_xyxy.shape}")
        if self.masks.ndim != 3 or self.masks.shape[0] != n:
            raise ValueError(f"masks must have shape ({n}, H, W), got {self.masks.shape}")
        if self.masks.dtype != np.bool_:
            raise ValueError(f"masks must be bool, got {self.masks.dtype}")

    def __len__(self) -> int:
        return int(self.scores.shape[0])
