"""One Parquet part per chunk: the results of its images as rows a data lake reads directly.

One row per (image, prompt), instances as parallel list columns and masks as COCO RLE structs
(the SA-1B-in-Parquet layout). ``sam3_batch.index`` compacts the parts into a few large files.
"""

from __future__ import annotations

import hashlib
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
        pa.field("prompt_index", pa.int32(), nullable=False),
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
    return {
        "job_id": metadata.job_id, "chunk_id": metadata.chunk_id, "uri": metadata.image.uri,
        "width": metadata.image.width, "height": metadata.image.height,
        "prompt": summary.text, "prompt_index": prompt_index, "presence_score": summary.presence_score,
        "instance_count": summary.instance_count,
        "scores": [a.score for a in instances],
        "boxes_xyxy": [list(a.box_xyxy) for a in instances],
        "areas": [a.area for a in instances],
        "masks": [{"size": list(a.segmentation.size), "counts": a.segmentation.counts} for a in instances],
        "model_id": metadata.model.id, "model_revision": metadata.model.revision,
    }


def result_rows(metadata: ImageMetadata) -> list[dict[str, Any]]:
    """The rows of one image: one per prompt, its instances in annotation order."""
    by_prompt: list[list[Annotation]] = [[] for _ in metadata.prompts]
    for annotation in metadata.annotations:
        by_prompt[annotation.prompt_index].append(annotation)
    return [_prompt_row(metadata, index, instances) for index, instances in enumerate(by_prompt)]


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
