"""COCO export: files pycocotools and supervision load unchanged, with every count and mask right."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import supervision as sv
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from sam3_batch.coco_export import export_coco
from sam3_batch.contracts.storage import Storage
from sam3_batch.worker.encode import decode_rle
from tests.fixtures.results import RESULT_PROMPTS, FinishedJob
from tests.fixtures.workers import run_cli


def test_every_bbox_is_the_box_around_its_mask_and_the_detector_box_is_kept_apart(
    finished_job: FinishedJob,
) -> None:
    docs = finished_job.metadata()
    annotations = [a for doc in docs.values() for a in doc.annotations]
    assert annotations and any(a.area for a in annotations)
    for doc in docs.values():
        assert [(c.id, c.name) for c in doc.categories] == [(1, RESULT_PROMPTS[0]), (2, RESULT_PROMPTS[1])]
        assert [p.category_id for p in doc.prompts] == [1, 2] and doc.schema_version == 2
        assert [a.id for a in doc.annotations] == list(range(len(doc.annotations)))
        for a in doc.annotations:
            rle = {"size": list(a.segmentation.size), "counts": a.segmentation.counts.encode()}
            assert list(a.bbox) == mask_utils.toBbox(rle).tolist()
            assert a.category_id == a.prompt_index + 1 and a.area == int(decode_rle(a.segmentation).sum())
    assert any(list(a.bbox) != [a.pred_box_xyxy[0], a.pred_box_xyxy[1], a.pred_box_xyxy[2] - a.pred_box_xyxy[0],
                                a.pred_box_xyxy[3] - a.pred_box_xyxy[1]] for a in annotations)


def test_coco_export_of_an_output_root_loads_in_pycocotools_and_supervision_with_the_right_counts(
    finished_job: FinishedJob, tmp_path: Path,
) -> None:
    docs = finished_job.metadata()
    dest = tmp_path / "coco"

    done = run_cli(["export", str(finished_job.out_dir), "--format", "coco", "--images-per-file", "3",
                    "--dest", str(dest), "--json"], finished_job.settings)

    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    files = [Path(f) for f in summary["files"]]
    assert files == sorted(dest.glob("instances-*.json")) and len(files) == 3  # 7 images, 3 per file
    image_ids: set[int] = set()
    annotation_ids: set[int] = set()
    for path in files:
        coco = COCO(str(path))
        images = coco.loadImgs(coco.getImgIds())
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == RESULT_PROMPTS
        image_ids.update(coco.getImgIds())
        annotation_ids.update(coco.getAnnIds())
        for image in images:
            doc = docs[image["file_name"]]
            anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
            assert len(anns) == len(doc.annotations)
            for ann, want in zip(anns, doc.annotations, strict=True):
                assert np.array_equal(coco.annToMask(ann).astype(bool), decode_rle(want.segmentation))
                assert coco.loadCats([ann["category_id"]])[0]["name"] == want.prompt
        dataset = sv.DetectionDataset.from_coco(str(finished_job.images_dir), str(path))
        assert len(dataset) == len(images)
        for image_path, _, detections in dataset:
            doc = docs[Path(image_path).relative_to(finished_job.images_dir.resolve()).as_posix()]
            assert len(detections) == len(doc.annotations)
            assert detections.mask is not None and detections.mask.shape[1:] == (doc.image.height, doc.image.width)
            assert [dataset.classes[c] for c in detections.class_id] == [a.prompt for a in doc.annotations]
    assert len(image_ids) == len(docs) == summary["images"]
    assert len(annotation_ids) == sum(len(d.annotations) for d in docs.values()) == summary["annotations"]


def test_export_of_a_job_keeps_only_its_images_and_goes_under_its_folder(
    finished_job: FinishedJob, tmp_path: Path,
) -> None:
    storage = Storage(finished_job.settings)
    root, job_id = str(finished_job.out_dir), finished_job.report.job_id

    mine = export_coco(storage, root, job_id, images_per_file=100, dest=str(tmp_path / "mine"))
    other = export_coco(storage, root, "another-job", dest=str(tmp_path / "other"))

    assert mine.images == len(finished_job.metadata()) and len(mine.files) == 1
    assert (other.images, other.annotations) == (0, 0)
    assert json.loads(Path(other.files[0]).read_text())["images"] == []  # one, empty, file still loads
    assert len(COCO(other.files[0]).getImgIds()) == 0


def test_images_per_file_below_one_is_refused(finished_job: FinishedJob) -> None:
    with pytest.raises(ValueError, match="images_per_file must be at least 1"):
        export_coco(Storage(finished_job.settings), str(finished_job.out_dir), images_per_file=0)
