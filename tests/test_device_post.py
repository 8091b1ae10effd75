"""Post-processing on the device: batched upsampling, RLE/area/bbox on the device, masks packed only when asked.

The torch encoder (what a GPU runs) and pycocotools on the host (what the CPU runs) must give the same
RLEs, areas, boxes and masks, through ``start_masks`` and through the whole runtime and writer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from sam3_batch.contracts.schemas import JobSpec, OutputOptions, Thresholds, WorkItem
from sam3_batch.contracts.settings import Settings
from sam3_batch.contracts.storage import Storage
from sam3_batch.worker import device_post, shared_arrays
from sam3_batch.worker.detections import MaskCodes, MaskDelivery, PackedMasks, PromptDetections
from sam3_batch.worker.device_post import (
    RowMasks,
    sigmoid_then_upsample,
    start_masks,
    upsample_then_sigmoid,
)
from sam3_batch.worker.runtime import Sam3Runtime
from sam3_batch.worker.stage_pools import StagePool
from sam3_batch.worker.writer import WriteRequest, masks_for_writer, write_image_outputs
from tests.fixtures.model import scene_image

# Rows of (image size, instances): two images of one size in a row, an empty row, odd and 1-px sizes.
ROWS = [((37, 53), 3), ((37, 53), 0), ((37, 53), 2), ((1, 29), 2), ((64, 48), 4), ((37, 53), 1), ((23, 1), 2)]
DELIVERIES: list[MaskDelivery] = ["none", "packed", "full"]


def _logits(count: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return 4 * torch.randn((count, 12, 12), generator=generator)


def _rows_by(encode_on_device: bool, delivery: MaskDelivery, upsample: device_post.Upsampler) -> list[RowMasks]:
    logits = _logits(sum(count for _, count in ROWS))
    pending = start_masks(logits, ROWS, 0.5, delivery, upsample, encode_on_device=encode_on_device)
    return pending.finish()


def _full(row: RowMasks) -> np.ndarray:
    if row.masks is not None:
        return row.masks
    assert row.packed is not None
    return row.packed.unpacked()


@pytest.mark.parametrize("upsample", [sigmoid_then_upsample, upsample_then_sigmoid])
@pytest.mark.parametrize("delivery", DELIVERIES)
def test_device_encoder_equals_pycocotools_row_by_row(delivery: MaskDelivery, upsample: device_post.Upsampler) -> None:
    on_device = _rows_by(True, delivery, upsample)
    on_host = _rows_by(False, "full", upsample)
    assert [len(row.codes) for row in on_device] == [count for _, count in ROWS]
    for ours, reference, (size_hw, _) in zip(on_device, on_host, ROWS, strict=True):
        assert ours.codes.size_hw == size_hw
        assert ours.codes.rles == reference.codes.rles
        np.testing.assert_array_equal(ours.codes.areas, reference.codes.areas)
        np.testing.assert_array_equal(ours.codes.bboxes_xywh, reference.codes.bboxes_xywh)
        if delivery == "none":
            assert ours.masks is None and ours.packed is None
        else:
            np.testing.assert_array_equal(_full(ours), _full(reference))
        if delivery == "packed":
            assert ours.packed is not None and ours.masks is None  # bits cross, unpacked where they are used


def test_masks_are_upsampled_as_one_row_at_a_time_would_be() -> None:
    # Batching rows (and images of one size) must not change a pixel: compare with one call per row.
    logits = _logits(sum(count for _, count in ROWS), seed=3)
    batched = start_masks(logits, ROWS, 0.5, "full", sigmoid_then_upsample, encode_on_device=True).finish()
    first = 0
    for row, (size_hw, count) in zip(batched, ROWS, strict=True):
        alone = sigmoid_then_upsample(logits[first : first + count], size_hw, 0.5).numpy() if count \
            else np.zeros((0, *size_hw), dtype=bool)
        np.testing.assert_array_equal(_full(row), alone)
        first += count


def test_the_device_path_copies_runs_not_masks_unless_masks_are_asked_for() -> None:
    logits = 8 * torch.ones((5, 12, 12))  # five full masks: one run of ones each
    rows = [((300, 400), 5)]
    rle_only = start_masks(logits, rows, 0.5, "none", sigmoid_then_upsample, encode_on_device=True)
    packed = start_masks(logits, rows, 0.5, "packed", sigmoid_then_upsample, encode_on_device=True)
    assert rle_only.bytes_to_host == 4 * (5 * 6 + 5 * 2)  # int32: run counts, areas, bboxes, two runs each
    assert packed.bytes_to_host == rle_only.bytes_to_host + 5 * 300 * 400 // 8
    [row] = packed.finish()
    assert row.codes.areas.tolist() == [300 * 400] * 5
    assert row.codes.bboxes_xywh.tolist() == [[0.0, 0.0, 400.0, 300.0]] * 5


def test_detections_give_masks_from_bits_or_rles_and_codes_from_masks() -> None:
    masks = np.zeros((2, 5, 7), dtype=bool)
    masks[0, 1:3, 2:6] = True
    masks[1, 4, 6] = True
    codes = MaskCodes.of_masks(masks)
    scores, boxes = np.array([0.9, 0.8], np.float32), np.zeros((2, 4), np.float32)
    from_bits = PromptDetections("p", None, scores, boxes, codes=codes,
                                 packed=PackedMasks(np.packbits(masks.reshape(2, -1), axis=1), (5, 7)))
    from_rles = PromptDetections("p", None, scores, boxes, codes=codes)
    from_masks = PromptDetections("p", None, scores, boxes, masks=masks)
    np.testing.assert_array_equal(from_bits.full_masks(), masks)
    np.testing.assert_array_equal(from_rles.full_masks(), masks)
    assert from_masks.mask_codes().rles == codes.rles
    assert codes.areas.tolist() == [8, 1] and codes.bboxes_xywh.tolist() == [[2, 1, 4, 2], [6, 4, 1, 1]]
    empty = PromptDetections("p", None, np.zeros(0, np.float32), np.zeros((0, 4), np.float32),
                             codes=MaskCodes((5, 7), [], np.zeros(0, np.int64), np.zeros((0, 4))))
    assert empty.full_masks().shape == (0, 5, 7)


def test_detections_without_masks_or_codes_are_refused() -> None:
    with pytest.raises(ValueError, match="need their masks"):
        PromptDetections("p", None, np.zeros(0, np.float32), np.zeros((0, 4), np.float32))
    with pytest.raises(ValueError, match="mask codes must describe 1"):
        PromptDetections("p", None, np.ones(1, np.float32), np.zeros((1, 4), np.float32),
                         codes=MaskCodes((2, 2), [], np.zeros(0, np.int64), np.zeros((0, 4))))


@pytest.fixture(scope="module")
def scenes(tiny_runtime: Sam3Runtime) -> list[object]:
    return [tiny_runtime.prepare(scene_image(size, variant=k)) for k, size in enumerate([(300, 400), (123, 457)])]


PROMPTS = [["cat", "dog"], ["cat"]]
EVERYTHING = Thresholds(score=0.0, mask=0.5)


@pytest.mark.parametrize("delivery", DELIVERIES)
def test_runtime_with_the_device_encoder_equals_the_host_encoder(
    tiny_runtime: Sam3Runtime, scenes: list[object], delivery: MaskDelivery, monkeypatch: pytest.MonkeyPatch,
) -> None:
    reference = tiny_runtime.segment(scenes, PROMPTS, EVERYTHING, "full")  # type: ignore[arg-type]
    monkeypatch.setattr(device_post, "TORCH_ENCODER_ON_CPU", True)
    found = tiny_runtime.segment(scenes, PROMPTS, EVERYTHING, delivery)  # type: ignore[arg-type]
    assert sum(len(d) for image in found for d in image) == 15  # 5 queries x 3 rows: every instance kept
    for ours_image, reference_image in zip(found, reference, strict=True):
        for ours, theirs in zip(ours_image, reference_image, strict=True):
            np.testing.assert_array_equal(ours.scores, theirs.scores)
            assert ours.mask_codes().rles == theirs.mask_codes().rles
            np.testing.assert_array_equal(ours.mask_codes().areas, theirs.mask_codes().areas)
            np.testing.assert_array_equal(ours.mask_codes().bboxes_xywh, theirs.mask_codes().bboxes_xywh)
            assert theirs.masks is not None
            np.testing.assert_array_equal(ours.full_masks(), theirs.masks)
            assert (ours.masks is None) == (delivery != "full")


def _written(tmp_path: Path, name: str, detections: list[PromptDetections], spec: JobSpec) -> dict[str, bytes]:
    root = tmp_path / name
    spec = spec.model_copy(update={"output_root": f"file://{root}"})
    image = scene_image((300, 400))
    item = WorkItem(uri="file:///scene.png", out_key="scene.png")
    write_image_outputs(WriteRequest.of_image(spec, "c", item, image, detections, {}), Storage(Settings()))
    files = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    metadata = json.loads(files.pop("scene.png.json"))
    metadata.pop("processed_at")
    files["metadata"] = json.dumps(metadata, sort_keys=True).replace(str(root), "ROOT").encode()  # keys name it
    return files


@pytest.mark.parametrize("outputs", [OutputOptions(), OutputOptions(png_masks=True, masked_image=True)])
def test_writer_outputs_from_device_codes_are_byte_identical_to_host_encoded_masks(
    tiny_runtime: Sam3Runtime, tmp_path: Path, outputs: OutputOptions, monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = JobSpec(job_id="j", prompts=["cat", "dog"], thresholds=EVERYTHING, outputs=outputs, output_root="file:///x")
    prepared = [tiny_runtime.prepare(scene_image((300, 400)))]
    [old_style] = tiny_runtime.segment(prepared, [["cat", "dog"]], EVERYTHING, "full")
    host_masks = [PromptDetections(d.prompt, d.presence_score, d.scores, d.boxes_xyxy, masks=d.masks)
                  for d in old_style]  # masks alone: the writer encodes them as before this change
    monkeypatch.setattr(device_post, "TORCH_ENCODER_ON_CPU", True)
    [device] = tiny_runtime.segment(prepared, [["cat", "dog"]], EVERYTHING, masks_for_writer(spec))
    assert all(d.masks is None for d in device)
    expected = _written(tmp_path, "host", host_masks, spec)
    assert _written(tmp_path, "device", device, spec) == expected
    assert len(expected) == (1 + 10 + 1 if outputs.png_masks else 1)  # metadata, 10 PNG masks, masked image


@dataclass(frozen=True)
class _NoSetup:
    def __call__(self, own_process: bool) -> int:
        return 0


def _unpacked_in_a_writer(_: int, found: PromptDetections) -> np.ndarray:
    return found.full_masks()


def test_packed_masks_from_the_device_buffer_reach_a_writer_process_intact() -> None:
    # The bits are views into the one buffer the device copied: they must still cross in shared memory.
    logits = _logits(6, seed=5)
    [row] = start_masks(logits, [((300, 400), 6)], 0.5, "packed", sigmoid_then_upsample,
                        encode_on_device=True).finish()
    assert row.packed is not None and row.packed.bits.nbytes >= shared_arrays.SHARED_MIN_BYTES
    found = PromptDetections("p", None, np.ones(6, np.float32), np.zeros((6, 4), np.float32),
                             codes=row.codes, packed=row.packed)
    pool = StagePool("test", _NoSetup(), mode="processes", workers=1)
    try:
        unpacked = pool.start(_unpacked_in_a_writer, found).result(timeout=120)
    finally:
        pool.close()
    np.testing.assert_array_equal(unpacked, row.packed.unpacked())
    assert unpacked.any()
