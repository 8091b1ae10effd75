"""The results index: one Parquet part per chunk, compacted into a dataset that matches the JSON exactly."""

from __future__ import annotations

import importlib
import importlib.util
import io
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from sam3_batch import jobs
from sam3_batch.contracts.jobstate import RedisJobStore
from sam3_batch.contracts.keys import job_dir_uri, out_key_of_metadata
from sam3_batch.contracts.schemas import (
    RLE,
    Annotation,
    ImageInfo,
    ImageMetadata,
    ModelInfo,
    PromptSummary,
    Thresholds,
)
from sam3_batch.contracts.settings import Settings
from sam3_batch.contracts.storage import Storage
from sam3_batch.index import IndexPartError, compact_index, index_dir_uri
from sam3_batch.worker.encode import decode_rle, encode_rle
from sam3_batch.worker.parquet_parts import RESULTS_SCHEMA, part_uri, parts_dir_uri, write_chunk_part
from tests.fixtures.workers import run_cli, wait_for_job

PROMPTS = ["a red square", "the blue circle"]
Row = dict[str, Any]


# --- the oracle: rows built from the JSON documents, independently of worker.parquet_parts ---------------


def expected_rows(metadata: Iterable[ImageMetadata]) -> dict[tuple[str, int], Row]:
    """(uri, prompt_index) -> the row the index must hold, straight from the metadata JSON."""
    rows: dict[tuple[str, int], Row] = {}
    for doc in metadata:
        for index, summary in enumerate(doc.prompts):
            instances = [a for a in doc.annotations if a.prompt_index == index]
            rows[(doc.image.uri, index)] = {
                "job_id": doc.job_id, "chunk_id": doc.chunk_id, "uri": doc.image.uri,
                "width": doc.image.width, "height": doc.image.height, "prompt": summary.text,
                "prompt_index": index, "presence_score": summary.presence_score,
                "instance_count": summary.instance_count, "scores": [a.score for a in instances],
                "boxes_xyxy": [list(a.box_xyxy) for a in instances], "areas": [a.area for a in instances],
                "masks": [{"size": list(a.segmentation.size), "counts": a.segmentation.counts} for a in instances],
                "model_id": doc.model.id, "model_revision": doc.model.revision,
            }
    return rows


def assert_index_matches(table: pa.Table, metadata: list[ImageMetadata]) -> None:
    """Every row equals its JSON counterpart (floats bit for bit, RLE strings identical); none missing or extra."""
    expected = expected_rows(metadata)
    actual = table.to_pylist()
    keys = [(row["uri"], row["prompt_index"]) for row in actual]
    assert len(keys) == len(set(keys)), "an (image, prompt) pair is indexed more than once"
    assert set(keys) == set(expected)
    for row in actual:
        want = expected[(row["uri"], row["prompt_index"])]
        assert row == want, f"row for {row['uri']} prompt {row['prompt_index']} differs from its JSON"
        assert row["instance_count"] == len(row["scores"]) == len(row["boxes_xyxy"]) == len(row["masks"])
        for mask, area in zip(row["masks"], row["areas"], strict=True):
            decoded = decode_rle(RLE(size=tuple(mask["size"]), counts=mask["counts"]))
            assert decoded.shape == (row["height"], row["width"]) and int(decoded.sum()) == area


def read_local_index(folder: Path) -> pa.Table:
    """The compacted dataset through pyarrow.dataset, as a data lake reader would open it."""
    return ds.dataset(str(folder), format="parquet").to_table()


def duckdb_totals(folder: Path) -> tuple[int, int] | None:
    """(rows, instances) through DuckDB when it is installed (not a dependency); None otherwise."""
    if importlib.util.find_spec("duckdb") is None:
        return None
    duckdb = importlib.import_module("duckdb")
    query = f"SELECT count(*), sum(instance_count) FROM read_parquet('{folder}/*.parquet')"
    rows, instances = duckdb.sql(query).fetchone()
    return int(rows), int(instances or 0)


def local_metadata(out_dir: Path) -> list[ImageMetadata]:
    """Every per-image metadata JSON under a local output root."""
    found = []
    for path in sorted(out_dir.rglob("*.json")):
        if out_key_of_metadata(path.relative_to(out_dir).as_posix()) is not None:
            found.append(ImageMetadata.model_validate_json(path.read_bytes()))
    return found


