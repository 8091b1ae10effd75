"""The results as Arrow/Parquet rows a data lake reads directly: one row per image, its instances nested.

Why one row per image (with ``instances: list<struct>``) rather than one row per instance: a row is
exactly one ``K.json`` (or one failed image, with its reason), so images with no instance and failed
images are ordinary rows, image-level filters need no DISTINCT, a rerun replaces whole rows, and the
index can be checked row for row against the JSON. Instance-level questions are one ``UNNEST`` away
(DuckDB ``unnest(instances)``, Spark ``explode``, Polars ``explode``); README shows three queries.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from sam3_batch.contracts.layout import JobLayout, OutputLayout
from sam3_batch.contracts.redact import display_uri
from sam3_batch.contracts.schemas import SCHEMA_VERSION, ImageMetadata, ItemOutcome, JobSpec
from sam3_batch.contracts.storage import Storage

PARQUET_COMPRESSION = "zstd"
PARQUET_CONTENT_TYPE = "application/vnd.apache.parquet"

RLE_TYPE = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])
PROMPT_TYPE = pa.struct([
    ("category_id", pa.int32()), ("text", pa.string()), ("presence_score", pa.float64()),
    ("instance_count", pa.int32()),
    ("boxes", pa.list_(pa.list_(pa.float64()))),  # a concept prompt's exemplar boxes (xyxy), if any
    ("box_labels", pa.list_(pa.int32())),
])
OBJECT_TYPE = pa.struct([  # an object prompt (points and/or a box): its input geometry and its mask's score
    ("object_index", pa.int32()), ("points", pa.list_(pa.list_(pa.float64()))),
    ("point_labels", pa.list_(pa.int32())), ("box", pa.list_(pa.float64())), ("score", pa.float64()),
])
INSTANCE_TYPE = pa.struct([
    ("id", pa.int32()), ("category_id", pa.int32()), ("prompt", pa.string()), ("prompt_index", pa.int32()),
    ("object_index", pa.int32()),  # set instead of prompt_index on an object prompt's mask
    ("score", pa.float64()),
    ("bbox", pa.list_(pa.float64())),  # x, y, w, h around the mask (COCO)
    ("pred_box_xyxy", pa.list_(pa.float64())),  # the detector's box
    ("area", pa.int64()), ("segmentation", RLE_TYPE), ("mask_png_uri", pa.string()),
])

RESULTS_SCHEMA = pa.schema(
    [
        pa.field("schema_version", pa.int32(), nullable=False),
        pa.field("job_id", pa.string(), nullable=False),
        pa.field("chunk_id", pa.string(), nullable=False),
        pa.field("out_key", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # done | failed
        pa.field("reason", pa.string()),  # why it failed
        pa.field("metadata_uri", pa.string()),  # K.json, for done images
        pa.field("masked_image_uri", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("model_revision", pa.string()),
        pa.field("model_commit", pa.string()),
        pa.field("score_threshold", pa.float64(), nullable=False),
        pa.field("mask_threshold", pa.float64(), nullable=False),
        pa.field("processed_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("processed_date", pa.date32(), nullable=False),  # for partitioning by day
        pa.field("instance_count", pa.int32(), nullable=False),
        pa.field("prompts", pa.list_(PROMPT_TYPE), nullable=False),
        pa.field("instances", pa.list_(INSTANCE_TYPE), nullable=False),
        pa.field("objects", pa.list_(OBJECT_TYPE), nullable=False),
    ],
    metadata={"sam3_batch.schema_version": str(SCHEMA_VERSION), "sam3_batch.layout": "row per image"},
)
PARTITION_COLUMNS = ("job_id", "status", "processed_date", "model_id")


def _when(moment: datetime) -> dict[str, Any]:
    return {"processed_at": moment, "processed_date": moment.date()}


def done_row(metadata: ImageMetadata, out_key: str, output_root: str, with_json: bool = True) -> dict[str, Any]:
    """The row of one done image: everything its ``K.json`` says, and where its files are (``metadata_uri``
    is None when the job writes no ``K.json``: the chunk layout's default)."""
    return {
        "schema_version": metadata.schema_version, "job_id": metadata.job_id, "chunk_id": metadata.chunk_id,
        "out_key": out_key, "uri": metadata.image.uri, "status": "done", "reason": None,
        "metadata_uri": OutputLayout(output_root, out_key).metadata_uri if with_json else None,
        "masked_image_uri": metadata.masked_image,
        "width": metadata.image.width, "height": metadata.image.height,
        "model_id": metadata.model.id, "model_revision": metadata.model.revision,
        "model_commit": metadata.model.commit,
        "score_threshold": metadata.thresholds.score, "mask_threshold": metadata.thresholds.mask,
        **_when(metadata.processed_at), "instance_count": len(metadata.annotations),
        "prompts": [p.model_dump() for p in metadata.prompts],
        "instances": [
            {
                "id": a.id, "category_id": a.category_id, "prompt": a.prompt, "prompt_index": a.prompt_index,
                "object_index": a.object_index, "score": a.score,
                "bbox": list(a.bbox), "pred_box_xyxy": list(a.pred_box_xyxy), "area": a.area,
                "segmentation": {"size": list(a.segmentation.size), "counts": a.segmentation.counts},
                "mask_png_uri": a.mask_png,
            }
            for a in metadata.annotations
        ],
        "objects": [o.model_dump() for o in metadata.objects],
    }


def failed_row(spec: JobSpec, chunk_id: str, outcome: ItemOutcome, moment: datetime) -> dict[str, Any]:
    """The row of one failed image: its reason, no instances."""
    return {
        "schema_version": SCHEMA_VERSION, "job_id": spec.job_id, "chunk_id": chunk_id,
        "out_key": outcome.out_key or "", "uri": display_uri(outcome.uri), "status": "failed", "reason": outcome.reason,
        "metadata_uri": None, "masked_image_uri": None, "width": None, "height": None,
        "model_id": spec.model_id, "model_revision": spec.model_revision, "model_commit": None,
        "score_threshold": spec.thresholds.score, "mask_threshold": spec.thresholds.mask,
        **_when(moment), "instance_count": 0, "prompts": [], "instances": [], "objects": [],
    }


def chunk_rows(
    spec: JobSpec, chunk_id: str, outcomes: Sequence[ItemOutcome], metadata: Sequence[ImageMetadata]
) -> list[dict[str, Any]]:
    """One row per image of a chunk: done images from their metadata, failed ones from their outcome.

    ``metadata`` holds the done images' documents in the order of the done ``outcomes`` (as ChunkResult).
    """
    done = [o for o in outcomes if o.status == "done"]
    if len(done) != len(metadata):
        raise ValueError(f"{len(done)} done outcomes but {len(metadata)} metadata documents")
    with_json = spec.outputs.writes_per_image_json
    rows = [done_row(m, o.out_key or "", spec.output_root, with_json) for o, m in zip(done, metadata, strict=True)]
    now = datetime.now(UTC)
    rows += [failed_row(spec, chunk_id, o, now) for o in outcomes if o.status == "failed"]
    return rows


def table_to_parquet(table: pa.Table) -> bytes:
    """A whole table as the bytes of one Parquet file (one row group)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=PARQUET_COMPRESSION, row_group_size=max(table.num_rows, 1))
    return bytes(sink.getvalue().to_pybytes())


def chunk_part_uri(spec: JobSpec, chunk_id: str, out_keys: Sequence[str]) -> str:
    """Where a chunk's part goes: by chunk id (image layout), or as its shard, by content (chunk layout)."""
    layout = JobLayout(spec.output_root, spec.job_id)
    if spec.outputs.layout == "chunk":
        return layout.shard_uri(spec.chunk_size or 0, list(out_keys))  # 0: planned before sizes were recorded
    return layout.part_uri(chunk_id)


def encode_chunk_part(
    spec: JobSpec, chunk_id: str, outcomes: Sequence[ItemOutcome], metadata: Sequence[ImageMetadata],
    out_keys: Sequence[str] = (),
) -> tuple[str, bytes] | None:
    """A chunk's images (done and failed) as the URI and bytes of one Parquet part; None when it has none.

    In the chunk layout this part is the chunk's shard and done marker; ``out_keys`` (the chunk's items'
    keys, in message order) name it.
    """
    rows = chunk_rows(spec, chunk_id, outcomes, metadata)
    if not rows:
        return None
    table = pa.Table.from_pylist(rows, schema=RESULTS_SCHEMA)
    return chunk_part_uri(spec, chunk_id, out_keys), table_to_parquet(table)


def write_chunk_part(
    storage: Storage, spec: JobSpec, chunk_id: str, outcomes: Sequence[ItemOutcome],
    metadata: Sequence[ImageMetadata], out_keys: Sequence[str] = (),
) -> str | None:
    """Write a chunk's images (done and failed) as one Parquet part in one PUT; its URI, or None when it has none."""
    part = encode_chunk_part(spec, chunk_id, outcomes, metadata, out_keys)
    if part is None:
        return None
    storage.write_bytes(part[0], part[1], PARQUET_CONTENT_TYPE)
    return part[0]


def read_part_table(storage: Storage, uri: str, columns: Sequence[str] | None = None) -> pa.Table:
    """A part or shard as a table (``columns`` only, if given)."""
    return pq.read_table(pa.BufferReader(storage.read_bytes(uri)), columns=list(columns) if columns else None)


def outcomes_of_shard(table: pa.Table) -> list[ItemOutcome]:
    """How each image of a shard ended, as the job state counts it (a redelivered chunk is counted from these)."""
    return [
        ItemOutcome(uri=row["uri"], status=row["status"], reason=row["reason"], instances=row["instance_count"],
                    out_key=row["out_key"])
        for row in table.select(["uri", "status", "reason", "instance_count", "out_key"]).to_pylist()
    ]


def existing_shard_outcomes(storage: Storage, spec: JobSpec, chunk_id: str,
                            out_keys: Sequence[str]) -> list[ItemOutcome] | None:
    """In the chunk layout, the outcomes a chunk's existing shard records (one HEAD, one GET); else None.

    A redelivered chunk whose shard was written (the worker died before counting it) is counted from its
    shard instead of being segmented again.
    """
    if spec.outputs.layout != "chunk":
        return None
    uri = chunk_part_uri(spec, chunk_id, out_keys)
    if not storage.exists(uri):
        return None
    return outcomes_of_shard(read_part_table(storage, uri, ["uri", "status", "reason", "instance_count", "out_key"]))
