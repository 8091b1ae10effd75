"""The whole distributed path: CLI submit -> Redis/Celery -> a real worker process -> SeaweedFS S3."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from sam3_batch.contracts.jobstate import RedisJobStore
from sam3_batch.contracts.keys import OutputLayout
from sam3_batch.contracts.report import report_uri
from sam3_batch.contracts.schemas import ImageMetadata, JobReport
from sam3_batch.contracts.settings import Settings
from sam3_batch.results import read_results
from sam3_batch.worker.encode import decode_rle
from tests.fixtures.workers import run_cli, wait_for_job

PROMPTS = ["a red square", "the blue circle"]


def _upload(s3_client: Any, bucket: str, key: str, data: bytes) -> str:
    s3_client.put_object(Bucket=bucket, Key=key, Body=data)
    return f"s3://{bucket}/{key}"


def _get(s3_client: Any, uri: str) -> bytes:
    bucket, key = uri.removeprefix("s3://").split("/", 1)
    return bytes(s3_client.get_object(Bucket=bucket, Key=key)["Body"].read())


def _exists(s3_client: Any, uri: str) -> bool:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bool(s3_client.list_objects_v2(Bucket=bucket, Prefix=key).get("KeyCount", 0))


def _settings(settings_factory: Any, tiny_checkpoint: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"model": str(tiny_checkpoint), "device": "cpu", "chunk_size": 3, "batch_size": 2}
    values.update(overrides)
    return settings_factory(**values)  # type: ignore[no-any-return]


def _check_image_outputs(s3_client: Any, metadata: ImageMetadata, layout: OutputLayout) -> None:
    assert metadata.model.id and metadata.thresholds.score == 0.0
    assert [p.text for p in metadata.prompts] == PROMPTS
    assert sum(p.instance_count for p in metadata.prompts) == len(metadata.annotations)
    for ann in metadata.annotations:
        mask = decode_rle(ann.segmentation)
        assert mask.shape == (metadata.image.height, metadata.image.width)
        assert int(mask.sum()) == ann.area
        assert ann.mask_png is not None
        png = np.array(Image.open(io.BytesIO(_get(s3_client, ann.mask_png))).convert("L")) > 0
        assert np.array_equal(png, mask)
    masked = Image.open(io.BytesIO(_get(s3_client, layout.masked_image_uri("png"))))
    assert masked.mode == "RGBA" and masked.size == (metadata.image.width, metadata.image.height)


@pytest.mark.slow
@pytest.mark.parametrize("output_layout", ["image", "chunk"])
def test_submit_prefix_to_real_worker_writes_every_output_and_counts_exactly(
    settings_factory: Any, tiny_checkpoint: Path, s3_client: Any, s3_bucket: str,
    image_bytes_factory: Any, worker_factory: Any, output_layout: str,
) -> None:
    settings = _settings(settings_factory, tiny_checkpoint)
    good = {"in/a.jpg": "jpeg", "in/sub/b.png": "png_rgba", "in/sub/c d ü.webp": "webp", "in/e.gif": "gif_animated"}
    for key, kind in good.items():
        _upload(s3_client, s3_bucket, key, image_bytes_factory(kind))
    _upload(s3_client, s3_bucket, "in/broken.jpg", image_bytes_factory("truncated"))
    _upload(s3_client, s3_bucket, "in/notes.txt", b"not listed: wrong extension")
    worker = worker_factory(settings)

    args = ["submit", f"s3://{s3_bucket}/in/", "--out", f"s3://{s3_bucket}/out/", "--threshold", "0",
            "--png-masks", "--masked", "--output-format", "png", "--layout", output_layout, "--json"]
    for prompt in PROMPTS:
        args += ["--prompt", prompt]
    submitted = run_cli(args, settings)
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["job_id"]

    store = RedisJobStore(settings.state_redis_url())
    counters = wait_for_job(store, job_id, workers=[worker])
    assert (counters.total, counters.done, counters.failed, counters.skipped) == (5, 4, 1, 0)
    [failure] = store.failures(job_id)
    assert failure.uri.endswith("broken.jpg") and "BadImageError" in failure.reason

    # The chunk layout writes no K.json: its results are read back from the shards by read_results.
    read = {r.out_key: r.metadata for r in read_results(f"s3://{s3_bucket}/out/", settings=settings)}
    assert sorted(read) == sorted(key.removeprefix("in/") for key in good)
    for key in good:
        layout = OutputLayout(f"s3://{s3_bucket}/out/", key.removeprefix("in/"))
        if output_layout == "image":
            metadata = ImageMetadata.model_validate_json(_get(s3_client, layout.metadata_uri))
            assert metadata.annotations == read[key.removeprefix("in/")].annotations
        else:
            assert not _exists(s3_client, layout.metadata_uri)
            metadata = read[key.removeprefix("in/")]
        assert metadata.image.uri == f"s3://{s3_bucket}/{key}"
        _check_image_outputs(s3_client, metadata, layout)
    report = JobReport.model_validate_json(_get(s3_client, report_uri(f"s3://{s3_bucket}/out/", job_id)))
    assert report.state == "complete" and report.counters.done == 4 and len(report.failures) == 1


@pytest.mark.slow
def test_manifest_with_missing_key_and_per_image_prompts_fails_only_that_image(
    settings_factory: Any, tiny_checkpoint: Path, s3_client: Any, s3_bucket: str,
    image_bytes_factory: Any, worker_factory: Any,
) -> None:
    settings = _settings(settings_factory, tiny_checkpoint)
    first = _upload(s3_client, s3_bucket, "imgs/one.jpg", image_bytes_factory("jpeg"))
    second = _upload(s3_client, s3_bucket, "imgs/two.png", image_bytes_factory("gray"))
    lines = [
        json.dumps({"uri": first, "prompts": ["dog"]}),
        json.dumps({"uri": f"s3://{s3_bucket}/imgs/missing.jpg"}),
        "{not json",
        json.dumps({"uri": second}),
    ]
    manifest = _upload(s3_client, s3_bucket, "manifest.jsonl", "\n".join(lines).encode())
    worker = worker_factory(settings)

    submitted = run_cli(["submit", "--manifest", manifest, "--prompt", "cat", "--out",
                         f"s3://{s3_bucket}/out", "--threshold", "0", "--json"], settings)
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["job_id"]
    store = RedisJobStore(settings.state_redis_url())
    counters = wait_for_job(store, job_id, workers=[worker])
    assert (counters.total, counters.done, counters.failed) == (4, 2, 2)
    reasons = {f.uri: f.reason for f in store.failures(job_id)}
    assert "NotFoundError" in reasons[f"s3://{s3_bucket}/imgs/missing.jpg"]
    assert any(uri.endswith("line 3") and "malformed manifest line" in r for uri, r in reasons.items())
    one = OutputLayout(f"s3://{s3_bucket}/out", f"{s3_bucket}/imgs/one.jpg")
    metadata = ImageMetadata.model_validate_json(_get(s3_client, one.metadata_uri))
    assert [p.text for p in metadata.prompts] == ["dog"]  # the manifest's prompts override the job's

    status = run_cli(["status", job_id, "--json"], settings)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["state"] == "complete"


@pytest.mark.slow
def test_a_job_for_another_model_fails_with_a_reason_instead_of_using_the_wrong_model(
    settings_factory: Any, tiny_checkpoint: Path, s3_client: Any, s3_bucket: str,
    image_bytes_factory: Any, worker_factory: Any,
) -> None:
    settings = _settings(settings_factory, tiny_checkpoint)
    _upload(s3_client, s3_bucket, "in/a.jpg", image_bytes_factory("jpeg"))
    worker = worker_factory(settings)
    submitted = run_cli(["submit", f"s3://{s3_bucket}/in/", "--prompt", "x", "--out", f"s3://{s3_bucket}/out/",
                         "--model", "facebook/sam3", "--revision", "abc123", "--json"], settings)
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["job_id"]
    store = RedisJobStore(settings.state_redis_url())
    counters = wait_for_job(store, job_id, workers=[worker])
    assert (counters.done, counters.failed) == (0, 1)
    [failure] = store.failures(job_id)
    assert "asks for facebook/sam3 (revision abc123)" in failure.reason
    listed = s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="out/")
    assert [o["Key"] for o in listed.get("Contents", []) if not o["Key"].startswith("out/_jobs/")] == []
