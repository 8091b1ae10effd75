"""Storage behind one interface, chosen by URI scheme: ``Storage(settings).read_bytes("s3://b/k")``."""

from contracts.storage.base import Backend, ObjectInfo
from contracts.storage.router import Storage

__all__ = ["Backend", "ObjectInfo", "Storage"]
