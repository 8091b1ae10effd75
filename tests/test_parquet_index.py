"""The Parquet index: a part per chunk, compacted when the job completes into rows that equal the JSON exactly."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from pycocotools.coco import COCO

from sam3_batch.contracts.jobstate import RedisJobStore
from sam3_batch.contracts.lake import RESULTS_SCHEMA, write_chunk_part
from sam3_batch.contracts.lake_index import IndexPartError, compact_index
from sam3_batch.contracts.layout import index_dir_uri, out_key_of_metadata, part_uri, parts_dir_uri, report_uri
from sam3_batch.contracts.schemas import (
    Annotation,
    Category,
    ImageInfo,
    ImageMetadata,
    ItemOutcome,
    JobReport,
    JobSpec,
    ModelInfo,
    PromptSummary,
    Thresholds,
)
from sam3_batch.contracts.settings import Settings
from sam3_batch.contracts.storage import Storage
from sam3_batch.worker.encode import encode_rle
from tests.fixtures.results import BROKEN_NAME, RESULT_PROMPTS, FinishedJob
from tests.fixtures.workers import REPO_ROOT, run_cli, wait_for_job, wait_until

Row = dict[str, Any]

# --- the oracle: rows built from the JSON documents, independently of contracts.lake ------------------------


def expected_done_row(doc: ImageMetadata, out_key: str, root: str) -> Row:
    """The row the index must hold for a done image, straight from its metadata JSON."""
    return {
        "schema_version": 2, "job_id": doc.job_id, "chunk_id": doc.chunk_id, "out_key": out_key,
        "uri": doc.image.uri, "status": "done", "reason": None, "metadata_uri": f"{root.rstrip('/')}/{out_key}.json",
        "masked_image_uri": doc.masked_image, "width": doc.image.width, "height": doc.image.height,
        "model_id": doc.model.id, "model_revision": doc.model.revision, "model_commit": doc.model.commit,
        "score_threshold": doc.thresholds.score, "mask_threshold": doc.thresholds.mask,
        "processed_at": doc.processed_at, "processed_date": doc.processed_at.date(),
        "instance_count": len(doc.annotations),
        "prompts": [
            {"category_id": p.category_id, "text": p.text, "presence_score": p.presence_score,
             "instance_count": p.instance_count,
             "boxes": [list(box) for box in p.boxes] if p.boxes is not None else None, "box_labels": p.box_labels}
            for p in doc.prompts
        ],
        "instances": [
            {"id": a.id, "category_id": a.category_id, "prompt": a.prompt, "prompt_index": a.prompt_index,
             "object_index": a.object_index, "score": a.score,
             "bbox": list(a.bbox), "pred_box_xyxy": list(a.pred_box_xyxy), "area": a.area,
             "segmentation": {"size": list(a.segmentation.size), "counts": a.segmentation.counts},
             "mask_png_uri": a.mask_png}
            for a in doc.annotations
        ],
        "objects": [
            {"object_index": o.object_index, "box": list(o.box) if o.box is not None else None, "score": o.score,
             "points": [list(point) for point in o.points] if o.points is not None else None,
             "point_labels": o.point_labels}
            for o in doc.objects
        ],
    }


def assert_done_rows_equal_json(rows: list[Row], docs: dict[str, ImageMetadata], root: str) -> None:
    """Every done row equals its JSON counterpart (floats bit for bit, RLE strings identical); none missing."""
    done = {row["out_key"]: row for row in rows if row["status"] == "done"}
    assert len(done) == len([r for r in rows if r["status"] == "done"]), "an image is indexed twice"
    assert set(done) == set(docs)
    for out_key, doc in docs.items():
        assert done[out_key] == expected_done_row(doc, out_key, root), f"row of {out_key} differs from its JSON"


def read_index(folder: Path) -> list[Row]:
    """The compacted dataset through pyarrow.dataset, as a data lake reader opens it."""
    return ds.dataset(str(folder), format="parquet", partitioning="hive").to_table().to_pylist()


# --- hand-made metadata (real RLEs from real masks) for the part-level properties --------------------------


def make_metadata(uri: str, chunk_id: str, instances_per_prompt: list[int], job_id: str = "job1") -> ImageMetadata:
    """An image's metadata with real RLE masks: a block per instance, moving right; scores 0.95, 0.75, ..."""
    height, width = 20, 30
    annotations: list[Annotation] = []
    for prompt_index, count in enumerate(instances_per_prompt):
        for i in range(count):
            mask = np.zeros((height, width), dtype=bool)
            mask[2 + prompt_index : 8 + prompt_index, 3 * i : 3 * i + 5] = True
            annotations.append(Annotation(
                id=len(annotations), category_id=prompt_index + 1, prompt=f"p{prompt_index}",
                prompt_index=prompt_index, score=0.95 - 0.2 * i, bbox=(3.0 * i, 2.0 + prompt_index, 5.0, 6.0),
                pred_box_xyxy=(3.0 * i, 2.0 + prompt_index, 3.0 * i + 5.2, 8.1 + prompt_index),
                area=int(mask.sum()), segmentation=encode_rle(mask),
            ))
    prompts = [
        PromptSummary(category_id=p + 1, text=f"p{p}", presence_score=None if p else 0.75, instance_count=n)
        for p, n in enumerate(instances_per_prompt)
    ]
    return ImageMetadata(
        job_id=job_id, chunk_id=chunk_id, image=ImageInfo(uri=uri, width=width, height=height, file_name="x"),
        model=ModelInfo(id="facebook/sam3", revision="main", commit="abc123"), thresholds=Thresholds(),
        categories=[Category(id=p + 1, name=f"p{p}") for p in range(len(prompts))], prompts=prompts,
        annotations=annotations, processed_at=datetime(2026, 11, 29, 12, 0, tzinfo=UTC),
    )


