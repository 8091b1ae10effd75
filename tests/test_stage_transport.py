"""The stage pool boundary: a pool runs any step with what its setup made, and big numpy arrays cross
to and from its processes in shared memory (a file descriptor in the pipe, not the array's bytes)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler

import numpy as np
import numpy.typing as npt
import pytest

from sam3_batch.worker import shared_arrays
from sam3_batch.worker.stage_pools import StagePool

BIG_SHAPE = (4, 512, 512)  # 1 MiB of bool masks


@dataclass(frozen=True)
class OffsetSetup:
    """A stand-in for a step's resources: a number each stage process (or the threads) gets once."""

    offset: int

    def __call__(self, own_process: bool) -> int:
        return self.offset


def flip_and_offset(offset: int, masks: npt.NDArray[np.bool_]) -> tuple[npt.NDArray[np.bool_], int]:
    """A step: masks back inverted (as big an array as it received), with the setup's number."""
    return ~masks, offset


def _masks() -> npt.NDArray[np.bool_]:
    return np.random.default_rng(7).random(BIG_SHAPE) > 0.5


@pytest.fixture(params=["processes", "threads"])
def pool(request: pytest.FixtureRequest) -> Iterator[StagePool[int]]:
    stage = StagePool("test", OffsetSetup(41), mode=request.param, workers=1)
    yield stage
    stage.close()


def test_a_pool_runs_a_step_with_its_setups_resources_and_big_arrays_survive_the_trip(pool: StagePool[int]) -> None:
    masks = _masks()

    flipped, offset = pool.start(flip_and_offset, masks).result(timeout=120)

    assert offset == 41
    assert flipped.dtype == np.bool_ and flipped.shape == BIG_SHAPE
    assert np.array_equal(flipped, ~masks)
    assert (len(pool.worker_pids()) == 1) == (pool.mode == "processes")


def test_big_arrays_are_pickled_as_a_shared_memory_handle_small_and_read_only_ones_as_bytes() -> None:
    shared_arrays.install()
    big, small = _masks(), np.ones(100, dtype=np.float32)
    frozen = _masks()
    frozen.flags.writeable = False

    assert len(ForkingPickler.dumps(big)) < 2048 < big.nbytes
    assert len(ForkingPickler.dumps(small)) > small.nbytes
    assert len(ForkingPickler.dumps(frozen)) > frozen.nbytes
