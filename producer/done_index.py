"""Which images already have a complete output, from ONE listing of the output prefix (no HEAD per image).

Image layout: every ``K.json`` marks its image done (``DoneIndex``). Chunk layout: every shard marks its
whole chunk done (``ShardIndex``), found by listing ``<root>/_jobs/`` once; a chunk planned now is done when
a shard with the same name (chunk size + digest of its output keys) exists, whichever job wrote it.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

from sam3_batch.contracts.layout import (
    SHARD_DIGEST_BYTES,
    jobs_dir_uri,
    out_key_of_metadata,
    shard_digest,
    shard_of_jobs_key,
)
from sam3_batch.contracts.storage import Storage


def _hash64(out_key: str) -> int:
    return int.from_bytes(hashlib.blake2b(out_key.encode("utf-8"), digest_size=8).digest(), "little")


def _hashes(values: array[int]) -> npt.NDArray[np.uint64]:
    return np.frombuffer(values, dtype=np.uint64) if values else np.zeros(0, dtype=np.uint64)


class DoneIndex:
    """A sorted array of 64-bit key hashes: 8 bytes per done image, so millions fit in a few MB."""

    def __init__(self, hashes: npt.NDArray[np.uint64]) -> None:
        self._hashes = np.sort(hashes)

    @classmethod
    def from_output_root(cls, storage: Storage, output_root: str) -> DoneIndex:
        """List the output root once; every metadata JSON found marks its image done."""
        found = array("Q")  # 8 bytes per key while listing, not a Python int object each
        for obj in storage.list_objects(output_root):
            out_key = out_key_of_metadata(obj.relative_key)
            if out_key is not None:
                found.append(_hash64(out_key))
        return cls(_hashes(found))

    @classmethod
    def of_keys(cls, out_keys: Iterable[str]) -> DoneIndex:
        """An index of the given done keys."""
        return cls(_hashes(array("Q", (_hash64(key) for key in out_keys))))

    def __len__(self) -> int:
        return int(self._hashes.shape[0])

    def __contains__(self, out_key: object) -> bool:
        if not isinstance(out_key, str) or not len(self._hashes):
            return False
        value = np.uint64(_hash64(out_key))
        index = int(np.searchsorted(self._hashes, value))
        return index < len(self._hashes) and self._hashes[index] == value


def _done_keys_of_shards(storage: Storage, uris: list[str]) -> Iterable[str]:
    from sam3_batch.contracts.lake import read_part_table  # pyarrow: only when such shards exist

    for uri in uris:
        table = read_part_table(storage, uri, ["out_key", "status"])
        for out_key, status in zip(table.column("out_key").to_pylist(), table.column("status").to_pylist(),
                                   strict=True):
            if status == "done":
                yield out_key


class ShardIndex:
    """The chunk layout's done chunks: 16-byte shard digests, sorted (0.5 B per image at chunks of 32).

    Shards planned with another chunk size can never match a chunk planned now, so their images are read
    from the shards themselves (one GET each, two columns) into a per-image ``DoneIndex``: a rerun with a
    different ``--chunk-size`` still skips every done image, at the price of reading those shards.
    """

    def __init__(self, digests: npt.NDArray[np.void], images: DoneIndex, shards: int, shards_read: int) -> None:
        self._digests = np.sort(digests)
        self.images = images
        self.shards, self.shards_read = shards, shards_read

    @classmethod
    def from_output_root(cls, storage: Storage, output_root: str, chunk_size: int) -> ShardIndex:
        """List ``<root>/_jobs/`` once; read only shards planned with another chunk size."""
        digests, others, shards = bytearray(), [], 0
        for obj in storage.list_objects(jobs_dir_uri(output_root)):
            key = shard_of_jobs_key(obj.relative_key)
            if key is None:
                continue
            shards += 1
            if key.chunk_size == chunk_size:
                digests += bytes.fromhex(key.digest)
            else:
                others.append(obj.uri)
        images = DoneIndex.of_keys(_done_keys_of_shards(storage, others)) if others else DoneIndex.of_keys([])
        return cls(np.frombuffer(bytes(digests), dtype=f"V{SHARD_DIGEST_BYTES}"), images, shards, len(others))

    def chunk_done(self, out_keys: list[str]) -> bool:
        """True when a shard of exactly this chunk (same keys, same order, same chunk size) exists."""
        if not len(self._digests):
            return False
        value = np.frombuffer(bytes.fromhex(shard_digest(out_keys)), dtype=f"V{SHARD_DIGEST_BYTES}")[0]
        index = int(np.searchsorted(self._digests, value))
        return index < len(self._digests) and bytes(self._digests[index]) == bytes(value)

    def __contains__(self, out_key: object) -> bool:
        return out_key in self.images