# --- hand-made metadata (real RLEs from real masks) for the part-level properties --------------------------


def make_metadata(uri: str, chunk_id: str, instances_per_prompt: list[int], job_id: str = "job1") -> ImageMetadata:
    """An image's metadata with real RLE masks: a block per instance, moving right."""
    height, width = 20, 30
    annotations: list[Annotation] = []
    for prompt_index, count in enumerate(instances_per_prompt):
        for i in range(count):
            mask = np.zeros((height, width), dtype=bool)
            mask[2 + prompt_index : 8 + prompt_index, 3 * i : 3 * i + 5] = True
            box = (3.0 * i, 2.0 + prompt_index, 3.0 * i + 5, 8.0 + prompt_index)
            annotations.append(Annotation(
                id=len(annotations), prompt=f"p{prompt_index}", prompt_index=prompt_index,
                score=0.9 - 0.1 * i + 1e-9 * prompt_index, box_xyxy=box, bbox=(box[0], box[1], 5.0, 6.0),
                area=int(mask.sum()), segmentation=encode_rle(mask),
            ))
    prompts = [
        PromptSummary(text=f"p{p}", presence_score=None if p else 0.75, instance_count=n)
        for p, n in enumerate(instances_per_prompt)
    ]
    return ImageMetadata(
        job_id=job_id, chunk_id=chunk_id, image=ImageInfo(uri=uri, width=width, height=height, file_name="x"),
        model=ModelInfo(id="facebook/sam3", revision="abc123"), thresholds=Thresholds(), prompts=prompts,
        annotations=annotations,
    )


def part_names(storage: Storage, root: str, job_id: str) -> list[str]:
    return [info.relative_key for info in storage.list_objects(parts_dir_uri(root, job_id))]


@pytest.fixture
def local_storage() -> Storage:
    return Storage(Settings())


# --- embedded run ---------------------------------------------------------------------------------------------


def test_embedded_job_index_matches_every_metadata_json_row_for_row(
    tiny_checkpoint: Path, good_images_dir: Path, tmp_path: Path
) -> None:
    settings = Settings(model=str(tiny_checkpoint), device="cpu", chunk_size=3, batch_size=2)
    out_dir = tmp_path / "out"
    request = jobs.JobRequest(inputs=[str(good_images_dir)], prompts=PROMPTS, output_root=str(out_dir),
                              thresholds=Thresholds(score=0.0))
    report = jobs.run_embedded(request, settings)
    assert report.counters.done == 7 and report.counters.failed == 0
    storage = Storage(settings)
    assert len(part_names(storage, str(out_dir), report.job_id)) == 3  # 7 images in chunks of 3

    summary = compact_index(storage, str(out_dir), report.job_id, target_rows=4)

    metadata = local_metadata(out_dir)
    assert len(metadata) == 7 and sum(len(m.annotations) for m in metadata) > 0
    assert (summary.parts_read, summary.images, summary.rows, summary.files_written) == (3, 7, 14, 4)
    assert summary.instances == sum(len(m.annotations) for m in metadata)
    assert [pq.ParquetFile(uri).metadata.num_rows for uri in summary.uris] == [4, 4, 4, 2]
    index_dir = Path(index_dir_uri(str(out_dir), report.job_id))
    table = read_local_index(index_dir)
    assert table.schema.equals(RESULTS_SCHEMA)
    assert_index_matches(table, metadata)
    totals = duckdb_totals(index_dir)  # DuckDB is not installed here: pyarrow alone reads it then
    assert totals is None or totals == (14, summary.instances)


def test_index_command_with_out_compacts_an_embedded_job_without_redis(
    tiny_checkpoint: Path, good_images_dir: Path, tmp_path: Path
) -> None:
    settings = Settings(model=str(tiny_checkpoint), device="cpu", chunk_size=4, batch_size=4,
                        broker_url="redis://127.0.0.1:1/0")  # nothing listens there: Redis must not be needed
    out_dir = tmp_path / "out"
    request = jobs.JobRequest(inputs=[str(good_images_dir)], prompts=["dog"], output_root=str(out_dir),
                              thresholds=Thresholds(score=0.0))
    report = jobs.run_embedded(request, settings)

    done = run_cli(["index", report.job_id, "--out", str(out_dir), "--json"], settings)

    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["parts_read"], summary["rows"], summary["files_written"]) == (2, 7, 1)
    assert_index_matches(read_local_index(Path(index_dir_uri(str(out_dir), report.job_id))), local_metadata(out_dir))


