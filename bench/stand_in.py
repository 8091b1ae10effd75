"""A stand-in accelerator: a ``Sam3Model``-shaped module for the real ``Sam3Runtime``, so the host side can be
measured without a GPU (bench/host_budget.py).

Its vision pass holds each batch for a fixed time per image with the GIL released (``time.sleep``, as a
thread waiting for a CUDA sync would), and its detector returns what SAM 3 returns, shaped as SAM 3 shapes
it: ``pred_logits`` (rows, queries), ``pred_boxes`` (rows, queries, 4) xyxy in [0, 1], ``pred_masks`` (rows,
queries, 288, 288) logits and ``presence_logits`` (rows, 1), with ``instances`` queries per row scoring above
any usual threshold and the rest far below. Mask logits are blobs (wobbly ellipses with soft edges), so the
thresholded full-size masks have plausible outlines and RLE lengths. Everything after the model (the
runtime's post-processing, RLE, writing) is the product's own code.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from transformers import Sam3ImageProcessor, Sam3Processor
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.sam3.modeling_sam3 import Sam3ImageSegmentationOutput, Sam3VisionEncoderOutput

from sam3_batch.worker.runtime import Sam3Runtime
from sam3_batch.worker.tiny_model import resolve_model

STAND_IN_ID = "bench/stand-in-accelerator"
MASK_SIDE = 288  # SAM 3's mask resolution at a 1008x1008 input
TEXT_TOKENS = 32  # SAM 3's text window
KEPT_LOGIT, DROPPED_LOGIT, PRESENCE_LOGIT = 4.0, -6.0, 4.0  # scores ~0.96 and ~0.002
_FEATURE = 8  # width of the (tiny) feature tensors the runtime passes back in: they cost nothing to move


@dataclass
class DeviceCounters:
    """What the stand-in saw: images through the vision pass, detector rows, the seconds it held them."""

    images: int = 0
    rows: int = 0
    held_s: float = 0.0
    pixel_bytes: int = 0  # the batches' pixels as the model received them
    extra: dict[str, float] = field(default_factory=dict)


def blob_bank(count: int, side: int = MASK_SIDE, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` mask-logit maps (count, side, side) of wobbly soft-edged ellipses, and their boxes (count, 4)
    xyxy in [0, 1] (where the logit is positive)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:side, 0:side].astype(np.float32) / side
    maps, boxes = [], []
    for _ in range(count):
        cx, cy = rng.uniform(0.2, 0.8, size=2)
        rx, ry = rng.uniform(0.05, 0.22, size=2)
        angle, phase3, phase5 = rng.uniform(0, math.pi, size=3)
        dx, dy = xs - cx, ys - cy
        u = (dx * math.cos(angle) + dy * math.sin(angle)) / rx
        v = (-dx * math.sin(angle) + dy * math.cos(angle)) / ry
        theta = np.arctan2(v, u)
        wobble = 1.0 + 0.15 * np.sin(3 * theta + phase3) + 0.08 * np.sin(5 * theta + phase5)
        logits = 12.0 * (1.0 - np.sqrt(u * u + v * v) / wobble)
        inside_y, inside_x = np.nonzero(logits > 0)
        maps.append(logits.astype(np.float32))
        boxes.append([inside_x.min() / side, inside_y.min() / side, (inside_x.max() + 1) / side,
                      (inside_y.max() + 1) / side])
    return torch.from_numpy(np.stack(maps)), torch.tensor(boxes, dtype=torch.float32)


class StandInSam3(torch.nn.Module):
    """What ``Sam3Runtime`` calls on ``Sam3Model``: ``get_vision_features``, ``get_text_features``, ``forward``."""

    def __init__(self, ms_per_image: float, instances: int, queries: int, seed: int = 0) -> None:
        super().__init__()
        if not 0 <= instances <= queries:
            raise ValueError(f"instances must be within 0..{queries}, got {instances}")
        self.ms_per_image, self.instances, self.queries = ms_per_image, instances, queries
        self.config = SimpleNamespace(text_config=SimpleNamespace(max_position_embeddings=TEXT_TOKENS))
        self.counters = DeviceCounters()
        # Seconds of device work done on the host CPU so far (normalising pixels, upsampling masks): the
        # stand-in holds each batch that much less, so the "accelerator" with its own work stays at its rate.
        self.device_clock: Callable[[], float] = lambda: 0.0
        self._clock_mark = 0.0
        masks, boxes = blob_bank(queries, seed=seed)
        self.register_buffer("mask_bank", masks, persistent=False)
        self.register_buffer("box_bank", boxes, persistent=False)
        self._masks_out = torch.empty(0)  # the bank repeated for the most rows asked for so far (see ``forward``)
        logits = torch.full((queries,), DROPPED_LOGIT)
        logits[:instances] = KEPT_LOGIT
        self.register_buffer("logit_row", logits, persistent=False)

    def get_vision_features(self, pixel_values: torch.Tensor, **_: Any) -> Sam3VisionEncoderOutput:
        batch = pixel_values.shape[0]
        # Device work since the last hold: the previous batch's post-processing and this batch's pixels.
        done_on_cpu = self.device_clock() - self._clock_mark
        held = max(0.0, self.ms_per_image * batch / 1000.0 - done_on_cpu)
        time.sleep(held)  # the accelerator's time: the GIL is free meanwhile, as during a CUDA sync
        self._clock_mark = self.device_clock()
        self.counters.images += batch
        self.counters.held_s += held
        self.counters.pixel_bytes += pixel_values.nbytes
        levels = tuple(torch.zeros(batch, _FEATURE, s, s, device=pixel_values.device) for s in (4, 2, 1))
        return Sam3VisionEncoderOutput(fpn_hidden_states=levels, fpn_position_encoding=levels)

    def owns(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is one of the outputs this stand-in made once and never changes."""
        return tensor.untyped_storage().data_ptr() == self._masks_out.untyped_storage().data_ptr()

    def get_text_features(self, input_ids: torch.Tensor, **_: Any) -> BaseModelOutputWithPooling:
        return BaseModelOutputWithPooling(pooler_output=torch.zeros(input_ids.shape[0], TEXT_TOKENS, _FEATURE,
                                                                    device=input_ids.device))

    def forward(self, *, text_embeds: BaseModelOutputWithPooling, **_: Any) -> Sam3ImageSegmentationOutput:
        features = text_embeds.pooler_output
        assert features is not None
        rows = features.shape[0]
        self.counters.rows += rows
        mask_bank: torch.Tensor = self.mask_bank  # type: ignore[assignment]
        box_bank: torch.Tensor = self.box_bank  # type: ignore[assignment]
        logit_row: torch.Tensor = self.logit_row  # type: ignore[assignment]
        if self._masks_out.shape[0] < rows:
            # Contiguous, as SAM 3's are (an expanded view would make the runtime's gather copy every row), and
            # made once: every row shows the same blobs, which costs the post-processing the same.
            self._masks_out = mask_bank.expand(rows, -1, -1, -1).contiguous()
        return Sam3ImageSegmentationOutput(
            pred_logits=logit_row.expand(rows, -1),
            pred_boxes=box_bank.expand(rows, -1, -1),
            pred_masks=self._masks_out[:rows],
            presence_logits=torch.full((rows, 1), PRESENCE_LOGIT, device=features.device),
        )


def stand_in_runtime(ms_per_image: float, instances: int, queries: int, device: str = "cpu") -> Sam3Runtime:
    """The product's ``Sam3Runtime`` over the stand-in, with SAM 3's real processor settings (1008 px input)
    and the tiny checkpoint's tokenizer (prompts are tokenised as in production)."""
    processor: Any = Sam3Processor.from_pretrained(resolve_model("tiny-random"))
    processor.image_processor = Sam3ImageProcessor()  # the class defaults are SAM 3's: 1008x1008, masks 288
    torch_device = torch.device(device)
    model: Any = StandInSam3(ms_per_image, instances, queries).to(torch_device)
    return Sam3Runtime(model, processor, model_id=STAND_IN_ID, revision=None, device=torch_device,
                       dtype=torch.float32)
