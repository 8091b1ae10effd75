"""Which images already have a complete output, from ONE listing of the output prefix (no HEAD per image)."""

from __future__ import annotations

import hashlib
from array import array

import numpy as np
import numpy.typing as npt

from sam3_batch.contracts.layout import out_key_of_metadata
from sam3_batch.contracts.storage import Storage


def _hash64(out_key: str) -> int:
    return int.from_bytes(hashlib.blake2b(out_key.encode("utf-8"), digest_size=8).digest(), "little")


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
        return cls(np.frombuffer(found, dtype=np.uint64) if found else np.zeros(0, dtype=np.uint64))

    def __len__(self) -> int:
        return int(self._hashes.shape[0])

    def __contains__(self, out_key: object) -> bool:
        if not isinstance(out_key, str) or not len(self._hashes):
            return False
        value = np.uint64(_hash64(out_key))
        index = int(np.searchsorted(self._hashes, value))
        return index < len(self._hashes) and self._hashes[index] == value