# --- part-level properties -----------------------------------------------------------------------------------


def test_redelivered_chunk_overwrites_its_own_part_and_adds_no_rows(local_storage: Storage, tmp_path: Path) -> None:
    root = str(tmp_path / "out")
    first = [make_metadata("s3://b/a.jpg", "c0", [2, 0])]
    # The redelivery finished one more image than the first delivery had.
    redelivered = [*first, make_metadata("s3://b/b.jpg", "c0", [1, 3])]
    other = [make_metadata("s3://b/c.jpg", "c1", [0, 0])]

    uri_first = write_chunk_part(local_storage, root, "job1", "c0", first)
    uri_again = write_chunk_part(local_storage, root, "job1", "c0", redelivered)
    write_chunk_part(local_storage, root, "job1", "c1", other)
    write_chunk_part(local_storage, root, "job1", "c1", other)

    assert uri_first == uri_again == part_uri(root, "job1", "c0")
    assert part_names(local_storage, root, "job1") == ["c0.parquet", "c1.parquet"]
    summary = compact_index(local_storage, root, "job1")
    assert (summary.parts_read, summary.rows, summary.images, summary.instances) == (2, 6, 3, 6)
    assert_index_matches(read_local_index(Path(index_dir_uri(root, "job1"))), redelivered + other)


def test_image_found_in_two_parts_is_indexed_once(local_storage: Storage, tmp_path: Path) -> None:
    root = str(tmp_path / "out")
    shared = make_metadata("s3://b/shared.jpg", "c0", [1, 1])
    write_chunk_part(local_storage, root, "job1", "c0", [shared, make_metadata("s3://b/x.jpg", "c0", [2])])
    write_chunk_part(local_storage, root, "job1", "c1", [shared.model_copy(update={"chunk_id": "c1"})])

    summary = compact_index(local_storage, root, "job1")

    assert (summary.rows, summary.images, summary.duplicate_rows_dropped) == (3, 2, 2)
    table = read_local_index(Path(index_dir_uri(root, "job1")))
    assert sorted(table.column("uri").to_pylist()) == ["s3://b/shared.jpg"] * 2 + ["s3://b/x.jpg"]


def test_rerun_with_fewer_files_leaves_no_stale_rows_behind(local_storage: Storage, tmp_path: Path) -> None:
    root = str(tmp_path / "out")
    docs = [make_metadata(f"s3://b/{i}.jpg", f"c{i % 2}", [1, 2]) for i in range(5)]
    for chunk in ("c0", "c1"):
        write_chunk_part(local_storage, root, "job1", chunk, [d for d in docs if d.chunk_id == chunk])
    many = compact_index(local_storage, root, "job1", target_rows=3)
    assert many.files_written == 4

    again = compact_index(local_storage, root, "job1")

    assert again.files_written == 1 and len(again.stale_files_emptied) == 3
    assert again.uris == many.uris[:1]
    assert_index_matches(read_local_index(Path(index_dir_uri(root, "job1"))), docs)
    assert compact_index(local_storage, root, "job1").stale_files_emptied == []  # already empty: left alone


def test_chunk_without_done_images_writes_no_part(local_storage: Storage, tmp_path: Path) -> None:
    root = str(tmp_path / "out")

    assert write_chunk_part(local_storage, root, "job1", "c0", []) is None

    assert part_names(local_storage, root, "job1") == []
    summary = compact_index(local_storage, root, "job1")
    assert (summary.parts_read, summary.rows, summary.files_written) == (0, 0, 1)
    assert read_local_index(Path(index_dir_uri(root, "job1"))).num_rows == 0


