"""The control plane (submit, status, jobs, failures, retry-failed, cancel, index) runs without the GPU stack.

Each command runs in-process in a fresh interpreter (so nothing an earlier import pulled in counts), then
that interpreter reports which of the GPU stack's modules it imported. A command that needs the worker
extra, run where it is missing, says so in one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sam3_batch.contracts.settings import ENV_PREFIX
from sam3_batch.extras import INSTALL_HINT

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples" / "images"
GPU_STACK = ("torch", "transformers", "pycocotools", "PIL")

# Runs the CLI in this interpreter with the given arguments, then writes what it imported to REPORT.
_IN_PROCESS = """
import json, os, sys
blocked = [name for name in os.environ.get("BLOCK_MODULES", "").split(",") if name]
for name in blocked:
    sys.modules[name] = None  # `import name` now raises ImportError, as if it were not installed
sys.argv = ["sam3-batch", *sys.argv[1:]]
code = 0
try:
    from sam3_batch.cli import main
    main()
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
finally:
    loaded = sorted(name for name in os.environ["GPU_STACK"].split(",") if sys.modules.get(name) is not None)
    with open(os.environ["REPORT"], "w") as report:
        json.dump({"exit": code, "loaded": loaded}, report)
"""


def _env(broker_url: str, report: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env.update(SAM3_BATCH_BROKER_URL=broker_url, REPORT=str(report), GPU_STACK=",".join(GPU_STACK),
               PYTHONPATH=str(REPO), **extra)
    return env


def run_in_process(args: list[str], broker_url: str, tmp_path: Path, **extra_env: str) -> dict[str, Any]:
    """Run ``sam3-batch ARGS`` in a fresh interpreter; its exit code, output and imported GPU modules."""
    report = tmp_path / f"report-{args[0]}.json"
    done = subprocess.run(
        [sys.executable, "-c", _IN_PROCESS, *args], env=_env(broker_url, report, **extra_env), cwd=REPO,
        capture_output=True, text=True, timeout=120,
    )
    found: dict[str, Any] = json.loads(report.read_text())
    found.update(stdout=done.stdout, stderr=done.stderr)
    return found


def test_help_and_every_control_plane_command_run_without_importing_the_gpu_stack(
    flush_redis: str, tmp_path: Path,
) -> None:
    out_root = tmp_path / "out"
    submitted = run_in_process(["submit", str(SAMPLES), "--prompt", "a dog", "--out", str(out_root), "--json"],
                               flush_redis, tmp_path)
    assert submitted["exit"] == 0, submitted["stderr"]
    assert submitted["loaded"] == []
    job_id = json.loads(submitted["stdout"])["job_id"]

    for args in (["--help"], ["status", job_id, "--json"], ["jobs", "--json"], ["failures", job_id],
                 ["retry-failed", job_id], ["index", job_id], ["cancel", job_id]):
        result = run_in_process(args, flush_redis, tmp_path)
        assert result["exit"] == 0, (args, result["stderr"])
        assert result["loaded"] == [], f"`sam3-batch {' '.join(args)}` imported {result['loaded']}"

    assert json.loads(run_in_process(["status", job_id, "--json"], flush_redis, tmp_path)["stdout"])["state"] \
        == "cancelled"
    assert list((out_root / "_jobs" / job_id / "index").glob("*.parquet")), "index wrote no file"


@pytest.mark.parametrize(("args", "blocked"), [
    (["run", str(SAMPLES), "--prompt", "a dog", "--model", "tiny-random"], "torch"),
    (["worker"], "transformers,PIL"),
], ids=["run", "worker"])
def test_a_gpu_command_without_the_worker_extra_fails_with_one_readable_line(
    args: list[str], blocked: str, flush_redis: str, tmp_path: Path,
) -> None:
    result = run_in_process([*args, "--out", str(tmp_path / "out")] if args[0] == "run" else args,
                            flush_redis, tmp_path, BLOCK_MODULES=blocked)
    assert result["exit"] == 1
    assert "Traceback" not in result["stderr"]
    last_line = result["stderr"].strip().splitlines()[-1]
    assert last_line.endswith(INSTALL_HINT), result["stderr"]
    for name in blocked.replace("PIL", "pillow").split(","):
        assert name in last_line
    assert not (tmp_path / "out").exists()
