"""A worker that should have a GPU says so when it runs on the CPU, and refuses to start when told to.

These run on this CPU-only machine with the real torch: `device=auto` resolves to the CPU here, and the
signs of a GPU machine (NVIDIA_VISIBLE_DEVICES, /dev/nvidiaN) are given as the NVIDIA runtime gives them.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from sam3_batch.contracts.settings import ENV_PREFIX, Settings
from sam3_batch.worker.device_check import GpuRequiredError, check_device

REPO = Path(__file__).resolve().parents[1]
LOGGER = "sam3_batch.worker.device_check"


def warnings_of_the_check(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == LOGGER]


def fallback_metric() -> float | None:
    return REGISTRY.get_sample_value("sam3_device_fallback_cpu")


def test_auto_falling_back_to_cpu_where_nvidia_visible_devices_is_set_warns_and_sets_the_metric(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path,
) -> None:
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", "all")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        device = check_device(Settings(device="auto"), dev_dir=tmp_path)
    assert device == "cpu"
    (record,) = warnings_of_the_check(caplog)
    assert "fell back to the CPU" in record.getMessage() and "NVIDIA_VISIBLE_DEVICES=all" in record.getMessage()
    assert "SAM3_BATCH_REQUIRE_GPU=true" in record.getMessage()
    assert fallback_metric() == 1


def test_a_nvidia_device_file_alone_is_a_sign_of_a_gpu_machine(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path,
) -> None:
    monkeypatch.delenv("NVIDIA_VISIBLE_DEVICES", raising=False)
    (tmp_path / "nvidia0").touch()
    (tmp_path / "nvidiactl").touch()  # a control node, not a GPU
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        check_device(Settings(device="auto"), dev_dir=tmp_path)
    (record,) = warnings_of_the_check(caplog)
    assert str(tmp_path / "nvidia0") in record.getMessage()
    assert "nvidiactl" not in record.getMessage()
    assert fallback_metric() == 1


@pytest.mark.parametrize(("visible", "device"), [(None, "auto"), ("void", "auto"), ("all", "cpu")],
                         ids=["cpu-machine", "runtime-says-no-gpu", "cpu-chosen"])
def test_no_warning_when_the_cpu_is_expected(
    visible: str | None, device: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    if visible is None:
        monkeypatch.delenv("NVIDIA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", visible)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert check_device(Settings(device=device), dev_dir=tmp_path) == "cpu"
    assert warnings_of_the_check(caplog) == []
    assert fallback_metric() == 0


@pytest.mark.parametrize("device", ["auto", "cuda", "cpu"])
def test_require_gpu_refuses_every_device_that_is_not_a_usable_gpu(
    device: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", "0")
    with pytest.raises(GpuRequiredError) as refused:
        check_device(Settings(device=device, require_gpu=True), dev_dir=tmp_path)
    message = str(refused.value)
    assert message.startswith("SAM3_BATCH_REQUIRE_GPU=true but no GPU is usable")
    assert "NVIDIA_VISIBLE_DEVICES=0" in message and "\n" not in message


def test_worker_with_require_gpu_refuses_to_start_on_the_cpu_in_one_line(flush_redis: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env.update(SAM3_BATCH_BROKER_URL=flush_redis, SAM3_BATCH_MODEL="tiny-random", SAM3_BATCH_REQUIRE_GPU="true",
               NVIDIA_VISIBLE_DEVICES="all", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "sam3_batch", "worker", "--pool", "solo"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: SAM3_BATCH_REQUIRE_GPU=true but no GPU is usable"), done.stderr
    assert "loaded" not in done.stderr  # refused before the model load
