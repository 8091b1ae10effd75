"""Bad input end to end: one manifest job full of broken entries, through a real worker process.

Every bad entry must end failed with a reason a user can act on, in Redis and in the job report, and
every good entry in the same chunks must still be segmented. (worker/decode.py's own unit tests are in
tests/test_decode.py; this proves the whole path: manifest -> producer -> queue -> worker -> report.)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sam3_batch.contracts.jobstate import RedisJobStore
from sam3_batch.contracts.keys import OutputLayout
from sam3_batch.contracts.report import report_uri
from sam3_batch.contracts.schemas import ImageMetadata, JobReport
from sam3_batch.contracts.settings import Settings
from tests.fixtures.images import SIZE
from tests.fixtures.workers import run_cli, wait_for_job, wait_until

pytestmark = pytest.mark.slow

MAX_PIXELS = 50_000_000  # below the 80 M pixels of the "huge_dims" image
WIDTH, HEIGHT = SIZE

# name -> (image kind, (width, height) it must be segmented at). These must all end done.
GOOD = {
    "plain.jpg": ("jpeg", (WIDTH, HEIGHT)),
    "sixteen-bit.png": ("png16", (WIDTH, HEIGHT)),
    "cmyk.jpg": ("cmyk_jpeg", (WIDTH, HEIGHT)),
    "animated.gif": ("gif_animated", (WIDTH, HEIGHT)),  # its first frame
    "unreadable-exif.png": ("bad_exif", (WIDTH, HEIGHT)),
    "broken-exif-tags.jpg": ("bad_exif_tags", (HEIGHT, WIDTH)),  # orientation 6 still applied
    "rotated.jpeg": ("exif_rotated", (HEIGHT, WIDTH)),
    "a b ü 猫.jpg": ("jpeg", (WIDTH, HEIGHT)),  # spaces and unicode in the key
    "with-prompts.png": ("png", (WIDTH, HEIGHT)),  # its manifest line gives its own prompts
}
PROMPTED = "with-prompts.png"
# name -> (image kind, what the failure reason must say). These must all end failed.
BAD_IMAGES = {
    "truncated.jpg": ("truncated", "BadImageError: corrupt or truncated"),
    "letter.jpg": ("not_an_image", "BadImageError: not a recognised image format"),
    "bomb.gif": ("bomb", "decompression bomb"),
    "huge.png": ("huge_dims", "BadImageError: image too large: 10000x8000"),
    "empty.jpg": ("zero_bytes", "BadImageError: empty file (0 bytes)"),
}


def _manifest_lines(bucket: str) -> list[tuple[str, str | None]]:
    """(line, reason it must fail with or None) in manifest order; a blank line is ignored but counted."""
    uri = f"s3://{bucket}/in"
    good = [(json.dumps({"uri": f"{uri}/{name}"}, ensure_ascii=False), None) for name in GOOD if name != PROMPTED]
    bad = [(json.dumps({"uri": f"{uri}/{name}"}), reason) for name, (_, reason) in BAD_IMAGES.items()]
    return [
        *good[:4],
        ("{not json", "malformed manifest line"),
        *bad[:3],
        (json.dumps({"uri": f"{uri}/{PROMPTED}", "prompts": ["dog", "a red mark"]}), None),
        ("", None),
        (json.dumps({"uri": f"{uri}/plain.jpg", "prompts": [""]}), "invalid item: prompts.0"),
        (json.dumps({"uri": f"{uri}/plain.jpg", "prompts": ["x" * 300]}), "at most 256 characters"),
        (json.dumps({"uri": f"{uri}/plain.jpg", "prompts": ["   "]}), "must not be empty or whitespace only"),
        (json.dumps({"uri": "ftp://example.com/cat.jpg"}), "unsupported URI scheme 'ftp'"),
        (json.dumps({"uri": "gs://bucket/cat.jpg"}), "unsupported URI scheme 'gs'"),
        (json.dumps([1, 2]), "expected an object with a 'uri' field"),
        (json.dumps({"url": f"{uri}/plain.jpg"}), "missing or empty 'uri'"),
        (json.dumps({"uri": 7}), "missing or empty 'uri'"),
        *good[4:],
        *bad[3:],
        (json.dumps({"uri": f"{uri}/never-uploaded.jpg"}), "NotFoundError"),
    ]


def _keys(s3_client: Any, bucket: str, prefix: str) -> list[str]:
    pages = s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [entry["Key"] for page in pages for entry in page.get("Contents", [])]


def _get(s3_client: Any, bucket: str, key: str) -> bytes:
    return bytes(s3_client.get_object(Bucket=bucket, Key=key)["Body"].read())


def test_one_job_of_broken_entries_fails_each_with_its_reason_and_segments_every_good_image(
    settings_factory: Callable[..., Settings], tiny_checkpoint: Path, s3_client: Any, s3_bucket: str,
    image_bytes_factory: Callable[[str], bytes], worker_factory: Any,
) -> None:
    settings = settings_factory(model=str(tiny_checkpoint), device="cpu", chunk_size=4, batch_size=2,
                                max_image_pixels=MAX_PIXELS)
    for name, (kind, _) in {**GOOD, **BAD_IMAGES}.items():
        s3_client.put_object(Bucket=s3_bucket, Key=f"in/{name}", Body=image_bytes_factory(kind))
    lines = _manifest_lines(s3_bucket)
    manifest = f"s3://{s3_bucket}/manifest.jsonl"
    s3_client.put_object(Bucket=s3_bucket, Key="manifest.jsonl",
                         Body="\n".join(line for line, _ in lines).encode("utf-8"))
    worker = worker_factory(settings)

    submitted = run_cli(["submit", "--manifest", manifest, "-p", "cat", "--out", f"s3://{s3_bucket}/out",
                         "--threshold", "0", "--json"], settings)
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["job_id"]
    store = RedisJobStore(settings.state_redis_url())
    counters = wait_for_job(store, job_id, workers=[worker])

    entries = [(number, line, reason) for number, (line, reason) in enumerate(lines, start=1) if line]
    expected_failed = [(n, line, r) for n, line, r in entries if r is not None]
    assert (counters.total, counters.failed, counters.skipped) == (len(entries), len(expected_failed), 0)
    assert counters.done == len(entries) - len(expected_failed)
    wait_until(lambda: report_uri("out", job_id) in _keys(s3_client, s3_bucket, "out/_jobs/"), 60,
               "the job report")  # written just after the last chunk is counted
    report = JobReport.model_validate_json(_get(s3_client, s3_bucket, report_uri("out", job_id)))
    assert report.state == "complete" and report.counters == counters
    assert sorted(report.failures, key=lambda f: f.uri) == sorted(store.failures(job_id), key=lambda f: f.uri)
    _assert_each_failure_has_its_reason(report, expected_failed, manifest)
    _assert_good_images_segmented(s3_client, s3_bucket)


def _assert_each_failure_has_its_reason(report: JobReport, expected: list[tuple[int, str, str]],
                                        manifest: str) -> None:
    unmatched = list(report.failures)
    for number, line, reason in expected:
        parsed = _json_or_none(line)
        uri = parsed.get("uri") if isinstance(parsed, dict) else None
        where = {f"{manifest} line {number}"} | ({uri} if isinstance(uri, str) else set())
        match = next((f for f in unmatched if f.uri in where and reason in f.reason), None)
        assert match is not None, f"line {number} ({line!r}): no failure saying {reason!r} in {unmatched}"
        assert "Traceback" not in match.reason and len(match.reason) < 500
        unmatched.remove(match)
    assert unmatched == []


def _json_or_none(line: str) -> Any:
    try:
        return json.loads(line)
    except ValueError:
        return None


def _assert_good_images_segmented(s3_client: Any, bucket: str) -> None:
    for name, (_, (width, height)) in GOOD.items():
        layout = OutputLayout(f"s3://{bucket}/out", f"{bucket}/in/{name}")
        key = layout.metadata_uri.removeprefix(f"s3://{bucket}/")
        metadata = ImageMetadata.model_validate_json(_get(s3_client, bucket, key))
        assert (metadata.image.width, metadata.image.height) == (width, height), name
        assert metadata.image.uri == f"s3://{bucket}/in/{name}"
        assert metadata.annotations, name
        prompts = ["dog", "a red mark"] if name == PROMPTED else ["cat"]
        assert [p.text for p in metadata.prompts] == prompts, name
