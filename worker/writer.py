"""Turns one image's detections into output objects; the metadata JSON goes last (the done marker)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import numpy as np
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
from sam3_batch.worker.decode import RgbPixels, rgb_pixels
from sam3_batch.worker.detections import MaskCodes, MaskDelivery, PromptDetections
from sam3_batch.worker.device_post import materialised
from sam3_batch.worker.encode import (
    BoolMask,
    encode_masked_image,
    encode_overlay_image,
    encode_png_mask,
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
    # The visual prompts as segmented (boxes clipped to the image), echoed in the metadata.
    prompts: list[PromptSpec] = field(default_factory=list)
    objects: list[ObjectPrompt] = field(default_factory=list)
    object_detections: list[PromptDetections] = field(default_factory=list)  # one per object
    model_commit: str | None = None  # the loaded model's resolved hub commit, recorded in the metadata

    def materialised(self) -> WriteRequest:
        """The request with every deferred detection post-processed (``device_post.materialised``)."""
        return replace(self, detections=materialised(self.detections),
                       object_detections=materialised(self.object_detections))

    @classmethod
    def of_image(
        cls, spec: JobSpec, chunk_id: str, item: WorkItem, image: Image.Image,
        detections: list[PromptDetections], timings_ms: dict[str, float],
    ) -> WriteRequest:
        """The request for a decoded image in hand."""
        return cls(spec, chunk_id, item, (image.width, image.height), pixels_for_writer(spec, image), detections,
                   timings_ms)


def masks_for_writer(spec: JobSpec) -> MaskDelivery:
    """What of the full-size masks the writer needs from the device: packed bits for PNGs and masked images."""
    return "packed" if spec.outputs.png_masks or spec.outputs.masked_image else "none"


def pixels_for_writer(spec: JobSpec, image: Image.Image) -> RgbPixels | None:
    """The image's RGB pixels if the job writes masked images, else None."""
    return rgb_pixels(image) if spec.outputs.masked_image else None


def _annotations(request: WriteRequest, layout: OutputLayout) -> list[Annotation]:
    annotations: list[Annotation] = []
    for prompt_index, found in enumerate(request.detections):
        codes = found.mask_codes()  # computed on the device by the runtime; encoded here for stand-ins
        for instance_index, rle in enumerate(codes.rles):
            x0, y0, x1, y1 = (float(v) for v in found.boxes_xyxy[instance_index])
            wants_png = request.spec.outputs.png_masks
            png_key = layout.mask_png_uri(prompt_index, instance_index) if wants_png else None
            annotations.append(
                Annotation(
                    id=len(annotations), category_id=prompt_index + 1, prompt=found.prompt,
                    prompt_index=prompt_index, score=float(found.scores[instance_index]),
                    bbox=_bbox(codes, instance_index), pred_box_xyxy=(x0, y0, x1, y1),
                    area=int(codes.areas[instance_index]), segmentation=rle, mask_png=png_key,
                )
            )
    return annotations + _object_annotations(request, layout, first_id=len(annotations))


def _object_category_id(request: WriteRequest) -> int:
    """Object prompts share one category, ``object``, after the concept prompts' categories."""
    return len(request.detections) + 1


def _categories(request: WriteRequest) -> list[Category]:
    categories = [Category(id=index + 1, name=d.prompt) for index, d in enumerate(request.detections)]
    if request.object_detections:
        categories.append(Category(id=_object_category_id(request), name="object", supercategory="object"))
    return categories


def _object_annotations(request: WriteRequest, layout: OutputLayout, first_id: int) -> list[Annotation]:
    annotations: list[Annotation] = []
    for object_index, found in enumerate(request.object_detections):
        png_key = layout.object_png_uri(object_index) if request.spec.outputs.png_masks else None
        codes = found.mask_codes()
        for instance_index, rle in enumerate(codes.rles):
            x0, y0, x1, y1 = (float(v) for v in found.boxes_xyxy[instance_index])
            annotations.append(
                Annotation(
                    id=first_id + len(annotations), category_id=_object_category_id(request), prompt=found.prompt,
                    prompt_index=None, object_index=object_index, score=float(found.scores[instance_index]),
                    bbox=_bbox(codes, instance_index), pred_box_xyxy=(x0, y0, x1, y1),
                    area=int(codes.areas[instance_index]), segmentation=rle, mask_png=png_key,
                )
            )
    return annotations


def _bbox(codes: MaskCodes, index: int) -> tuple[float, float, float, float]:
    x, y, width, height = (float(v) for v in codes.bboxes_xywh[index])
    return (x, y, width, height)


def _prompt_summary(request: WriteRequest, index: int, found: PromptDetections) -> PromptSummary:
    prompt = request.prompts[index] if index < len(request.prompts) else found.prompt
    boxes = None if isinstance(prompt, str) else prompt.boxes
    labels = None if isinstance(prompt, str) else prompt.labels
    return PromptSummary(category_id=index + 1, text=found.prompt, presence_score=found.presence_score,
                         instance_count=len(found), boxes=boxes or None, box_labels=labels or None)


