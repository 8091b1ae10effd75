"""The pipelined chunk processing (loader pool, batches, writer pool; the pools as processes or threads)
writes what a strictly sequential loop writes: read, decode, prepare, segment one image alone, write."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sam3_batch.contracts.keys import OutputLayout
from sam3_batch.contracts.schemas import ChunkMessage, ImageMetadata, JobSpec, OutputOptions, Thresholds, WorkItem
from sam3_batch.contracts.settings import Settings
from sam3_batch.contracts.storage import Storage
from sam3_batch.worker.decode import decode_image
from sam3_batch.worker.detections import MaskDelivery, PromptDetections
from sam3_batch.worker.encode import decode_rle
from sam3_batch.worker.pipeline import ChunkContext, process_chunk
from sam3_batch.worker.runtime import CPU_BATCH_SIZE, Sam3Runtime
from sam3_batch.worker.writer import WriteRequest, write_image_outputs
from tests.fixtures.model import BATCHED_MASK_TOLERANCE, SCENE_SIZES_HW, scene_items

PROMPTS = ["a red disc", "blue box"]
# Random weights score queries at ~0.05-0.25: this keeps some instances and drops others.
THRESHOLDS = Thresholds(score=0.1, mask=0.5)
OVERRIDE_PROMPTS = ["dog", "a red disc", "blue sky"]  # one item's own prompts, as from a manifest
BATCH_SIZE = 3
IO_WORKERS = 3
IO_MODES = ["processes", "threads"]
# Two scenes share a size (224x224) so that swapping results between same-sized images would show.
SIZES_HW = (*SCENE_SIZES_HW, (224, 224), (640, 480), (333, 222), (400, 300))


class RecordingRuntime:
    """The real runtime, with a record of the batch sizes the pipeline hands it."""

    def __init__(self, runtime: Sam3Runtime) -> None:
        self.inner = runtime
        self.model_id, self.revision = runtime.model_id, runtime.revision
        self.batch_sizes: list[int] = []
        self._lock = threading.Lock()

    @property
    def preparer(self) -> Any:
        return self.inner.preparer

    def suggest_batch_size(self) -> int:
        return self.inner.suggest_batch_size()

    def segment(
        self, images: list[Any], prompts: list[list[str]], thresholds: Thresholds,
        masks: MaskDelivery = "full",
    ) -> list[list[PromptDetections]]:
        with self._lock:
            self.batch_sizes.append(len(images))
        return self.inner.segment(images, prompts, thresholds, masks)


@pytest.fixture(scope="module")
def photo_items(tmp_path_factory: pytest.TempPathFactory) -> list[WorkItem]:
    """JPEG and PNG photos of different sizes on disk, one of them with its own prompts."""
    items = scene_items(tmp_path_factory.mktemp("photos"), SIZES_HW, prefix="photo-", formats=("jpg", "png"))
    items[2] = WorkItem(uri=items[2].uri, out_key=items[2].out_key, prompts=OVERRIDE_PROMPTS)
    return items


def _spec(root: Path) -> JobSpec:
    return JobSpec(job_id="pipelined-vs-sequential", prompts=PROMPTS, thresholds=THRESHOLDS,
                   outputs=OutputOptions(png_masks=True, masked_image=True), output_root=f"file://{root}")


def _settings(batch_size: int, io_mode: str = "processes") -> Settings:
    return Settings(device="cpu", batch_size=batch_size, io_workers=IO_WORKERS, io_mode=io_mode)


def _sequential(items: list[WorkItem], spec: JobSpec, runtime: Sam3Runtime) -> dict[str, ImageMetadata]:
    """The plainest possible path: one image at a time, every stage on this thread."""
    settings = _settings(1)
    storage = Storage(settings)
    found = {}
    for item in items:
        image = decode_image(storage.read_bytes(item.uri), max_pixels=settings.max_image_pixels)
        [detections] = runtime.segment([runtime.prepare(image)], [list(item.prompts or spec.prompts)], spec.thresholds)
        job = WriteRequest.of_image(spec, "chunk-0", item, image, detections, timings_ms={})
        found[item.uri] = write_image_outputs(job, storage)
    return found


def _pipelined(items: list[WorkItem], spec: JobSpec, runtime: RecordingRuntime, batch_size: int,
               chunks: int = 1, io_mode: str = "processes") -> dict[str, ImageMetadata]:
    """``process_chunk`` on the items; with ``chunks`` > 1, that many chunks at once on one context."""
    settings = _settings(batch_size, io_mode)
    context = ChunkContext.create(runtime, Storage(settings), settings)
    messages = [ChunkMessage(job_id=spec.job_id, chunk_id="chunk-0", items=items[start::chunks])
                for start in range(chunks)]
    try:
        with ThreadPoolExecutor(chunks) as chunk_threads:
            results = list(chunk_threads.map(lambda message: process_chunk(message, spec, context), messages))
    finally:
        context.close()
    outcomes = [outcome for result in results for outcome in result.outcomes]
    assert [o.status for o in outcomes] == ["done"] * len(items), outcomes
    return {metadata.image.uri: metadata for result in results for metadata in result.metadata}


def _stored(spec: JobSpec, item: WorkItem) -> ImageMetadata:
    layout = OutputLayout(spec.output_root, item.out_key)
    return ImageMetadata.model_validate_json(Storage(_settings(1)).read_bytes(layout.metadata_uri))


def _comparable(metadata: ImageMetadata, root: str) -> dict[str, Any]:
    """All but timings and write time, with the output root taken out of the PNG mask and masked image keys."""
    document = metadata.model_dump(exclude={"timings_ms", "processed_at"})
    document["masked_image"] = document["masked_image"].removeprefix(root)
    for annotation in document["annotations"]:
        annotation["mask_png"] = annotation["mask_png"].removeprefix(root)
    return document


def _instances(metadata: dict[str, ImageMetadata]) -> int:
    return sum(len(m.annotations) for m in metadata.values())


def _assert_close(actual: ImageMetadata, expected: ImageMetadata) -> None:
    """Same images, prompts and instance counts; scores, boxes and masks equal up to float noise."""
    where = expected.image.uri
    assert actual.image == expected.image and actual.chunk_id == expected.chunk_id, where
    assert [(p.text, p.instance_count) for p in actual.prompts] == [
        (p.text, p.instance_count) for p in expected.prompts], where
    for got_prompt, want_prompt in zip(actual.prompts, expected.prompts, strict=True):
        assert want_prompt.presence_score is not None and got_prompt.presence_score is not None, where
        assert abs(got_prompt.presence_score - want_prompt.presence_score) <= 1e-5, where
    for got, want in zip(actual.annotations, expected.annotations, strict=True):
        assert (got.id, got.prompt, got.prompt_index) == (want.id, want.prompt, want.prompt_index), where
        assert abs(got.score - want.score) <= 1e-5, where
        np.testing.assert_allclose(got.pred_box_xyxy, want.pred_box_xyxy, rtol=1e-4, atol=1e-3, err_msg=where)
        got_mask, want_mask = decode_rle(got.segmentation), decode_rle(want.segmentation)
        differing = int(np.count_nonzero(got_mask != want_mask))
        assert differing <= BATCHED_MASK_TOLERANCE * want_mask.size, f"{where}: {differing} pixels differ"
        assert abs(got.area - want.area) <= differing, where


@pytest.fixture(scope="module")
def sequential(photo_items: list[WorkItem], tiny_runtime: Sam3Runtime,
               tmp_path_factory: pytest.TempPathFactory) -> tuple[JobSpec, dict[str, ImageMetadata]]:
    spec = _spec(tmp_path_factory.mktemp("out-sequential"))
    return spec, _sequential(photo_items, spec, tiny_runtime)


def test_the_comparison_has_instances_and_tells_same_sized_images_apart(
    sequential: tuple[JobSpec, dict[str, ImageMetadata]], photo_items: list[WorkItem]
) -> None:
    _, expected = sequential
    assert _instances(expected) > 0
    twins = [expected[item.uri] for item in photo_items if item.uri.endswith(("photo-0.jpg", "photo-5.png"))]
    assert twins[0].image.height == twins[1].image.height == 224
    assert [a.segmentation for a in twins[0].annotations] != [a.segmentation for a in twins[1].annotations]
    assert [p.text for p in expected[photo_items[2].uri].prompts] == OVERRIDE_PROMPTS


@pytest.mark.parametrize("io_mode", IO_MODES)
def test_pipelined_with_batches_of_one_writes_exactly_what_the_sequential_loop_writes(
    sequential: tuple[JobSpec, dict[str, ImageMetadata]], photo_items: list[WorkItem],
    tiny_runtime: Sam3Runtime, tmp_path: Path, io_mode: str,
) -> None:
    sequential_spec, expected = sequential
    spec = _spec(tmp_path)
    runtime = RecordingRuntime(tiny_runtime)

    found = _pipelined(photo_items, spec, runtime, batch_size=1, io_mode=io_mode)

    assert runtime.batch_sizes == [1] * len(photo_items)
    assert found.keys() == expected.keys()
    for item in photo_items:
        want = _comparable(expected[item.uri], sequential_spec.output_root)
        assert _comparable(found[item.uri], spec.output_root) == want, item.uri
        assert _comparable(_stored(spec, item), spec.output_root) == want, item.uri
        for annotation in found[item.uri].annotations:
            png = annotation.mask_png or ""
            sequential_png = sequential_spec.output_root + png.removeprefix(spec.output_root)
            storage = Storage(_settings(1))
            assert storage.read_bytes(png) == storage.read_bytes(sequential_png), png
        masked = found[item.uri].masked_image or ""
        sequential_masked = sequential_spec.output_root + masked.removeprefix(spec.output_root)
        assert masked.startswith(spec.output_root), item.uri
        assert Storage(_settings(1)).read_bytes(masked) == Storage(_settings(1)).read_bytes(sequential_masked)


def test_pipelined_in_batches_gives_the_sequential_results_up_to_float_noise(
    sequential: tuple[JobSpec, dict[str, ImageMetadata]], photo_items: list[WorkItem],
    tiny_runtime: Sam3Runtime, tmp_path: Path,
) -> None:
    _, expected = sequential
    spec = _spec(tmp_path)
    runtime = RecordingRuntime(tiny_runtime)

    found = _pipelined(photo_items, spec, runtime, batch_size=BATCH_SIZE)

    assert max(runtime.batch_sizes) == BATCH_SIZE and sum(runtime.batch_sizes) == len(photo_items)
    assert found.keys() == expected.keys()
    for item in photo_items:
        _assert_close(found[item.uri], expected[item.uri])
        assert _stored(spec, item) == found[item.uri]


@pytest.mark.parametrize("io_mode", IO_MODES)
def test_two_chunks_at_once_on_one_worker_give_the_sequential_results_up_to_float_noise(
    sequential: tuple[JobSpec, dict[str, ImageMetadata]], photo_items: list[WorkItem],
    tiny_runtime: Sam3Runtime, tmp_path: Path, io_mode: str,
) -> None:
    """As with ``sam3-batch worker --pool threads --concurrency 2``: two chunks share the model and pools."""
    _, expected = sequential
    spec = _spec(tmp_path)

    found = _pipelined(photo_items, spec, RecordingRuntime(tiny_runtime), batch_size=BATCH_SIZE, chunks=2,
                       io_mode=io_mode)

    assert found.keys() == expected.keys()
    for item in photo_items:
        _assert_close(found[item.uri], expected[item.uri])


def test_batch_size_zero_batches_as_the_runtime_suggests_with_the_same_results(
    sequential: tuple[JobSpec, dict[str, ImageMetadata]], photo_items: list[WorkItem],
    tiny_runtime: Sam3Runtime, tmp_path: Path,
) -> None:
    """``batch_size=0`` is automatic: from free GPU memory on CUDA, a fixed size on the CPU."""
    _, expected = sequential
    runtime = RecordingRuntime(tiny_runtime)

    found = _pipelined(photo_items, _spec(tmp_path), runtime, batch_size=0)

    assert tiny_runtime.suggest_batch_size() == CPU_BATCH_SIZE < len(photo_items)
    assert runtime.batch_sizes == [CPU_BATCH_SIZE, len(photo_items) - CPU_BATCH_SIZE]
    for item in photo_items:
        _assert_close(found[item.uri], expected[item.uri])
