"""Downloaded bytes -> an upright 8-bit RGB image for the model, or BadImageError with a readable reason.

Pillow parses every header (format, size, pixel limit, EXIF orientation) and decodes; only
``decode_for_model`` may instead hand a plain RGB or grayscale JPEG at full scale to torchvision's decoder,
which returns the same pixels as a tensor (see ``decode_for_model``).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from PIL import ExifTags, Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_jpeg

from sam3_batch.contracts.errors import BadImageError

# Pillow is only allowed to try these parsers: PSD, EPS (which runs Ghostscript), ICO, ... are refused unread.
# Sources list the files whose extension is in contracts.keys.IMAGE_EXTENSIONS (a test checks they match).
ACCEPTED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")

# Transparent pixels are composited on white, the way viewers and browsers usually show them.
TRANSPARENT_BACKGROUND = (255, 255, 255)

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})

# The table ImageOps.exif_transpose uses. We apply it ourselves because exif_transpose also rewrites the
# EXIF block, and that rewrite raises on corrupt tags that have nothing to do with the orientation.
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# The orientations whose transpose swaps width and height.
_QUARTER_TURNS = frozenset({5, 6, 7, 8})

# The flips among them on an (H, W, 3) tensor (dims 0 and 1: rows, columns), pixel for pixel Pillow's. The quarter
# turns are left to Pillow: a transposing copy of 3-byte pixels costs torch about what it saves (measured).
_TENSOR_FLIPS: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    2: lambda hwc: hwc.flip(1),
    3: lambda hwc: hwc.flip(0, 1),
    4: lambda hwc: hwc.flip(0),
}

# JPEG modes (as Pillow opens them) whose RGB pixels torchvision's decoder gives exactly as Pillow's decode and
# convert("RGB") do: both are libjpeg-turbo doing the colour conversion (tests/test_jpeg_decoder.py checks it
# for each subsampling, progressive, restart markers, odd sizes, ICC). CMYK/YCCK are left to Pillow.
_TENSOR_MODES = frozenset({"RGB", "L"})

# Only used to word the reason when Pillow cannot parse a header that claims to be one of our formats.
_SIGNATURES = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}

_BOMB_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning)

RgbPixels = npt.NDArray[np.uint8]  # (H, W, 3)


def limit_pillow_pixels(max_pixels: int) -> None:
    """Make Pillow's own decompression-bomb check (in ``Image.open``) agree with ``decode_image``'s limit.

    Pillow keeps its limit in a module global: call this once where a process that decodes starts
    (the worker, the embedded runner, a loader process), never from a library function.
    """
    Image.MAX_IMAGE_PIXELS = max_pixels


def decode_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Decode to upright RGB: EXIF orientation applied, transparency on white, frame 0 of animations.

    Raises BadImageError for anything but a whole image of an accepted format with at most
    ``max_pixels`` pixels; the pixel count is checked from the header, before any pixel is decoded.
    """
    if not data:
        raise BadImageError("empty file (0 bytes)")
    image = _open(data)
    _check_pixel_count(image.size, max_pixels)
    _load(image)
    return _to_rgb(_upright(image))


@dataclass(frozen=True)
class ModelImage:
    """A decoded image for the model alone: pixels possibly reduced, and the upright full size masks must have."""

    # Upright RGB; a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (never below at_least_wh). A PIL image, or
    # (``decode_for_model(..., as_tensor=True)``) a uint8 (3, H, W) tensor laid out H x W x 3 in memory.
    image: Image.Image | torch.Tensor
    size_wh: tuple[int, int]  # the upright image's full size, from the header

    @property
    def decoded_wh(self) -> tuple[int, int]:
        """The size of ``image``: ``size_wh`` unless decoded at a reduced scale."""
        if isinstance(self.image, Image.Image):
            return self.image.size
        return int(self.image.shape[2]), int(self.image.shape[1])


def decode_for_model(
    data: bytes, *, max_pixels: int, at_least_wh: tuple[int, int], as_tensor: bool = False
) -> ModelImage:
    """``decode_image``, but a JPEG larger than ``at_least_wh`` is decoded at a reduced scale (Pillow's draft).

    The decoder then skips most of the inverse DCT work: a 4000x3000 photo for a 1008x1008 model input
    is decoded at 2000x1500. Only for the model's input: outputs that need the full-resolution pixels
    (the masked image) use ``decode_image``. Masks are still made at ``size_wh``, the full size.

    ``as_tensor``: an RGB or grayscale JPEG that draft cannot reduce (and not stored a quarter turn from
    upright) is decoded by torchvision instead, into the (3, H, W) uint8 tensor a resize wants, without
    Pillow's image or a copy of it: the same pixels (both are libjpeg-turbo) for less CPU. Pillow still
    reads the header, the pixel limit and the orientation first; whatever torchvision cannot decode
    (truncated, broken) is decoded by Pillow again, which words the reason. Unlike Pillow, torchvision's
    libjpeg prints its first warning about damaged data it still decodes (one line on stderr).
    """
    if not data:
        raise BadImageError("empty file (0 bytes)")
    image = _open(data)
    _check_pixel_count(image.size, max_pixels)
    orientation = _orientation(image)
    turned = orientation in _QUARTER_TURNS
    stored_wh = image.size
    full_wh = (stored_wh[1], stored_wh[0]) if turned else stored_wh
    if image.format == "JPEG":
        # The draft size is in the stored orientation: the image is turned upright only after decoding.
        image.draft(None, at_least_wh[::-1] if turned else at_least_wh)
        if as_tensor and image.size == stored_wh and image.mode in _TENSOR_MODES and not turned:
            pixels = _torchvision_rgb(data, stored_wh, orientation)
            if pixels is not None:
                return ModelImage(pixels, full_wh)
    _load(image)
    return ModelImage(_to_rgb(_upright(image)), full_wh)


