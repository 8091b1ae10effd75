"""Turns one image's detections into output objects; the metadata JSON goes last (the done marker)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
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
from sam3_batch.worker.decode import RgbPixels, rgb_pixels
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
class WriteRequest:
    """Everything needed to write one image's results (picklable: it may go to a writer process).

    Its arrays (masks, pixels) are numpy; ``worker.shared_arrays`` hands them to a writer process in shared memory.
    """

    spec: JobSpec
    chunk_id: str
    item: WorkItem
    size_wh: tuple[int, int]
    rgb: RgbPixels | None  # (H, W, 3) uint8: the image, needed only for the masked-image output
    detections: list[PromptDetections]
    timings_ms: dict[str, float]

    @classmethod
    def of_image(
        cls, spec: JobSpec, chunk_id: str, item: WorkItem, image: Image.Image,
        detections: list[PromptDetections], timings_ms: dict[str, float],
    ) -> WriteRequest:
        """The request for a decoded image in hand."""
        return cls(spec, chunk_id, item, (image.width, image.height), pixels_for_writer(spec, image), detections,
                   timings_ms)


def pixels_for_writer(spec: JobSpec, image: Image.Image) -> RgbPixels | None:
    """The image's RGB pixels if the job writes masked images, else None."""
    return rgb_pixels(image) if spec.outputs.masked_image else None


def _annotations(request: WriteRequest, layout: OutputLayout) -> list[Annotation]:
    annotations: list[Annotation] = []
    for prompt_index, found in enumerate(request.detections):
        rles = encode_rle_batch(found.masks)
        for instance_index, rle in enumerate(rles):
            x0, y0, x1, y1 = (float(v) for v in found.boxes_xyxy[instance_index])
            box = (x0, y0, x1, y1)
            wants_png = request.spec.outputs.png_masks
            png_key = layout.mask_png_uri(prompt_index, instance_index) if wants_png else None
            annotations.append(
                Annotation(
                    id=len(annotations), prompt=found.prompt, prompt_index=prompt_index,
                    score=float(found.scores[instance_index]), box_xyxy=box,
                    bbox=box_xyxy_to_xywh(box), area=rle_area(rle), segmentation=rle, mask_png=png_key,
                )
            )
    return annotations


def _write_png_masks(request: WriteRequest, layout: OutputLayout, storage: Storage) -> None:
    for prompt_index, found in enumerate(request.detections):
        for instance_index in range(len(found)):
            data = encode_png_mask(found.masks[instance_index])
            storage.write_bytes(layout.mask_png_uri(prompt_index, instance_index), data, "image/png")


def _write_masked_image(request: WriteRequest, layout: OutputLayout, storage: Storage) -> str:
    if request.rgb is None:
        raise ValueError("the masked image needs the image's pixels: build the WriteRequest with them")
    width, height = request.size_wh
    all_masks = [found.masks for found in request.detections if len(found)]
    stacked = np.concatenate(all_masks) if all_masks else np.zeros((0, height, width), dtype=bool)
    fmt = request.spec.outputs.output_format
    uri = layout.masked_image_uri(fmt)
    image = Image.fromarray(request.rgb)
    storage.write_bytes(uri, encode_masked_image(image, union_of(stacked), fmt), _CONTENT_TYPES[fmt])
    return uri


def build_metadata(request: WriteRequest, layout: OutputLayout, masked_uri: str | None) -> ImageMetadata:
    """The per-image metadata document (SA-1B-like: ``image`` + flat ``annotations`` + per-prompt summary)."""
    name = request.item.uri.rstrip("/").rsplit("/", 1)[-1]
    return ImageMetadata(
        job_id=request.spec.job_id, chunk_id=request.chunk_id,
        image=ImageInfo(uri=request.item.uri, width=request.size_wh[0], height=request.size_wh[1], file_name=name),
        model=ModelInfo(id=request.spec.model_id, revision=request.spec.model_revision),
        thresholds=request.spec.thresholds,
        prompts=[
            PromptSummary(text=d.prompt, presence_score=d.presence_score, instance_count=len(d))
            for d in request.detections
        ],
        annotations=_annotations(request, layout), masked_image=masked_uri, timings_ms=request.timings_ms,
    )


def write_image_outputs(request: WriteRequest, storage: Storage) -> ImageMetadata:
    """Write PNG masks and the masked image first, then the metadata JSON that marks the image done."""
    layout = OutputLayout(request.spec.output_root, request.item.out_key)
    if request.spec.outputs.png_masks:
        _write_png_masks(request, layout, storage)
    masked_uri = _write_masked_image(request, layout, storage) if request.spec.outputs.masked_image else None
    metadata = build_metadata(request, layout, masked_uri)
    storage.write_bytes(layout.metadata_uri, metadata.model_dump_json().encode(), "application/json")
    return metadata
