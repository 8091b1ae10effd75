"""The chunk output layout: one Parquet shard per chunk is the done marker; every reader reads it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import pyarrow.parquet as pq
import pytest
from pycocotools.coco import COCO

from sam3_batch import jobs
from sam3_batch.coco_export import export_coco
from sam3_batch.contracts.jobstate_memory import MemoryJobStore
from sam3_batch.contracts.lake import write_chunk_part
from sam3_batch.contracts.lake_index import compact_index
from sam3_batch.contracts.layout import JOB_DIR, shard_digest, shard_name, shard_of_jobs_key
from sam3_batch.contracts.schemas import (
    ChunkMessage,
    ItemOutcome,
    JobReport,
    JobSpec,
    OutputOptions,
    Thresholds,
    WorkItem,
)
from sam3_batch.contracts.settings import Settings
from sam3_batch.contracts.storage import Storage
from sam3_batch.producer.done_index import ShardIndex
from sam3_batch.results import read_results
from sam3_batch.worker.chunk_record import record_chunk
from sam3_batch.worker.pipeline import ChunkContext, process_chunk
from tests.fixtures.images import GOOD_IMAGES_DIR_FILES
from tests.fixtures.results import BROKEN_NAME, RESULT_PROMPTS, FinishedJob
from tests.fixtures.workers import run_cli

IMAGES = len(GOOD_IMAGES_DIR_FILES) + 1  # + the broken file


def _run(finished_job: FinishedJob, out: Path, *, chunk_size: int = 3, skip_existing: bool = False,
         per_image_json: bool | None = None) -> JobReport:
    settings = Settings(model=finished_job.settings.model, device="cpu", chunk_size=chunk_size, batch_size=1)
    request = jobs.JobRequest(
        inputs=[str(finished_job.images_dir)], prompts=RESULT_PROMPTS, output_root=str(out),
        thresholds=Thresholds(score=0.0), skip_existing=skip_existing,
        outputs=OutputOptions(layout="chunk", per_image_json=per_image_json),
    )
    return jobs.run_embedded(request, settings)


def _shards(out: Path) -> dict[Path, int]:
    """Every shard under the output root, with its modification time."""
    jobs_dir = out / JOB_DIR
    return {
        path: path.stat().st_mtime_ns for path in jobs_dir.rglob("*.parquet")
        if shard_of_jobs_key(path.relative_to(jobs_dir).as_posix()) is not None
    }


@pytest.fixture(scope="module")
def chunk_job(finished_job: FinishedJob, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, JobReport]:
    """The images of ``finished_job`` (image layout) run again in the chunk layout, chunks of 3."""
    out = tmp_path_factory.mktemp("chunk-layout") / "out"
    report = _run(finished_job, out)
    assert (report.counters.done, report.counters.failed) == (IMAGES - 1, 1)
    return out, report


def test_chunk_layout_writes_one_shard_per_chunk_with_every_image_and_no_per_image_json(
    chunk_job: tuple[Path, JobReport],
) -> None:
    out, report = chunk_job
    shards = _shards(out)
    assert len(shards) == -(-IMAGES // 3)  # 8 images in chunks of 3
    assert not [p for p in out.rglob("*.json") if JOB_DIR not in p.parts]  # no K.json
    rows = [row for path in sorted(shards) for row in pq.read_table(path).to_pylist()]
    assert len(rows) == IMAGES and len({r["out_key"] for r in rows}) == IMAGES
    [failed] = [r for r in rows if r["status"] == "failed"]
    assert failed["out_key"] == BROKEN_NAME and "not a recognised image format" in failed["reason"]
    assert all(r["metadata_uri"] is None for r in rows)  # no K.json to point at
    for path in shards:
        keys = pq.read_table(path, columns=["out_key"]).column("out_key").to_pylist()
        assert path.name == shard_name(3, sorted(keys))  # named by content: the planner lists in key order
    written = JobReport.model_validate_json((out / JOB_DIR / report.job_id / "report.json").read_bytes())
    assert written.index is not None and written.index.images == IMAGES  # compacted from the shards


def test_read_results_and_coco_export_of_the_chunk_layout_equal_the_image_layouts(
    finished_job: FinishedJob, chunk_job: tuple[Path, JobReport], tmp_path: Path,
) -> None:
    out, report = chunk_job
    expected = finished_job.metadata()

    results = {r.out_key: r.metadata for r in read_results(str(out))}

    assert set(results) == set(expected)
    for key, metadata in results.items():
        assert metadata.annotations == expected[key].annotations
        assert metadata.prompts == expected[key].prompts and metadata.job_id == report.job_id
    from_index = {r.out_key for r in read_results(str(out), job_id=report.job_id, from_index=True)}
    assert from_index == set(expected)
    summary = export_coco(Storage(finished_job.settings), str(out), dest=str(tmp_path / "coco"))
    coco = COCO(summary.files[0])
    assert len(coco.getImgIds()) == len(expected)
    assert len(coco.getAnnIds()) == sum(len(m.annotations) for m in expected.values())


def test_index_command_reads_the_shards(chunk_job: tuple[Path, JobReport], finished_job: FinishedJob) -> None:
    out, report = chunk_job
    done = run_cli(["index", report.job_id, "--out", str(out), "--json"], finished_job.settings)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["images"], summary["done"], summary["failed"]) == (IMAGES, IMAGES - 1, 1)


def test_skip_existing_rerun_skips_every_chunk_with_a_shard_and_rewrites_nothing(
    finished_job: FinishedJob, tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    _run(finished_job, out)
    before = _shards(out)

    again = _run(finished_job, out, skip_existing=True)

    assert (again.counters.skipped, again.counters.done, again.counters.failed) == (IMAGES, 0, 0)
    assert {p: t for p, t in _shards(out).items() if p in before} == before
    assert len(list((out / JOB_DIR / again.job_id).rglob("s*-*.parquet"))) == 0  # the new job wrote no shard


def test_dry_run_with_skip_existing_counts_the_chunks_with_a_shard_as_skipped(
    chunk_job: tuple[Path, JobReport], finished_job: FinishedJob,
) -> None:
    out, _ = chunk_job
    request = jobs.JobRequest(inputs=[str(finished_job.images_dir)], prompts=RESULT_PROMPTS, output_root=str(out),
                              skip_existing=True, outputs=OutputOptions(layout="chunk"))
    settings = Settings(model=finished_job.settings.model, chunk_size=3)

    plan = jobs.dry_run(request, settings, rate=1.0)

    assert (plan.images, plan.chunks, plan.skipped) == (0, 0, IMAGES)


def test_a_redelivered_chunk_whose_shard_exists_is_counted_from_it_without_segmenting_or_writing(
    chunk_job: tuple[Path, JobReport], finished_job: FinishedJob,
) -> None:
    out, report = chunk_job
    names = sorted([*GOOD_IMAGES_DIR_FILES, BROKEN_NAME])[:3]
    spec = JobSpec(job_id=report.job_id, prompts=RESULT_PROMPTS, output_root=str(out), chunk_size=3,
                   outputs=OutputOptions(layout="chunk"))
    chunk = ChunkMessage(job_id=spec.job_id, chunk_id=f"{spec.job_id}-g0-000000000", items=[
        WorkItem(uri=str(finished_job.images_dir / name), out_key=name) for name in names])
    storage = Storage(finished_job.settings)
    # No model and no stage pools: anything but reading the shard back would fail.
    context = ChunkContext(runtime=cast(Any, None), storage=storage, settings=finished_job.settings,
                           loaders=cast(Any, None), writers=cast(Any, None))
    [shard] = [p for p in _shards(out) if p.name == shard_name(3, names)]
    written_at = shard.stat().st_mtime_ns
    store = MemoryJobStore()
    store.create(spec)

    result = process_chunk(chunk, spec, context, check_done=True)

    assert result.from_existing_shard and sorted(o.out_key or "" for o in result.outcomes) == names
    assert [o.status for o in result.outcomes].count("failed") == names.count(BROKEN_NAME)
    assert record_chunk(store, storage, spec, chunk, result) is True
    assert record_chunk(store, storage, spec, chunk, result) is False  # counted once
    assert store.counters(spec.job_id).done == sum(o.status == "done" for o in result.outcomes)
    assert shard.stat().st_mtime_ns == written_at  # not rewritten


def test_skip_existing_with_another_chunk_size_reads_the_shards_and_skips_each_done_image(
    finished_job: FinishedJob, tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    _run(finished_job, out, chunk_size=3)

    again = _run(finished_job, out, chunk_size=2, skip_existing=True)

    # No chunk of 2 matches a shard of 3: the done images are found in the shards' rows, and only the
    # failed image is tried again.
    assert (again.counters.skipped, again.counters.done, again.counters.failed) == (IMAGES - 1, 0, 1)
    assert len({r.out_key for r in read_results(str(out))}) == IMAGES - 1  # still one result per image


def test_per_image_json_in_the_chunk_layout_writes_both_and_readers_see_each_image_once(
    finished_job: FinishedJob, tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    report = _run(finished_job, out, per_image_json=True)

    jsons = [p for p in out.rglob("*.json") if JOB_DIR not in p.parts]
    assert len(jsons) == report.counters.done == IMAGES - 1 and len(_shards(out)) == 3
    keys = [r.out_key for r in read_results(str(out))]
    assert sorted(keys) == sorted(GOOD_IMAGES_DIR_FILES)


def test_shard_index_matches_exact_chunks_only_and_reads_shards_of_another_size(
    chunk_job: tuple[Path, JobReport], finished_job: FinishedJob,
) -> None:
    out, _ = chunk_job
    storage = Storage(finished_job.settings)
    names = sorted([*GOOD_IMAGES_DIR_FILES, BROKEN_NAME])

    same = ShardIndex.from_output_root(storage, str(out), 3)
    assert (same.shards, same.shards_read) == (3, 0)  # one LIST, no GET
    assert same.chunk_done(names[:3]) and same.chunk_done(names[6:])
    assert not same.chunk_done(names[:2]) and not same.chunk_done(names[1:4])
    assert names[0] not in same  # per-image answers only come from shards of another size

    other = ShardIndex.from_output_root(storage, str(out), 4)
    assert (other.shards, other.shards_read) == (3, 3)
    assert not other.chunk_done(names[:3])
    assert all(name in other for name in GOOD_IMAGES_DIR_FILES) and BROKEN_NAME not in other


def test_shard_names_depend_on_the_keys_their_order_and_the_chunk_size() -> None:
    assert shard_name(32, ["a", "b"]) == shard_name(32, ["a", "b"])
    assert len({shard_name(32, ["a", "b"]), shard_name(32, ["b", "a"]), shard_name(16, ["a", "b"]),
                shard_name(32, ["ab"]), shard_name(32, ["a", "b", ""])}) == 5
    key = shard_of_jobs_key(f"job-1/parts/{shard_name(32, ['x'])}")
    assert key is not None and (key.job_id, key.chunk_size, key.digest) == ("job-1", 32, shard_digest(["x"]))
    assert shard_of_jobs_key("job-1/parts/job-1-g0-000000001.parquet") is None  # an image layout part


def test_image_layout_refuses_to_go_without_its_per_image_json() -> None:
    with pytest.raises(ValueError, match=r"image layout always writes K\.json"):
        OutputOptions(layout="image", per_image_json=False)


def test_run_with_layout_chunk_on_the_command_line_writes_shards_and_refuses_a_bad_layout(
    good_images_dir: Path, tmp_path: Path, finished_job: FinishedJob,
) -> None:
    out = tmp_path / "out"
    args = ["run", str(good_images_dir), "--prompt", "thing", "--out", str(out), "--model", "tiny-random"]

    done = run_cli([*args, "--layout", "chunk", "--chunk-size", "4"], finished_job.settings)

    assert done.returncode == 0, done.stderr
    assert len(_shards(out)) == -(-len(GOOD_IMAGES_DIR_FILES) // 4)
    assert not [p for p in out.rglob("*.json") if JOB_DIR not in p.parts]
    bad = run_cli([*args, "--layout", "row"], finished_job.settings)
    assert bad.returncode != 0 and "--layout must be image or chunk" in bad.stderr


def test_a_retried_image_has_its_done_row_in_a_new_shard_and_readers_and_the_index_keep_that_one(
    finished_job: FinishedJob, tmp_path: Path,
) -> None:
    docs = finished_job.metadata()
    first, second = sorted(docs)[:2]
    spec = JobSpec(job_id="retry-job", prompts=RESULT_PROMPTS, output_root=str(tmp_path), chunk_size=2,
                   outputs=OutputOptions(layout="chunk"))
    storage = Storage(finished_job.settings)
    done = [ItemOutcome(uri=docs[k].image.uri, status="done", out_key=k) for k in (first, second)]
    failed = ItemOutcome(uri=docs[second].image.uri, status="failed", reason="timed out", out_key=second)
    # The job's chunk: one image done, one failed; then retry-failed's chunk of the failed image, done.
    write_chunk_part(storage, spec, "retry-job-g0-000000000", [done[0], failed], [docs[first]], [first, second])
    write_chunk_part(storage, spec, "retry-job-retry1-000000000", [done[1]], [docs[second]], [second])

    read = {r.out_key: r.metadata for r in read_results(str(tmp_path))}
    summary = compact_index(storage, str(tmp_path), spec.job_id)

    assert set(read) == {first, second} and read[second].annotations == docs[second].annotations
    assert (summary.parts_read, summary.images, summary.done, summary.failed) == (2, 2, 2, 0)
    assert summary.duplicate_rows_dropped == 1  # the failed row the retry replaced
