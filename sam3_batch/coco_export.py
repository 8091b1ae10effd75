"""COCO instances JSON from the per-image results, sharded: files ``pycocotools.coco.COCO`` and supervision load.

Image ids and annotation ids are 1-based and unique across all shards; categories are the prompts
(by text, in order of first appearance; an image's own ``category_id`` is its prompt index + 1, so it is
remapped). Each shard lists the categories known when it was written; ids never change between shards.
``file_name`` is the image's output key: for a local input folder, the path relative to that folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sam3_batch.contracts.layout import JobLayout, coco_shard_uri
from sam3_batch.contracts.schemas import ImageMetadata
from sam3_batch.contracts.storage import Storage
from sam3_batch.results import iter_metadata

ALL_JOBS = "_all"  # the export folder's job id when a whole output root is exported


@dataclass
class CocoExportSummary:
    """What an export wrote."""

    images: int = 0
    annotations: int = 0
    categories: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


class _Shard:
    """One COCO file being assembled."""

    def __init__(self) -> None:
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []


class CocoWriter:
    """Assigns global ids and writes a shard every ``images_per_file`` images."""

    def __init__(self, storage: Storage, folder: str, images_per_file: int) -> None:
        if images_per_file < 1:
            raise ValueError(f"images_per_file must be at least 1, got {images_per_file}")
        self.storage, self.folder, self.images_per_file = storage, folder, images_per_file
        self.summary = CocoExportSummary()
        self._category_ids: dict[str, int] = {}
        self._shard = _Shard()

    def _category(self, text: str) -> int:
        if text not in self._category_ids:
            self._category_ids[text] = len(self._category_ids) + 1
            self.summary.categories.append(text)
        return self._category_ids[text]

    def add(self, out_key: str, metadata: ImageMetadata) -> None:
        self.summary.images += 1
        image_id = self.summary.images
        self._shard.images.append({
            "id": image_id, "file_name": out_key, "width": metadata.image.width, "height": metadata.image.height,
            "coco_url": metadata.image.uri,
        })
        for annotation in metadata.annotations:
            self.summary.annotations += 1
            self._shard.annotations.append({
                "id": self.summary.annotations, "image_id": image_id,
                "category_id": self._category(annotation.prompt),
                "segmentation": {"size": list(annotation.segmentation.size), "counts": annotation.segmentation.counts},
                "area": annotation.area, "bbox": list(annotation.bbox), "iscrowd": 0, "score": annotation.score,
            })
        for prompt in metadata.prompts:
            self._category(prompt.text)
        if len(self._shard.images) >= self.images_per_file:
            self.flush()

    def flush(self) -> None:
        """Write the shard being assembled (an export of nothing still writes one, empty, file)."""
        if not self._shard.images and self.summary.files:
            return
        document = {
            "info": {"description": "sam3-batch results", "version": "1.0"},
            "images": self._shard.images, "annotations": self._shard.annotations,
            "categories": [
                {"id": i, "name": name, "supercategory": "prompt"} for name, i in self._category_ids.items()
            ],
        }
        uri = coco_shard_uri(self.folder, len(self.summary.files))
        self.storage.write_bytes(uri, json.dumps(document).encode(), "application/json")
        self.summary.files.append(uri)
        self._shard = _Shard()


def export_coco(storage: Storage, output_root: str, job_id: str | None = None, *,
                images_per_file: int = 10_000, dest: str | None = None) -> CocoExportSummary:
    """Write ``<job dir>/coco/instances-00000.json, ...`` (or under ``dest``) for a job or a whole root."""
    folder = dest or JobLayout(output_root, job_id or ALL_JOBS).coco_dir
    writer = CocoWriter(storage, folder, images_per_file)
    for out_key, metadata in iter_metadata(storage, output_root, job_id):
        writer.add(out_key, metadata)
    writer.flush()
    return writer.summary

