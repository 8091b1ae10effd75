"""On a CPU "device" the runtime leaves the detector's mask post-processing to the writer processes: the model
call returns each row's kept mask logits, and the writer runs the same post-processing on them. What is
written must be byte-identical to the in-process path (masks post-processed by the runtime)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sam3_batch.contracts.schemas import ChunkMessage, JobSpec, OutputOptions, Thresholds, WorkItem
from sam3_batch.contracts.settings import Settings
from sam3_batch.contracts.storage import Storage
from sam3_batch.worker import device_post
from sam3_batch.worker.detections import DeferredMasks, MaskDelivery, PromptDetections
from sam3_batch.worker.device_post import defer_to_writer, materialised, sigmoid_then_upsample, start_masks
from sam3_batch.worker.pipeline import ChunkContext, process_chunk
from sam3_batch.worker.runtime import Sam3Runtime
from tests.fixtures.model import scene_image, scene_items

PROMPTS = ["a red disc", "blue box", "dog"]
# Score threshold 0 keeps every query: many instances per image, as in a crowded scene.
THRESHOLDS = Thresholds(score=0.0, mask=0.5)
SIZES_HW = ((224, 224), (480, 640), (333, 222), (300, 400))


def _segment(runtime: Sam3Runtime, delivery: MaskDelivery) -> list[list[PromptDetections]]:
    images = [runtime.prepare(scene_image(size, variant=index)) for index, size in enumerate(SIZES_HW)]
    return runtime.segment(images, [PROMPTS] * len(images), THRESHOLDS, delivery)


@pytest.mark.parametrize("delivery", ["none", "packed", "full"])
def test_the_model_call_returns_logits_for_a_writer_that_materialises_them_as_the_runtime_would(
    tiny_runtime: Sam3Runtime, delivery: MaskDelivery,
) -> None:
    in_process = _segment(tiny_runtime, delivery)
    with defer_to_writer():
        deferred = _segment(tiny_runtime, delivery)

    rows = [(want, got, done) for wants, gots in zip(in_process, deferred, strict=True)
            for want, got, done in zip(wants, gots, materialised(gots), strict=True)]
    assert sum(len(want) for want, _, _ in rows) > 0
    for want, got, done in rows:
        assert want.deferred is None and want.codes is not None
        assert got.masks is None and got.codes is None and got.packed is None and got.deferred is not None
        # Low-resolution logits (the model's mask size), not full-size masks.
        assert got.deferred.logits.shape[0] == len(want) and got.deferred.logits.dtype == np.float32
        assert got.deferred.logits.shape[1:] != want.mask_codes().size_hw
        assert got.deferred.size_hw == want.mask_codes().size_hw and got.deferred.delivery == delivery
        np.testing.assert_array_equal(got.scores, want.scores)
        np.testing.assert_array_equal(got.boxes_xyxy, want.boxes_xyxy)
        assert done.deferred is None and done.codes is not None
        assert done.codes.rles == want.codes.rles
        np.testing.assert_array_equal(done.codes.areas, want.codes.areas)
        np.testing.assert_array_equal(done.codes.bboxes_xywh, want.codes.bboxes_xywh)
        assert (done.masks is None) == (want.masks is None)
        np.testing.assert_array_equal(done.full_masks(), want.full_masks())


def test_without_a_writer_the_runtime_post_processes_as_before(tiny_runtime: Sam3Runtime) -> None:
    """Outside ``defer_to_writer`` (the Python API, tests, benches) detections come finished."""
    assert all(found.deferred is None and found.codes is not None
               for image in _segment(tiny_runtime, "none") for found in image)


@pytest.fixture(scope="module")
def items(tmp_path_factory: pytest.TempPathFactory) -> list[WorkItem]:
    return scene_items(tmp_path_factory.mktemp("crowded"), SIZES_HW, formats=("jpg", "png"))


def _files(root: Path) -> dict[str, bytes]:
    """Every written file; the metadata without its timings and write time (they differ run to run)."""
    files = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        data = path.read_bytes()
        if path.suffix == ".json":
            document = json.loads(data)
            document.pop("timings_ms", None)
            document.pop("processed_at", None)
            data = json.dumps(document, sort_keys=True).encode().replace(str(root).encode(), b"ROOT")
        files[path.relative_to(root).as_posix()] = data
    return files


def _chunk(runtime: Sam3Runtime, items: list[WorkItem], root: Path, io_mode: str) -> dict[str, bytes]:
    spec = JobSpec(job_id="cpu-deferred", prompts=PROMPTS, thresholds=THRESHOLDS,
                   outputs=OutputOptions(png_masks=True, masked_image=True), output_root=f"file://{root}")
    # Batches of one: which images share a batch follows load order, and batching moves the model's floats.
    settings = Settings(device="cpu", batch_size=1, io_workers=2, io_mode=io_mode)
    context = ChunkContext.create(runtime, Storage(settings), settings)
    try:
        result = process_chunk(ChunkMessage(job_id=spec.job_id, chunk_id="chunk-0", items=items), spec, context)
    finally:
        context.close()
    assert [outcome.status for outcome in result.outcomes] == ["done"] * len(items), result.outcomes
    return _files(root)


def test_a_cpu_chunk_written_by_writer_processes_equals_the_in_process_post_processing(
    tiny_runtime: Sam3Runtime, items: list[WorkItem], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    deferred = _chunk(tiny_runtime, items, tmp_path / "deferred", "processes")
    monkeypatch.setattr(device_post, "DEFER_ON_CPU", False)
    in_process = _chunk(tiny_runtime, items, tmp_path / "in-process", "threads")

    assert deferred.keys() == in_process.keys()
    assert sum(name.endswith(".png") for name in deferred) > len(items)  # PNG masks of many instances
    for name, data in in_process.items():
        assert deferred[name] == data, name


def test_the_writer_upsamples_with_the_runtime_threads_for_identical_masks() -> None:
    """CPU bilinear upsampling of 3 masks on 1 thread rounds unlike on 2: the writer takes the runtime's count."""
    logits = torch.rand(3, 72, 72, generator=torch.Generator().manual_seed(0)) * 0.02 - 0.01  # near 0.5
    size_hw, threads = (640, 480), torch.get_num_threads()

    def in_process(count: int) -> list[object]:
        torch.set_num_threads(count)
        [row] = start_masks(logits, [(size_hw, 3)], 0.5, "full", sigmoid_then_upsample).finish()
        return [row.codes.rles, row.masks]

    try:
        on_one, on_two = in_process(1), in_process(2)
        assert on_one[0] != on_two[0]  # else this test could not tell the thread counts apart
        deferred = PromptDetections("p", None, np.ones(3, np.float32), np.zeros((3, 4), np.float32),
                                    deferred=DeferredMasks(logits.numpy(), size_hw, 0.5, "full", threads=1))
        [done] = materialised([deferred])
        assert done.codes is not None and done.codes.rles == on_one[0]
        np.testing.assert_array_equal(done.full_masks(), on_one[1])
    finally:
        torch.set_num_threads(threads)
