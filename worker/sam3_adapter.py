"""The one place that knows the transformers SAM 3 output layouts; turns them into ``PromptDetections``.

It also knows the shapes of the vision/text features the runtime caches and feeds back in
(``vision_embeds=``, ``text_embeds=``). ``to_detections`` re-implements the processor's
``post_process_instance_segmentation`` on the model's device, in the same order of operations (sigmoid,
score filter, bilinear upsampling, mask threshold), so results match the processor's; the masks are then
encoded on the device (``worker.device_post``) and only their RLEs (and, if asked, packed bits) cross.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.sam3.modeling_sam3 import Sam3ImageSegmentationOutput, Sam3VisionEncoderOutput

from sam3_batch.contracts.errors import Sam3BatchError
from sam3_batch.contracts.schemas import Thresholds
from sam3_batch.worker.detections import DeferredMasks, MaskDelivery, PromptDetections
from sam3_batch.worker.device_post import (
    DeferredDetections,
    PendingDetections,
    RowMasks,
    deferred_logits,
    sigmoid_then_upsample,
    start_masks,
)

BOX_PAD_LABEL = -10  # Sam3Processor's padding label for exemplar boxes


class NonFiniteOutputError(Sam3BatchError):
    """The model gave NaN or infinite scores or boxes (float16 overflow, say): the batch fails, never 0 instances."""


def to_detections(
    outputs: Sam3ImageSegmentationOutput,
    prompts: Sequence[str],
    sizes_hw: Sequence[tuple[int, int]],
    thresholds: Thresholds,
    delivery: MaskDelivery = "full",
) -> list[PromptDetections]:
    """One ``PromptDetections`` per output row (one row per image-prompt pair), waiting for the masks."""
    return start_detections(outputs, prompts, sizes_hw, thresholds, delivery).finish()


def start_detections(
    outputs: Sam3ImageSegmentationOutput,
    prompts: Sequence[str],
    sizes_hw: Sequence[tuple[int, int]],
    thresholds: Thresholds,
    delivery: MaskDelivery,
    *,
    defer: bool = False,
) -> PendingDetections:
    """The detections of each output row, their masks post-processed on the device and still on their way.

    ``prompts`` and ``sizes_hw`` name each row's prompt and its image's original (height, width). With
    ``defer``, the masks are not post-processed here: each row carries its kept instances' mask logits
    (``DeferredMasks``) for the writer to finish (``device_post.materialised``).
    """
    logits = _required(outputs.pred_logits, "pred_logits")  # (R, Q)
    boxes = _required(outputs.pred_boxes, "pred_boxes")  # (R, Q, 4) xyxy relative to the image
    mask_logits = _required(outputs.pred_masks, "pred_masks")  # (R, Q, h, w) at the mask resolution
    rows = logits.shape[0]
    if len(prompts) != rows or len(sizes_hw) != rows:
        raise ValueError(f"expected {rows} prompts and sizes, got {len(prompts)} and {len(sizes_hw)}")
    # Float32 even when the model ran in bf16/fp16: thresholds near 0.5 need more than 8 mantissa bits.
    scores = logits.float().sigmoid()
    presence = _presence_scores(outputs.presence_logits)
    if presence is not None:
        scores = scores * presence[:, None]
    # Scores, boxes and the keep mask are small: one transfer for the whole batch.
    scores_host, boxes_host = scores.cpu(), boxes.float().cpu()
    _check_finite(scores_host, boxes_host, logits.dtype)
    keep_host = scores_host > thresholds.score
    presence_host = presence.cpu().tolist() if presence is not None else [None] * rows
    kept = [keep_host[row].nonzero().squeeze(1) for row in range(rows)]  # host indices: no device sync
    # Every row's kept instances in one gather, row after row: (K, h, w).
    flat_index = torch.cat([row * logits.shape[1] + k for row, k in enumerate(kept)])
    instance_logits = gather_instances(mask_logits, flat_index.to(mask_logits.device))
    if defer:
        host_logits, first, threads = deferred_logits(instance_logits), 0, torch.get_num_threads()
        found: list[PromptDetections] = []
        for row, k in enumerate(kept):
            found.append(PromptDetections(
                prompt=prompts[row], presence_score=presence_host[row],
                scores=scores_host[row, k].numpy().astype(np.float32),
                boxes_xyxy=_scaled_boxes(boxes_host[row, k], sizes_hw[row]),
                deferred=DeferredMasks(host_logits[first : first + len(k)], sizes_hw[row], thresholds.mask, delivery,
                                       threads),
            ))
            first += len(k)
        return DeferredDetections(found)
    pending = start_masks(instance_logits, [(size, len(k)) for size, k in zip(sizes_hw, kept, strict=True)],
                          thresholds.mask, delivery, sigmoid_then_upsample)

    def assemble(masks: list[RowMasks]) -> list[PromptDetections]:
        return [
            PromptDetections(
                prompt=prompts[row], presence_score=presence_host[row],
                scores=scores_host[row, kept[row]].numpy().astype(np.float32),
                boxes_xyxy=_scaled_boxes(boxes_host[row, kept[row]], sizes_hw[row]),
                masks=found.masks, codes=found.codes, packed=found.packed,
            )
            for row, found in enumerate(masks)
        ]

    return PendingDetections(pending, assemble)


def gather_instances(mask_logits: torch.Tensor, flat_index: torch.Tensor) -> torch.Tensor:
    """(R, Q, h, w) mask logits -> the (K, h, w) rows at ``flat_index`` (row * Q + query): one device gather."""
    return mask_logits.flatten(0, 1).index_select(0, flat_index)


def select_vision_rows(vision: Sam3VisionEncoderOutput, rows: torch.Tensor) -> Sam3VisionEncoderOutput:
    """Vision features with row k taken from image ``rows[k]``, so one encoder pass serves many prompts.

    Only what ``Sam3Model.forward`` reads is copied: every feature level but the last (the detector and
    the mask decoder read ``fpn_hidden_states[:-1]``). The last level keeps its shape as a view that
    copies nothing, and so do the position encodings, which depend on the level's shape alone (the same
    for every image): each is the first image's, expanded.
    """
    hidden = _required_levels(vision.fpn_hidden_states, "fpn_hidden_states")
    positions = _required_levels(vision.fpn_position_encoding, "fpn_position_encoding")
    count = rows.shape[0]
    return Sam3VisionEncoderOutput(
        fpn_hidden_states=(
            *(level.index_select(0, rows) for level in hidden[:-1]),
            *(_expanded_first(level, count) for level in hidden[-1:]),
        ),
        fpn_position_encoding=tuple(_expanded_first(level, count) for level in positions),
    )


def _expanded_first(level: torch.Tensor, count: int) -> torch.Tensor:
    return level[:1].expand(count, *level.shape[1:])


def text_features(text_output: BaseModelOutputWithPooling) -> torch.Tensor:
    """The per-token projected features ``get_text_features`` returns (as ``pooler_output``): (B, T, D)."""
    return _required(text_output.pooler_output, "pooler_output")


def as_text_embeds(features: torch.Tensor) -> BaseModelOutputWithPooling:
    """Wrap stacked ``text_features`` rows the way ``Sam3Model.forward(text_embeds=...)`` reads them."""
    return BaseModelOutputWithPooling(pooler_output=features)


def _required_levels(levels: tuple[torch.Tensor, ...] | None, name: str) -> tuple[torch.Tensor, ...]:
    if levels is None:
        raise ValueError(f"SAM 3 vision output has no {name}")
    return levels


def _required(tensor: torch.Tensor | None, name: str) -> torch.Tensor:
    if tensor is None:
        raise ValueError(f"SAM 3 output has no {name}")
    return tensor


def _check_finite(scores: torch.Tensor, boxes: torch.Tensor, model_dtype: torch.dtype) -> None:
    bad_rows = ~(torch.isfinite(scores).all(dim=1) & torch.isfinite(boxes).flatten(1).all(dim=1))
    if bad_rows.any():
        hint = ": float16 overflows, use bfloat16 or autocast-bf16" if model_dtype == torch.float16 else ""
        raise NonFiniteOutputError(
            f"the model gave NaN/inf scores or boxes for {int(bad_rows.sum())} of {scores.shape[0]} "
            f"image-prompt rows (outputs in {str(model_dtype).removeprefix('torch.')}){hint}"
        )


def _presence_scores(presence_logits: torch.Tensor | None) -> torch.Tensor | None:
    if presence_logits is None:
        return None
    return presence_logits.float().sigmoid().reshape(-1)


def _scaled_boxes(relative_xyxy: torch.Tensor, size_hw: tuple[int, int]) -> np.ndarray:
    height, width = size_hw
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    return (relative_xyxy * scale).numpy().astype(np.float32).reshape(-1, 4)


def exemplar_inputs(
    boxes: Sequence[Sequence[tuple[float, float, float, float]]],
    labels: Sequence[Sequence[int]],
    sizes_hw: Sequence[tuple[int, int]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_boxes`` (R, K, 4) and ``input_boxes_labels`` (R, K) for rows of up to K exemplar boxes each.

    Pixel xyxy boxes become (cx, cy, w, h) relative to each row's image, as ``Sam3Processor`` makes them;
    shorter rows are padded as the processor pads them (label -10: masked out of the geometry encoder).
    """
    most = max(len(row) for row in boxes)
    corners = torch.full((len(boxes), most, 4), float(BOX_PAD_LABEL))
    padded_labels = torch.full((len(boxes), most), BOX_PAD_LABEL, dtype=torch.long)
    for r, (row, row_labels, (height, width)) in enumerate(zip(boxes, labels, sizes_hw, strict=True)):
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        x0, y0, x1, y1 = (torch.tensor([list(box) for box in row], dtype=torch.float32) / scale).unbind(-1)
        corners[r, : len(row)] = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)
        padded_labels[r, : len(row)] = torch.tensor(list(row_labels), dtype=torch.long)
    return corners, padded_labels