def _object_summaries(request: WriteRequest) -> list[ObjectSummary]:
    return [
        ObjectSummary(object_index=index, points=obj.points, point_labels=obj.labels if obj.points else None,
                      box=obj.box, score=float(found.scores[0]) if len(found) else 0.0)
        for index, (obj, found) in enumerate(zip(request.objects, request.object_detections, strict=True))
    ]


@dataclass(frozen=True)
class _FullMasks:
    """Each prompt's and each object's (N, H, W) bool masks, unpacked once for the PNG and masked outputs."""

    concepts: list[BoolMask]
    objects: list[BoolMask]

    @classmethod
    def of(cls, request: WriteRequest) -> _FullMasks:
        # Unpacked here, in the writer, from the bits the device packed (or decoded from the RLEs).
        return cls([found.full_masks() for found in request.detections],
                   [found.full_masks() for found in request.object_detections])


def _write_png_masks(masks: _FullMasks, layout: OutputLayout, storage: Storage) -> int:
    written = 0
    for prompt_index, prompt_masks in enumerate(masks.concepts):
        for instance_index, mask in enumerate(prompt_masks):
            data = encode_png_mask(mask)
            storage.write_bytes(layout.mask_png_uri(prompt_index, instance_index), data, "image/png")
            written += len(data)
    for object_index, object_masks in enumerate(masks.objects):
        for mask in object_masks:  # one per object
            data = encode_png_mask(mask)
            storage.write_bytes(layout.object_png_uri(object_index), data, "image/png")
            written += len(data)
    return written


def _write_masked_image(
    request: WriteRequest, masks: _FullMasks, layout: OutputLayout, storage: Storage,
) -> tuple[str, int]:
    if request.rgb is None:
        raise ValueError("the masked image needs the image's pixels: build the WriteRequest with them")
    fmt = request.spec.outputs.output_format
    uri = layout.masked_image_uri(fmt)
    image = Image.fromarray(request.rgb)
    if request.spec.outputs.masked_style == "overlay":
        # One colour per concept prompt, then one per object.
        data = encode_overlay_image(image, [*masks.concepts, *masks.objects], fmt)
    else:
        width, height = request.size_wh
        all_masks = [found for found in [*masks.concepts, *masks.objects] if len(found)]
        stacked = np.concatenate(all_masks) if all_masks else np.zeros((0, height, width), dtype=bool)
        data = encode_masked_image(image, union_of(stacked), fmt)
    storage.write_bytes(uri, data, _CONTENT_TYPES[fmt])
    return uri, len(data)


def build_metadata(request: WriteRequest, layout: OutputLayout, masked_uri: str | None) -> ImageMetadata:
    """The per-image metadata document (SA-1B-like: ``image`` + flat ``annotations`` + per-prompt summary)."""
    shown = display_uri(request.item.uri)  # the real URI may carry a signature: it stays in the queue message
    name = shown.split("?", 1)[0].split("#", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    return ImageMetadata(
        job_id=request.spec.job_id, chunk_id=request.chunk_id,
        image=ImageInfo(uri=shown, width=request.size_wh[0], height=request.size_wh[1], file_name=name),
        model=ModelInfo(id=request.spec.model_id, revision=request.spec.model_revision, commit=request.model_commit),
        thresholds=request.spec.thresholds,
        categories=_categories(request),
        prompts=[_prompt_summary(request, index, d) for index, d in enumerate(request.detections)],
        annotations=_annotations(request, layout), objects=_object_summaries(request), masked_image=masked_uri,
        processed_at=datetime.now(UTC),
        timings_ms=request.timings_ms,
    )


@dataclass(frozen=True)
class WrittenOutputs:
    """An image's metadata as written, and the bytes of every object written for it (metadata included)."""

    metadata: ImageMetadata
    bytes_written: int


def write_image_outputs(request: WriteRequest, storage: Storage) -> ImageMetadata:
    """Write PNG masks and the masked image first, then the metadata JSON that marks the image done.

    In the chunk layout the JSON is optional (off by default): the chunk's shard, written after every
    image of the chunk, carries the same document and is the done marker.
    """
    return write_counted_outputs(request, storage).metadata


def write_counted_outputs(request: WriteRequest, storage: Storage) -> WrittenOutputs:
    """``write_image_outputs``, also counting the bytes written (the writer process returns the count)."""
    request = request.materialised()  # masks a CPU runtime left to the writer: post-processed here
    layout = OutputLayout(request.spec.output_root, request.item.out_key)
    outputs = request.spec.outputs
    masks = _FullMasks.of(request) if outputs.png_masks or outputs.masked_image else None
    written = _write_png_masks(masks, layout, storage) if masks is not None and outputs.png_masks else 0
    masked_uri = None
    if masks is not None and outputs.masked_image:
        masked_uri, masked_bytes = _write_masked_image(request, masks, layout, storage)
        written += masked_bytes
    metadata = build_metadata(request, layout, masked_uri)
    if not request.spec.outputs.writes_per_image_json:
        return WrittenOutputs(metadata, written)
    document = metadata.model_dump_json().encode()
    storage.write_bytes(layout.metadata_uri, document, "application/json")
    return WrittenOutputs(metadata, written + len(document))
