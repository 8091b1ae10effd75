"""Draw the committed sample images: synthetic, seeded scenes in mixed formats (run from anywhere).

python3 samples/make_samples.py [output_dir]    # default: samples/images next to this file
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

Color = tuple[int, int, int]
Box = tuple[float, float, float, float]

SEED = 20251
EXIF_ORIENTATION = 0x0112


# ---- painting helpers -------------------------------------------------------------------------------


def vertical_gradient(size: tuple[int, int], top: Color, bottom: Color) -> Image.Image:
    """An RGB image fading from ``top`` to ``bottom``."""
    width, height = size
    t = np.linspace(0.0, 1.0, height)[:, None, None]
    rows = (1 - t) * np.array(top) + t * np.array(bottom)
    return Image.fromarray(np.repeat(rows, width, axis=1).astype(np.uint8))


def add_texture(
    image: Image.Image, rng: np.random.Generator, amplitude: float, blur: float = 0.8
) -> Image.Image:
    """Soft film-grain noise, so flat areas look photographed rather than drawn."""
    grain = rng.normal(0.0, amplitude, (image.height, image.width, 1))
    grain_image = Image.fromarray(np.clip(grain + 128, 0, 255).astype(np.uint8)[..., 0])
    smooth = np.asarray(grain_image.filter(ImageFilter.GaussianBlur(blur))).astype(np.float32) - 128
    pixels = np.asarray(image.convert("RGB")).astype(np.float32) + smooth[..., None]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def soft_shadow(canvas: Image.Image, box: Box, blur: float, opacity: int) -> None:
    """Darken an elliptical patch with blurred edges (a contact shadow on the ground)."""
    layer = Image.new("L", canvas.size, 0)
    ImageDraw.Draw(layer).ellipse(box, fill=opacity)
    canvas.paste((0, 0, 0), mask=layer.filter(ImageFilter.GaussianBlur(blur)))


def grass_strokes(draw: ImageDraw.ImageDraw, rng: np.random.Generator, area: Box, count: int) -> None:
    """Short slanted blades in several greens."""
    x0, y0, x1, y1 = area
    for _ in range(count):
        x, y = rng.uniform(x0, x1), rng.uniform(y0, y1)
        lean, length = rng.uniform(-4, 4), rng.uniform(4, 12) * (0.5 + (y - y0) / max(y1 - y0, 1))
        shade = int(rng.integers(70, 150))
        draw.line([(x, y), (x + lean, y - length)], fill=(shade // 3, shade, shade // 4), width=1)


# ---- subjects ---------------------------------------------------------------------------------------


def draw_ox(draw: ImageDraw.ImageDraw, x: float, y: float, scale: float) -> None:
    """A brown ox facing left, with curved pale horns; (x, y) is the middle of its back."""
    brown, dark, horn = (112, 70, 40), (70, 42, 24), (232, 220, 190)
    s = scale
    for leg_x in (-60, -35, 35, 60):
        draw.rounded_rectangle((x + leg_x * s, y + 30 * s, x + (leg_x + 14) * s, y + 95 * s), 4, fill=dark)
    draw.ellipse((x - 85 * s, y - 10 * s, x + 85 * s, y + 60 * s), fill=brown)
    draw.line([(x + 82 * s, y + 10 * s), (x + 100 * s, y + 70 * s)], fill=dark, width=max(2, int(4 * s)))
    draw.ellipse((x - 130 * s, y - 20 * s, x - 70 * s, y + 40 * s), fill=brown)  # head
    draw.ellipse((x - 140 * s, y + 10 * s, x - 105 * s, y + 42 * s), fill=(150, 105, 80))  # muzzle
    for side in (-1, 1):  # horns grow out of the top of the head, curving up and in
        horn_points = [(-100 + side * dx, dy) for dx, dy in [(12, -12), (30, -22), (42, -40), (36, -60)]]
        scaled = [(x + hx * s, y + hy * s) for hx, hy in horn_points]
        draw.line(scaled, fill=horn, width=max(3, int(8 * s)), joint="curve")
    draw.ellipse((x - 118 * s, y - 2 * s, x - 110 * s, y + 6 * s), fill=(15, 10, 5))  # eye


def draw_car(draw: ImageDraw.ImageDraw, x: float, y: float, color: Color) -> None:
    """A side-on hatchback; (x, y) is the bottom-left of the body."""
    glass = (150, 180, 200)
    draw.rounded_rectangle((x, y - 40, x + 150, y), 10, fill=color)
    draw.polygon([(x + 25, y - 40), (x + 45, y - 70), (x + 110, y - 70), (x + 130, y - 40)], fill=color)
    draw.polygon([(x + 35, y - 42), (x + 50, y - 64), (x + 76, y - 64), (x + 76, y - 42)], fill=glass)
    draw.polygon([(x + 82, y - 42), (x + 82, y - 64), (x + 106, y - 64), (x + 122, y - 42)], fill=glass)
    for wheel_x in (x + 35, x + 118):
        draw.ellipse((wheel_x - 16, y - 16, wheel_x + 16, y + 16), fill=(20, 20, 20))
        draw.ellipse((wheel_x - 7, y - 7, wheel_x + 7, y + 7), fill=(160, 160, 160))
    draw.rectangle((x + 140, y - 34, x + 150, y - 26), fill=(250, 220, 120))  # headlight


def draw_person(draw: ImageDraw.ImageDraw, x: float, y: float, height: float, shirt: Color) -> None:
    """A standing figure; (x, y) is between the feet."""
    h = height
    skin, trousers = (220, 180, 150), (40, 45, 70)
    draw.rectangle((x - 0.12 * h, y - 0.48 * h, x - 0.02 * h, y), fill=trousers)
    draw.rectangle((x + 0.02 * h, y - 0.48 * h, x + 0.12 * h, y), fill=trousers)
    draw.rounded_rectangle(
        (x - 0.16 * h, y - 0.82 * h, x + 0.16 * h, y - 0.45 * h), int(0.05 * h), fill=shirt
    )
    draw.line([(x - 0.16 * h, y - 0.78 * h), (x - 0.24 * h, y - 0.5 * h)], fill=shirt, width=int(0.06 * h))
    draw.line([(x + 0.16 * h, y - 0.78 * h), (x + 0.24 * h, y - 0.5 * h)], fill=shirt, width=int(0.06 * h))
    draw.ellipse((x - 0.09 * h, y - h, x + 0.09 * h, y - 0.82 * h), fill=skin)


def draw_dog(draw: ImageDraw.ImageDraw, x: float, y: float) -> None:
    """A tan dog facing right, tail up; (x, y) is the middle of its back."""
    tan, dark = (196, 150, 96), (110, 74, 40)
    for leg_x in (-50, -30, 30, 48):
        draw.rounded_rectangle((x + leg_x, y + 20, x + leg_x + 13, y + 80), 5, fill=tan)
    draw.ellipse((x - 70, y - 10, x + 70, y + 50), fill=tan)
    draw.line([(x - 62, y + 5), (x - 85, y - 12), (x - 95, y - 38)], fill=tan, width=9, joint="curve")  # tail
    draw.ellipse((x + 45, y - 55, x + 105, y + 5), fill=tan)  # head
    draw.ellipse((x + 85, y - 35, x + 125, y - 8), fill=(210, 170, 120))  # snout
    draw.ellipse((x + 118, y - 30, x + 128, y - 21), fill=(20, 15, 10))  # nose
    draw.ellipse((x + 44, y - 50, x + 66, y - 5), fill=dark)  # ear
    draw.ellipse((x + 80, y - 40, x + 88, y - 32), fill=(20, 15, 10))  # eye


def draw_fruit(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, center: tuple[float, float], kind: str
) -> None:
    """An apple, orange or lemon with a highlight."""
    colors = {"apple": (190, 30, 35), "orange": (240, 140, 20), "lemon": (240, 215, 60)}
    radius = {"apple": 30, "orange": 32, "lemon": 24}[kind] * rng.uniform(0.9, 1.1)
    cx, cy = center
    draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colors[kind])
    draw.ellipse(
        (cx - radius * 0.5, cy - radius * 0.6, cx - radius * 0.1, cy - radius * 0.25), fill=(250, 240, 220)
    )
    if kind == "apple":
        draw.line([(cx, cy - radius), (cx + 4, cy - radius - 10)], fill=(80, 50, 20), width=3)


# ---- scenes -----------------------------------------------------------------------------------------


def ox_in_a_field(rng: np.random.Generator) -> Image.Image:
    size = (640, 427)
    image = vertical_gradient(size, (150, 190, 230), (225, 235, 240))
    draw = ImageDraw.Draw(image)
    draw.polygon(
        [(0, 230), (160, 190), (330, 215), (480, 180), (640, 220), (640, 260), (0, 260)], fill=(120, 140, 120)
    )
    image.paste(vertical_gradient((640, 187), (120, 160, 60), (80, 125, 40)), (0, 240))
    grass_strokes(draw, rng, (0, 240, 640, 427), 2500)
    draw.ellipse((500, 120, 600, 230), fill=(50, 90, 40))  # tree crown
    draw.rectangle((543, 225, 557, 260), fill=(70, 50, 30))
    soft_shadow(image, (180, 345, 440, 385), blur=8, opacity=110)
    draw_ox(ImageDraw.Draw(image), 330, 270, 1.15)
    return add_texture(image, rng, amplitude=7)


def street_with_cars_and_people(rng: np.random.Generator) -> Image.Image:
    size = (640, 400)
    image = vertical_gradient(size, (170, 200, 225), (215, 220, 225))
    draw = ImageDraw.Draw(image)
    for i, (x0, top, tone) in enumerate(
        [(0, 60, 150), (130, 30, 175), (270, 80, 140), (400, 40, 165), (520, 70, 155)]
    ):
        draw.rectangle((x0, top, x0 + 125, 250), fill=(tone, tone - 15 - 5 * i, tone - 35))
        for wx in range(x0 + 12, x0 + 110, 28):
            for wy in range(top + 15, 235, 32):
                draw.rectangle((wx, wy, wx + 14, wy + 18), fill=(90, 110, 130))
    draw.rectangle((0, 250, 640, 285), fill=(175, 170, 160))  # sidewalk
    image.paste(vertical_gradient((640, 115), (70, 70, 75), (50, 50, 55)), (0, 285))
    for x in range(10, 640, 90):
        draw.rectangle((x, 338, x + 45, 344), fill=(230, 230, 220))
    for box in [(60, 360, 230, 378), (350, 385, 520, 400)]:
        soft_shadow(image, box, blur=5, opacity=140)
    draw_car(draw, 70, 365, (180, 30, 30))
    draw_car(draw, 360, 390, (30, 70, 160))
    for x, height, shirt in [(300, 95, (40, 120, 60)), (335, 88, (200, 160, 40)), (560, 100, (90, 60, 140))]:
        soft_shadow(image, (x - 20, 277, x + 30, 287), blur=3, opacity=120)
        draw_person(draw, x, 282, height, shirt)
    return add_texture(image, rng, amplitude=6)


def fruit_bowl_cutout(rng: np.random.Generator) -> Image.Image:
    """A bowl of fruit on a transparent background, with a half-transparent shadow (RGBA)."""
    size = (420, 320)
    shadow = Image.new("L", size, 0)
    ImageDraw.Draw(shadow).ellipse((70, 255, 360, 300), fill=120)
    image = Image.new("RGBA", size, (0, 0, 0, 0))
    image.putalpha(shadow.filter(ImageFilter.GaussianBlur(8)))
    draw = ImageDraw.Draw(image)
    for center, kind in [
        ((150, 170), "orange"),
        ((205, 150), "apple"),
        ((265, 168), "lemon"),
        ((120, 200), "apple"),
        ((235, 195), "orange"),
        ((300, 200), "apple"),
    ]:
        draw_fruit(draw, rng, center, kind)
    draw.chord((70, 110, 350, 290), 0, 180, fill=(235, 235, 240, 255))  # bowl
    draw.arc((70, 110, 350, 290), 0, 180, fill=(170, 170, 185, 255), width=3)
    draw.ellipse((70, 190, 350, 210), outline=(200, 200, 210, 255), width=2)
    return image


def kitchen_table_gray(rng: np.random.Generator) -> Image.Image:
    """A kitchen table with fruit and a mug, in grayscale (mode L)."""
    size = (480, 360)
    image = vertical_gradient(size, (200, 195, 185), (170, 160, 150))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 200, 480, 360), fill=(150, 110, 70))
    for y in range(205, 360, 11):  # wood grain
        draw.line([(0, y), (480, y + int(rng.integers(-3, 4)))], fill=(130, 92, 58), width=2)
    soft_shadow(image, (90, 280, 380, 320), blur=6, opacity=90)
    draw.ellipse((90, 240, 380, 310), fill=(240, 240, 238))  # plate
    for center, kind in [
        ((170, 260), "apple"),
        ((230, 255), "orange"),
        ((290, 262), "lemon"),
        ((200, 285), "apple"),
    ]:
        draw_fruit(draw, rng, center, kind)
    draw.rounded_rectangle((390, 180, 440, 250), 8, fill=(60, 90, 140))  # mug
    draw.arc((425, 195, 460, 230), 270, 90, fill=(60, 90, 140), width=6)
    return add_texture(image, rng, amplitude=4).convert("L")


def dog_on_grass(rng: np.random.Generator) -> Image.Image:
    size = (560, 400)
    image = vertical_gradient(size, (160, 200, 235), (200, 225, 235))
    draw = ImageDraw.Draw(image)
    image.paste(vertical_gradient((560, 250), (110, 165, 70), (60, 120, 35)), (0, 150))
    grass_strokes(draw, rng, (0, 150, 560, 400), 2200)
    soft_shadow(image, (180, 320, 420, 350), blur=7, opacity=120)
    draw_dog(ImageDraw.Draw(image), 280, 250)
    draw.ellipse((440, 330, 470, 360), fill=(230, 60, 50))  # a ball
    return add_texture(image, rng, amplitude=6)


def bouncing_ball_frames() -> list[Image.Image]:
    """Four frames of a red ball bouncing on a lawn (flat colours keep the GIF small)."""
    frames = []
    for height in (20, 70, 110, 70):
        frame = Image.new("RGB", (320, 240), (170, 205, 235))
        draw = ImageDraw.Draw(frame)
        draw.rectangle((0, 170, 320, 240), fill=(90, 150, 60))
        draw.ellipse((135, 185, 185, 197), fill=(60, 105, 45))  # shadow
        top = 170 - 40 - height
        draw.ellipse((140, top, 180, top + 40), fill=(210, 40, 40))
        frames.append(frame.quantize(colors=16, dither=Image.Dither.NONE).convert("RGB"))
    return frames


# ---- writing ----------------------------------------------------------------------------------------


def save_rotated_jpeg(upright: Image.Image, path: Path) -> None:
    """Store the pixels turned a quarter left, tagged orientation 6, as cameras held sideways do."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(path, "JPEG", quality=82, exif=exif.tobytes())


