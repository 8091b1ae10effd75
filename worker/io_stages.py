"""The steps beside the model, one image at a time: load (read, decode, prepare) and write (encode, upload).

Each step is a module-level function whose first argument is what its stage pool set up once per worker
(``worker.stage_pools``): the loader gets storage, the model's preparer and the pixel limit; the writer gets
storage. Everything else arrives with the call. Arguments and results are plain picklable data (numpy
arrays, pydantic models), so a step runs the same in a stage process or in a thread.
Steps never raise for a problem with the image: they return a ``StageFailure`` that says what happened
and whether trying again later may help, decided where the original exception still exists.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import cast

import torch
from PIL import Image

from sam3_batch.contracts.errors import is_transient, reason_of
from sam3_batch.contracts.layout import OutputLayout
from sam3_batch.contracts.schemas import ImageMetadata, ObjectPrompt, PromptSpec, WorkItem
from sam3_batch.contracts.settings import Settings
from sam3_batch.contracts.storage import Storage
from sam3_batch.worker.decode import (
    ModelImage,
    RgbPixels,
    decode_for_model,
    decode_image,
    limit_pillow_pixels,
    rgb_pixels,
)
from sam3_batch.worker.model_input import PreparedImage, Preparer
from sam3_batch.worker.pixel_slots import PixelSlots
from sam3_batch.worker.writer import WriteRequest, write_counted_outputs


@dataclass(frozen=True)
class Loader:
    """What the load step uses."""

    storage: Storage
    preparer: Preparer
    max_pixels: int
    # A JPEG is decoded at a reduced scale no smaller than this (the model's input) unless its full
    # pixels are wanted; None: always at full scale.
    draft_wh: tuple[int, int] | None = None
    slots: PixelSlots | None = None  # where 8-bit pixels for the model are handed over, in a loader process
    # The preparer takes a uint8 (3, H, W) tensor too: a JPEG draft cannot reduce then goes to torchvision's
    # decoder, straight into the tensor the resize wants (``decode_for_model``'s as_tensor).
    tensor_pixels: bool = False


@dataclass(frozen=True)
class LoaderSetup:
    """Builds a ``Loader`` (picklable: each loader process builds its own storage clients)."""

    settings: Settings
    preparer: Preparer
    # JPEG draft decoding: 4000x3000 photos decode ~25% cheaper and hand over 4x fewer pixels (bench/RESULTS.md).
    draft: bool = True
    slots: PixelSlots | None = None  # made by the worker for loader processes (``pixel_slots_for``)

    def __call__(self, own_process: bool) -> Loader:
        if own_process:
            torch.set_num_threads(1)  # many loader processes: each resize on one core, none competing with the model
            limit_pillow_pixels(self.settings.max_image_pixels)
        # Only a preparer that names its input size can be given reduced pixels (a bench stand-in may not).
        draft_wh = getattr(self.preparer, "input_size_wh", None) if self.draft else None
        tensor_pixels = draft_wh is not None and bool(getattr(self.preparer, "takes_tensors", False))
        return Loader(Storage(self.settings), self.preparer, self.settings.max_image_pixels, draft_wh,
                      self.slots if own_process else None, tensor_pixels)


def pixel_slots_for(settings: Settings, preparer: Preparer, mode: str) -> PixelSlots | None:
    """Slots for loader processes that hand over 8-bit pixels at a known input size; None otherwise."""
    input_wh = getattr(preparer, "input_size_wh", None)
    if mode != "processes" or settings.pixel_slots == 0 or getattr(preparer, "hand_off", None) != "uint8" \
            or input_wh is None:
        return None
    return PixelSlots.create(settings.pixel_slots, 3 * input_wh[0] * input_wh[1])


@dataclass(frozen=True)
class WriterSetup:
    """Builds what the write step uses: storage (picklable: each writer process builds its own clients)."""

    settings: Settings

    def __call__(self, own_process: bool) -> Storage:
        return Storage(self.settings)


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
class DoneCheck:
    """Where a retried image's metadata would be, and the job it must belong to for the image to count as done."""

    output_root: str
    job_id: str


@dataclass(frozen=True)
class LoadedImage:
    """One image ready for the model."""

    item: WorkItem
    prepared: PreparedImage
    size_wh: tuple[int, int]
    rgb: RgbPixels | None  # (H, W, 3) uint8, only when asked for (the job writes masked images)
    timings_ms: dict[str, float]
    bytes_read: int = 0
    cpu_ms: dict[str, float] = field(default_factory=dict)  # this thread's CPU per step: the host budget's figures
    # Set by the pipeline: the image's prompts (its own or the job's), then fitted to the image.
    prompts: list[PromptSpec] = field(default_factory=list)
    objects: list[ObjectPrompt] = field(default_factory=list)


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
    bytes_written: int = 0  # counted where the write ran (a writer process): the worker adds it to its metrics
    cpu_ms: float = 0.0  # this thread's CPU for encoding and uploading


