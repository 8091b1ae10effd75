"""Pixel slots: loader processes hand 8-bit pixels to the worker in shared-memory slots made once, and a slot is
free again only when the last tensor viewing it in the worker is gone."""

from __future__ import annotations

import gc
import io
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import pytest
import torch
from PIL import Image

from sam3_batch.contracts.schemas import WorkItem
from sam3_batch.contracts.settings import Settings
from sam3_batch.worker import shared_arrays
from sam3_batch.worker.io_stages import LoadedImage, Loader, LoaderSetup, load_image, pixel_slots_for
from sam3_batch.worker.model_input import PreparedImage
from sam3_batch.worker.pixel_slots import PixelSlots
from sam3_batch.worker.runtime import ImagePreparer, Sam3Runtime, resized_uint8
from sam3_batch.worker.stage_pools import StagePool
from tests.fixtures.model import scene_image

SLOTS = 3


@dataclass(frozen=True)
class SlotsSetup:
    """A stand-in setup that only hands the slots to the stage process (as ``LoaderSetup`` does)."""

    slots: PixelSlots

    def __call__(self, own_process: bool) -> PixelSlots:
        return self.slots


def held(slots: PixelSlots, seed: int) -> torch.Tensor:
    """A step: channel-plane pixels laid out height x width x channel (as the resize leaves them), put in a slot."""
    pixels = torch.randint(0, 256, (40, 30, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return slots.hold(pixels.permute(2, 0, 1))


def expected(seed: int) -> torch.Tensor:
    pixels = torch.randint(0, 256, (40, 30, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return pixels.permute(2, 0, 1)


@pytest.fixture
def slots_pool() -> Iterator[tuple[PixelSlots, StagePool[PixelSlots]]]:
    slots = PixelSlots.create(SLOTS, 3 * 40 * 30)
    pool = StagePool("test", SlotsSetup(slots), mode="processes", workers=2)
    yield slots, pool
    pool.close()


def test_pixels_cross_in_slots_intact_and_each_slot_is_lent_until_its_last_view_is_gone(
    slots_pool: tuple[PixelSlots, StagePool[PixelSlots]],
) -> None:
    slots, pool = slots_pool

    first = [pool.start(held, seed).result(timeout=120) for seed in range(SLOTS)]

    assert [slots.slot_of(pixels) for pixels in first] == [0, 1, 2]  # they arrived in the slots, not copied
    assert slots.free == 0
    assert all(torch.equal(pixels, expected(seed)) and pixels.stride() == expected(seed).stride()
               for seed, pixels in enumerate(first))
    view = first[1].permute(1, 2, 0)  # a view keeps its slot lent after its tensor is gone
    del first
    gc.collect()
    assert slots.free == 2

    more = [pool.start(held, seed).result(timeout=120) for seed in range(10, 12)]

    assert sorted(slots.slot_of(pixels) for pixels in more) == [0, 2]
    assert torch.equal(view, expected(1).permute(1, 2, 0))  # not overwritten by the images that came after
    del view
    gc.collect()
    assert slots.free == 1


def test_when_every_slot_is_lent_pixels_cross_the_usual_way(
    slots_pool: tuple[PixelSlots, StagePool[PixelSlots]],
) -> None:
    slots, pool = slots_pool

    results = [pool.start(held, seed).result(timeout=120) for seed in range(SLOTS + 2)]

    assert [slots.slot_of(pixels) for pixels in results] == [0, 1, 2, None, None]
    assert all(torch.equal(pixels, expected(seed)) for seed, pixels in enumerate(results))
    del results
    gc.collect()
    assert slots.free == SLOTS


def test_a_tensor_in_a_slot_pickles_as_the_slots_number_only_outside_the_worker_that_lends_it() -> None:
    shared_arrays.install()
    slots = PixelSlots.create(1, 3 * 40 * 30)
    pixels = slots.hold(expected(0))
    assert slots.slot_of(pixels) == 0

    # In the worker (the slots' owner) it crosses as any shared tensor would: a writer process has no slots.
    assert b"_lent" not in bytes(ForkingPickler.dumps(pixels))
    slots.owner_pid = -1  # as a loader process sees it
    assert b"_lent" in bytes(ForkingPickler.dumps(pixels))


def test_pixels_that_do_not_fit_or_are_not_8_bit_are_left_as_they_are() -> None:
    slots = PixelSlots.create(1, 3 * 40 * 30)
    too_big = torch.zeros((3, 41, 30), dtype=torch.uint8)
    floats = torch.zeros((3, 10, 10), dtype=torch.float32)

    assert slots.hold(too_big) is too_big
    assert slots.hold(floats) is floats
    assert slots.free == 1


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def test_a_loader_process_hands_the_model_the_same_pixels_through_a_slot(
    tiny_runtime: Sam3Runtime, tmp_path: Path
) -> None:
    path = tmp_path / "scene.jpg"
    path.write_bytes(_jpeg(scene_image((480, 640))))
    item = WorkItem(uri=str(path), out_key="scene")
    settings = Settings(pixel_slots=2)
    slots = pixel_slots_for(settings, tiny_runtime.preparer, "processes")
    assert slots is not None
    pool: StagePool[Loader] = StagePool("loader", LoaderSetup(settings, tiny_runtime.preparer, slots=slots),
                                        mode="processes", workers=1)
    try:
        loaded = pool.start(load_image, item, False, None).result(timeout=120)
    finally:
        pool.close()
    in_process = load_image(LoaderSetup(settings, tiny_runtime.preparer)(False), item, False, None)

    assert isinstance(loaded, LoadedImage) and isinstance(in_process, LoadedImage)
    assert slots.slot_of(loaded.prepared.pixel_values) == 0
    assert torch.equal(loaded.prepared.pixel_values, in_process.prepared.pixel_values)
    assert "hand-off" not in loaded.cpu_ms  # resized straight into the slot: nothing left to copy
    assert pixel_slots_for(settings, tiny_runtime.preparer, "threads") is None  # threads share the memory anyway
    assert pixel_slots_for(Settings(pixel_slots=0), tiny_runtime.preparer, "processes") is None


def test_a_taker_that_died_holding_the_lock_costs_the_others_their_slots_never_a_hang(
    slots_pool: tuple[PixelSlots, StagePool[PixelSlots]],
) -> None:
    slots, pool = slots_pool
    lent = pool.start(held, 0).result(timeout=120)
    assert slots.slot_of(lent) == 0
    assert slots.lock.acquire(timeout=5)  # as a loader killed inside ``_take`` would leave it: never released

    crossed = [pool.start(held, seed).result(timeout=120) for seed in range(1, 4)]
    del lent
    gc.collect()  # the worker releases without the lock

    assert [slots.slot_of(pixels) for pixels in crossed] == [None, None, None]
    assert all(torch.equal(pixels, expected(seed)) for seed, pixels in enumerate(crossed, start=1))
    assert slots.free == SLOTS


@pytest.mark.parametrize(("source_hw", "layout"), [
    ((1000, 1500), "hwc"), ((480, 640), "hwc"), ((1500, 2000), "hwc"), ((1008, 1008), "hwc"), ((37, 1200), "hwc"),
    ((1000, 1500), "chw"), ((600, 400), "chw"),
])
def test_resizing_into_a_slot_gives_torchvisions_pixels_bit_for_bit_in_the_slot_itself(
    source_hw: tuple[int, int], layout: str
) -> None:
    generator = torch.Generator().manual_seed(source_hw[0] * 7 + source_hw[1])
    smooth = torch.randint(0, 256, (3, 12, 16), generator=generator, dtype=torch.uint8)
    base = torch.nn.functional.interpolate(smooth[None].float(), size=source_hw, mode="bicubic")[0]
    noise = torch.randint(-20, 21, (3, *source_hw), generator=generator)
    chw = (base + noise).clamp(0, 255).to(torch.uint8)  # photo-like: smooth fields plus fine texture
    pixels = chw.permute(1, 2, 0).contiguous().permute(2, 0, 1) if layout == "hwc" else chw.contiguous()
    slots = PixelSlots.create(2, 3 * 1008 * 1008)

    slot = slots.take((3, 1008, 1008))
    assert slot is not None and slots.slot_of(slot) == 0 and slots.free == 1
    result = resized_uint8(pixels, (1008, 1008), out=slot)

    assert result.data_ptr() == slot.data_ptr() and result.stride() == slot.stride()
    assert torch.equal(result, resized_uint8(pixels, (1008, 1008)))  # torchvision's resize, the processor's
    contiguous_out = torch.empty((3, 1008, 1008), dtype=torch.uint8)  # the other layout: resized, then copied
    assert torch.equal(resized_uint8(pixels, (1008, 1008), out=contiguous_out), result)


def test_a_taken_slot_that_the_preparer_fails_to_fill_is_free_again(tiny_runtime: Sam3Runtime, tmp_path: Path) -> None:
    path = tmp_path / "scene.jpg"
    path.write_bytes(_jpeg(scene_image((480, 640))))
    slots = PixelSlots.create(1, 3 * 1008 * 1008)
    failing = FailingIntoSlot(tiny_runtime.preparer)
    loader = Loader(LoaderSetup(Settings(), tiny_runtime.preparer)(False).storage, failing, 10**8, slots=slots)

    failed = load_image(loader, WorkItem(uri=str(path), out_key="scene"), False, None)

    assert not isinstance(failed, LoadedImage) and "no room" in failed.reason  # type: ignore[union-attr]
    assert failing.given_slot and slots.free == 1


class FailingIntoSlot:
    """The real preparer, failing once it has been given a slot to write into (as a resize out of memory would)."""

    def __init__(self, preparer: ImagePreparer) -> None:
        self.preparer, self.given_slot = preparer, False
        self.input_size_wh, self.fills_slots = preparer.input_size_wh, True

    def __call__(self, image: Image.Image, out: torch.Tensor | None = None) -> PreparedImage:
        self.given_slot = out is not None
        raise MemoryError("no room") if out is not None else RuntimeError("expected a slot")
