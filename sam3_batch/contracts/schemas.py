"""Pydantic models at the boundaries: job spec, chunk messages, per-image metadata, job report."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

SCHEMA_VERSION = 2  # 2: bbox is the mask's box, pred_box_xyxy the detector's; category_id, categories
MAX_PROMPT_CHARS = 256

Prompt = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]


def _clean_prompts(prompts: list[str]) -> list[str]:
    cleaned = [" ".join(p.split()) for p in prompts]
    if any(not p for p in cleaned):
        raise ValueError("prompts must not be empty or whitespace only")
    return list(dict.fromkeys(cleaned))  # drop duplicates, keep order


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OutputOptions(_Strict):
    """What to write per image besides the metadata JSON (which always carries COCO RLE masks)."""

    png_masks: bool = False
    masked_image: bool = False
    # overlay: masks drawn on the image, a colour per prompt (as ``apply_mask`` in the hosted SAM 3 image API);
    # cutout: only the masked pixels (transparent, or black in jpg, elsewhere)
    masked_style: Literal["overlay", "cutout"] = "cutout"
    output_format: Literal["jpg", "png"] = "png"
    # image: K.json per image is the done marker (small jobs); chunk: one Parquet shard per chunk holds every
    # image's results and is the chunk's done marker (lakes, millions of images: far fewer PUTs and objects)
    layout: Literal["image", "chunk"] = "image"
    per_image_json: bool | None = None  # None: on in the image layout (it is the marker), off in the chunk one

    @model_validator(mode="after")
    def _check_layout(self) -> OutputOptions:
        if self.layout == "image" and self.per_image_json is False:
            raise ValueError("the image layout always writes K.json (its done marker): use layout chunk")
        return self

    @property
    def writes_per_image_json(self) -> bool:
        """Whether each image gets its ``K.json``."""
        return self.layout == "image" or bool(self.per_image_json)


class Thresholds(_Strict):
    """As in transformers' ``post_process_instance_segmentation``."""

    score: float = Field(0.3, ge=0.0, le=1.0)
    mask: float = Field(0.5, ge=0.0, le=1.0)


class JobSpec(_Strict):
    """Stored once in Redis under the job id; chunk messages refer to it by id."""

    job_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    prompts: list[Prompt] = Field(max_length=64)  # may be empty only with a manifest (its lines give them)
    thresholds: Thresholds = Thresholds()
    outputs: OutputOptions = OutputOptions()
    output_root: str
    model_id: str = "facebook/sam3"
    model_revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16", "autocast-bf16"] = "auto"
    created_at: float = 0.0
    inputs: list[str] = Field(default_factory=list)  # an S3 prefix / folder, or http(s) URLs
    manifest: str | None = None
    state_ttl_s: int | None = Field(None, ge=1)  # job state expires this long after the job ended
    # `run --box`: one exemplar prompt applied to every image without prompts of its own.
    exemplar: ConceptPrompt | None = None
    # Images per chunk as planned when the job was created; the chunk layout names shards by it and a resume
    # keeps it, so the same listing gives the same chunks (and shard keys) again.
    chunk_size: int | None = Field(None, ge=1)

    @property
    def source(self) -> str:
        """A one-line description of where the images come from."""
        return f"manifest {self.manifest}" if self.manifest else " ".join(self.inputs)

    @field_validator("prompts")
    @classmethod
    def _check_prompts(cls, prompts: list[str]) -> list[str]:
        return _clean_prompts(prompts)

    @model_validator(mode="after")
    def _check_has_prompts(self) -> JobSpec:
        if not self.prompts and not self.manifest and self.exemplar is None:
            raise ValueError("give at least one --prompt (or a manifest whose lines carry prompts or objects)")
        return self


# Visual prompts: pixel coordinates in the EXIF-upright frame of the image (the frame the outputs use).
# Checks that need the image's size (inside the image) are made by the worker, which fails that image alone.
MAX_BOXES_PER_PROMPT = 64
MAX_POINTS_PER_OBJECT = 64
MAX_OBJECTS_PER_IMAGE = 256
Coordinate = Annotated[float, Field(allow_inf_nan=False)]
BoxXYXY = tuple[Coordinate, Coordinate, Coordinate, Coordinate]
PointXY = tuple[Coordinate, Coordinate]
Label = Literal[0, 1]  # 1: positive (include), 0: negative (exclude)


def _check_box(box: BoxXYXY) -> BoxXYXY:
    x0, y0, x1, y1 = box
    if not (x0 < x1 and y0 < y1):
        raise ValueError(f"a box is (x0, y0, x1, y1) with x0 < x1 and y0 < y1, got {list(box)}")
    return box


def _check_labels(labels: list[Label] | None, count: int, what: str) -> None:
    if labels is not None and len(labels) != count:
        raise ValueError(f"{what}_labels has {len(labels)} entries for {count} {what}(s)")