def save_gif(frames: list[Image.Image], path: Path) -> None:
    first, *rest = frames
    first.save(path, "GIF", save_all=True, append_images=rest, duration=120, loop=0)


def make_all(out_dir: Path) -> list[Path]:
    """Write every sample under ``out_dir``; returns the paths written."""
    rng = np.random.default_rng(SEED)
    writers: list[tuple[str, Callable[[Path], None]]] = [
        ("farm/ox_in_field.jpg", lambda p: save_rotated_jpeg(ox_in_a_field(rng), p)),
        (
            "street/cars_and_people.jpg",
            lambda p: street_with_cars_and_people(rng).save(p, "JPEG", quality=80),
        ),
        ("kitchen/fruit_bowl.png", lambda p: fruit_bowl_cutout(rng).save(p, "PNG", optimize=True)),
        ("kitchen/table_gray.png", lambda p: kitchen_table_gray(rng).save(p, "PNG", optimize=True)),
        ("park/dog_on_grass.webp", lambda p: dog_on_grass(rng).save(p, "WEBP", quality=80, method=6)),
        ("park/animated/bouncing_ball.gif", lambda p: save_gif(bouncing_ball_frames(), p)),
    ]
    written = []
    for relative, write in writers:
        path = out_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
        written.append(path)
    return written


def main() -> None:
    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "images"
    for path in make_all(out_dir):
        print(f"{path.stat().st_size:>8,} B  {path}")


if __name__ == "__main__":
    main()