def spec_for(root: str, job_id: str = "job1") -> JobSpec:
    return JobSpec(job_id=job_id, prompts=["p0", "p1"], output_root=root, model_id="facebook/sam3")


def key_of(uri: str) -> str:
    return uri.removeprefix("s3://")


def write_part(storage: Storage, root: str, chunk_id: str, done: list[ImageMetadata],
               failed: Iterable[str] = (), job_id: str = "job1") -> str | None:
    """A chunk part as a worker writes it: done images with their metadata, failed ones with a reason."""
    outcomes = [ItemOutcome(uri=d.image.uri, status="done", out_key=key_of(d.image.uri)) for d in done]
    outcomes += [ItemOutcome(uri=u, status="failed", reason="cannot decode", out_key=key_of(u)) for u in failed]
    return write_chunk_part(storage, spec_for(root, job_id), chunk_id, outcomes, done)


@pytest.fixture
def local_storage() -> Storage:
    return Storage(Settings())


# --- the finished embedded job ----------------------------------------------------------------------------------


def test_job_end_compacts_the_index_automatically_and_it_equals_every_json_row_for_row(
    finished_job: FinishedJob,
) -> None:
    root, job_id = str(finished_job.out_dir), finished_job.report.job_id
    docs = finished_job.metadata()
    index_dir = Path(index_dir_uri(root, job_id))
    rows = read_index(index_dir)

    assert_done_rows_equal_json(rows, docs, root)
    [failed] = [row for row in rows if row["status"] == "failed"]
    [failure] = finished_job.report.failures
    assert (failed["uri"], failed["reason"], failed["out_key"]) == (failure.uri, failure.reason, failure.out_key)
    assert failed["uri"].endswith(BROKEN_NAME) and failed["instances"] == [] and failed["width"] is None
    assert len(rows) == len(docs) + 1
    report = JobReport.model_validate_json(Path(report_uri(root, job_id)).read_bytes())
    assert report.index is not None and report.index.dir == str(index_dir)
    assert [Path(uri) for uri in report.index.files] == sorted(index_dir.glob("*.parquet"))
    assert report.instances == report.index.instances == sum(len(d.annotations) for d in docs.values()) > 0
    assert report.thresholds == Thresholds(score=0.0) and report.outputs is not None
    assert set(report.software) == {"sam3-batch", "torch", "transformers"}
    assert pq.read_schema(report.index.files[0]).equals(RESULTS_SCHEMA)


def readme_queries() -> list[str]:
    """The SQL blocks of README's Parquet section, in order."""
    readme = (REPO_ROOT / "README.md").read_text()
    return re.findall(r"```sql\n(.*?)```", readme, flags=re.DOTALL)


def run_query(sql: str, index_dir: Path) -> list[tuple[Any, ...]]:
    return duckdb.sql(sql.replace("INDEX", str(index_dir))).fetchall()


