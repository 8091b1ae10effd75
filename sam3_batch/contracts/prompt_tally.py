"""Counts of what a job's images were asked (text, exemplar boxes, objects) and what each kind found.

Read from the results' Parquet rows with Arrow compute (no Python object per instance), during the
compaction that already reads every row once.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from sam3_batch.contracts.schemas import PromptCounts

PROMPT_NAMES_KEPT = 1000  # a manifest may give every image its own prompt: the report keeps the top ones


def _sum(values: pa.Array | pa.ChunkedArray) -> int:
    return int(pc.sum(values).as_py() or 0)


def _count(mask: pa.Array | pa.ChunkedArray) -> int:
    return _sum(pc.cast(pc.fill_null(mask, False), pa.int64()))


@dataclass
class PromptTally:
    """Accumulates prompt counts over tables of results rows (schema ``lake.RESULTS_SCHEMA``)."""

    text_prompts: int = 0
    exemplar_prompts: int = 0
    exemplar_boxes: int = 0
    negative_boxes: int = 0
    objects: int = 0
    by_kind: Counter[str] = field(default_factory=Counter)
    by_prompt: Counter[str] = field(default_factory=Counter)

    def add(self, table: pa.Table) -> None:
        """Count the prompts, objects and instances of ``table``'s rows."""
        prompts = pc.list_flatten(table.column("prompts"))
        if len(prompts):
            box_counts = pc.fill_null(pc.list_value_length(pc.struct_field(prompts, "boxes")), 0)
            boxed = pc.greater(box_counts, 0)
            found = pc.struct_field(prompts, "instance_count")
            self.exemplar_prompts += _count(boxed)
            self.text_prompts += len(prompts) - _count(boxed)
            self.exemplar_boxes += _sum(box_counts)
            self.negative_boxes += _count(pc.equal(pc.list_flatten(pc.struct_field(prompts, "box_labels")), 0))
            self.by_kind["exemplar"] += _sum(pc.filter(found, boxed))
            self.by_kind["text"] += _sum(pc.filter(found, pc.invert(boxed)))
        self.objects += _sum(pc.list_value_length(table.column("objects")))
        instances = pc.list_flatten(table.column("instances"))
        if len(instances):
            self.by_kind["object"] += _count(pc.is_valid(pc.struct_field(instances, "object_index")))
            for entry in pc.value_counts(pc.struct_field(instances, "prompt")).to_pylist():
                if entry["values"] is not None:
                    self.by_prompt[entry["values"]] += entry["counts"]

    def counts(self) -> PromptCounts:
        """The totals as the report carries them."""
        return PromptCounts(
            text_prompts=self.text_prompts, exemplar_prompts=self.exemplar_prompts,
            exemplar_boxes=self.exemplar_boxes, negative_boxes=self.negative_boxes, objects=self.objects,
            instances_by_kind={kind: n for kind, n in self.by_kind.items() if n},
            instances_by_prompt=dict(self.by_prompt.most_common(PROMPT_NAMES_KEPT)),
        )
