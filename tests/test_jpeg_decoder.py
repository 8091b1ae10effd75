"""decode_for_model(..., as_tensor=True): JPEGs that draft cannot reduce are decoded by torchvision, into exactly
the pixels (and the same failures) Pillow's path gives, and the loader takes that path for a plain photo."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

from sam3_batch.contracts.errors import BadImageError
from sam3_batch.contracts.schemas import WorkItem
from sam3_batch.contracts.settings import Settings
from sam3_batch.worker import decode
from sam3_batch.worker.decode import ModelImage, decode_for_model
from sam3_batch.worker.io_stages import LoadedImage, LoaderSetup, StageFailure, load_image
from sam3_batch.worker.runtime import ImagePreparer, Sam3Runtime

MAX_PIXELS = 50_000_000
SIDE = 1008  # the model input: JPEGs under 2x this each way are not reduced by draft
ORIENTATION_TAG = 0x0112
PREPARER = ImagePreparer(SimpleNamespace(size={"width": SIDE, "height": SIDE}), torch.float32)


def _photo(size_wh: tuple[int, int], seed: int = 0) -> Image.Image:
    """Smooth colour fields with fine noise: chroma and luma detail in every 8x8 block, at any size."""
    width, height = size_wh
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([cols * 255 / max(width, 1), rows * 255 / max(height, 1),
                     (np.sin(cols / 23.0) * np.cos(rows / 17.0) + 1) * 127], axis=-1)
    noisy = base + rng.normal(0.0, 12.0, size=base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), mode="RGB")


def _jpeg(image: Image.Image, orientation: int | None = None, **options: Any) -> bytes:
    exif = Image.Exif()
    if orientation is not None:
        exif[ORIENTATION_TAG] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes(), **{"quality": 90, **options})
    return buffer.getvalue()


def _old(data: bytes) -> ModelImage:
    return decode_for_model(data, max_pixels=MAX_PIXELS, at_least_wh=(SIDE, SIDE))


def _new(data: bytes) -> ModelImage:
    return decode_for_model(data, max_pixels=MAX_PIXELS, at_least_wh=(SIDE, SIDE), as_tensor=True)


def _outcome(decoder: Any, data: bytes) -> tuple[str, Any]:
    try:
        found = decoder(data)
    except BadImageError as exc:
        return "failed", str(exc)
    pixels = found.image
    if isinstance(pixels, Image.Image):
        pixels = torch.from_numpy(np.array(pixels, dtype=np.uint8)).permute(2, 0, 1)
    return "decoded", (found.size_wh, pixels)


def _assert_same_pixels_for_the_model(data: bytes, by_torchvision: bool = True) -> None:
    old, new = _old(data), _new(data)
    assert isinstance(old.image, Image.Image)
    if not by_torchvision:  # left to Pillow: the same decode as before
        assert isinstance(new.image, Image.Image) and new.size_wh == old.size_wh
        assert np.array_equal(np.asarray(new.image), np.asarray(old.image))
        return
    assert isinstance(new.image, torch.Tensor), "expected torchvision's path"
    assert new.size_wh == old.size_wh and new.decoded_wh == old.decoded_wh
    expected = torch.from_numpy(np.array(old.image, dtype=np.uint8)).permute(2, 0, 1)
    assert new.image.dtype == torch.uint8 and new.image.stride() == expected.stride()  # H x W x 3 in memory
    assert torch.equal(new.image, expected)
    assert torch.equal(PREPARER(new.image).pixel_values, PREPARER(old.image).pixel_values)


_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
_CASES: dict[str, tuple[tuple[int, int], dict[str, Any]]] = {
    "4:2:0": ((1500, 1000), {"subsampling": "4:2:0"}),
    "4:2:2": ((1500, 1000), {"subsampling": "4:2:2"}),
    "4:4:4": ((1500, 1000), {"subsampling": "4:4:4", "quality": 100}),
    "4:1:1": ((640, 480), {"subsampling": "4:1:1"}),
    "progressive": ((1500, 1000), {"progressive": True}),
    "progressive-4:4:4": ((640, 480), {"progressive": True, "subsampling": "4:4:4"}),
    "restart-markers": ((1500, 1000), {"restart_marker_blocks": 5}),
    "restart-rows": ((640, 480), {"restart_marker_rows": 1}),
    "odd-size": ((1001, 999), {}),
    "odd-size-4:2:2": ((333, 17), {"subsampling": "4:2:2"}),
    "one-pixel": ((1, 1), {}),
    "icc-profile": ((1500, 1000), {"icc_profile": _SRGB}),
    "optimized-huffman": ((640, 480), {"optimize": True, "quality": 75}),
    "rgb-coded": ((640, 480), {"keep_rgb": True}),
    "just-under-draft": ((2015, 2015), {}),
}


@pytest.mark.parametrize("case", list(_CASES))
def test_torchvision_decodes_exactly_pillows_pixels(case: str) -> None:
    size_wh, options = _CASES[case]
    _assert_same_pixels_for_the_model(_jpeg(_photo(size_wh), **options))


@pytest.mark.parametrize("progressive", [False, True])
def test_a_grayscale_jpeg_becomes_the_same_gray_rgb_pixels(progressive: bool) -> None:
    gray = _photo((1001, 999)).convert("L")
    _assert_same_pixels_for_the_model(_jpeg(gray, progressive=progressive))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_applied_as_pillow_applies_it(orientation: int) -> None:
    data = _jpeg(_photo((640, 360)), orientation=orientation)
    _assert_same_pixels_for_the_model(data, by_torchvision=orientation <= 4)  # quarter turns: Pillow's path
    assert _new(data).size_wh == ((360, 640) if orientation >= 5 else (640, 360))


def test_a_grayscale_flipped_jpeg_is_flipped_as_pillow_flips_it() -> None:
    _assert_same_pixels_for_the_model(_jpeg(_photo((300, 200)).convert("L"), orientation=3))


def test_an_unreadable_orientation_leaves_the_image_as_stored_as_before() -> None:
    _assert_same_pixels_for_the_model(_jpeg(_photo((300, 200)), orientation=42))


def _assert_same_outcome(data: bytes) -> str:
    old, new = _outcome(_old, data), _outcome(_new, data)
    assert old[0] == new[0]
    if old[0] == "failed":
        assert new[1] == old[1]
    else:
        assert new[1][0] == old[1][0] and torch.equal(new[1][1], old[1][1])
    return old[0]


def test_cmyk_jpegs_and_jpegs_draft_reduces_stay_with_pillow() -> None:
    cmyk = _jpeg(_photo((300, 200)).convert("CMYK"))
    assert isinstance(_new(cmyk).image, Image.Image)
    assert _assert_same_outcome(cmyk) == "decoded"
    big = _jpeg(_photo((2016, 2016)))
    found = _new(big)
    assert isinstance(found.image, Image.Image) and found.decoded_wh == (1008, 1008) and found.size_wh == (2016, 2016)


@pytest.mark.parametrize("progressive", [False, True])
def test_truncated_jpegs_fail_as_before(progressive: bool) -> None:
    data = _jpeg(_photo((640, 480)), progressive=progressive)
    for keep in (len(data) // 3, len(data) // 2, len(data) - 100, len(data) - 2):
        assert _assert_same_outcome(data[:keep]) == "failed", keep
    assert "corrupt or truncated image" in _outcome(_new, data[: len(data) // 2])[1]


@pytest.mark.parametrize("progressive", [False, True])
def test_corrupt_jpeg_data_gives_the_same_pixels_or_the_same_failure_as_before(progressive: bool) -> None:
    data = _jpeg(_photo((320, 240)), progressive=progressive, restart_marker_blocks=4 if progressive else 0)
    rng = np.random.default_rng(7)
    outcomes: list[str] = []
    for trial in range(40):
        corrupt = bytearray(data)
        start = int(rng.integers(len(data) // 4, len(data) - 4))
        if trial % 4 == 0:  # a stray marker in the entropy-coded data
            corrupt[start: start + 2] = bytes([0xFF, int(rng.choice([0xD9, 0xD0, 0xC4, 0xDA, 0xFF]))])
        else:
            count = int(rng.integers(1, 64))
            corrupt[start: start + count] = rng.integers(0, 256, size=len(corrupt[start: start + count]),
                                                         dtype=np.uint8).tobytes()
        outcomes.append(_assert_same_outcome(bytes(corrupt)))
    assert "decoded" in outcomes  # libjpeg warns and decodes most damage; both paths fill it in alike


def _loaded(tmp_path: Path, data: bytes, preparer: Any = PREPARER, keep_pixels: bool = False) -> LoadedImage:
    path = tmp_path / "image.jpg"
    path.write_bytes(data)
    loaded = load_image(LoaderSetup(Settings(), preparer)(False), WorkItem(uri=str(path), out_key="image"),
                        keep_pixels, None)
    assert isinstance(loaded, LoadedImage)
    return loaded


def _count_torchvision_decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = decode.decode_jpeg

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(decode, "decode_jpeg", counted)
    return calls


def test_the_loader_decodes_a_plain_photo_with_torchvision_into_the_same_model_input(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    data = _jpeg(_photo((1500, 1000)))
    calls = _count_torchvision_decodes(monkeypatch)

    loaded = _loaded(tmp_path, data)

    assert calls == [1]
    assert loaded.size_wh == (1500, 1000) and loaded.prepared.original_size_hw == (1000, 1500)
    assert set(loaded.cpu_ms) == {"download", "decode", "preprocess"}
    assert torch.equal(loaded.prepared.pixel_values, PREPARER(_old(data).image).pixel_values)


def test_the_loader_keeps_pillow_where_the_tensor_path_does_not_apply(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls = _count_torchvision_decodes(monkeypatch)
    photo = _jpeg(_photo((1500, 1000)))

    kept = _loaded(tmp_path, photo, keep_pixels=True)  # the masked image needs decode_image's PIL pixels
    drafted = _loaded(tmp_path, _jpeg(_photo((2100, 2100))))  # draft reduces it: Pillow is faster there

    assert calls == []
    assert kept.rgb is not None and kept.rgb.shape == (1000, 1500, 3)
    assert drafted.size_wh == (2100, 2100) and drafted.prepared.original_size_hw == (2100, 2100)


def test_a_truncated_photo_fails_in_the_loader_with_the_same_reason(tmp_path: Path) -> None:
    data = _jpeg(_photo((640, 480)))[:20_000]
    path = tmp_path / "cut.jpg"
    path.write_bytes(data)

    loader, item = LoaderSetup(Settings(), PREPARER)(False), WorkItem(uri=str(path), out_key="cut")
    assert loader.tensor_pixels

    failed = load_image(loader, item, False, None)
    before = load_image(replace(loader, tensor_pixels=False), item, False, None)

    assert isinstance(failed, StageFailure) and not failed.transient
    assert failed == before and "corrupt or truncated image" in failed.reason


def test_the_normalized_hand_off_is_given_pillow_images_and_takes_a_tensor_alike(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_runtime: Sam3Runtime
) -> None:
    normalized = replace(tiny_runtime.preparer, hand_off="normalized")
    assert not normalized.takes_tensors and tiny_runtime.preparer.takes_tensors
    calls = _count_torchvision_decodes(monkeypatch)
    data = _jpeg(_photo((400, 300)))

    loaded = _loaded(tmp_path, data, preparer=normalized)

    assert calls == []
    pixels = _new(data).image
    assert isinstance(pixels, torch.Tensor)
    assert torch.equal(normalized(pixels).pixel_values, loaded.prepared.pixel_values)