def normalise_image(image: Image.Image, *, max_pixels: int) -> Image.Image:
    """An image already opened (the Python API's PIL input) made what ``decode_image`` returns: upright RGB."""
    _check_pixel_count(image.size, max_pixels)
    _load(image)
    return _to_rgb(_upright(image))


def rgb_pixels(image: Image.Image) -> RgbPixels:
    """The pixels of an image from ``decode_image`` (RGB) as an (H, W, 3) uint8 array of its own."""
    return np.array(image, dtype=np.uint8)


def _open(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError as exc:
        raise BadImageError(_unidentified_reason(data)) from exc
    except _BOMB_ERRORS as exc:
        # Pillow's own cap (2 x Image.MAX_IMAGE_PIXELS) fires in open(), before our check can.
        raise BadImageError(f"image too large (possible decompression bomb): {exc}") from exc
    except MemoryError:
        raise
    except Exception as exc:  # header parsers raise many types on hostile input
        claimed = _claimed_format(data) or "image"
        raise BadImageError(f"corrupt or truncated {claimed} header: {_describe(exc)}") from exc


def _torchvision_rgb(data: bytes, stored_wh: tuple[int, int], orientation: int) -> torch.Tensor | None:
    """A JPEG's upright RGB pixels from torchvision's decoder; None where it fails (Pillow then decides)."""
    try:
        # A bytearray: torch warns on a buffer it may not write to. The copy is ~1% of the decode.
        pixels: torch.Tensor = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except MemoryError:
        raise
    except Exception:  # e.g. truncated data (Pillow's load raises there too): Pillow decodes it again
        return None
    if tuple(pixels.shape) != (3, stored_wh[1], stored_wh[0]):  # not the image Pillow's header describes
        return None
    # Flipped by Pillow's reading of the orientation (unreadable EXIF: as stored), not torchvision's own.
    flip = _TENSOR_FLIPS.get(orientation)
    if flip is None:
        return pixels  # (3, H, W) over H x W x 3 memory: the layout torchvision's uint8 resize is fastest on
    upright: torch.Tensor = flip(pixels.permute(1, 2, 0)).contiguous()  # a flip copies: already contiguous
    return upright.permute(2, 0, 1)


def _unidentified_reason(data: bytes) -> str:
    claimed = _claimed_format(data)
    if claimed is not None:
        return f"corrupt or truncated {claimed} header"
    return "not a recognised image format (accepted: JPEG, PNG, GIF, WebP, BMP, TIFF)"


def _claimed_format(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return next((fmt for sig, fmt in _SIGNATURES.items() if data.startswith(sig)), None)


def _check_pixel_count(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise BadImageError(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise BadImageError(
            f"image too large: {width}x{height} = {width * height:,} pixels is over the limit of "
            f"{max_pixels:,} (possible decompression bomb)"
        )


def _load(image: Image.Image) -> None:
    # A full decode is the only way to notice truncated or corrupt pixel data.
    try:
        image.load()
    except _BOMB_ERRORS as exc:
        raise BadImageError(f"image too large (possible decompression bomb): {exc}") from exc
    except MemoryError:
        raise
    except Exception as exc:
        raise BadImageError(f"corrupt or truncated image: {_describe(exc)}") from exc


def _upright(image: Image.Image) -> Image.Image:
    method = _ORIENTATION_TRANSPOSE.get(_orientation(image))
    return image if method is None else image.transpose(method)


def _orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # unreadable EXIF must not fail the image: treat it as upright
        return 1
    return value if isinstance(value, int) else 1


def _to_rgb(image: Image.Image) -> Image.Image:
    try:
        return _convert(image)
    except MemoryError:
        raise
    except Exception as exc:
        raise BadImageError(f"cannot convert pixel format {image.mode} to RGB: {_describe(exc)}") from exc


def _convert(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_gray8(image).convert("RGB")
    if image.has_transparency_data:
        return _flatten_on_background(image)
    return image.convert("RGB")


def _sixteen_bit_to_gray8(image: Image.Image) -> Image.Image:
    # Pillow's convert("L") clips 16-bit values at 255 instead of scaling them. Mode "I" comes from
    # 16-bit sources too, so both are mapped 0..65535 -> 0..255 (rounded).
    values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
    return Image.fromarray(((values + 128) // 257).astype(np.uint8))


def _flatten_on_background(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    flat = Image.new("RGB", rgba.size, TRANSPARENT_BACKGROUND)
    flat.paste(rgba, mask=rgba.getchannel("A"))
    return flat


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{text} ({type(exc).__name__})" if text else type(exc).__name__