class ConceptPrompt(_Strict):
    """Every instance of a concept given by text and/or exemplar boxes (``Sam3Model`` ``input_boxes``)."""

    text: Prompt | None = None
    boxes: list[BoxXYXY] = Field(default_factory=list, max_length=MAX_BOXES_PER_PROMPT)
    box_labels: list[Label] | None = None  # default: all positive

    @field_validator("text")
    @classmethod
    def _clean_text(cls, text: str | None) -> str | None:
        return None if text is None else _clean_prompts([text])[0]

    @field_validator("boxes")
    @classmethod
    def _check_boxes(cls, boxes: list[BoxXYXY]) -> list[BoxXYXY]:
        return [_check_box(box) for box in boxes]

    @model_validator(mode="after")
    def _check_prompt(self) -> ConceptPrompt:
        _check_labels(self.box_labels, len(self.boxes), "box")
        if self.text is None and 1 not in self.labels:
            raise ValueError("a prompt without text needs at least one positive box")
        return self

    @property
    def labels(self) -> list[int]:
        """One label per box (1 when ``box_labels`` is not given)."""
        return list(self.box_labels) if self.box_labels is not None else [1] * len(self.boxes)

    def name(self, prompt_index: int) -> str:
        """The text, or ``exemplar:N`` (N the prompt's index on its image) when there is none."""
        return self.text if self.text is not None else f"exemplar:{prompt_index}"


class ObjectPrompt(_Strict):
    """One object to segment from clicks and/or a box (``Sam3TrackerModel``): exactly one mask."""

    points: list[PointXY] | None = Field(None, min_length=1, max_length=MAX_POINTS_PER_OBJECT)
    point_labels: list[Label] | None = None  # default: all positive
    box: BoxXYXY | None = None

    @field_validator("box")
    @classmethod
    def _check_box(cls, box: BoxXYXY | None) -> BoxXYXY | None:
        return None if box is None else _check_box(box)

    @model_validator(mode="after")
    def _check_object(self) -> ObjectPrompt:
        if self.points is None and self.box is None:
            raise ValueError("an object needs 'points', a 'box', or both")
        if self.point_labels is not None and self.points is None:
            raise ValueError("'point_labels' given without 'points'")
        _check_labels(self.point_labels, len(self.points or []), "point")
        return self

    @property
    def labels(self) -> list[int]:
        """One label per point (1 when ``point_labels`` is not given)."""
        points = self.points or []
        return list(self.point_labels) if self.point_labels is not None else [1] * len(points)


def _prompt_kind(value: object) -> str:
    return "text" if isinstance(value, str) else "concept"


# A manifest's prompts mix plain text and concept objects; the tag keeps validation errors to the one kind.
PromptSpec = Annotated[
    Annotated[Prompt, Tag("text")] | Annotated[ConceptPrompt, Tag("concept")], Discriminator(_prompt_kind)
]


def prompt_name(prompt: PromptSpec, prompt_index: int) -> str:
    """What an annotation's ``prompt`` says: the text, or ``exemplar:N`` for boxes alone."""
    return prompt if isinstance(prompt, str) else prompt.name(prompt_index)


def _clean_prompt_specs(prompts: list[PromptSpec]) -> list[PromptSpec]:
    cleaned: list[PromptSpec] = []
    for prompt in prompts:
        candidate = _clean_prompts([prompt])[0] if isinstance(prompt, str) else prompt
        if candidate not in cleaned:  # drop duplicates, keep order
            cleaned.append(candidate)
    return cleaned


class WorkItem(_Strict):
    """One image to segment. ``prompts`` (from a manifest) override the job's; ``objects`` add object masks."""

    uri: str = Field(min_length=1)
    out_key: str = Field(min_length=1)
    prompts: list[PromptSpec] | None = Field(None, max_length=64)
    objects: list[ObjectPrompt] | None = Field(None, max_length=MAX_OBJECTS_PER_IMAGE)

    @field_validator("prompts")
    @classmethod
    def _check_prompts(cls, prompts: list[PromptSpec] | None) -> list[PromptSpec] | None:
        return None if prompts is None else _clean_prompt_specs(prompts)


class ChunkMessage(_Strict):
    """The body of one Celery task: tens of images, so Redis holds ~100 B per queued image."""

    job_id: str
    chunk_id: str
    generation: int = 0  # bumped by a resume that replans; older chunks are then stale
    items: list[WorkItem] = Field(min_length=1)


class RLE(_Strict):
    """COCO run-length encoding; ``counts`` is the compressed UTF-8 string from pycocotools."""

    size: tuple[int, int]  # (height, width), COCO order
    counts: str


