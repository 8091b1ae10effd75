"""decode_image: every accepted kind becomes upright RGB; every bad one is a BadImageError with a reason."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image, ImageFile, ImageOps

from sam3_batch.contracts.errors import BadImageError
from sam3_batch.contracts.keys import IMAGE_EXTENSIONS
from sam3_batch.worker.decode import ACCEPTED_FORMATS, TRANSPARENT_BACKGROUND, decode_image
from tests.fixtures.images import (
    ALPHA_HIDDEN,
    BLUE,
    GOOD_IMAGES_DIR_FILES,
    GOOD_KINDS,
    GRAY_FIELD,
    GRAY_MARK,
    MARK_BOX,
    RED,
    ROTATED_KINDS,
    SIZE,
    ImageBytesFactory,
    scene_rgb,
)

MAX_PIXELS = 50_000_000
WHITE = TRANSPARENT_BACKGROUND
MARK_CENTER = ((MARK_BOX[0] + MARK_BOX[2]) // 2, (MARK_BOX[1] + MARK_BOX[3]) // 2)
FIELD_POINT = (SIZE[0] - 4, SIZE[1] - 4)  # bottom-right, far from the mark
COLOUR_KINDS = (
    "jpeg",
    "mpo",
    "png",
    "palette",
    "gif_animated",
    "webp",
    "webp_animated",
    "tiff",
    "bmp",
    "bad_exif",
)


def _decode(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    return decode_image(data, max_pixels=max_pixels)


def _close(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


def _pixel(image: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    value = image.getpixel(xy)
    assert isinstance(value, tuple)
    return value


def _array(image: Image.Image) -> npt.NDArray[np.int16]:
    return np.asarray(image).astype(np.int16)


@pytest.mark.parametrize("kind", [k for k in GOOD_KINDS if k not in ROTATED_KINDS])
def test_every_good_kind_decodes_to_rgb_at_its_stored_size(
    kind: str, image_bytes_factory: ImageBytesFactory
) -> None:
    image = _decode(image_bytes_factory(kind))
    assert image.mode == "RGB"
    assert image.size == SIZE


@pytest.mark.parametrize("kind", COLOUR_KINDS)
def test_colours_survive_decoding_with_the_mark_top_left(
    kind: str, image_bytes_factory: ImageBytesFactory
) -> None:
    image = _decode(image_bytes_factory(kind))
    assert _close(_pixel(image, MARK_CENTER), RED, tolerance=8)
    assert _close(_pixel(image, FIELD_POINT), BLUE, tolerance=8)


@pytest.mark.parametrize("kind", ROTATED_KINDS)
def test_exif_orientation_6_turns_the_image_a_quarter_clockwise(
    kind: str, image_bytes_factory: ImageBytesFactory
) -> None:
    image = _decode(image_bytes_factory(kind))
    width, height = SIZE
    assert image.size == (height, width)
    expected = np.rot90(np.asarray(scene_rgb()), k=-1).astype(np.int16)  # k=-1: clockwise
    assert np.abs(_array(image) - expected).mean() < 2.0
    # The stored top-left mark is now in the top-right corner.
    assert _close(_pixel(image, (height - 1 - MARK_CENTER[1], MARK_CENTER[0])), RED, tolerance=8)
    assert _close(_pixel(image, (2, 2)), BLUE, tolerance=8)


def test_exif_that_breaks_pillows_exif_transpose_still_rotates(
    image_bytes_factory: ImageBytesFactory,
) -> None:
    data = image_bytes_factory("bad_exif_tags")
    with pytest.raises(Exception):  # noqa: B017 - proves the fixture is hostile to the usual helper
        ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert _decode(data).size == (SIZE[1], SIZE[0])


def test_unreadable_exif_falls_back_to_no_rotation(image_bytes_factory: ImageBytesFactory) -> None:
    data = image_bytes_factory("bad_exif")
    with pytest.raises(SyntaxError):
        Image.open(io.BytesIO(data)).getexif()
    image = _decode(data)
    assert image.size == SIZE
    assert _close(_pixel(image, MARK_CENTER), RED, tolerance=0)


@pytest.mark.parametrize("kind", ["png_rgba", "palette_transparent"])
def test_transparent_pixels_are_composited_on_white(
    kind: str, image_bytes_factory: ImageBytesFactory
) -> None:
    image = _decode(image_bytes_factory(kind))
    assert _pixel(image, FIELD_POINT) == WHITE
    assert _pixel(image, MARK_CENTER) == RED
    assert ALPHA_HIDDEN not in {color for _, color in image.getcolors() or []}


def test_half_transparent_pixels_blend_with_white() -> None:
    rgba = Image.new("RGBA", (8, 8), (200, 0, 0, 128))
    buffer = io.BytesIO()
    rgba.save(buffer, "PNG")
    assert _close(_pixel(_decode(buffer.getvalue()), (4, 4)), (227, 127, 127), tolerance=2)


def test_gray_with_alpha_is_composited_and_spread_to_three_channels() -> None:
    la = Image.new("LA", (8, 8), (50, 255))
    la.paste((50, 0), (4, 0, 8, 8))  # right half transparent
    buffer = io.BytesIO()
    la.save(buffer, "PNG")
    image = _decode(buffer.getvalue())
    assert _pixel(image, (1, 1)) == (50, 50, 50)
    assert _pixel(image, (6, 1)) == WHITE


def test_grayscale_becomes_three_equal_channels(image_bytes_factory: ImageBytesFactory) -> None:
    image = _decode(image_bytes_factory("gray"))
    assert _pixel(image, MARK_CENTER) == (GRAY_MARK,) * 3
    assert _pixel(image, FIELD_POINT) == (GRAY_FIELD,) * 3


def test_cmyk_jpeg_colours_are_roughly_right(image_bytes_factory: ImageBytesFactory) -> None:
    data = image_bytes_factory("cmyk_jpeg")
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    image = _decode(data)
    assert _close(_pixel(image, MARK_CENTER), (255, 0, 0), tolerance=30)
    assert _close(_pixel(image, FIELD_POINT), (0, 55, 255), tolerance=30)


def test_16_bit_grayscale_png_is_scaled_to_8_bits_not_clipped(image_bytes_factory: ImageBytesFactory) -> None:
    data = image_bytes_factory("png16")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    image = _decode(data)
    assert _close(_pixel(image, FIELD_POINT), (GRAY_FIELD,) * 3, tolerance=1)
    assert _pixel(image, MARK_CENTER) == (255, 255, 255)


def test_32_bit_integer_tiff_is_read_as_16_bit_range() -> None:
    values = np.array([[0, 257, 32896, 65535, 70000, -5]], dtype=np.int32)
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, "TIFF")
    assert Image.open(io.BytesIO(buffer.getvalue())).mode == "I"
    gray = np.asarray(_decode(buffer.getvalue()))[0, :, 0]
    assert gray.tolist() == [0, 1, 128, 255, 255, 0]


@pytest.mark.parametrize("kind", ["gif_animated", "webp_animated", "mpo"])
def test_multi_frame_images_give_their_first_frame(kind: str, image_bytes_factory: ImageBytesFactory) -> None:
    data = image_bytes_factory(kind)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    image = _decode(data)
    assert _close(_pixel(image, MARK_CENTER), RED, tolerance=2)
    assert _close(_pixel(image, FIELD_POINT), BLUE, tolerance=2)


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("zero_bytes", "empty file (0 bytes)"),
        ("not_an_image", "not a recognised image format"),
        ("truncated", "corrupt or truncated image: image file is truncated"),
        ("bomb", "image too large (possible decompression bomb)"),
        ("huge_dims", "image too large: 10000x8000 = 80,000,000 pixels is over the limit of 50,000,000"),
    ],
)
def test_every_bad_kind_is_a_bad_image_with_a_readable_reason(
    kind: str, reason: str, image_bytes_factory: ImageBytesFactory
) -> None:
    with pytest.raises(BadImageError) as caught:
        _decode(image_bytes_factory(kind))
    assert reason in str(caught.value)


def test_a_known_format_cut_inside_its_header_is_called_corrupt(
    image_bytes_factory: ImageBytesFactory,
) -> None:
    with pytest.raises(BadImageError, match="corrupt or truncated PNG header"):
        _decode(image_bytes_factory("png")[:20])


def test_formats_outside_the_accepted_list_are_refused() -> None:
    buffer = io.BytesIO()
    scene_rgb().save(buffer, "PPM")  # Pillow reads PPM, but we do not accept it
    with pytest.raises(BadImageError, match="not a recognised image format"):
        _decode(buffer.getvalue())


def test_pixel_limit_is_inclusive(image_bytes_factory: ImageBytesFactory) -> None:
    data = image_bytes_factory("png")
    pixels = SIZE[0] * SIZE[1]
    assert _decode(data, max_pixels=pixels).size == SIZE
    with pytest.raises(BadImageError, match="image too large"):
        _decode(data, max_pixels=pixels - 1)


class _LoadSpy:
    def __init__(self) -> None:
        self.calls = 0
        self.original = ImageFile.ImageFile.load

    def __call__(self, image: ImageFile.ImageFile) -> object:
        self.calls += 1
        return self.original(image)


@pytest.fixture
def load_spy(monkeypatch: pytest.MonkeyPatch) -> _LoadSpy:
    spy = _LoadSpy()
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda image: spy(image))
    return spy


def test_the_load_spy_sees_pixel_decoding(load_spy: _LoadSpy, image_bytes_factory: ImageBytesFactory) -> None:
    _decode(image_bytes_factory("png"))
    assert load_spy.calls >= 1


@pytest.mark.parametrize(("kind", "max_pixels"), [("huge_dims", MAX_PIXELS), ("bomb", 10**12)])
def test_oversized_images_are_rejected_before_any_pixel_is_decoded(
    kind: str, max_pixels: int, load_spy: _LoadSpy, image_bytes_factory: ImageBytesFactory
) -> None:
    # bomb with a limit of 10**12 gets past our check and meets Pillow's own cap, still before load().
    with pytest.raises(BadImageError, match="image too large"):
        _decode(image_bytes_factory(kind), max_pixels=max_pixels)
    assert load_spy.calls == 0


@pytest.mark.parametrize("kind", GOOD_KINDS)
def test_mangled_bytes_raise_nothing_but_bad_image_error(
    kind: str, image_bytes_factory: ImageBytesFactory
) -> None:
    data = image_bytes_factory(kind)
    rng = np.random.default_rng(sum(kind.encode()))
    for _ in range(24):
        mangled = bytearray(data[: int(rng.integers(1, len(data) + 1))])
        for position in rng.integers(0, len(mangled), size=3):
            mangled[position] = int(rng.integers(0, 256))
        try:
            image = _decode(bytes(mangled), max_pixels=1_000_000)
        except BadImageError as exc:
            assert str(exc)
        else:
            assert image.mode == "RGB"


def test_decoding_leaves_pillow_globals_alone(image_bytes_factory: ImageBytesFactory) -> None:
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    for kind in ("jpeg", "truncated", "bomb"):
        with contextlib.suppress(BadImageError):
            _decode(image_bytes_factory(kind))
    assert before == (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)


def test_supported_extensions_are_those_pillow_maps_to_accepted_formats() -> None:
    accepted = {ext for ext, fmt in Image.registered_extensions().items() if fmt in ACCEPTED_FORMATS}
    assert accepted >= IMAGE_EXTENSIONS
    assert {".jpg", ".jpeg", ".png", ".gif", ".webp"} <= IMAGE_EXTENSIONS
    assert all(ext == ext.lower() and ext.startswith(".") for ext in IMAGE_EXTENSIONS)


def test_good_images_dir_holds_decodable_images_in_nested_folders(good_images_dir: Path) -> None:
    files = sorted(p for p in good_images_dir.rglob("*") if p.is_file())
    assert {p.relative_to(good_images_dir).as_posix() for p in files} == set(GOOD_IMAGES_DIR_FILES)
    assert max(len(p.relative_to(good_images_dir).parts) for p in files) >= 3
    for path in files:
        assert path.suffix.lower() in IMAGE_EXTENSIONS
        assert _decode(path.read_bytes()).mode == "RGB"


SAMPLES_DIR = Path(__file__).resolve().parents[1] / "samples" / "images"


def test_committed_samples_are_small_varied_and_decode_upright() -> None:
    paths = sorted(p for p in SAMPLES_DIR.rglob("*") if p.is_file())
    assert sum(p.stat().st_size for p in paths) < 400_000
    assert {_header(p)[0] for p in paths} >= {"JPEG", "PNG", "WEBP", "GIF"}
    assert any(p.parent != SAMPLES_DIR for p in paths)  # listing must recurse to find them
    for path in paths:
        image = _decode(path.read_bytes())
        assert image.mode == "RGB"
        assert 320 <= max(image.size) <= 640
        assert image.width > image.height  # every scene is landscape once EXIF rotation is applied
    rotated = SAMPLES_DIR / "farm" / "ox_in_field.jpg"
    assert _header(rotated)[1] == 6


def _header(path: Path) -> tuple[str | None, object]:
    """Format and EXIF orientation of a file, read without keeping it open."""
    with Image.open(path) as image:
        return image.format, image.getexif().get(0x0112)
