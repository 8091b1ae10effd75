"""Turns one image's detections into output objects; the metadata JSON goes last (the done marker)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from sam3_batch.contracts.keys import OutputLayout
from sam3_batch.contracts.schemas import (
    Annotation,
    ImageInfo,
    ImageMetadata,
    JobSpec,
    ModelInfo,
    PromptSummary,
    WorkItem,
)
from sam3_batch.contracts.storage import Storage
from sam3_batch.worker.detections import PromptDetections
from sam3_batch.worker.encode import (
    box_xyxy_to_xywh,
    encode_masked_image,
    encode_png_mask,
    encode_rle_batch,
    rle_area,
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
            box = (x0, y0, x1, y1)
            wants_png = job.spec.outputs.png_masks
            png_key = layout.mask_png_uri(prompt_index, instance_index) if wants_png else None
            annotations.append(
                Annotation(
                    id=len(annotations), prompt=found.prompt, prompt_index=prompt_index,
                    score=float(found.scores[instance_index]), box_xyxy=box,
                    bbox=box_xyxy_to_xywh(box), area=rle_area(rle), segmentation=rle, mask_png=png_key,
                )
            )
    return annotations


def _write_png_masks(job: ImageJob, layout: OutputLayout, storage: Storage) -> None:
    for prompt_index, found in enumerate(job.detections):
        for instance_index in range(len(found)):
            data = encode_png_mask(found.masks[instance_index])
            storage.write_bytes(layout.mask_png_uri(prompt_index, instance_index), data, "image/png")


def _write_masked_image(job: ImageJob, layout: OutputLayout, storage: Storage) -> str:
    if job.rgb is None:
        raise ValueError("the masked image needs the image's pixels: build the ImageJob with them")
    width, height = job.size_wh
    all_masks = [found.masks for found in job.detections if len(found)]
    stacked = np.concatenate(all_masks) if all_masks else np.zeros((0, height, width), dtype=bool)
    fmt = job.spec.outputs.output_format
    uri = layout.masked_image_uri(fmt)
    image = Image.fromarray(job.rgb.numpy())
    storage.write_bytes(uri, encode_masked_image(image, union_of(stacked), fmt), _CONTENT_TYPES[fmt])
    return uri


def build_metadata(job: ImageJob, layout: OutputLayout, masked_uri: str | None) -> ImageMetadata:
    """The per-image metadata document (SA-1B-like: ``image`` + flat ``annotations`` + per-prompt summary)."""
    name = job.item.uri.rstrip("/").rsplit("/", 1)[-1]
    return ImageMetadata(
        job_id=job.spec.job_id, chunk_id=job.chunk_id,
        image=ImageInfo(uri=job.item.uri, width=job.size_wh[0], height=job.size_wh[1], file_name=name),
        model=ModelInfo(id=job.spec.model_id, revision=job.spec.model_revision, commit=job.model_commit),
        thresholds=job.spec.thresholds,
        prompts=[
            PromptSummary(text=d.prompt, presence_score=d.presence_score, instance_count=len(d))
            for d in job.detections
        ],
        annotations=_annotations(job, layout), masked_image=masked_uri, timings_ms=job.timings_ms,
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
