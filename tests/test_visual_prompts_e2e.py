"""Visual prompts from a manifest, end to end: ``sam3-batch run`` and ``submit`` to a real worker.

The written masks and scores equal plain transformers calls; bad geometry fails only its image, with a reason.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sam3_batch.contracts.jobstate import RedisJobStore
from sam3_batch.contracts.keys import OutputLayout, key_from_uri
from sam3_batch.contracts.report import report_uri
from sam3_batch.contracts.schemas import ConceptPrompt, ImageMetadata, JobReport, ObjectPrompt, Thresholds
from sam3_batch.worker.detections import PromptDetections
from sam3_batch.worker.encode import decode_rle
from tests.fixtures.model import scene_image
from tests.fixtures.visual import VisualOracle, assert_matches_oracle
from tests.fixtures.workers import REPO_ROOT, run_cli, wait_for_job, wait_until

SIZE_HW = (300, 400)
THRESHOLDS = Thresholds(score=0.0, mask=0.5)


def _good_line(uri: str) -> dict[str, Any]:
    """Every kind at once: text, text + boxes, boxes alone, a negative box; points, a box, points + box."""
    return {
        "uri": uri,
        "prompts": [
            "cat",
            {"text": "a red disc", "boxes": [[60, 90, 220, 255]]},
            {"boxes": [[60, 90, 220, 255], [240, 30, 368, 135]]},
            {"text": "shape", "boxes": [[60, 90, 220, 255], [240, 30, 368, 135]], "box_labels": [1, 0]},
        ],
        "objects": [
            {"points": [[140, 180], [320, 90]], "point_labels": [1, 0]},
            {"box": [240, 30, 368, 135]},
            {"points": [[120, 150]], "box": [-20, 75, 240, 270]},  # clipped to the image
        ],
    }


BAD_LINES: dict[str, tuple[dict[str, Any], str]] = {  # name -> (manifest line without uri, the failure's reason)
    "point_outside": ({"objects": [{"points": [[500, 10]]}]}, "object 0 point 0 [500.0, 10.0] lies outside"),
    "box_outside": ({"prompts": [{"boxes": [[410, 0, 480, 50]]}]}, "prompt 0 box 0 [410.0, 0.0, 480.0, 50.0] lies"),
    "box_inverted": ({"prompts": [{"text": "x", "boxes": [[50, 50, 10, 80]]}]}, "x0 < x1 and y0 < y1"),
    "labels_mismatch": ({"objects": [{"points": [[5, 5]], "point_labels": [1, 0]}]}, "point_labels has 2 entries"),
}


def _expected(oracle: VisualOracle, image: Image.Image, line: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    prompts = [p if isinstance(p, str) else ConceptPrompt.model_validate(p) for p in line["prompts"]]
    objects = [ObjectPrompt.model_validate(o) for o in line["objects"]]
    objects[2] = objects[2].model_copy(update={"box": (0.0, 75.0, 240.0, 270.0)})  # as the worker clips it
    return ([oracle.concept(image, p, j, THRESHOLDS) for j, p in enumerate(prompts)],
            [oracle.object(image, o, k) for k, o in enumerate(objects)])


def _written(metadata: ImageMetadata) -> tuple[list[PromptDetections], list[PromptDetections]]:
    """The metadata's annotations regrouped per prompt and per object, masks decoded."""
    def group(annotations: list[Any], name: str, presence: float | None) -> PromptDetections:
        masks = [decode_rle(a.segmentation) for a in annotations]
        shape = (metadata.image.height, metadata.image.width)
        return PromptDetections(
            prompt=name, presence_score=presence, scores=np.array([a.score for a in annotations], dtype=np.float32),
            boxes_xyxy=np.array([a.pred_box_xyxy for a in annotations], dtype=np.float32).reshape(-1, 4),
            masks=np.stack(masks) if masks else np.zeros((0, *shape), dtype=bool),
        )
    concepts = [group([a for a in metadata.annotations if a.prompt_index == j], p.text, p.presence_score)
                for j, p in enumerate(metadata.prompts)]
    objects = [group([a for a in metadata.annotations if a.object_index == o.object_index],
                     f"object:{o.object_index}", None) for o in metadata.objects]
    return concepts, objects