def test_duckdb_answers_the_readme_queries_as_the_json_says(finished_job: FinishedJob) -> None:
    queries = readme_queries()
    assert len(queries) == 3
    root, job_id = str(finished_job.out_dir), finished_job.report.job_id
    docs = list(finished_job.metadata().values())
    index_dir = Path(index_dir_uri(root, job_id))
    instances = sum(len(d.annotations) for d in docs)

    assert run_query(queries[0], index_dir) == [("done", len(docs), instances), ("failed", 1, 0)]
    per_prompt = {p: sum(1 for d in docs for a in d.annotations if a.prompt == p and a.score >= 0.5)
                  for p in RESULT_PROMPTS}
    assert run_query(queries[1], index_dir) == sorted((p, n) for p, n in per_prompt.items() if n)
    [failure] = finished_job.report.failures
    assert run_query(queries[2], index_dir) == [(failure.uri, failure.reason)]


def test_readme_queries_read_a_hive_partitioned_index(local_storage: Storage, tmp_path: Path) -> None:
    root = str(tmp_path / "out")
    write_part(local_storage, root, "c0", [make_metadata("s3://b/a.jpg", "c0", [2, 1])], failed=["s3://b/bad.jpg"])
    write_part(local_storage, root, "c1", [make_metadata("s3://b/c.jpg", "c1", [4, 0])])

    summary = compact_index(local_storage, root, "job1", partition_by=["status", "processed_date"])

    index_dir = Path(index_dir_uri(root, "job1"))
    assert sorted(Path(u).relative_to(index_dir).parent.as_posix() for u in summary.uris) == [
        "status=done/processed_date=2026-11-29", f"status=failed/processed_date={datetime.now(UTC).date()}"]
    queries = readme_queries()
    assert run_query(queries[0], index_dir) == [("done", 2, 7), ("failed", 1, 0)]
    assert run_query(queries[1], index_dir) == [("p0", 5), ("p1", 1)]  # p0 scores 0.95, 0.75 | 0.95, 0.75, 0.55, 0.35
    assert run_query(queries[2], index_dir) == [("s3://b/bad.jpg", "cannot decode")]


# --- part-level properties -----------------------------------------------------------------------------------


def test_retry_that_succeeded_replaces_the_failed_row(local_storage: Storage, tmp_path: Path) -> None:
    root = str(tmp_path / "out")
    write_part(local_storage, root, "c0", [make_metadata("s3://b/a.jpg", "c0", [1, 0])], failed=["s3://b/flaky.jpg"])
    retried = make_metadata("s3://b/flaky.jpg", "job1-retry-0", [0, 2])
    write_part(local_storage, root, "job1-retry-0", [retried], failed=["s3://b/still-bad.jpg"])
    write_part(local_storage, root, "job1-retry-1", [], failed=["s3://b/still-bad.jpg"])

    summary = compact_index(local_storage, root, "job1")

    rows = {row["out_key"]: row for row in read_index(Path(index_dir_uri(root, "job1")))}
    assert {k: r["status"] for k, r in rows.items()} == {
        "b/a.jpg": "done", "b/flaky.jpg": "done", "b/still-bad.jpg": "failed"}
    assert rows["b/flaky.jpg"] == expected_done_row(retried, "b/flaky.jpg", root)
    assert (summary.images, summary.done, summary.failed, summary.duplicate_rows_dropped) == (3, 2, 1, 2)


def test_redelivered_chunk_overwrites_its_own_part_and_adds_no_rows(local_storage: Storage, tmp_path: Path) -> None:
    root = str(tmp_path / "out")
    first = [make_metadata("s3://b/a.jpg", "c0", [2, 0])]
    redelivered = [*first, make_metadata("s3://b/b.jpg", "c0", [1, 3])]  # it finished one image more

    uri_first = write_part(local_storage, root, "c0", first)
    uri_again = write_part(local_storage, root, "c0", redelivered)
    write_part(local_storage, root, "c1", [make_metadata("s3://b/c.jpg", "c1", [0, 0])])

    assert uri_first == uri_again == part_uri(root, "job1", "c0")
    assert [i.relative_key for i in local_storage.list_objects(parts_dir_uri(root, "job1"))] == [
        "c0.parquet", "c1.parquet"]
    summary = compact_index(local_storage, root, "job1")
    assert (summary.parts_read, summary.images, summary.instances) == (2, 3, 6)


