"""The first GPU session's script runs here in its smoke mode, so it cannot rot before a GPU is lent."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_session_smoke_mode_writes_its_tables_with_instances_on_every_image(tmp_path: Path) -> None:
    env = os.environ | {"OUT": str(tmp_path), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([str(ROOT / "bench" / "gpu_session.sh"), "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)

    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    bench = (tmp_path / "gpu_bench.md").read_text()
    for dtype in ("float32", "autocast-bf16"):
        assert re.search(rf"^\| {dtype} \| 2 \| \d+\.\d\d \|", bench, re.MULTILINE), bench
    instances = re.search(r"score threshold 0\.0: (\d+\.\d) instances per image", bench)
    assert instances and float(instances.group(1)) > 0, bench
    assert "process_chunk, two chunks at once" in bench
    assert re.search(r"^\| autocast-bf16 \| \d\.\d\de-\d\d \|", bench, re.MULTILINE), bench  # against float32
    assert "torch.compile toolchain" in (tmp_path / "environment.txt").read_text()
    budget = (tmp_path / "host_budget.md").read_text()  # the host budget around the real (smoke) model
    assert re.search(r"^\| \*\*host CPU ms/image\*\* .* \| \*\*\d+\.\d\*\* \|", budget, re.MULTILINE), budget
    assert "normalized, full decode" in budget  # the old input path measured beside the new one


def test_the_wheel_list_pins_what_the_gpu_machine_lacks() -> None:
    pins = dict(line.split("==") for line in (ROOT / "bench" / "gpu_wheels.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    assert {"transformers", "pydantic", "pydantic-settings", "celery", "redis", "pycocotools"} <= set(pins)
    major, minor = (int(part) for part in pins["transformers"].split(".")[:2])
    assert (major, minor) >= (5, 23)  # the project's minimum; the GPU machine has 5.17
    assert "/.whl/" in (ROOT / ".gitignore").read_text().splitlines()
