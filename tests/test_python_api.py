"""The Python API: segment() equals the CLI's output, read_results reads folders, S3 prefixes and the index."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from PIL import Image

import sam3_batch
from sam3_batch.contracts.schemas import ImageMetadata
from sam3_batch.contracts.settings import Settings
from tests.fixtures.results import RESULT_PROMPTS, FinishedJob
from tests.fixtures.workers import REPO_ROOT

_RUN_SPECIFIC = {"job_id", "chunk_id", "processed_at", "timings_ms"}


def comparable(metadata: ImageMetadata) -> dict[str, Any]:
    """The document without what differs between two runs of the same images (ids, times)."""
    return metadata.model_dump(exclude=_RUN_SPECIFIC)


def test_segment_equals_the_cli_output_for_the_same_images(finished_job: FinishedJob) -> None:
    docs = {doc.image.uri: doc for doc in finished_job.metadata().values()}
    paths = sorted(docs)
    assert len(paths) == 7

    results = sam3_batch.segment(paths, RESULT_PROMPTS, threshold=0.0, settings=finished_job.settings)

    assert [r.uri for r in results] == paths
    for result in results:
        assert comparable(result.metadata) == comparable(docs[result.uri]), result.uri
    assert sum(len(r.annotations) for r in results) > 0


def test_segment_takes_pil_images_and_applies_their_exif_orientation(finished_job: FinishedJob) -> None:
    [rotated] = [d for d in finished_job.metadata().values() if d.image.uri.endswith("rotated.jpeg")]

    [result] = sam3_batch.segment([Image.open(rotated.image.uri)], RESULT_PROMPTS, threshold=0.0,
                                  settings=finished_job.settings)

    assert result.size_wh == (rotated.image.width, rotated.image.height) == (48, 64)  # stored 64x48, EXIF 6
    assert [a.segmentation for a in result.annotations] == [a.segmentation for a in rotated.annotations]
    assert [a.score for a in result.annotations] == [a.score for a in rotated.annotations]


def test_read_results_from_a_folder_and_from_the_index_equal_the_json(finished_job: FinishedJob) -> None:
    docs = finished_job.metadata()
    root, job_id = str(finished_job.out_dir), finished_job.report.job_id

    from_json = {r.out_key: r for r in sam3_batch.read_results(root)}
    from_index = {r.out_key: r for r in sam3_batch.read_results(root, job_id=job_id, from_index=True)}

    assert {k: r.metadata for k, r in from_json.items()} == docs
    assert set(from_index) == set(docs)
    for out_key, doc in docs.items():
        assert from_index[out_key].metadata == doc.model_copy(update={"timings_ms": {}}), out_key
    assert list(sam3_batch.read_results(root, job_id="another-job")) == []


def test_read_results_from_an_s3_prefix(
    finished_job: FinishedJob, settings_factory: Callable[..., Settings], s3_client: Any, s3_bucket: str,
) -> None:
    for path in finished_job.out_dir.rglob("*"):
        if path.is_file():
            key = "results/" + path.relative_to(finished_job.out_dir).as_posix()
            s3_client.put_object(Bucket=s3_bucket, Key=key, Body=path.read_bytes())
    settings = settings_factory()
    root = f"s3://{s3_bucket}/results"

    found = {r.out_key: r.metadata for r in sam3_batch.read_results(root, settings=settings)}
    indexed = list(sam3_batch.read_results(root, job_id=finished_job.report.job_id, from_index=True,
                                           settings=settings))

    assert found == finished_job.metadata()
    assert sorted(r.out_key for r in indexed) == sorted(found)


def test_to_supervision_gives_mask_boxes_scores_and_prompt_class_ids(finished_job: FinishedJob) -> None:
    result = max(sam3_batch.read_results(str(finished_job.out_dir)), key=lambda r: len(r.annotations))
    annotations = result.annotations
    assert len({a.prompt_index for a in annotations}) == 2

    detections = result.to_supervision()

    assert len(detections) == len(annotations)
    assert detections.class_id.tolist() == [a.prompt_index for a in annotations]
    assert detections.data["class_name"].tolist() == [a.prompt for a in annotations]
    np.testing.assert_array_equal(detections.confidence, np.array([a.score for a in annotations], np.float32))
    np.testing.assert_array_equal(detections.xyxy, np.array(
        [[x, y, x + w, y + h] for x, y, w, h in (a.bbox for a in annotations)], np.float32))
    masks = result.masks()
    assert masks.shape == (len(annotations), result.size_wh[1], result.size_wh[0])
    assert np.array_equal(np.asarray(detections.mask), masks)
    assert masks.sum(axis=(1, 2)).tolist() == [a.area for a in annotations]


def test_importing_the_package_and_reading_results_loads_no_gpu_stack(finished_job: FinishedJob) -> None:
    code = (
        "import sys, sam3_batch\n"
        f"results = list(sam3_batch.read_results({str(finished_job.out_dir)!r}))\n"
        "assert results and callable(sam3_batch.segment)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'PIL') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_unknown_attribute_of_the_package_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'segmnet'"):
        sam3_batch.segmnet  # type: ignore[attr-defined]  # noqa: B018


def test_result_without_instances_converts_to_empty_detections(finished_job: FinishedJob) -> None:
    doc = next(iter(finished_job.metadata().values()))
    empty = sam3_batch.Result(doc.model_copy(update={"annotations": []}))

    detections = empty.to_supervision()

    assert len(detections) == 0 and detections.xyxy.shape == (0, 4)
    assert empty.masks().shape == (0, doc.image.height, doc.image.width)
