"""Storage behind one interface, chosen by URI scheme: ``Storage(settings).read_bytes("s3://b/k")``."""

from sam3_batch.contracts.storage.base import Backend, ObjectInfo
from sam3_batch.contracts.storage.router import Storage

__all__ = ["Backend", "ObjectInfo", "Storage"]
