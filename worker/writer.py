"""Turns one image's detections into output objects; the metadata JSON goes last (the done marker)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import torch
from PIL import Image

from sam3_batch.contracts.layout import OutputLayout
from sam3_batch.contracts.redact import display_uri
from sam3_batch.contracts.schemas import (
    Annotation,
    Category,
    ImageInfo,
    ImageMetadata,
    JobSpec,
    ModelInfo,
    ObjectPrompt,
    ObjectSummary,
    PromptSpec,
    PromptSummary,
    WorkItem,
)
from sam3_batch.contracts.storage import Storage
from sam3_batch.worker.detections import PromptDetections
from sam3_batch.worker.encode import (
    encode_masked_image,
    encode_overlay_image,
    encode_png_mask,
    encode_rle_batch,
    rle_area,
    rle_bbox,
    union_of,
)

_CONTENT_TYPES = {"png": "image/png", "jpg": "image/jpeg"}


@dataclass(frozen=True)
class ImageJob:
    """Everything needed to write one image's results (picklable: it may go to a writer process)."""

    spec: JobSpec
    chunk_id: str
    item: WorkItem
    size_wh: tuple[int, int]
    rgb: torch.Tensor | None  # (H, W, 3) uint8: the image, needed only for the masked-image output
    detections: list[PromptDetections]
    timings_ms: dict[str, float]
    # The visual prompts as segmented (boxes clipped to the image), echoed in the metadata.
    prompts: list[PromptSpec] = field(default_factory=list)
    objects: list[ObjectPrompt] = field(default_factory=list)
    object_detections: list[PromptDetections] = field(default_factory=list)  # one per object
    model_commit: str | None = None  # the loaded model's resolved hub commit, recorded in the metadata

    @classmethod
    def of_image(
        cls, spec: JobSpec, chunk_id: str, item: WorkItem, image: Image.Image,
        detections: list[PromptDetections], timings_ms: dict[str, float],
    ) -> ImageJob:
        """The job for a decoded image in hand."""
        return cls(spec, chunk_id, item, (image.width, image.height), pixels_for_writer(spec, image), detections,
                   timings_ms)


def pixels_for_writer(spec: JobSpec, image: Image.Image) -> torch.Tensor | None:
    """The image's RGB pixels as an (H, W, 3) uint8 tensor if the job writes masked images, else None."""
    return torch.from_numpy(np.array(image)) if spec.outputs.masked_image else None


def _annotations(job: ImageJob, layout: OutputLayout) -> list[Annotation]:
    annotations: list[Annotation] = []
    for prompt_index, found in enumerate(job.detections):
        rles = encode_rle_batch(found.masks)
        for instance_index, rle in enumerate(rles):
            x0, y0, x1, y1 = (float(v) for v in found.boxes_xyxy[instance_index])
            wants_png = job.spec.outputs.png_masks
            png_key = layout.mask_png_uri(prompt_index, instance_index) if wants_png else None
            annotations.append(
                Annotation(
                    id=len(annotations), category_id=prompt_index + 1, prompt=found.prompt,
                    prompt_index=prompt_index, score=float(found.scores[instance_index]), bbox=rle_bbox(rle),
                    pred_box_xyxy=(x0, y0, x1, y1), area=rle_area(rle), segmentation=rle, mask_png=png_key,
                )
            )
    return annotations + _object_annotations(job, layout, first_id=len(annotations))


def _object_category_id(job: ImageJob) -> int:
    """Object prompts share one category, ``object``, after the concept prompts' categories."""
    return len(job.detections) + 1


def _categories(job: ImageJob) -> list[Category]:
    categories = [Category(id=index + 1, name=d.prompt) for index, d in enumerate(job.detections)]
    if job.object_detections:
        categories.append(Category(id=_object_category_id(job), name="object", supercategory="object"))
    return categories


def _object_annotations(job: ImageJob, layout: OutputLayout, first_id: int) -> list[Annotation]:
    annotations: list[Annotation] = []
    for object_index, found in enumerate(job.object_detections):
        png_key = layout.object_png_uri(object_index) if job.spec.outputs.png_masks else None
        for instance_index, rle in enumerate(encode_rle_batch(found.masks)):
            x0, y0, x1, y1 = (float(v) for v in found.boxes_xyxy[instance_index])
            annotations.append(
                Annotation(
                    id=first_id + len(annotations), category_id=_object_category_id(job), prompt=found.prompt,
                    prompt_index=None, object_index=object_index, score=float(found.scores[instance_index]),
                    bbox=rle_bbox(rle), pred_box_xyxy=(x0, y0, x1, y1), area=rle_area(rle), segmentation=rle,
                    mask_png=png_key,
                )
            )
    return annotations


