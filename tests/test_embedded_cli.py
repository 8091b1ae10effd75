"""Embedded mode through the real CLI: a folder in, a folder of masks + metadata + report out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sam3_batch.contracts.keys import OutputLayout
from sam3_batch.contracts.report import report_uri
from sam3_batch.contracts.schemas import ImageMetadata, JobReport
from sam3_batch.worker.encode import decode_rle
from tests.fixtures.images import GOOD_IMAGES_DIR_FILES
from tests.fixtures.workers import REPO_ROOT


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "sam3_batch", *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path)


def _report(out: Path) -> JobReport:
    [path] = (out / "_jobs").glob("*/report.json")
    return JobReport.model_validate_json(path.read_text())


def test_run_segments_a_nested_folder_and_reports_the_bad_file_by_name(
    good_images_dir: Path, image_bytes_factory: Any, tmp_path: Path,
) -> None:
    (good_images_dir / "broken.jpg").write_bytes(image_bytes_factory("not_an_image"))
    (good_images_dir / "readme.txt").write_text("not an image extension: never listed")
    out = tmp_path / "masks"
    result = _run(["run", str(good_images_dir), "--prompt", "a red mark", "--prompt", "blue", "--out", str(out),
                   "--model", "tiny-random", "--threshold", "0", "--png-masks", "--masked",
                   "--output-format", "jpg"], tmp_path)

    assert result.returncode == 2, result.stderr  # a failed image makes the exit code non-zero
    assert "masks are meaningless" in result.stderr
    assert "broken.jpg" in result.stderr and "not a recognised image format" in result.stderr
    for relative_name in GOOD_IMAGES_DIR_FILES:
        layout = OutputLayout(str(out), relative_name)
        metadata = ImageMetadata.model_validate_json(Path(layout.metadata_uri).read_text())
        assert [p.text for p in metadata.prompts] == ["a red mark", "blue"]
        assert metadata.annotations, "threshold 0 keeps every query, so there are instances"
        for ann in metadata.annotations:
            mask = decode_rle(ann.segmentation)
            assert mask.shape == (metadata.image.height, metadata.image.width)
            png = np.array(Image.open(str(ann.mask_png))) > 0
            assert np.array_equal(png, mask)
        masked = Image.open(layout.masked_image_uri("jpg"))
        assert masked.format == "JPEG" and masked.size == (metadata.image.width, metadata.image.height)
    report = _report(out)
    total = len(GOOD_IMAGES_DIR_FILES) + 1
    assert (report.counters.total, report.counters.done, report.counters.failed) == (total, total - 1, 1)
    assert report.failures[0].uri.endswith("broken.jpg")
    assert Path(report_uri(str(out), report.job_id)).exists()


def test_rerun_with_skip_existing_skips_every_done_image(good_images_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "masks"
    args = ["run", str(good_images_dir), "--prompt", "thing", "--out", str(out), "--model", "tiny-random"]
    first = _run(args, tmp_path)
    assert first.returncode == 0, first.stderr
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.json") if "_jobs" not in p.parts}

    second = _run([*args, "--skip-existing"], tmp_path)
    assert second.returncode == 0, second.stderr
    reports = sorted((out / "_jobs").glob("*/report.json"), key=lambda p: p.stat().st_mtime_ns)
    counters = json.loads(reports[-1].read_text())["counters"]
    assert counters["skipped"] == len(GOOD_IMAGES_DIR_FILES) and counters["done"] == 0
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing was rewritten