def test_image_without_instances_keeps_one_row_per_prompt_with_empty_lists(
    local_storage: Storage, tmp_path: Path
) -> None:
    root = str(tmp_path / "out")
    write_chunk_part(local_storage, root, "job1", "c0", [make_metadata("s3://b/empty.jpg", "c0", [0, 0, 0])])

    table = pq.read_table(part_uri(root, "job1", "c0"))

    assert table.column("prompt").to_pylist() == ["p0", "p1", "p2"]
    assert table.column("presence_score").to_pylist() == [0.75, None, None]
    assert table.column("masks").to_pylist() == [[], [], []]


def test_part_that_is_not_results_parquet_fails_compaction_naming_it(local_storage: Storage, tmp_path: Path) -> None:
    root = str(tmp_path / "out")
    write_chunk_part(local_storage, root, "job1", "c0", [make_metadata("s3://b/a.jpg", "c0", [1])])
    bad = part_uri(root, "job1", "c1")
    local_storage.write_bytes(bad, b"PAR1 but not really")

    with pytest.raises(IndexPartError, match=r"c1\.parquet"):
        compact_index(local_storage, root, "job1")


def test_chunk_id_that_is_not_a_plain_name_stays_inside_the_parts_folder(
    local_storage: Storage, tmp_path: Path
) -> None:
    root = str(tmp_path / "out")

    uri = write_chunk_part(local_storage, root, "job1", "../../escape/x", [make_metadata("s3://b/a.jpg", "c", [1])])

    assert uri is not None and uri.startswith(parts_dir_uri(root, "job1") + "/")
    assert "/" not in uri.removeprefix(parts_dir_uri(root, "job1") + "/")
    assert not (tmp_path / "escape").exists() and Path(uri).is_file()


# --- distributed run: real worker, SeaweedFS, the CLI -------------------------------------------------------


def _s3_objects(s3_client: Any, bucket: str, prefix: str) -> Iterable[str]:
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for entry in page.get("Contents", []):
            yield entry["Key"]


def _s3_get(s3_client: Any, bucket: str, key: str) -> bytes:
    return bytes(s3_client.get_object(Bucket=bucket, Key=key)["Body"].read())


@pytest.mark.slow
def test_distributed_job_index_on_s3_matches_every_metadata_json(
    settings_factory: Callable[..., Settings], tiny_checkpoint: Path, s3_client: Any, s3_bucket: str,
    image_bytes_factory: Callable[[str], bytes], worker_factory: Any,
) -> None:
    settings = settings_factory(model=str(tiny_checkpoint), device="cpu", chunk_size=2, batch_size=2)
    kinds = {"a.jpg": "jpeg", "b.png": "png_rgba", "sub/c.webp": "webp", "sub/d.png": "gray", "e.tif": "tiff"}
    for name, kind in kinds.items():
        s3_client.put_object(Bucket=s3_bucket, Key=f"in/{name}", Body=image_bytes_factory(kind))
    worker = worker_factory(settings)
    args = ["submit", f"s3://{s3_bucket}/in/", "--out", f"s3://{s3_bucket}/out", "--threshold", "0", "--json"]
    submitted = run_cli([*args, "-p", PROMPTS[0], "-p", PROMPTS[1]], settings)
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["job_id"]
    counters = wait_for_job(RedisJobStore(settings.state_redis_url()), job_id, workers=[worker])
    assert counters.done == 5

    indexed = run_cli(["index", job_id, "--json"], settings)

    assert indexed.returncode == 0, indexed.stderr
    summary = json.loads(indexed.stdout)
    assert (summary["parts_read"], summary["images"], summary["rows"]) == (3, 5, 10)
    metadata = [
        ImageMetadata.model_validate_json(_s3_get(s3_client, s3_bucket, key))
        for key in _s3_objects(s3_client, s3_bucket, "out/")
        if out_key_of_metadata(key.removeprefix("out/")) is not None
    ]
    index_prefix = index_dir_uri(f"s3://{s3_bucket}/out", job_id).removeprefix(f"s3://{s3_bucket}/") + "/"
    files = list(_s3_objects(s3_client, s3_bucket, index_prefix))
    assert [f"s3://{s3_bucket}/{key}" for key in files] == summary["uris"]
    table = pa.concat_tables(pq.read_table(io.BytesIO(_s3_get(s3_client, s3_bucket, key))) for key in files)
    assert len(metadata) == 5
    assert_index_matches(table, metadata)
    assert job_dir_uri(f"s3://{s3_bucket}/out", job_id) in summary["uris"][0]