def _prompt_summary(job: ImageJob, index: int, found: PromptDetections) -> PromptSummary:
    prompt = job.prompts[index] if index < len(job.prompts) else found.prompt
    boxes = None if isinstance(prompt, str) else prompt.boxes
    labels = None if isinstance(prompt, str) else prompt.labels
    return PromptSummary(category_id=index + 1, text=found.prompt, presence_score=found.presence_score,
                         instance_count=len(found), boxes=boxes or None, box_labels=labels or None)


def _object_summaries(job: ImageJob) -> list[ObjectSummary]:
    return [
        ObjectSummary(object_index=index, points=obj.points, point_labels=obj.labels if obj.points else None,
                      box=obj.box, score=float(found.scores[0]) if len(found) else 0.0)
        for index, (obj, found) in enumerate(zip(job.objects, job.object_detections, strict=True))
    ]


def _write_png_masks(job: ImageJob, layout: OutputLayout, storage: Storage) -> None:
    for prompt_index, found in enumerate(job.detections):
        for instance_index in range(len(found)):
            data = encode_png_mask(found.masks[instance_index])
            storage.write_bytes(layout.mask_png_uri(prompt_index, instance_index), data, "image/png")
    for object_index, found in enumerate(job.object_detections):
        for mask in found.masks:  # one per object
            storage.write_bytes(layout.object_png_uri(object_index), encode_png_mask(mask), "image/png")


def _write_masked_image(job: ImageJob, layout: OutputLayout, storage: Storage) -> str:
    if job.rgb is None:
        raise ValueError("the masked image needs the image's pixels: build the ImageJob with them")
    fmt = job.spec.outputs.output_format
    uri = layout.masked_image_uri(fmt)
    image = Image.fromarray(job.rgb.numpy())
    if job.spec.outputs.masked_style == "overlay":
        # One colour per concept prompt, then one per object.
        data = encode_overlay_image(image, [found.masks for found in [*job.detections, *job.object_detections]], fmt)
    else:
        width, height = job.size_wh
        all_masks = [found.masks for found in [*job.detections, *job.object_detections] if len(found)]
        stacked = np.concatenate(all_masks) if all_masks else np.zeros((0, height, width), dtype=bool)
        data = encode_masked_image(image, union_of(stacked), fmt)
    storage.write_bytes(uri, data, _CONTENT_TYPES[fmt])
    return uri


def build_metadata(job: ImageJob, layout: OutputLayout, masked_uri: str | None) -> ImageMetadata:
    """The per-image metadata document (SA-1B-like: ``image`` + flat ``annotations`` + per-prompt summary)."""
    shown = display_uri(job.item.uri)  # the real URI may carry a signature: it stays in the queue message
    name = shown.split("?", 1)[0].split("#", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    return ImageMetadata(
        job_id=job.spec.job_id, chunk_id=job.chunk_id,
        image=ImageInfo(uri=shown, width=job.size_wh[0], height=job.size_wh[1], file_name=name),
        model=ModelInfo(id=job.spec.model_id, revision=job.spec.model_revision, commit=job.model_commit),
        thresholds=job.spec.thresholds,
        categories=_categories(job),
        prompts=[_prompt_summary(job, index, d) for index, d in enumerate(job.detections)],
        annotations=_annotations(job, layout), objects=_object_summaries(job), masked_image=masked_uri,
        processed_at=datetime.now(UTC),
        timings_ms=job.timings_ms,
    )


def write_image_outputs(job: ImageJob, storage: Storage) -> ImageMetadata:
    """Write PNG masks and the masked image first, then the metadata JSON that marks the image done."""
    layout = OutputLayout(job.spec.output_root, job.item.out_key)
    if job.spec.outputs.png_masks:
        _write_png_masks(job, layout, storage)
    masked_uri = _write_masked_image(job, layout, storage) if job.spec.outputs.masked_image else None
    metadata = build_metadata(job, layout, masked_uri)
    storage.write_bytes(layout.metadata_uri, metadata.model_dump_json().encode(), "application/json")
    return metadata