def test_image_found_in_two_parts_is_indexed_once(local_storage: Storage, tmp_path: Path) -> None:
    root = str(tmp_path / "out")
    shared = make_metadata("s3://b/shared.jpg", "c0", [1, 1])
    write_part(local_storage, root, "c0", [shared, make_metadata("s3://b/x.jpg", "c0", [2])])
    write_part(local_storage, root, "c1", [shared.model_copy(update={"chunk_id": "c1"})])

    summary = compact_index(local_storage, root, "job1")

    assert (summary.images, summary.duplicate_rows_dropped) == (2, 1)
    assert sorted(r["uri"] for r in read_index(Path(index_dir_uri(root, "job1")))) == [
        "s3://b/shared.jpg", "s3://b/x.jpg"]


def test_rerun_with_fewer_files_leaves_no_stale_rows_behind(local_storage: Storage, tmp_path: Path) -> None:
    root = str(tmp_path / "out")
    docs = [make_metadata(f"s3://b/{i}.jpg", f"c{i % 2}", [1, 2]) for i in range(5)]
    for chunk in ("c0", "c1"):
        write_part(local_storage, root, chunk, [d for d in docs if d.chunk_id == chunk])
    many = compact_index(local_storage, root, "job1", max_rows_per_file=2)
    assert many.files_written == 3
    assert [pq.ParquetFile(uri).metadata.num_rows for uri in many.uris] == [2, 2, 1]

    again = compact_index(local_storage, root, "job1")

    assert again.files_written == 1 and len(again.stale_files_emptied) == 2
    assert_done_rows_equal_json(read_index(Path(index_dir_uri(root, "job1"))),
                                {key_of(d.image.uri): d for d in docs}, root)
    assert compact_index(local_storage, root, "job1").stale_files_emptied == []  # already empty: left alone


def test_shared_lake_folder_holds_several_jobs_side_by_side(local_storage: Storage, tmp_path: Path) -> None:
    root, lake = str(tmp_path / "out"), tmp_path / "lake"
    for job in ("job1", "job2"):
        write_part(local_storage, root, "c0", [make_metadata(f"s3://b/{job}.jpg", "c0", [1, 1], job)], job_id=job)
        compact_index(local_storage, root, job, dest=str(lake), partition_by=["job_id"])

    rows = read_index(lake)

    assert sorted((r["job_id"], r["uri"]) for r in rows) == [("job1", "s3://b/job1.jpg"), ("job2", "s3://b/job2.jpg")]
    assert sorted(p.relative_to(lake).as_posix() for p in lake.rglob("*.parquet")) == [
        "job_id=job1/job1-part-0.parquet", "job_id=job2/job2-part-0.parquet"]


def test_unknown_partition_column_is_refused_by_name(local_storage: Storage, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot partition by uri"):
        compact_index(local_storage, str(tmp_path), "job1", partition_by=["uri"])


def test_chunk_without_images_writes_no_part_and_an_empty_index_keeps_the_schema(
    local_storage: Storage, tmp_path: Path
) -> None:
    root = str(tmp_path / "out")

    assert write_part(local_storage, root, "c0", []) is None

    summary = compact_index(local_storage, root, "job1")
    assert (summary.parts_read, summary.images, summary.files_written) == (0, 0, 1)
    assert pq.read_table(summary.uris[0]).schema.equals(RESULTS_SCHEMA)


def test_part_that_is_not_results_parquet_fails_compaction_naming_it(local_storage: Storage, tmp_path: Path) -> None:
    root = str(tmp_path / "out")
    write_part(local_storage, root, "c0", [make_metadata("s3://b/a.jpg", "c0", [1])])
    local_storage.write_bytes(part_uri(root, "job1", "c1"), b"PAR1 but not really")

    with pytest.raises(IndexPartError, match=r"c1\.parquet"):
        compact_index(local_storage, root, "job1")


def test_chunk_id_that_is_not_a_plain_name_stays_inside_the_parts_folder(
    local_storage: Storage, tmp_path: Path
) -> None:
    root = str(tmp_path / "out")

    uri = write_part(local_storage, root, "../../escape/x", [make_metadata("s3://b/a.jpg", "c", [1])])

    assert uri is not None and uri.startswith(parts_dir_uri(root, "job1") + "/")
    assert "/" not in uri.removeprefix(parts_dir_uri(root, "job1") + "/")
    assert not (tmp_path / "escape").exists() and Path(uri).is_file()


def test_index_command_with_out_recompacts_an_embedded_job_without_redis(
    finished_job: FinishedJob, tmp_path: Path
) -> None:
    settings = finished_job.settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})  # nobody there
    root, job_id = str(finished_job.out_dir), finished_job.report.job_id
    lake = tmp_path / "lake"

    done = run_cli(["index", job_id, "--out", root, "--dest", str(lake), "--partition-by", "status", "--json"],
                   settings)

    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["images"], summary["failed"]) == (len(finished_job.metadata()) + 1, 1)
    assert_done_rows_equal_json(read_index(lake), finished_job.metadata(), root)


