"""The checks of an image's visual prompts that need its size: boxes are clipped to it, points must lie in it.

The manifest's geometry was validated when the job was planned (numbers, x0 < x1, labels, lengths); what
depends on the image is checked here, once it is decoded, and a problem fails that image alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from sam3_batch.contracts.errors import ItemError
from sam3_batch.contracts.schemas import BoxXYXY, ConceptPrompt, ObjectPrompt, PointXY, PromptSpec
from sam3_batch.worker.detections import PromptDetections


@dataclass(frozen=True)
class VisualRequest:
    """One image's prompts: text and concept prompts (in order), and object prompts."""

    prompts: list[PromptSpec]
    objects: list[ObjectPrompt]


@dataclass(frozen=True)
class VisualResult:
    """One image's results: one ``PromptDetections`` per prompt, and one (a single mask) per object."""

    concepts: list[PromptDetections]
    objects: list[PromptDetections]


class GeometryError(ItemError):
    """A prompt's geometry does not fit its image (the image fails with this reason)."""


def has_visual_prompts(prompts: list[PromptSpec], objects: list[ObjectPrompt] | None) -> bool:
    """True when the image needs the visual-prompt path (exemplar boxes or objects)."""
    return bool(objects) or any(isinstance(p, ConceptPrompt) for p in prompts)


def fit_prompts(prompts: list[PromptSpec], size_wh: tuple[int, int]) -> list[PromptSpec]:
    """The prompts with every exemplar box clipped to the image (pixel coordinates, EXIF-upright frame)."""
    fitted: list[PromptSpec] = []
    for index, prompt in enumerate(prompts):
        if isinstance(prompt, ConceptPrompt) and prompt.boxes:
            where = f"prompt {index}"
            boxes = [_clipped(box, size_wh, f"{where} box {b}") for b, box in enumerate(prompt.boxes)]
            prompt = prompt.model_copy(update={"boxes": boxes})
        fitted.append(prompt)
    return fitted


def fit_objects(objects: list[ObjectPrompt], size_wh: tuple[int, int]) -> list[ObjectPrompt]:
    """The objects with boxes clipped to the image; a point outside the image is an error."""
    fitted = []
    for index, obj in enumerate(objects):
        for p, point in enumerate(obj.points or []):
            _check_inside(point, size_wh, f"object {index} point {p}")
        box = _clipped(obj.box, size_wh, f"object {index} box") if obj.box is not None else None
        fitted.append(obj.model_copy(update={"box": box}))
    return fitted


def _clipped(box: BoxXYXY, size_wh: tuple[int, int], where: str) -> BoxXYXY:
    width, height = size_wh
    x0, y0, x1, y1 = box
    clipped = (min(max(x0, 0.0), width), min(max(y0, 0.0), height), min(max(x1, 0.0), width),
               min(max(y1, 0.0), height))
    if not (clipped[0] < clipped[2] and clipped[1] < clipped[3]):
        raise GeometryError(f"{where} {list(box)} lies outside the {width}x{height} image")
    return clipped


def _check_inside(point: PointXY, size_wh: tuple[int, int], where: str) -> None:
    width, height = size_wh
    x, y = point
    if not (0 <= x <= width and 0 <= y <= height):
        raise GeometryError(f"{where} {list(point)} lies outside the {width}x{height} image")
