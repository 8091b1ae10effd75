"""The manifest contract for visual prompts: what is accepted, what is refused (and how it says why)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from sam3_batch.contracts.schemas import ConceptPrompt, JobSpec, ObjectPrompt, WorkItem, prompt_name
from sam3_batch.contracts.settings import Settings
from sam3_batch.contracts.storage import Storage
from sam3_batch.producer.planner import _work_item
from sam3_batch.producer.sources import ManifestSource, SourceItem, SourceProblem
from sam3_batch.worker.visual_prompts import GeometryError, fit_objects, fit_prompts, has_visual_prompts

MIXED_PROMPTS = ["dog", {"boxes": [[1, 2, 30, 40]]}, {"text": " a  cat ", "boxes": [[0, 0, 5, 5], [6, 6, 9, 9]],
                                                         "box_labels": [1, 0]}]
OBJECTS = [{"points": [[3, 4]]}, {"box": [1, 1, 8, 9]}, {"points": [[1, 1], [2, 2]], "point_labels": [1, 0],
                                                         "box": [0, 0, 4, 4]}]


def test_a_work_item_mixes_text_and_concept_prompts_and_carries_objects() -> None:
    item = WorkItem.model_validate({"uri": "u", "out_key": "k", "prompts": MIXED_PROMPTS, "objects": OBJECTS})
    assert item.prompts is not None and item.objects is not None
    assert item.prompts[0] == "dog" and isinstance(item.prompts[2], ConceptPrompt)
    assert item.prompts[2].text == "a cat" and item.prompts[2].labels == [1, 0]
    assert [prompt_name(p, i) for i, p in enumerate(item.prompts)] == ["dog", "exemplar:1", "a cat"]
    assert item.objects[0].labels == [1] and item.objects[1].labels == []
    assert WorkItem.model_validate_json(item.model_dump_json()) == item, "survives the queue message round trip"


@pytest.mark.parametrize(
    ("prompt", "reason"),
    [
        ({"boxes": [[5, 2, 1, 4]]}, "x0 < x1 and y0 < y1"),
        ({"boxes": [[1, 2, 3]]}, "Field required"),
        ({"boxes": [[1, 2, 3, "nan"]]}, "finite number"),
        ({"boxes": [[1, 2, 3, 4]], "box_labels": [2]}, "Input should be 0 or 1"),
        ({"boxes": [[1, 2, 3, 4]], "box_labels": [1, 1]}, "box_labels has 2 entries for 1 box"),
        ({"boxes": [[1, 2, 3, 4]], "box_labels": [0]}, "without text needs at least one positive box"),
        ({}, "without text needs at least one positive box"),
        ({"text": "x", "colour": "red"}, "Extra inputs are not permitted"),
    ],
)
def test_a_bad_concept_prompt_is_refused_with_a_readable_reason(prompt: dict[str, object], reason: str) -> None:
    with pytest.raises(ValidationError, match=reason):
        WorkItem.model_validate({"uri": "u", "out_key": "k", "prompts": [prompt]})


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        ({}, "needs 'points', a 'box', or both"),
        ({"points": []}, "at least 1 item"),
        ({"point_labels": [1]}, "needs 'points', a 'box', or both"),
        ({"points": [[1, 2]], "point_labels": [1, 0]}, "point_labels has 2 entries for 1 point"),
        ({"points": [[1, 2, 3]]}, "at most 2 items"),
        ({"points": [[1, 2]], "point_labels": [-1]}, "Input should be 0 or 1"),
        ({"box": [1, 1, 1, 2]}, "x0 < x1 and y0 < y1"),
    ],
)
def test_a_bad_object_prompt_is_refused_with_a_readable_reason(obj: dict[str, object], reason: str) -> None:
    with pytest.raises(ValidationError, match=reason):
        WorkItem.model_validate({"uri": "u", "out_key": "k", "objects": [obj]})


def test_a_job_may_leave_prompts_to_its_manifest_but_not_otherwise() -> None:
    assert JobSpec(job_id="j", prompts=[], output_root="/o", manifest="m.jsonl").prompts == []
    with pytest.raises(ValidationError, match="at least one --prompt"):
        JobSpec(job_id="j", prompts=[], output_root="/o")


def _entries(tmp_path: Path, name: str, text: str) -> list[SourceItem | SourceProblem]:
    path = tmp_path / name
    path.write_text(text)
    return list(ManifestSource(Storage(Settings()), str(path)).entries(None))


def test_jsonl_and_csv_manifests_carry_visual_prompts_to_work_items(tmp_path: Path) -> None:
    jsonl = json.dumps({"uri": "/i/a.png", "prompts": MIXED_PROMPTS, "objects": OBJECTS}) + "\n"
    csv_text = "uri,prompts,objects\n" + ",".join(
        ["/i/a.png", '"' + json.dumps(MIXED_PROMPTS).replace('"', '""') + '"',
         '"' + json.dumps(OBJECTS).replace('"', '""') + '"']) + "\n/i/b.png,dog|cat,\n"
    [from_jsonl] = _entries(tmp_path, "m.jsonl", jsonl)
    from_csv, plain = _entries(tmp_path, "m.csv", csv_text)
    assert isinstance(from_jsonl, SourceItem) and isinstance(from_csv, SourceItem) and isinstance(plain, SourceItem)
    items = [_work_item(entry) for entry in (from_jsonl, from_csv, plain)]
    assert all(isinstance(item, WorkItem) for item in items)
    assert items[0] == items[1], "CSV cells holding JSON lists mean the same as JSONL fields"
    assert isinstance(items[2], WorkItem) and items[2].prompts == ["dog", "cat"] and items[2].objects is None


def test_bad_geometry_in_a_manifest_line_becomes_a_problem_of_that_line_only(tmp_path: Path) -> None:
    lines = [{"uri": "/i/a.png", "objects": [{"box": [9, 9, 1, 1]}]}, {"uri": "/i/b.png", "objects": OBJECTS},
             {"uri": "/i/c.png", "objects": "a box"}]
    entries = _entries(tmp_path, "m.jsonl", "\n".join(json.dumps(line) for line in lines))
    first, second, third = (e if isinstance(e, SourceProblem) else _work_item(e) for e in entries)
    assert isinstance(first, SourceProblem) and "objects.0.box" in first.reason and "x0 < x1" in first.reason
    assert isinstance(second, WorkItem)
    assert isinstance(third, SourceProblem) and "'objects' must be a list" in third.reason


def test_boxes_are_clipped_to_the_image_and_geometry_outside_it_fails_the_image() -> None:
    prompts = [ConceptPrompt(boxes=[(-10, 5, 50, 500)])]
    [fitted] = fit_prompts(["dog", *prompts], (40, 30))[1:]
    assert isinstance(fitted, ConceptPrompt) and fitted.boxes == [(0, 5, 40, 30)]
    [obj] = fit_objects([ObjectPrompt(points=[(40, 30)], box=(35, -5, 90, 10))], (40, 30))
    assert obj.box == (35, 0, 40, 10), "a point on the image's edge is inside"
    with pytest.raises(GeometryError, match=r"object 0 point 0 \[40.5, 3.0\] lies outside the 40x30 image"):
        fit_objects([ObjectPrompt(points=[(40.5, 3)])], (40, 30))
    with pytest.raises(GeometryError, match=r"prompt 0 box 0 .* lies outside the 40x30 image"):
        fit_prompts([ConceptPrompt(boxes=[(41, 0, 60, 10)])], (40, 30))
    assert not has_visual_prompts(["dog"], None) and has_visual_prompts(["dog"], [obj])