def _check_against_oracle(metadata: ImageMetadata, oracle: VisualOracle, image: Image.Image, uri: str) -> None:
    line = _good_line(uri)
    expected_concepts, expected_objects = _expected(oracle, image, line)
    concepts, objects = _written(metadata)
    assert [p.text for p in metadata.prompts] == ["cat", "a red disc", "exemplar:2", "shape"]
    assert metadata.prompts[3].boxes == [(60, 90, 220, 255), (240, 30, 368, 135)]
    assert metadata.prompts[3].box_labels == [1, 0]
    assert [(o.points, o.box) for o in metadata.objects] == [
        ([(140, 180), (320, 90)], None), (None, (240, 30, 368, 135)), ([(120, 150)], (0, 75, 240, 270))
    ]
    assert sum(len(c) for c in expected_concepts) > 0, "no instances: the comparison would prove nothing"
    for j, (actual, expected) in enumerate(zip(concepts, expected_concepts, strict=True)):
        assert_matches_oracle(actual, expected, f"prompt {j}")
    for k, (actual, expected) in enumerate(zip(objects, expected_objects, strict=True)):
        assert_matches_oracle(actual, expected, f"object {k}")
        assert metadata.objects[k].score == pytest.approx(float(expected.scores[0]), abs=1e-3)


def _check_report_prompt_counts(report: JobReport, metadata: ImageMetadata) -> None:
    """The report counts the good line's prompts by kind, and its instances by kind and by prompt name."""
    counts = report.prompt_counts
    assert counts is not None
    # "cat"; three prompts with boxes (1 + 2 + 2 of them, one negative); three objects. Failed images add none.
    assert (counts.text_prompts, counts.exemplar_prompts, counts.exemplar_boxes, counts.negative_boxes,
            counts.objects) == (1, 3, 5, 1, 3)
    by_prompt: dict[str, int] = {}
    for annotation in metadata.annotations:
        by_prompt[annotation.prompt] = by_prompt.get(annotation.prompt, 0) + 1
    assert counts.instances_by_prompt == by_prompt
    kinds = {"text": by_prompt.get("cat", 0), "object": 3,
             "exemplar": sum(by_prompt.get(name, 0) for name in ["a red disc", "exemplar:2", "shape"])}
    assert counts.instances_by_kind == {kind: n for kind, n in kinds.items() if n}
    assert sum(counts.instances_by_kind.values()) == report.instances == len(metadata.annotations)


def test_run_with_a_visual_manifest_writes_what_transformers_gives_and_fails_bad_geometry_alone(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    image = scene_image(SIZE_HW, 1)
    uris = {name: str(tmp_path / f"{name}.png") for name in ["good", *BAD_LINES]}
    for uri in uris.values():
        image.save(uri)
    lines = [_good_line(uris["good"])] + [{"uri": uris[name], **line} for name, (line, _) in BAD_LINES.items()]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    out = tmp_path / "out"

    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "sam3_batch", "run", "--manifest", str(manifest), "--out", str(out),
         "--model", str(tiny_checkpoint), "--threshold", "0"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )

    assert result.returncode == 2, result.stderr  # failed images make the exit code non-zero
    [report_path] = (out / "_jobs").glob("*/report.json")
    report = JobReport.model_validate_json(report_path.read_text())
    assert (report.counters.done, report.counters.failed) == (1, len(BAD_LINES))
    reasons = {Path(f.uri).stem: f.reason for f in report.failures}
    for name, (_, reason) in BAD_LINES.items():
        assert reason in reasons[name], reasons[name]
        assert reason.split(" [")[0] in result.stderr
    layout = OutputLayout(str(out), key_from_uri(uris["good"]))
    metadata = ImageMetadata.model_validate_json(Path(layout.metadata_uri).read_text())
    oracle = VisualOracle(tiny_checkpoint)
    _check_against_oracle(metadata, oracle, Image.open(uris["good"]).convert("RGB"), uris["good"])
    _check_report_prompt_counts(report, metadata)

    [part] = (out / "_jobs").glob("*/parts/*.parquet")
    [row] = [r for r in pq.read_table(part).to_pylist() if r["uri"] == metadata.image.uri]
    assert [p["text"] for p in row["prompts"]] == ["cat", "a red disc", "exemplar:2", "shape"]
    assert [(i["prompt_index"], i["object_index"]) for i in row["instances"]] == [
        (a.prompt_index, a.object_index) for a in metadata.annotations
    ]
    assert [o["object_index"] for o in row["objects"]] == [0, 1, 2]
    assert (row["objects"][2]["points"], row["objects"][2]["point_labels"], row["objects"][2]["box"]) == (
        [[120, 150]], [1], [0, 75, 240, 270]
    )


