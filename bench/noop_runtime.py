"""A stand-in for the SAM 3 runtime that finds nothing: the control-plane bench measures everything else.

It satisfies ``worker.pipeline.SegmentationRuntime``, so chunks still flow through the real Celery task,
the real download + decode and the real metadata write; only the model call is free.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from sam3_batch.contracts.schemas import Thresholds
from sam3_batch.worker.detections import MaskDelivery, PromptDetections

NOOP_MODEL_ID = "bench/noop"


def _nothing_found(prompt: str) -> PromptDetections:
    return PromptDetections(
        prompt=prompt, presence_score=None, scores=np.zeros(0, dtype=np.float32),
        boxes_xyxy=np.zeros((0, 4), dtype=np.float32), masks=np.zeros((0, 1, 1), dtype=np.bool_),
    )


def _prepare_nothing(image: Image.Image) -> Any:
    """Nothing to precompute: there is no model."""
    return None


class NoopRuntime:
    """``preparer`` keeps nothing and ``segment`` answers "no instance" for every prompt of every image."""

    model_id: str = NOOP_MODEL_ID
    revision: str | None = None
    preparer = staticmethod(_prepare_nothing)

    def segment(
        self, images: list[Any], prompts: list[list[str]], thresholds: Thresholds,
        masks: MaskDelivery = "full",
    ) -> list[list[PromptDetections]]:
        """One empty detection per prompt of each image, in the order given."""
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompt lists")
        return [[_nothing_found(p) for p in image_prompts] for image_prompts in prompts]
