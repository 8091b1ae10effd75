"""Visual prompts on the resident model: exemplar boxes (detector) and point/box objects (tracker).

One vision pass per batch serves every prompt of its images: text and exemplar prompts through
``Sam3Model`` with ``vision_embeds=``, object prompts through ``Sam3TrackerModel`` with
``image_embeddings=`` built from the same ViT output when the tracker's ViT is the detector's.
Text rows go through the detector together, rows with exemplar boxes together (boxes padded and masked as
``Sam3Processor`` pads them); objects of the same shape (number of points; box or not) go through the
tracker together, unpadded, since padded points would still take part in its attention.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import Sam3Model, Sam3TrackerModel
from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

from sam3_batch.contracts.errors import ItemError
from sam3_batch.contracts.schemas import ConceptPrompt, ObjectPrompt, PromptSpec, Thresholds, prompt_name
from sam3_batch.worker.detections import MaskDelivery, PromptDetections
from sam3_batch.worker.device_post import PendingDetections
from sam3_batch.worker.sam3_adapter import as_text_embeds, exemplar_inputs, select_vision_rows, start_detections
from sam3_batch.worker.tracker_adapter import (
    embeddings_from_detector,
    embeddings_from_pixels,
    object_inputs,
    same_vision_backbone,
    select_embedding_rows,
    share_vision_backbone,
    start_object_detections,
)
from sam3_batch.worker.visual_prompts import VisualRequest, VisualResult

logger = logging.getLogger(__name__)

VISUAL_ONLY_TEXT = "visual"  # the text Sam3Processor gives a prompt of exemplar boxes alone


@dataclass(frozen=True)
class _Row:
    image: int
    slot: int  # the prompt's (or object's) index on its image
    size_hw: tuple[int, int]


_PendingGroup = tuple[list[_Row], PendingDetections]  # rows post-processed together, their masks on the way
TextRows = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]
VisionFeatures = Callable[[torch.Tensor], Sam3VisionEncoderOutput]


class VisualSegmenter:
    """Runs visual-prompt batches on the runtime's detector, loading the tracker on first use."""

    def __init__(
        self, model: Sam3Model, text_rows: TextRows, tracker_source: str | Path | None, *,
        revision: str | None, device: torch.device, dtype: torch.dtype,
        vision_features: VisionFeatures | None = None,
    ) -> None:
        self.model, self.text_rows, self.tracker_source = model, text_rows, tracker_source
        self.vision_features: VisionFeatures = vision_features or self._own_vision_features
        self.revision, self.device, self.dtype = revision, device, dtype
        self._tracker: Sam3TrackerModel | None = None
        self.shares_vision = False

    def segment(
        self, pixel_values: torch.Tensor, requests: list[VisualRequest], sizes_hw: list[tuple[int, int]],
        thresholds: Thresholds, masks: MaskDelivery = "full",
    ) -> list[VisualResult]:
        """Segment a batch (pixels already stacked on the device); call under the runtime's model lock."""
        return self.start(pixel_values, requests, sizes_hw, thresholds, masks)()

    def start(
        self, pixel_values: torch.Tensor, requests: list[VisualRequest], sizes_hw: list[tuple[int, int]],
        thresholds: Thresholds, masks: MaskDelivery,
    ) -> Callable[[], list[VisualResult]]:
        """Queue a batch's device work (under the model lock); the callable returned finishes it on the host."""
        vision = self.vision_features(pixel_values)
        concepts = self._concepts(vision, requests, sizes_hw, thresholds, masks)
        objects: list[_PendingGroup] = []
        if any(request.objects for request in requests):
            objects = self._objects(vision, pixel_values, requests, sizes_hw, thresholds, masks)

        def finish() -> list[VisualResult]:
            found_concepts, found_objects = _finished(concepts), _finished(objects)
            return [
                VisualResult(
                    concepts=[found_concepts[i, j] for j in range(len(request.prompts))],
                    objects=[found_objects[i, k] for k in range(len(request.objects))],
                )
                for i, request in enumerate(requests)
            ]

        return finish

    def _concepts(
        self, vision: Sam3VisionEncoderOutput, requests: list[VisualRequest], sizes_hw: list[tuple[int, int]],
        thresholds: Thresholds, masks: MaskDelivery,
    ) -> list[_PendingGroup]:
        # Two groups: text alone, and prompts with exemplar boxes (padded to the most boxes, as the processor
        # pads them; a row of padding alone is not text alone, the geometry encoder still adds its token).
        groups: dict[bool, list[tuple[_Row, PromptSpec]]] = defaultdict(list)
        for i, request in enumerate(requests):
            for j, prompt in enumerate(request.prompts):
                boxed = isinstance(prompt, ConceptPrompt) and bool(prompt.boxes)
                groups[boxed].append((_Row(i, j, sizes_hw[i]), prompt))
        return [([row for row, _ in rows], self._concept_group(vision, rows, thresholds, masks))
                for rows in groups.values()]

    def _concept_group(
        self, vision: Sam3VisionEncoderOutput, rows: list[tuple[_Row, PromptSpec]], thresholds: Thresholds,
        masks: MaskDelivery,
    ) -> PendingDetections:
        texts = [_text_of(prompt) for _, prompt in rows]
        features, attention_mask = self.text_rows(texts)
        kwargs: dict[str, Any] = {}
        concepts = [prompt for _, prompt in rows if isinstance(prompt, ConceptPrompt) and prompt.boxes]
        if concepts:  # a group is all boxed or all text alone
            boxes, labels = exemplar_inputs(
                [c.boxes for c in concepts], [c.labels for c in concepts], [row.size_hw for row, _ in rows]
            )
            kwargs = {"input_boxes": boxes.to(self.device, self.dtype), "input_boxes_labels": labels.to(self.device)}
        outputs = self.model(
            vision_embeds=select_vision_rows(vision, self._rows_tensor(rows)),
            text_embeds=as_text_embeds(features), attention_mask=attention_mask, **kwargs,
        )
        names = [prompt_name(prompt, row.slot) for row, prompt in rows]
        return start_detections(outputs, names, [row.size_hw for row, _ in rows], thresholds, masks)

    def _objects(
        self, vision: Sam3VisionEncoderOutput, pixel_values: torch.Tensor, requests: list[VisualRequest],
        sizes_hw: list[tuple[int, int]], thresholds: Thresholds, masks: MaskDelivery,
    ) -> list[_PendingGroup]:
        tracker = self.tracker()
        if self.shares_vision:
            embeddings = embeddings_from_detector(tracker, vision)
        else:
            embeddings = embeddings_from_pixels(tracker, pixel_values)
        groups: dict[tuple[int, bool], list[tuple[_Row, ObjectPrompt]]] = defaultdict(list)
        for i, request in enumerate(requests):
            for k, obj in enumerate(request.objects):
                groups[len(obj.points or []), obj.box is not None].append((_Row(i, k, sizes_hw[i]), obj))
        return [([row for row, _ in rows], self._object_group(tracker, embeddings, rows, thresholds, masks))
                for rows in groups.values()]

    def _object_group(
        self, tracker: Sam3TrackerModel, embeddings: list[torch.Tensor], rows: list[tuple[_Row, ObjectPrompt]],
        thresholds: Thresholds, masks: MaskDelivery,
    ) -> PendingDetections:
        objects = [obj for _, obj in rows]
        sizes = [row.size_hw for row, _ in rows]
        has_points, has_box = objects[0].points is not None, objects[0].box is not None
        input_side: Any = tracker.prompt_encoder.input_image_size  # the side the processor scales to
        inputs = object_inputs(
            [o.points or [] for o in objects] if has_points else None,
            [o.labels for o in objects] if has_points else None,
            [o.box for o in objects if o.box is not None] if has_box else None,
            sizes, int(input_side),
        )
        outputs = tracker(
            image_embeddings=select_embedding_rows(embeddings, self._rows_tensor(rows)),
            multimask_output=True,
            **{name: _to(tensor, self.device, self.dtype) for name, tensor in inputs.items()},
        )
        names = [f"object:{row.slot}" for row, _ in rows]
        return start_object_detections(outputs, names, sizes, thresholds.mask, masks)

    def _own_vision_features(self, pixel_values: torch.Tensor) -> Sam3VisionEncoderOutput:
        vision: Sam3VisionEncoderOutput = self.model.get_vision_features(pixel_values=pixel_values)
        return vision

    def _rows_tensor(self, rows: list[tuple[_Row, Any]]) -> torch.Tensor:
        image_of_row = [row.image for row, _ in rows]
        return torch.tensor(image_of_row, dtype=torch.long).to(self.device, non_blocking=True)

    def tracker(self) -> Sam3TrackerModel:
        """The tracker, loaded on first use (jobs without object prompts never pay for it)."""
        if self._tracker is None:
            self._load_tracker()
        assert self._tracker is not None  # set by use_tracker
        return self._tracker

    def use_tracker(self, tracker: Sam3TrackerModel) -> None:
        """Adopt a tracker (on any device): it shares the detector's ViT when it holds the same weights."""
        self.shares_vision = same_vision_backbone(self.model, tracker)
        if self.shares_vision:
            share_vision_backbone(self.model, tracker)
        module: torch.nn.Module = tracker
        module.to(self.device, self.dtype).eval()
        self._tracker = tracker
        logger.info("tracker ready; vision pass shared with the detector: %s", self.shares_vision)

    def _load_tracker(self) -> Sam3TrackerModel:
        if self.tracker_source is None:
            raise ItemError("this model has no tracker for object prompts (points/box objects)")
        tracker = Sam3TrackerModel.from_pretrained(
            self.tracker_source, revision=self.revision or "main", dtype=self.dtype, attn_implementation="sdpa"
        )
        self.use_tracker(tracker)
        logger.info("loaded the tracker from %s", self.tracker_source)
        return tracker


def _finished(groups: Sequence[_PendingGroup]) -> dict[tuple[int, int], PromptDetections]:
    """Each group's detections by (image, slot), once their masks are on the host."""
    found: dict[tuple[int, int], PromptDetections] = {}
    for rows, pending in groups:
        for row, detections in zip(rows, pending.finish(), strict=True):
            found[row.image, row.slot] = detections
    return found


def _text_of(prompt: PromptSpec) -> str:
    if isinstance(prompt, str):
        return prompt
    return prompt.text if prompt.text is not None else VISUAL_ONLY_TEXT


def _to(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # Coordinates follow the model's dtype; labels stay integers.
    return tensor.to(device, dtype) if tensor.is_floating_point() else tensor.to(device)
