"""The host-budget bench: its stand-in accelerator is shaped like SAM 3, and its quick run measures the real
chunk path (stage processes, SeaweedFS, Redis) and prints every figure."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.stand_in import MASK_SIDE, StandInSam3, blob_bank, stand_in_runtime
from sam3_batch.contracts.schemas import Thresholds
from sam3_batch.worker.model_input import PreparedImage

ROOT = Path(__file__).resolve().parents[1]


def test_blobs_are_single_plausible_shapes_inside_their_boxes() -> None:
    logits, boxes = blob_bank(12, seed=3)

    assert logits.shape == (12, MASK_SIDE, MASK_SIDE) and boxes.shape == (12, 4)
    for mask, (x0, y0, x1, y1) in zip((logits > 0).numpy(), boxes.numpy(), strict=True):
        share = mask.mean()
        assert 0.003 < share < 0.25  # an object, neither a speck nor the whole frame
        ys, xs = np.nonzero(mask)
        assert xs.min() / MASK_SIDE == pytest.approx(x0) and (xs.max() + 1) / MASK_SIDE == pytest.approx(x1)
        assert ys.min() / MASK_SIDE == pytest.approx(y0) and (ys.max() + 1) / MASK_SIDE == pytest.approx(y1)


def test_the_stand_in_through_the_real_runtime_keeps_its_instances_at_full_size() -> None:
    runtime = stand_in_runtime(ms_per_image=1.0, instances=3, queries=7)
    pixels = PreparedImage(torch.zeros(3, 1008, 1008, dtype=torch.uint8), (750, 1000))

    found = runtime.segment([pixels, pixels], [["a", "b"], ["c"]], Thresholds(score=0.5, mask=0.5))

    assert [len(per_image) for per_image in found] == [2, 1]
    for detections in (d for per_image in found for d in per_image):
        assert len(detections) == 3
        assert detections.masks.shape == (3, 750, 1000)
        assert 0.003 < detections.masks.mean() < 0.25
        assert (detections.scores > 0.9).all()
    model = runtime.model
    assert isinstance(model, StandInSam3)
    assert (model.counters.images, model.counters.rows) == (2, 3)
    assert model.counters.held_s == pytest.approx(0.002)


def test_quick_run_prints_host_cpu_by_stage_and_the_bytes_each_hand_off_moves() -> None:
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "bench.host_budget", "--quick", "--images", "4"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = done.stdout

    def row(name: str) -> list[str]:
        found = re.search(rf"^\| {re.escape(name)} \| (.*) \|$", table, re.MULTILINE)
        assert found, table
        return [cell.strip() for cell in found.group(1).split("|")]

    assert len(row("**host CPU ms/image** (loaders + writers + worker host part + forkserver)")) == 2
    for step in ("- download (step's own CPU)", "- decode (step's own CPU)", "- preprocess (step's own CPU)",
                 "- encode + upload (step's own CPU)", "S3 server (apart)"):
        assert all(float(cell) > 0 for cell in row(step)), step
    assert row("instances per image") == ["20.0", "20.0"]  # 4 prompts x 5 kept instances
    # 8-bit pixels at 1008x1008 against the processor's float32 output: 4x fewer bytes.
    assert row("host->device bytes/image") == ["3.05 MB", "12.19 MB"]