# --- distributed run: real worker, SeaweedFS, the CLI -------------------------------------------------------


def _s3_objects(s3_client: Any, bucket: str, prefix: str) -> Iterable[str]:
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for entry in page.get("Contents", []):
            yield entry["Key"]


def _s3_get(s3_client: Any, bucket: str, key: str) -> bytes:
    return bytes(s3_client.get_object(Bucket=bucket, Key=key)["Body"].read())


@pytest.mark.slow
def test_distributed_job_is_indexed_on_s3_by_the_worker_that_finishes_it_and_exports_to_coco(
    settings_factory: Callable[..., Settings], tiny_checkpoint: Path, s3_client: Any, s3_bucket: str,
    image_bytes_factory: Callable[[str], bytes], worker_factory: Any, tmp_path: Path,
) -> None:
    settings = settings_factory(model=str(tiny_checkpoint), device="cpu", chunk_size=2, batch_size=2)
    kinds = {"a.jpg": "jpeg", "b.png": "png_rgba", "sub/c.webp": "webp", "sub/d.png": "gray", "e.tif": "truncated"}
    for name, kind in kinds.items():
        s3_client.put_object(Bucket=s3_bucket, Key=f"in/{name}", Body=image_bytes_factory(kind))
    worker = worker_factory(settings)
    out_root = f"s3://{s3_bucket}/out"
    args = ["submit", f"s3://{s3_bucket}/in/", "--out", out_root, "--threshold", "0", "--json"]
    submitted = run_cli([*args, "-p", RESULT_PROMPTS[0], "-p", RESULT_PROMPTS[1]], settings)
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["job_id"]
    counters = wait_for_job(RedisJobStore(settings.state_redis_url()), job_id, workers=[worker])
    assert (counters.done, counters.failed) == (4, 1)

    report_key = report_uri("out", job_id)  # written after the index, by the worker that finished the job
    wait_until(lambda: report_key in _s3_objects(s3_client, s3_bucket, "out/_jobs/"), 60, "the job report",
               details=worker.log)
    report = JobReport.model_validate_json(_s3_get(s3_client, s3_bucket, report_key))

    docs = {
        key.removeprefix("out/").removesuffix(".json"): ImageMetadata.model_validate_json(
            _s3_get(s3_client, s3_bucket, key))
        for key in _s3_objects(s3_client, s3_bucket, "out/") if out_key_of_metadata(key.removeprefix("out/"))
    }
    assert report.index is not None and len(docs) == 4
    prefix = f"s3://{s3_bucket}/"
    table = pa.concat_tables(
        pq.read_table(io.BytesIO(_s3_get(s3_client, s3_bucket, uri.removeprefix(prefix)))) for uri in report.index.files
    )
    rows = table.to_pylist()
    assert_done_rows_equal_json(rows, docs, out_root)
    assert [(r["uri"], r["status"]) for r in rows if r["status"] == "failed"] == [(f"{prefix}in/e.tif", "failed")]

    exported = run_cli(["export", job_id, "--format", "coco", "--json"], settings)  # the job's root from Redis

    assert exported.returncode == 0, exported.stderr
    [coco_uri] = json.loads(exported.stdout)["files"]
    assert coco_uri == f"{prefix}out/_jobs/{job_id}/coco/instances-00000.json"
    coco_file = tmp_path / "coco.json"
    coco_file.write_bytes(_s3_get(s3_client, s3_bucket, coco_uri.removeprefix(prefix)))
    coco = COCO(str(coco_file))
    assert sorted(image["file_name"] for image in coco.loadImgs(coco.getImgIds())) == sorted(docs)
    assert len(coco.getAnnIds()) == sum(len(d.annotations) for d in docs.values())