LoadResult = LoadedImage | AlreadyDone | StageFailure
WriteResult = WrittenImage | StageFailure


def load_image(loader: Loader, item: WorkItem, keep_pixels: bool, done_check: DoneCheck | None) -> LoadResult:
    """Read, decode and prepare one image; with ``done_check``, first look for its finished metadata."""
    try:
        if done_check is not None:
            done = _existing_result(item, done_check, loader.storage)
            if done is not None:
                return done
        timings: dict[str, float] = {}
        cpu: dict[str, float] = {}
        start, cpu_start = time.perf_counter(), time.thread_time()
        data = loader.storage.read_bytes(item.uri)
        start, cpu_start = _timed(timings, cpu, "download", start, cpu_start)
        decoded = _decoded(loader, data, keep_pixels)
        start, cpu_start = _timed(timings, cpu, "decode", start, cpu_start)
        prepared = _prepared(loader, decoded.image)
        size_wh = decoded.size_wh
        if decoded.decoded_wh != size_wh:  # decoded at a reduced scale: masks are still made at the full size
            prepared = replace(prepared, original_size_hw=(size_wh[1], size_wh[0]))
        start, cpu_start = _timed(timings, cpu, "preprocess", start, cpu_start)
        if loader.slots is not None and loader.slots.slot_of(prepared.pixel_values) is None:
            prepared = replace(prepared, pixel_values=loader.slots.hold(prepared.pixel_values))
            _timed(timings, cpu, "hand-off", start, cpu_start)
    except Exception as exc:
        return StageFailure.of(exc)
    kept = decoded.image if keep_pixels and isinstance(decoded.image, Image.Image) else None  # decode_image's
    return LoadedImage(
        item=item, prepared=prepared, size_wh=size_wh,
        rgb=None if kept is None else rgb_pixels(kept), timings_ms=timings, bytes_read=len(data), cpu_ms=cpu,
    )


def _decoded(loader: Loader, data: bytes, keep_pixels: bool) -> ModelImage:
    """The decoded image and its full upright size; reduced (JPEG draft) when its full pixels are not kept."""
    if keep_pixels or loader.draft_wh is None:
        image = decode_image(data, max_pixels=loader.max_pixels)
        return ModelImage(image, image.size)
    return decode_for_model(data, max_pixels=loader.max_pixels, at_least_wh=loader.draft_wh,
                            as_tensor=loader.tensor_pixels)


def _prepared(loader: Loader, image: Image.Image | torch.Tensor) -> PreparedImage:
    """The preparer's output; in a loader process with pixel slots, written straight into a free slot."""
    # A tensor only reaches a preparer that says it takes one (Loader.tensor_pixels), a slot one that says it
    # fills them (``_free_slot``).
    prepare = cast(Callable[..., PreparedImage], loader.preparer)
    slot = _free_slot(loader)
    if slot is None or loader.slots is None:
        return prepare(image)
    try:
        return prepare(image, out=slot)
    except BaseException:
        loader.slots.give_back(slot)
        raise


def _free_slot(loader: Loader) -> torch.Tensor | None:
    """A slot the preparer can resize into (it says it can, and names its input size), if one is free."""
    size_wh: tuple[int, int] | None = getattr(loader.preparer, "input_size_wh", None)
    if loader.slots is None or size_wh is None or not getattr(loader.preparer, "fills_slots", False):
        return None
    return loader.slots.take((3, size_wh[1], size_wh[0]))


def write_image(storage: Storage, request: WriteRequest) -> WriteResult:
    """Encode and upload one image's outputs, metadata last."""
    start, cpu_start = time.perf_counter(), time.thread_time()
    try:
        written = write_counted_outputs(request, storage)
    except Exception as exc:
        return StageFailure.of(exc)
    return WrittenImage(metadata=written.metadata, seconds=time.perf_counter() - start,
                        bytes_written=written.bytes_written, cpu_ms=(time.thread_time() - cpu_start) * 1000.0)


def _existing_result(item: WorkItem, check: DoneCheck, storage: Storage) -> AlreadyDone | None:
    """On a retry or redelivery, an image whose metadata already exists is done: do not redo it."""
    uri = OutputLayout(check.output_root, item.out_key).metadata_uri
    if not storage.exists(uri):
        return None
    metadata = ImageMetadata.model_validate_json(storage.read_bytes(uri))
    if metadata.job_id != check.job_id:
        return None
    return AlreadyDone(item, metadata)


def _timed(timings: dict[str, float], cpu: dict[str, float], stage: str, start: float,
           cpu_start: float) -> tuple[float, float]:
    now, cpu_now = time.perf_counter(), time.thread_time()
    timings[stage] = (now - start) * 1000.0
    cpu[stage] = (cpu_now - cpu_start) * 1000.0
    return now, cpu_now
