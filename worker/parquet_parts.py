"""One Parquet part per chunk: the results of its images as rows a data lake reads directly.

One row per (image, prompt), instances as parallel list columns and masks as COCO RLE structs
(the SA-1B-in-Parquet layout). ``sam3_batch.index`` compacts the parts into a few large files.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from sam3_batch.contracts.keys import job_dir_uri, join_uri
from sam3_batch.contracts.schemas import SCHEMA_VERSION, Annotation, ImageMetadata
from sam3_batch.contracts.storage import Storage

PARTS_DIR = "parts"
PARQUET_SUFFIX = ".parquet"
PARQUET_COMPRESSION = "zstd"

RLE_TYPE = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])
BOX_TYPE = pa.list_(pa.float64(), 4)  # fixed size: x0, y0, x1, y1 in pixels

RESULTS_SCHEMA = pa.schema(
    [
        pa.field("job_id", pa.string(), nullable=False),
        pa.field("chunk_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("prompt_index", pa.int32()),  # null on an object prompt's row
        pa.field("object_index", pa.int32()),  # set on an object prompt's row (points and/or box)
        pa.field("prompt_geometry", pa.string()),  # JSON: exemplar boxes, or an object's points/box
        pa.field("presence_score", pa.float64()),
        pa.field("instance_count", pa.int32(), nullable=False),
        pa.field("scores", pa.list_(pa.float64()), nullable=False),
        pa.field("boxes_xyxy", pa.list_(BOX_TYPE), nullable=False),
        pa.field("areas", pa.list_(pa.int64()), nullable=False),
        pa.field("masks", pa.list_(RLE_TYPE), nullable=False),
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("model_revision", pa.string()),
    ],
    metadata={"sam3_batch.schema_version": str(SCHEMA_VERSION), "sam3_batch.layout": "row per image and prompt"},
)


def parts_dir_uri(output_root: str, job_id: str) -> str:
    """The folder holding a job's per-chunk parts."""
    return join_uri(job_dir_uri(output_root, job_id), PARTS_DIR)


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


def part_name(chunk_id: str) -> str:
    """A file name from the chunk id; an id that is not a plain name gets a cleaned name plus its hash."""
    if _SAFE_NAME.fullmatch(chunk_id):
        return chunk_id + PARQUET_SUFFIX
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", chunk_id)[:100].lstrip("._")
    digest = hashlib.sha1(chunk_id.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{cleaned}~{digest}{PARQUET_SUFFIX}"


def part_uri(output_root: str, job_id: str, chunk_id: str) -> str:
    """Where one chunk's part goes: named by the chunk id, so a redelivered chunk overwrites its own part."""
    return join_uri(parts_dir_uri(output_root, job_id), part_name(chunk_id))


def _prompt_row(metadata: ImageMetadata, prompt_index: int, instances: list[Annotation]) -> dict[str, Any]:
    summary = metadata.prompts[prompt_index]
    geometry = {"boxes": summary.boxes, "box_labels": summary.box_labels} if summary.boxes else None
    return _row(metadata, summary.text, summary.presence_score, instances) | {
        "prompt_index": prompt_index, "prompt_geometry": json.dumps(geometry) if geometry else None,
    }


def _object_row(metadata: ImageMetadata, object_index: int, instances: list[Annotation]) -> dict[str, Any]:
    summary = metadata.objects[object_index]
    geometry = summary.model_dump(include={"points", "point_labels", "box"}, exclude_none=True)
    name = instances[0].prompt if instances else f"object:{object_index}"
    return _row(metadata, name, None, instances) | {
        "object_index": object_index, "prompt_geometry": json.dumps(geometry),
    }


def _row(metadata: ImageMetadata, prompt: str, presence: float | None, instances: list[Annotation]) -> dict[str, Any]:
    return {
        "job_id": metadata.job_id, "chunk_id": metadata.chunk_id, "uri": metadata.image.uri,
        "width": metadata.image.width, "height": metadata.image.height,
        "prompt": prompt, "presence_score": presence, "instance_count": len(instances),
        "scores": [a.score for a in instances],
        "boxes_xyxy": [list(a.box_xyxy) for a in instances],
        "areas": [a.area for a in instances],
        "masks": [{"size": list(a.segmentation.size), "counts": a.segmentation.counts} for a in instances],
        "model_id": metadata.model.id, "model_revision": metadata.model.revision,
    }


def result_rows(metadata: ImageMetadata) -> list[dict[str, Any]]:
    """The rows of one image: one per prompt, then one per object prompt, instances in annotation order."""
    by_prompt: list[list[Annotation]] = [[] for _ in metadata.prompts]
    by_object: list[list[Annotation]] = [[] for _ in metadata.objects]
    for annotation in metadata.annotations:
        if annotation.object_index is not None:
            by_object[annotation.object_index].append(annotation)
        elif annotation.prompt_index is not None:
            by_prompt[annotation.prompt_index].append(annotation)
    rows = [_prompt_row(metadata, index, instances) for index, instances in enumerate(by_prompt)]
    return rows + [_object_row(metadata, index, instances) for index, instances in enumerate(by_object)]


def results_table(metadata: Sequence[ImageMetadata]) -> pa.Table:
    """The rows of many images as one Arrow table with ``RESULTS_SCHEMA``."""
    rows = [row for one in metadata for row in result_rows(one)]
    return pa.Table.from_pylist(rows, schema=RESULTS_SCHEMA)


def table_to_parquet(table: pa.Table) -> bytes:
    """A whole table as the bytes of one Parquet file (one row group)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=PARQUET_COMPRESSION, row_group_size=max(table.num_rows, 1))
    return bytes(sink.getvalue().to_pybytes())


def write_chunk_part(
    storage: Storage, output_root: str, job_id: str, chunk_id: str, metadata: Sequence[ImageMetadata]
) -> str | None:
    """Write the chunk's done images as one Parquet part; returns its URI, or None when none is done."""
    if not metadata:
        return None
    uri = part_uri(output_root, job_id, chunk_id)
    storage.write_bytes(uri, table_to_parquet(results_table(metadata)), "application/vnd.apache.parquet")
    return uri