class Annotation(_Strict):
    """One instance, COCO / SA-1B style: ``bbox`` (x, y, w, h) is the box around the mask (pycocotools
    ``toBbox`` of ``segmentation``); ``pred_box_xyxy`` is the detector's own box (x0, y0, x1, y1).

    A concept prompt's instance has ``prompt_index``; an object prompt's mask has ``object_index`` instead
    (and the category ``object``, listed after the prompts' categories)."""

    id: int  # 0.. within the image, in the order of ``annotations``
    category_id: int  # prompt_index + 1, as in ``categories``
    prompt: str
    prompt_index: int | None
    score: float
    bbox: tuple[float, float, float, float]
    pred_box_xyxy: tuple[float, float, float, float]
    area: int
    segmentation: RLE
    mask_png: str | None = None
    object_index: int | None = None


class Category(_Strict):
    """A COCO category: one per prompt of the image, ``id`` = prompt index + 1."""

    id: int
    name: str
    supercategory: str = "prompt"


class PromptSummary(_Strict):
    category_id: int
    text: str
    presence_score: float | None
    instance_count: int
    boxes: list[BoxXYXY] | None = None  # a concept prompt's exemplar boxes, as given
    box_labels: list[int] | None = None


class ObjectSummary(_Strict):
    """An object prompt's input geometry, echoed, and the predicted IoU of its one mask."""

    object_index: int
    points: list[PointXY] | None = None
    point_labels: list[int] | None = None
    box: BoxXYXY | None = None
    score: float


class ImageInfo(_Strict):
    uri: str
    width: int
    height: int
    file_name: str


class ModelInfo(_Strict):
    id: str
    revision: str | None
    commit: str | None = None  # the hub commit the worker actually loaded (None for a local folder)


class ImageMetadata(_Strict):
    """Written LAST for each image: its presence means the image is done."""

    schema_version: int = SCHEMA_VERSION
    job_id: str
    chunk_id: str
    image: ImageInfo
    model: ModelInfo
    thresholds: Thresholds
    categories: list[Category]
    prompts: list[PromptSummary]
    annotations: list[Annotation]
    objects: list[ObjectSummary] = Field(default_factory=list)
    masked_image: str | None = None
    processed_at: datetime  # UTC, when the outputs were written
    timings_ms: dict[str, float] = Field(default_factory=dict)


class ItemOutcome(_Strict):
    """How one image of a chunk ended."""

    uri: str
    status: Literal["done", "failed"]
    reason: str | None = None
    instances: int = 0
    out_key: str | None = None


class JobCounters(_Strict):
    total: int = 0
    done: int = 0
    failed: int = 0
    skipped: int = 0
    listing_complete: bool = False

    @property
    def finished(self) -> int:
        return self.done + self.failed + self.skipped

    @property
    def complete(self) -> bool:
        return self.listing_complete and self.finished >= self.total


class Failure(_Strict):
    """A failed image (or a bad input entry, which has no ``out_key`` and cannot be retried)."""

    uri: str
    reason: str
    chunk_id: str
    out_key: str | None = None


class PromptCounts(_Strict):
    """What the job's images were asked and what each kind of prompt found (from the index, done images)."""

    text_prompts: int = 0  # (image, prompt) pairs with text alone
    exemplar_prompts: int = 0  # (image, prompt) pairs with exemplar boxes (with or without text)
    exemplar_boxes: int = 0
    negative_boxes: int = 0
    objects: int = 0  # point/box object prompts
    instances_by_kind: dict[str, int] = Field(default_factory=dict)  # text | exemplar | object
    # Per annotation ``prompt`` name (text, ``exemplar:N``, ``object:N``); the most frequent names only.
    instances_by_prompt: dict[str, int] = Field(default_factory=dict)


class IndexInfo(_Strict):
    """Where the job's compacted Parquet index is (written automatically when the job completes)."""

    dir: str
    files: list[str]
    images: int
    instances: int


class JobReport(_Strict):
    """Written to ``<output_root>/_jobs/<job_id>/report.json`` when the job ends."""

    job_id: str
    state: Literal["complete", "cancelled", "failed", "running"]
    counters: JobCounters
    model: ModelInfo
    prompts: list[str]
    output_root: str
    source: str
    started_at: float
    finished_at: float
    wall_seconds: float
    images_per_second: float
    # Seconds the model spent on this job's batches (post-processing included), timed only while a batch
    # had the model: chunks waiting for their turn do not count. On a GPU worker this is GPU time.
    model_seconds: float = 0.0
    gpu_seconds: float = 0.0  # deprecated: the same value as model_seconds, kept for existing readers
    failures: list[Failure]
    instances: int | None = None  # from the index; None when no index was written
    thresholds: Thresholds | None = None
    outputs: OutputOptions | None = None
    model_commit: str | None = None  # the resolved commit the outputs name, where known
    software: dict[str, str] = Field(default_factory=dict)  # sam3-batch, torch, transformers versions
    index: IndexInfo | None = None
    error: str | None = None  # why the job as a whole failed
    prompt_counts: PromptCounts | None = None  # from the index; None when no index was written
