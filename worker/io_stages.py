"""The work beside the model, one image at a time: load (read, decode, prepare) and write (encode, upload).

These functions run in the stage pools (``worker.stage_pools``): in processes of their own by default,
so that none of this CPU work contends for the model process's GIL, or in threads of that process.
Everything they take and return is picklable; the big arrays (prepared pixels, RGB pixels, masks) travel
as torch tensors, which multiprocessing hands over in shared memory instead of copying through a pipe.
They never raise for a problem with the image: they return a ``StageFailure`` that says what happened
and whether trying again later may help, decided where the original exception still exists.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from sam3_batch.contracts.errors import is_transient, reason_of
from sam3_batch.contracts.keys import OutputLayout
from sam3_batch.contracts.schemas import ImageMetadata, JobSpec, WorkItem
from sam3_batch.contracts.settings import Settings
from sam3_batch.contracts.storage import Storage
from sam3_batch.worker.decode import decode_image
from sam3_batch.worker.writer import WriteRequest, pixels_for_writer, write_image_outputs

Preparer = Callable[[Image.Image], Any]  # decoded RGB image -> what the runtime's segment() takes


@dataclass(frozen=True)
class StageResources:
    """What a stage worker needs: built once per process (or once for all threads)."""

    settings: Settings
    storage: Storage
    preparer: Preparer


@dataclass(frozen=True)
class StageFailure:
    """Why one image could not be loaded or written, as the job report will show it."""

    reason: str
    transient: bool
    error_class: str

    @classmethod
    def of(cls, exc: BaseException) -> StageFailure:
        return cls(reason=reason_of(exc), transient=is_transient(exc), error_class=type(exc).__name__)


@dataclass(frozen=True)
class LoadedImage:
    """One image ready for the model, and what its writer will need of it."""

    item: WorkItem
    prepared: Any
    size_wh: tuple[int, int]
    rgb: torch.Tensor | None  # (H, W, 3) uint8, only when the job writes masked images
    prompts: list[str]
    timings_ms: dict[str, float]


@dataclass(frozen=True)
class AlreadyDone:
    """A retried image whose metadata already exists for this job: nothing to redo."""

    item: WorkItem
    metadata: ImageMetadata


@dataclass(frozen=True)
class WrittenImage:
    """An image whose outputs and metadata (the done marker) are stored."""

    metadata: ImageMetadata
    seconds: float


LoadResult = LoadedImage | AlreadyDone | StageFailure
WriteResult = WrittenImage | StageFailure


def load_image(resources: StageResources, item: WorkItem, spec: JobSpec, check_done: bool) -> LoadResult:
    """Read, decode and prepare one image; with ``check_done``, first look for its finished metadata."""
    try:
        if check_done:
            done = _existing_result(item, spec, resources.storage)
            if done is not None:
                return done
        timings: dict[str, float] = {}
        start = time.perf_counter()
        data = resources.storage.read_bytes(item.uri)
        start = _timed(timings, "download", start)
        image = decode_image(data, max_pixels=resources.settings.max_image_pixels)
        start = _timed(timings, "decode", start)
        prepared = resources.preparer(image)
        _timed(timings, "preprocess", start)
    except Exception as exc:
        return StageFailure.of(exc)
    return LoadedImage(
        item=item, prepared=prepared, size_wh=(image.width, image.height), rgb=pixels_for_writer(spec, image),
        prompts=list(item.prompts or spec.prompts), timings_ms=timings,
    )


def write_image(resources: StageResources, job: WriteRequest) -> WriteResult:
    """Encode and upload one image's outputs, metadata last."""
    start = time.perf_counter()
    try:
        metadata = write_image_outputs(job, resources.storage)
    except Exception as exc:
        return StageFailure.of(exc)
    return WrittenImage(metadata=metadata, seconds=time.perf_counter() - start)


def _existing_result(item: WorkItem, spec: JobSpec, storage: Storage) -> AlreadyDone | None:
    """On a retry or redelivery, an image whose metadata already exists is done: do not redo it."""
    uri = OutputLayout(spec.output_root, item.out_key).metadata_uri
    if not storage.exists(uri):
        return None
    metadata = ImageMetadata.model_validate_json(storage.read_bytes(uri))
    if metadata.job_id != spec.job_id:
        return None
    return AlreadyDone(item, metadata)


def _timed(timings: dict[str, float], stage: str, start: float) -> float:
    now = time.perf_counter()
    timings[stage] = (now - start) * 1000.0
    return now
