"""CPUs a worker may use (affinity, container quota) and the stage-worker count derived from them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sam3_batch.contracts import settings as settings_module
from sam3_batch.contracts.cpus import cgroup_cpu_quota, usable_cpus
from sam3_batch.contracts.settings import DEFAULT_MAX_IO_WORKERS, Settings
from sam3_batch.contracts.storage import Storage
from sam3_batch.worker.pipeline import ChunkContext
from sam3_batch.worker.runtime import Sam3Runtime


def _cgroup(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")
    return root


@pytest.mark.parametrize(("files", "quota"), [
    ({"cpu.max": "max 100000"}, None),
    ({"cpu.max": "200000 100000"}, 2.0),
    ({"cpu.max": "150000 100000"}, 1.5),
    ({"cpu.max": "50000"}, 0.5),  # no period written: the kernel's default 100000
    ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
    ({"cpu/cpu.cfs_quota_us": "300000", "cpu/cpu.cfs_period_us": "100000"}, 3.0),
    ({"cpu,cpuacct/cpu.cfs_quota_us": "50000", "cpu,cpuacct/cpu.cfs_period_us": "50000"}, 1.0),
    ({"cpu.max": "garbage here"}, None),
    ({}, None),
])
def test_cgroup_quota_v2_and_v1(tmp_path: Path, files: dict[str, str], quota: float | None) -> None:
    assert cgroup_cpu_quota(_cgroup(tmp_path, files)) == quota


def test_usable_cpus_is_the_affinity_capped_by_the_quota_rounded_up(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    assert usable_cpus(_cgroup(tmp_path / "none", {})) == affinity
    assert usable_cpus(_cgroup(tmp_path / "half", {"cpu.max": "50000 100000"})) == 1  # never 0
    assert usable_cpus(_cgroup(tmp_path / "big", {"cpu.max": f"{(affinity + 8) * 100000} 100000"})) == affinity
    if affinity >= 2:
        assert usable_cpus(_cgroup(tmp_path / "1.5", {"cpu.max": "150000 100000"})) == 2


@pytest.mark.parametrize(("cpus", "expected"), [(1, 1), (2, 2), (3, 3), (16, DEFAULT_MAX_IO_WORKERS)])
def test_default_io_workers_follow_the_usable_cpus(monkeypatch: pytest.MonkeyPatch, cpus: int, expected: int) -> None:
    monkeypatch.setattr(settings_module, "usable_cpus", lambda: cpus)
    assert Settings().io_worker_count() == expected
    assert Settings(io_workers=6).io_worker_count() == 6  # a set value is kept, above the cores too


def test_io_workers_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAM3_BATCH_IO_WORKERS", "5")
    assert Settings().io_worker_count() == 5
    monkeypatch.setenv("SAM3_BATCH_IO_WORKERS", "-1")
    with pytest.raises(ValueError, match="io_workers"):
        Settings()


def test_the_worker_starts_as_many_loaders_and_writers_as_the_default_says(
    monkeypatch: pytest.MonkeyPatch, tiny_runtime: Sam3Runtime
) -> None:
    monkeypatch.setattr(settings_module, "usable_cpus", lambda: 3)
    settings = Settings(device="cpu", io_mode="threads")
    context = ChunkContext.create(tiny_runtime, Storage(settings), settings)
    try:
        assert (context.loaders.workers, context.writers.workers) == (3, 3)
    finally:
        context.close()
