"""The one place that knows the transformers SAM 3 tracker layouts (object prompts: points and/or a box).

It builds the tracker's image embeddings from the detector's ViT output when both use the same ViT
(``facebook/sam3`` does: one checkpoint, the tracker's backbone renamed from the detector's), the way
``Sam3VideoModel.get_vision_features_for_tracker`` and ``Sam3TrackerModel.get_image_embeddings`` do, and
turns the tracker's multimask output into one ``PromptDetections`` per object: the mask with the best
predicted IoU, upsampled from logits as the tracker processor's ``post_process_masks`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers import Sam3Model, Sam3TrackerModel
from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput
from transformers.models.sam3_tracker.modeling_sam3_tracker import Sam3TrackerImageSegmentationOutput

from sam3_batch.worker.detections import MaskDelivery, PromptDetections
from sam3_batch.worker.device_post import PendingDetections, RowMasks, start_masks, upsample_then_sigmoid


def same_vision_backbone(detector: Sam3Model, tracker: Sam3TrackerModel) -> bool:
    """True when the tracker's ViT holds exactly the detector's weights (then one vision pass serves both)."""
    ours = detector.vision_encoder.backbone.state_dict()
    theirs = tracker.vision_encoder.backbone.state_dict()
    if ours.keys() != theirs.keys():
        return False
    return all(ours[k].shape == theirs[k].shape and torch.equal(ours[k], theirs[k].to(ours[k])) for k in ours)


def share_vision_backbone(detector: Sam3Model, tracker: Sam3TrackerModel) -> None:
    """Point the tracker at the detector's ViT module, so its copy of the weights is freed."""
    tracker.vision_encoder.backbone = detector.vision_encoder.backbone


def embeddings_from_detector(tracker: Sam3TrackerModel, vision: Sam3VisionEncoderOutput) -> list[torch.Tensor]:
    """The tracker's image embeddings (B, C, h, w per level) from the detector's ViT output."""
    hidden = vision.last_hidden_state
    if hidden is None:
        raise ValueError("SAM 3 vision output has no last_hidden_state")
    batch = hidden.shape[0]
    height, width = tracker.prompt_encoder.image_embedding_size
    spatial = hidden.view(batch, height, width, -1).permute(0, 3, 1, 2)
    fpn_hidden_states, _positions = tracker.vision_encoder.neck(spatial)
    return _with_decoder_projections(tracker, list(fpn_hidden_states))


def embeddings_from_pixels(tracker: Sam3TrackerModel, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """The tracker's image embeddings from its own vision pass (when its ViT is not the detector's)."""
    embeddings: list[torch.Tensor] = tracker.get_image_embeddings(pixel_values)
    return embeddings


def _with_decoder_projections(tracker: Sam3TrackerModel, levels: list[torch.Tensor]) -> list[torch.Tensor]:
    # As get_image_features + get_image_embeddings: the two finest levels go through the mask decoder's
    # projections, the coarsest gets the "no memory" embedding (an image, not a video frame).
    levels = levels[: len(tracker.backbone_feature_sizes)]
    levels[0] = tracker.mask_decoder.conv_s0(levels[0])
    levels[1] = tracker.mask_decoder.conv_s1(levels[1])
    levels[-1] = levels[-1] + tracker.no_memory_embedding.reshape(1, -1, 1, 1)
    return levels


def select_embedding_rows(embeddings: list[torch.Tensor], rows: torch.Tensor) -> list[torch.Tensor]:
    """Row k taken from image ``rows[k]``: one vision pass serves every object of an image."""
    return [level.index_select(0, rows) for level in embeddings]


def object_inputs(
    points: Sequence[Sequence[tuple[float, float]]] | None,
    labels: Sequence[Sequence[int]] | None,
    boxes: Sequence[tuple[float, float, float, float]] | None,
    sizes_hw: Sequence[tuple[int, int]],
    input_side: int,
) -> dict[str, torch.Tensor]:
    """Tracker inputs for G objects of one shape (same point count; all with or all without a box).

    Pixel coordinates scale to the model's input side, as ``Sam3TrackerProcessor`` does; one object per row.
    """
    scale = torch.tensor([[input_side / w, input_side / h] for h, w in sizes_hw], dtype=torch.float32)
    inputs: dict[str, torch.Tensor] = {}
    if points is not None and labels is not None:
        coords = torch.tensor([list(map(list, p)) for p in points], dtype=torch.float32)  # (G, N, 2)
        inputs["input_points"] = (coords * scale[:, None, :])[:, None]  # (G, 1, N, 2)
        inputs["input_labels"] = torch.tensor([list(lab) for lab in labels], dtype=torch.long)[:, None]
    if boxes is not None:
        corners = torch.tensor([list(b) for b in boxes], dtype=torch.float32)  # (G, 4)
        inputs["input_boxes"] = (corners * scale.repeat(1, 2))[:, None]  # (G, 1, 4)
    return inputs


def to_object_detections(
    outputs: Sam3TrackerImageSegmentationOutput,
    names: Sequence[str],
    sizes_hw: Sequence[tuple[int, int]],
    mask_threshold: float,
    delivery: MaskDelivery = "full",
) -> list[PromptDetections]:
    """One detection per object row: the best of its multimask outputs by predicted IoU, with that score."""
    return start_object_detections(outputs, names, sizes_hw, mask_threshold, delivery).finish()


def start_object_detections(
    outputs: Sam3TrackerImageSegmentationOutput,
    names: Sequence[str],
    sizes_hw: Sequence[tuple[int, int]],
    mask_threshold: float,
    delivery: MaskDelivery,
) -> PendingDetections:
    """``to_object_detections`` with the masks post-processed on the device and still on their way."""
    iou = _required(outputs.iou_scores, "iou_scores")[:, 0].float()  # (G, M)
    masks = _required(outputs.pred_masks, "pred_masks")[:, 0]  # (G, M, h, w) logits
    best = iou.argmax(dim=1)
    rows = torch.arange(iou.shape[0], device=iou.device)
    best_scores = iou[rows, best].cpu()
    object_logits: Any = outputs.object_score_logits
    object_scores = object_logits.float().sigmoid().reshape(-1).cpu().tolist() if object_logits is not None else None
    pending = start_masks(masks[rows, best], [(size, 1) for size in sizes_hw], mask_threshold, delivery,
                          upsample_then_sigmoid)

    def assemble(found: list[RowMasks]) -> list[PromptDetections]:
        return [
            PromptDetections(
                prompt=names[row],
                presence_score=object_scores[row] if object_scores is not None else None,
                scores=best_scores[row : row + 1].numpy().astype(np.float32),
                boxes_xyxy=_box_of_mask(one.codes.bboxes_xywh),
                masks=one.masks, codes=one.codes, packed=one.packed,
            )
            for row, one in enumerate(found)
        ]

    return PendingDetections(pending, assemble)


def _box_of_mask(bboxes_xywh: np.ndarray) -> np.ndarray:
    """The tight xyxy pixel box around each mask (zeros when it is empty), from its COCO bbox."""
    boxes = bboxes_xywh.astype(np.float32).reshape(-1, 4).copy()
    boxes[:, 2:] += boxes[:, :2]
    return boxes


def _required(tensor: torch.Tensor | None, name: str) -> torch.Tensor:
    if tensor is None:
        raise ValueError(f"SAM 3 tracker output has no {name}")
    return tensor
