"""Results as Python objects: what ``segment`` returns and ``read_results`` yields, one per image.

A ``Result`` wraps the per-image metadata document (``K.json``, schema in README) and decodes masks
only when asked (``masks()``, ``to_supervision()``), so iterating a million results stays cheap.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from sam3_batch.contracts.layout import JOB_DIR, JobLayout, ShardKey, out_key_of_metadata, shard_of_jobs_key
from sam3_batch.contracts.schemas import (
    RLE,
    Annotation,
    Category,
    ImageInfo,
    ImageMetadata,
    ModelInfo,
    PromptSummary,
    Thresholds,
)
from sam3_batch.contracts.settings import Settings

if TYPE_CHECKING:
    import supervision as sv

    from sam3_batch.contracts.storage import Storage


@dataclass(frozen=True)
class Result:
    """One segmented image: its metadata document, masks decoded on demand."""

    metadata: ImageMetadata
    out_key: str | None = None

    @property
    def uri(self) -> str:
        return self.metadata.image.uri

    @property
    def size_wh(self) -> tuple[int, int]:
        return (self.metadata.image.width, self.metadata.image.height)

    @property
    def annotations(self) -> list[Annotation]:
        return self.metadata.annotations

    @property
    def prompts(self) -> list[str]:
        return [p.text for p in self.metadata.prompts]

    def masks(self) -> npt.NDArray[np.bool_]:
        """The (N, H, W) bool masks of every instance, in ``annotations`` order (EXIF-upright frame)."""
        from pycocotools import mask as mask_utils

        width, height = self.size_wh
        if not self.annotations:
            return np.zeros((0, height, width), dtype=bool)
        rles = [_coco_rle(a.segmentation) for a in self.annotations]
        decoded: npt.NDArray[np.uint8] = mask_utils.decode(rles)  # (H, W, N)
        return np.ascontiguousarray(decoded.transpose(2, 0, 1)).astype(bool)

    def to_supervision(self) -> sv.Detections:
        """``supervision.Detections``: boxes around the masks (xyxy), scores, class ids = prompt indices.

        Masks stay compressed (``CompactMask`` from the RLEs) where supervision offers it; ``data`` carries
        ``class_name`` (the prompt) and ``pred_box_xyxy`` (the detector's box). Needs the ``supervision`` extra.
        """
        import supervision as sv

        count = len(self.annotations)
        xyxy = np.array([_xywh_to_xyxy(a.bbox) for a in self.annotations], dtype=np.float32).reshape(count, 4)
        return sv.Detections(
            xyxy=xyxy, mask=self._supervision_masks(xyxy),
            confidence=np.array([a.score for a in self.annotations], dtype=np.float32),
            class_id=np.array([a.prompt_index for a in self.annotations], dtype=int),
            data={
                "class_name": np.array([a.prompt for a in self.annotations], dtype=str),
                "pred_box_xyxy": np.array([a.pred_box_xyxy for a in self.annotations],
                                          dtype=np.float32).reshape(count, 4),
            },
        )

    def _supervision_masks(self, xyxy: npt.NDArray[np.float32]) -> Any:
        try:
            from supervision.detection.compact_mask import CompactMask
        except ImportError:  # an older supervision: dense masks
            return self.masks()
        width, height = self.size_wh
        # CompactMask crops at boxes with inclusive maxima; an empty mask gets the whole image.
        crops = np.array([
            [x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)] if x1 > x0 else [0, 0, width - 1, height - 1]
            for x0, y0, x1, y1 in xyxy.tolist()
        ], dtype=np.float32).reshape(len(xyxy), 4)
        rles = [{"size": list(a.segmentation.size), "counts": a.segmentation.counts} for a in self.annotations]
        return CompactMask.from_coco_rle(rles, crops, (height, width))


def _xywh_to_xyxy(box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    x, y, w, h = box
    return (x, y, x + w, y + h)


def _coco_rle(rle: RLE) -> dict[str, Any]:
    return {"size": list(rle.size), "counts": rle.counts.encode("utf-8")}


def is_output_root(job_or_root: str) -> bool:
    """True when the argument names a folder or URI rather than a job id."""
    return "://" in job_or_root or "/" in job_or_root or Path(job_or_root).is_dir()


def _resolve(job_or_root: str, settings: Settings) -> tuple[str, str | None]:
    if is_output_root(job_or_root):
        return job_or_root, None
    from sam3_batch.contracts.jobstate import RedisJobStore

    return RedisJobStore(settings.state_redis_url()).spec(job_or_root).output_root, job_or_root


def read_results(
    root_or_job: str, *, job_id: str | None = None, from_index: bool = False, settings: Settings | None = None,
) -> Iterator[Result]:
    """Every done image's result under an output root (folder or ``s3://`` prefix) or of a job id (in Redis).

    ``job_id`` keeps one job's images (an output root may hold several jobs). Either output layout is read
    (per-image ``K.json`` or chunk shards). ``from_index`` reads the job's compacted Parquet index instead
    (one request per file, not per image or chunk).
    """
    from sam3_batch.contracts.storage import Storage

    settings = settings or Settings()
    root, resolved_job = _resolve(root_or_job, settings)
    job_id = job_id or resolved_job
    storage = Storage(settings)
    if from_index:
        if job_id is None:
            raise ValueError("reading the Parquet index needs the job id: pass job_id=")
        yield from _from_index(storage, JobLayout(root, job_id).index_dir)
        return
    for out_key, metadata in iter_metadata(storage, root, job_id):
        yield Result(metadata, out_key)


def iter_metadata(storage: Storage, output_root: str, job_id: str | None = None) -> Iterator[tuple[str, ImageMetadata]]:
    """(out_key, metadata) of every done image under an output root; one job's only if given.

    One listing finds both layouts: ``K.json`` files (yielded in key order) and chunk layout shards (read
    after the listing, a GET per shard). A shard row whose image also has a ``K.json`` (``--per-image-json``)
    is not yielded twice, nor is an image that two shards hold (a rerun without ``--skip-existing``, a
    ``retry-failed`` chunk): the first shard listed wins.
    """
    shards: list[str] = []
    for info in storage.list_objects(output_root):
        shard = _shard_of(info.relative_key)
        if shard is not None:
            if job_id is None or shard.job_id == job_id:
                shards.append(info.uri)
            continue
        out_key = out_key_of_metadata(info.relative_key)
        if out_key is None:
            continue
        metadata = ImageMetadata.model_validate_json(storage.read_bytes(info.uri))
        if job_id is None or metadata.job_id == job_id:
            yield out_key, metadata
    yield from _shard_metadata(storage, shards, job_id)


def _shard_of(relative_key: str) -> ShardKey | None:
    prefix = JOB_DIR + "/"
    return shard_of_jobs_key(relative_key[len(prefix):]) if relative_key.startswith(prefix) else None


def _shard_metadata(storage: Storage, uris: list[str], job_id: str | None) -> Iterator[tuple[str, ImageMetadata]]:
    from sam3_batch.contracts.lake import read_part_table

    seen: set[str] = set()  # the keys yielded from shards (exact: a hash collision would drop an image)
    for uri in uris:
        for row in read_part_table(storage, uri).to_pylist():
            if row["status"] != "done" or row["metadata_uri"] is not None:  # the K.json was yielded already
                continue
            if job_id is not None and row["job_id"] != job_id:
                continue
            if row["out_key"] in seen:
                continue
            seen.add(row["out_key"])
            yield row["out_key"], metadata_of_row(row)


def _from_index(storage: Storage, index_dir: str) -> Iterator[Result]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for info in storage.list_objects(index_dir):
        if not info.relative_key.endswith(".parquet"):
            continue
        table = pq.read_table(pa.BufferReader(storage.read_bytes(info.uri)), partitioning=None)
        partition = _hive_values(info.relative_key)
        for row in table.to_pylist():
            row = {**partition, **row}
            if row["status"] == "done":
                yield Result(metadata_of_row(row), row["out_key"])


def _hive_values(relative_key: str) -> dict[str, str]:
    """Column values a hive-partitioned path carries (``status=done/part-0.parquet``)."""
    from urllib.parse import unquote

    pairs = (segment.split("=", 1) for segment in relative_key.split("/")[:-1] if "=" in segment)
    return {key: unquote(value) for key, value in pairs}


def metadata_of_row(row: dict[str, Any]) -> ImageMetadata:
    """The metadata document a done index row was made from (timings are not in the index)."""
    prompts = [PromptSummary(**p) for p in row["prompts"]]
    return ImageMetadata(
        schema_version=row["schema_version"], job_id=row["job_id"], chunk_id=row["chunk_id"],
        image=ImageInfo(uri=row["uri"], width=row["width"], height=row["height"],
                        file_name=row["uri"].rstrip("/").rsplit("/", 1)[-1]),
        model=ModelInfo(id=row["model_id"], revision=row["model_revision"], commit=row["model_commit"]),
        thresholds=Thresholds(score=row["score_threshold"], mask=row["mask_threshold"]),
        categories=[Category(id=p.category_id, name=p.text) for p in prompts], prompts=prompts,
        annotations=[
            Annotation(
                id=i["id"], category_id=i["category_id"], prompt=i["prompt"], prompt_index=i["prompt_index"],
                score=i["score"], bbox=tuple(i["bbox"]), pred_box_xyxy=tuple(i["pred_box_xyxy"]), area=i["area"],
                segmentation=RLE(size=tuple(i["segmentation"]["size"]), counts=i["segmentation"]["counts"]),
                mask_png=i["mask_png_uri"],
            )
            for i in row["instances"]
        ],
        masked_image=row["masked_image_uri"], processed_at=row["processed_at"],
    )