@pytest.mark.slow
def test_submit_a_visual_manifest_to_a_real_worker_writes_what_transformers_gives(
    settings_factory: Any, tiny_checkpoint: Path, s3_client: Any, s3_bucket: str, worker_factory: Any,
) -> None:
    settings = settings_factory(model=str(tiny_checkpoint), device="cpu", chunk_size=3, batch_size=2)
    buffer = io.BytesIO()
    image = scene_image(SIZE_HW, 1)
    image.save(buffer, format="PNG")
    for name in ("good.png", "bad.png"):
        s3_client.put_object(Bucket=s3_bucket, Key=f"in/{name}", Body=buffer.getvalue())
    good, bad = f"s3://{s3_bucket}/in/good.png", f"s3://{s3_bucket}/in/bad.png"
    lines = [_good_line(good), {"uri": bad, **BAD_LINES["point_outside"][0]}]
    body = "\n".join(json.dumps(line) for line in lines).encode()
    s3_client.put_object(Bucket=s3_bucket, Key="manifest.jsonl", Body=body)
    worker = worker_factory(settings)

    submitted = run_cli(["submit", "--manifest", f"s3://{s3_bucket}/manifest.jsonl", "--out",
                         f"s3://{s3_bucket}/out", "--threshold", "0", "--json"], settings)
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["job_id"]
    store = RedisJobStore(settings.state_redis_url())
    counters = wait_for_job(store, job_id, workers=[worker])
    assert (counters.total, counters.done, counters.failed) == (2, 1, 1)
    [failure] = store.failures(job_id)
    assert failure.uri == bad and BAD_LINES["point_outside"][1] in failure.reason

    layout = OutputLayout(f"s3://{s3_bucket}/out", key_from_uri(good))
    key = layout.metadata_uri.removeprefix(f"s3://{s3_bucket}/")
    metadata = ImageMetadata.model_validate_json(s3_client.get_object(Bucket=s3_bucket, Key=key)["Body"].read())
    _check_against_oracle(metadata, VisualOracle(tiny_checkpoint), image, good)
    report_key = report_uri(f"s3://{s3_bucket}/out", job_id).removeprefix(f"s3://{s3_bucket}/")

    def report() -> JobReport | None:  # the worker of the last chunk writes it just after counting it
        try:
            body = s3_client.get_object(Bucket=s3_bucket, Key=report_key)["Body"].read()
        except s3_client.exceptions.NoSuchKey:
            return None
        return JobReport.model_validate_json(body)

    _check_report_prompt_counts(wait_until(report, 60, "the job report"), metadata)


def test_run_with_box_applies_one_exemplar_prompt_to_the_image_as_transformers_does(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    image_path = tmp_path / "in" / "scene.png"
    image_path.parent.mkdir()
    scene_image(SIZE_HW, 1).save(image_path)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO_ROOT)}

    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sam3_batch", "run", str(image_path.parent), "--out", str(tmp_path / "out"),
             "--model", str(tiny_checkpoint), "--threshold", "0", *extra],
            capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
        )

    result = run("-p", "shape", "--box", "60,90,220,255", "--box", "240,30,368,135", "--box-label", "1",
                 "--box-label", "0")

    assert result.returncode == 0, result.stderr
    layout = OutputLayout(str(tmp_path / "out"), "scene.png")  # a folder's keys are relative to it
    metadata = ImageMetadata.model_validate_json(Path(layout.metadata_uri).read_text())
    prompt = ConceptPrompt(text="shape", boxes=[(60, 90, 220, 255), (240, 30, 368, 135)], box_labels=[1, 0])
    assert [(p.text, p.boxes, p.box_labels) for p in metadata.prompts] == [
        ("shape", [(60, 90, 220, 255), (240, 30, 368, 135)], [1, 0])]
    [written], _ = _written(metadata)
    expected = VisualOracle(tiny_checkpoint).concept(Image.open(image_path).convert("RGB"), prompt, 0, THRESHOLDS)
    assert len(expected) > 0, "no instances: the comparison would prove nothing"
    assert_matches_oracle(written, expected, "run --box")

    inverted = run("--box", "220,90,60,255")
    assert inverted.returncode == 2 and "Traceback" not in inverted.stderr
    assert "--box: a box is (x0, y0, x1, y1) with x0 < x1 and y0 < y1" in inverted.stderr
    too_many = run("-p", "cat", "-p", "dog", "--box", "60,90,220,255")
    assert too_many.returncode == 2 and "--box goes with at most one --prompt" in too_many.stderr
