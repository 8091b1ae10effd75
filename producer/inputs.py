"""From what the user gave (inputs, ``--manifest``) to the one ``Source`` that lists it."""

from __future__ import annotations

from sam3_batch.contracts.errors import BadUriError
from sam3_batch.contracts.keys import IMAGE_EXTENSIONS, key_from_uri
from sam3_batch.contracts.redact import display_uri
from sam3_batch.contracts.storage import Storage
from sam3_batch.contracts.storage.local import local_path
from sam3_batch.producer.inventory import InventorySource, is_inventory_manifest
from sam3_batch.producer.sources import ManifestSource, PrefixSource, Source, UrlSource


def open_source(storage: Storage, inputs: list[str], manifest: str | None = None,
                exclude_root: str | None = None) -> Source:
    """Choose the source from what the user gave: a manifest, http(s) URLs, or one prefix/folder.

    An S3 Inventory ``manifest.json`` (given as ``--manifest`` or as the only input) is read with
    ``InventorySource``; with ``--manifest``, one input names the prefix to take from the inventory.
    ``exclude_root`` (the job's output root) is never listed as input.
    """
    if manifest and is_inventory_manifest(manifest):
        if len(inputs) > 1:
            raise BadUriError("with an S3 Inventory manifest, give at most one prefix to take from it")
        return InventorySource(storage, manifest, prefix=inputs[0] if inputs else "")
    if len(inputs) == 1 and not manifest and is_inventory_manifest(inputs[0]):
        return InventorySource(storage, inputs[0])
    if manifest:
        return ManifestSource(storage, manifest)
    if inputs and all(i.startswith(("http://", "https://")) for i in inputs):
        for url in inputs:  # a URL typed on the command line is checked now, not after the model loads
            key_from_uri(url)
        return UrlSource(inputs)
    if len(inputs) != 1:
        raise BadUriError("give one S3 prefix or folder, or http(s) URLs, or --manifest FILE")
    source = inputs[0]
    scheme = source.split("://", 1)[0] if "://" in source else ""
    if scheme not in ("", "s3", "file"):
        raise BadUriError(f"unsupported input scheme {scheme!r}: use s3://, file://, a path or http(s) URLs")
    if scheme != "s3":
        _check_local_input(source)
    return PrefixSource(storage, source, exclude_root=exclude_root)


def _check_local_input(source: str) -> None:
    """A local input is an existing folder or one image file; anything else is an error, not an empty job."""
    path = local_path(source)
    if path.is_dir():
        return
    if not path.exists():
        raise BadUriError(f"input {display_uri(source)} does not exist")
    if not path.is_file():
        raise BadUriError(f"input {display_uri(source)} is not a folder or a regular file")
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise BadUriError(f"input {display_uri(source)} is a file without an image extension "
                          f"({', '.join(sorted(IMAGE_EXTENSIONS))}); use --manifest for a list of images")
