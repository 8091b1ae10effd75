"""In-process segmentation: ``segment(images, prompts)`` with the worker's runtime, decoding and encoding.

Images go through the same decoding (EXIF-upright RGB), the same resident runtime and batching, and the
same result encoding (COCO RLE, mask ``bbox``) as ``sam3-batch run``; nothing is written to storage.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sam3_batch.contracts.keys import key_from_uri
from sam3_batch.contracts.schemas import JobSpec, Thresholds, WorkItem
from sam3_batch.contracts.settings import Settings
from sam3_batch.results import Result

if TYPE_CHECKING:
    from PIL import Image

    from sam3_batch.worker.pipeline import SegmentationRuntime

API_JOB_ID = "python-api"
_MEMORY_ROOT = "memory://"  # nothing is written: the layout only names would-be PNG keys


class Segmenter:
    """A resident model for repeated ``segment`` calls (loading it is the slow part)."""

    def __init__(self, settings: Settings | None = None, **overrides: Any) -> None:
        from sam3_batch.extras import require_worker_extra

        require_worker_extra()  # one readable error, not an ImportError, without the GPU stack
        from sam3_batch.worker.process_context import load_runtime

        base = settings or Settings()
        self.settings = base.model_copy(update={k: v for k, v in overrides.items() if v is not None})
        self.runtime: SegmentationRuntime = load_runtime(self.settings)
        self._lock = threading.Lock()

    def segment(
        self, images: Iterable[Image.Image | str | Path], prompts: Sequence[str], *,
        threshold: float = 0.3, mask_threshold: float = 0.5,
    ) -> list[Result]:
        """One ``Result`` per image, in input order; a bad image raises (BadImageError, NotFoundError, ...)."""
        spec = JobSpec(job_id=API_JOB_ID, prompts=list(prompts), output_root=_MEMORY_ROOT,
                       thresholds=Thresholds(score=threshold, mask=mask_threshold), model_id=self.settings.model,
                       model_revision=self.settings.model_revision)
        loaded = [self._load(index, image) for index, image in enumerate(images)]
        size = self.settings.batch_size or 8
        results: list[Result] = []
        with self._lock:
            for start in range(0, len(loaded), size):
                results += self._run_batch(spec, loaded[start:start + size])
        return results

    def _load(self, index: int, image: Image.Image | str | Path) -> tuple[WorkItem, Image.Image]:
        from PIL import Image as PILImage

        from sam3_batch.contracts.storage import Storage
        from sam3_batch.worker.decode import decode_image, normalise_image

        limit = self.settings.max_image_pixels
        if isinstance(image, PILImage.Image):
            key = f"image-{index:05d}"
            return WorkItem(uri=key, out_key=key), normalise_image(image, max_pixels=limit)
        uri = str(image)
        decoded = decode_image(Storage(self.settings).read_bytes(uri), max_pixels=limit)
        return WorkItem(uri=uri, out_key=key_from_uri(uri)), decoded

    def _run_batch(self, spec: JobSpec, batch: list[tuple[WorkItem, Image.Image]]) -> list[Result]:
        from sam3_batch.contracts.layout import OutputLayout
        from sam3_batch.worker.writer import WriteRequest, build_metadata

        prepared = [self.runtime.preparer(image) for _, image in batch]
        # Metadata only: RLE, area and bbox come from the device, no full-size mask crosses to the host.
        found = self.runtime.segment(prepared, [list(spec.prompts)] * len(batch), spec.thresholds, "none")
        results = []
        for (item, image), detections in zip(batch, found, strict=True):
            job = WriteRequest(spec, API_JOB_ID, item, (image.width, image.height), None, detections, {})
            metadata = build_metadata(job, OutputLayout(spec.output_root, item.out_key), None)
            results.append(Result(metadata, item.out_key))
        return results


_resident: dict[str, Segmenter] = {}  # the last model ``segment`` loaded, by its settings
_resident_lock = threading.Lock()


def _segmenter_for(settings: Settings) -> Segmenter:
    key = settings.model_dump_json()
    with _resident_lock:
        if key not in _resident:
            _resident.clear()  # one resident model: a new one replaces it
            _resident[key] = Segmenter(settings)
        return _resident[key]


def segment(
    images: Iterable[Image.Image | str | Path], prompts: Sequence[str], *,
    threshold: float = 0.3, mask_threshold: float = 0.5, model: str | None = None, revision: str | None = None,
    device: str | None = None, dtype: str | None = None, batch_size: int | None = None,
    settings: Settings | None = None,
) -> list[Result]:
    """Segment PIL images, paths or URIs (``s3://``, ``http(s)://``) with text prompts; one Result per image.

    The model named by ``model`` (default ``facebook/sam3``; ``tiny-random`` for a smoke test) is loaded once
    and kept for later calls with the same settings. For several models at once, use ``Segmenter``.
    """
    overrides = {"model": model, "model_revision": revision, "device": device, "dtype": dtype,
                 "batch_size": batch_size}
    base = settings or Settings()
    chosen = base.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    return _segmenter_for(chosen).segment(images, prompts, threshold=threshold, mask_threshold=mask_threshold)
