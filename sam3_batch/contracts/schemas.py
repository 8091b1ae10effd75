"""Pydantic models at the boundaries: job spec, chunk messages, per-image metadata, job report."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

SCHEMA_VERSION = 1
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
    masked_image: bool = False  # as ``apply_mask`` in the hosted SAM 3 image API
    output_format: Literal["jpg", "png"] = "png"


class Thresholds(_Strict):
    """As in transformers' ``post_process_instance_segmentation``."""

    score: float = Field(0.3, ge=0.0, le=1.0)
    mask: float = Field(0.5, ge=0.0, le=1.0)


class JobSpec(_Strict):
    """Stored once in Redis under the job id; chunk messages refer to it by id."""

    job_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    prompts: list[Prompt] = Field(min_length=1, max_length=64)
    thresholds: Thresholds = Thresholds()
    outputs: OutputOptions = OutputOptions()
    output_root: str
    model_id: str = "facebook/sam3"
    model_revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    created_at: float = 0.0
    inputs: list[str] = Field(default_factory=list)  # an S3 prefix / folder, or http(s) URLs
    manifest: str | None = None

    @property
    def source(self) -> str:
        """A one-line description of where the images come from."""
        return f"manifest {self.manifest}" if self.manifest else " ".join(self.inputs)

    @field_validator("prompts")
    @classmethod
    def _check_prompts(cls, prompts: list[str]) -> list[str]:
        return _clean_prompts(prompts)


class WorkItem(_Strict):
    """One image to segment. ``prompts`` (from a manifest) override the job's prompts."""

    uri: str = Field(min_length=1)
    out_key: str = Field(min_length=1)
    prompts: list[Prompt] | None = None

    @field_validator("prompts")
    @classmethod
    def _check_prompts(cls, prompts: list[str] | None) -> list[str] | None:
        return None if prompts is None else _clean_prompts(prompts)


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
    """One instance, SA-1B / COCO style (``bbox`` is xywh; ``box_xyxy`` is given too)."""

    id: int
    prompt: str
    prompt_index: int
    score: float
    box_xyxy: tuple[float, float, float, float]
    bbox: tuple[float, float, float, float]
    area: int
    segmentation: RLE
    mask_png: str | None = None


class PromptSummary(_Strict):
    text: str
    presence_score: float | None
    instance_count: int


class ImageInfo(_Strict):
    uri: str
    width: int
    height: int
    file_name: str


class ModelInfo(_Strict):
    id: str
    revision: str | None


class ImageMetadata(_Strict):
    """Written LAST for each image: its presence means the image is done."""

    schema_version: int = SCHEMA_VERSION
    job_id: str
    chunk_id: str
    image: ImageInfo
    model: ModelInfo
    thresholds: Thresholds
    prompts: list[PromptSummary]
    annotations: list[Annotation]
    masked_image: str | None = None
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


class JobReport(_Strict):
    """Written to ``<output_root>/_job/<job_id>/report.json`` when the job ends."""

    job_id: str
    state: Literal["complete", "cancelled", "running"]
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
