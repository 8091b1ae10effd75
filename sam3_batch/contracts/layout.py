"""Where everything lives under an output root: the one home of the output layout.

Per image (``K`` is the image's output key)::

    K.json                      metadata, written LAST (the done marker)
    K.masks/pPP_iIII.png        --png-masks: one PNG per instance
    K.masked.png|jpg            --masked: the overlay or cut-out rendering

Per job::

    _jobs/JOB/report.json       the job report, once the job ends
    _jobs/JOB/parts/*.parquet   one Parquet part per chunk (worker output)
    _jobs/JOB/index/*.parquet   the compacted index (automatic when the job completes; ``sam3-batch index``)
    _jobs/JOB/coco/*.json       ``sam3-batch export --format coco``

The Arrow schema of the parts and the index is ``sam3_batch.contracts.lake``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

JOB_DIR = "_jobs"
METADATA_SUFFIX = ".json"
PARQUET_SUFFIX = ".parquet"
PARTS_DIR = "parts"
INDEX_DIR = "index"
COCO_DIR = "coco"
REPORT_NAME = "report.json"
INDEX_FILE_TEMPLATE = "part-{i}" + PARQUET_SUFFIX  # pyarrow.dataset basename_template
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


def join_uri(root: str, key: str) -> str:
    """``root`` (s3://b/p, file:///p or a path) joined with a relative '/'-separated key."""
    return f"{root.rstrip('/')}/{key.lstrip('/')}"


@dataclass(frozen=True)
class OutputLayout:
    """Where everything for one image goes under the output root."""

    output_root: str
    out_key: str

    @property
    def metadata_uri(self) -> str:
        return join_uri(self.output_root, self.out_key + METADATA_SUFFIX)

    def mask_png_uri(self, prompt_index: int, instance_index: int) -> str:
        return join_uri(self.output_root, f"{self.out_key}.masks/p{prompt_index:02d}_i{instance_index:03d}.png")

    def object_png_uri(self, object_index: int) -> str:
        return join_uri(self.output_root, f"{self.out_key}.masks/o{object_index:03d}.png")

    def masked_image_uri(self, output_format: str) -> str:
        return join_uri(self.output_root, f"{self.out_key}.masked.{output_format}")


def out_key_of_metadata(relative_key: str) -> str | None:
    """Inverse of ``OutputLayout.metadata_uri`` for a listed relative key; None for other objects."""
    if relative_key.startswith(JOB_DIR + "/") or not relative_key.endswith(METADATA_SUFFIX):
        return None
    return relative_key[: -len(METADATA_SUFFIX)]


def _file_name(name: str, suffix: str) -> str:
    """A file name from an id; an id that is not a plain name gets a cleaned name plus its hash."""
    if _SAFE_NAME.fullmatch(name):
        return name + suffix
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:100].lstrip("._")
    digest = hashlib.sha1(name.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{cleaned}~{digest}{suffix}"


@dataclass(frozen=True)
class JobLayout:
    """Where a job's own objects go under the output root."""

    output_root: str
    job_id: str

    @property
    def job_dir(self) -> str:
        return join_uri(self.output_root, f"{JOB_DIR}/{self.job_id}")

    @property
    def report_uri(self) -> str:
        return join_uri(self.job_dir, REPORT_NAME)

    @property
    def parts_dir(self) -> str:
        return join_uri(self.job_dir, PARTS_DIR)

    def part_uri(self, chunk_id: str) -> str:
        """Named by the chunk id, so a redelivered chunk overwrites its own part."""
        return join_uri(self.parts_dir, _file_name(chunk_id, PARQUET_SUFFIX))

    @property
    def index_dir(self) -> str:
        return join_uri(self.job_dir, INDEX_DIR)

    @property
    def coco_dir(self) -> str:
        return join_uri(self.job_dir, COCO_DIR)



def coco_shard_uri(folder: str, shard: int) -> str:
    """The n-th file of a COCO export in ``folder``: deterministic, so a rerun replaces it."""
    return join_uri(folder, f"instances-{shard:05d}.json")


def job_dir_uri(output_root: str, job_id: str) -> str:
    """The folder under the output root that holds a job's report, Parquet parts, index and exports."""
    return JobLayout(output_root, job_id).job_dir


def report_uri(output_root: str, job_id: str) -> str:
    """Where a job's report lives."""
    return JobLayout(output_root, job_id).report_uri


def index_dir_uri(output_root: str, job_id: str) -> str:
    """The folder holding a job's compacted index."""
    return JobLayout(output_root, job_id).index_dir


def parts_dir_uri(output_root: str, job_id: str) -> str:
    """The folder holding a job's per-chunk parts."""
    return JobLayout(output_root, job_id).parts_dir


def part_uri(output_root: str, job_id: str, chunk_id: str) -> str:
    """Where one chunk's Parquet part goes."""
    return JobLayout(output_root, job_id).part_uri(chunk_id)
