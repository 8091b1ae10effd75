"""Where everything lives under an output root: the one home of the output layout.

Per image (``K`` is the image's output key)::

    K.json                      metadata, written LAST (the done marker)
    K.masks/pPP_iIII.png        --png-masks: one PNG per instance
    K.masked.png|jpg            --masked: the overlay or cut-out rendering

Per job::

    _jobs/JOB/report.json       the job report, once the job ends
    _jobs/JOB/parts/*.parquet   one Parquet part per chunk (worker output), named by the chunk id
    _jobs/JOB/parts/sN-D.parquet   chunk layout: the chunk's shard, its done marker (N: the job's chunk size,
                                D: a digest of the chunk's output keys, so any job or generation that plans
                                the same chunk names the same shard; written last, in one PUT)
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
SHARD_DIGEST_BYTES = 16
# <job>/parts/s<chunk size>-<digest>.parquet, relative to the _jobs/ folder
_SHARD_KEY = re.compile(rf"[^/]+/{PARTS_DIR}/s(\d+)-([0-9a-f]{{{2 * SHARD_DIGEST_BYTES}}})\{PARQUET_SUFFIX}")
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

    def shard_uri(self, chunk_size: int, out_keys: list[str]) -> str:
        """The chunk layout's shard of a chunk: named by what the chunk holds, not by its id."""
        return join_uri(self.parts_dir, shard_name(chunk_size, out_keys))

    @property
    def index_dir(self) -> str:
        return join_uri(self.job_dir, INDEX_DIR)

    @property
    def coco_dir(self) -> str:
        return join_uri(self.job_dir, COCO_DIR)



def shard_digest(out_keys: list[str]) -> str:
    """A digest of a chunk's output keys in order: equal for equal chunks, whichever job planned them."""
    digest = hashlib.blake2b(digest_size=SHARD_DIGEST_BYTES)
    for key in out_keys:
        digest.update(key.encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()


def shard_name(chunk_size: int, out_keys: list[str]) -> str:
    """``s<chunk size>-<digest>.parquet``: the size says with which chunking the shard was planned."""
    return f"s{chunk_size}-{shard_digest(out_keys)}{PARQUET_SUFFIX}"


@dataclass(frozen=True)
class ShardKey:
    """A chunk layout shard found in a listing of ``<root>/_jobs/``."""

    job_id: str
    chunk_size: int
    digest: str


def shard_of_jobs_key(relative_key: str) -> ShardKey | None:
    """The shard a key relative to ``<root>/_jobs/`` names; None for any other object."""
    match = _SHARD_KEY.fullmatch(relative_key)
    if match is None:
        return None
    return ShardKey(relative_key.split("/", 1)[0], int(match.group(1)), match.group(2))


def jobs_dir_uri(output_root: str) -> str:
    """The folder holding every job's folder (one LIST of it finds every shard of an output root)."""
    return join_uri(output_root, JOB_DIR)


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
