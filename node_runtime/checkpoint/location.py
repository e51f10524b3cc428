"""The checkpoint location a URL names, opened as its store (a directory, or an Azure Blob container with a SAS)."""

from __future__ import annotations

from urllib.parse import urlsplit

from node_runtime.checkpoint.store_blob import BlobStore
from node_runtime.checkpoint.store_local import LocalStore
from node_runtime.checkpoint.stores import ENV_URL, Store
from node_runtime.errors import CheckpointError


def open_store(url: str | None = None, *, environ: dict[str, str] | None = None) -> Store:
    """Open the store a URL names; without a URL, the one in ``MPILAUNCH_CHECKPOINT_URL``."""
    if url is None:
        import os

        url = (environ if environ is not None else os.environ).get(ENV_URL, "").strip()
        if not url:
            raise CheckpointError(f"no checkpoint location: pass a URL or set {ENV_URL} "
                                  "(mpilaunch run --checkpoint-url URL sets it for you)")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("", "file"):
        if scheme == "file" and parts.netloc not in ("", "localhost"):
            raise CheckpointError(f"file URL {url!r} names host {parts.netloc!r}: use file:///absolute/path")
        return LocalStore(parts.path if scheme == "file" else url)
    if scheme in ("http", "https"):
        return BlobStore.from_url(url)
    shown = parts._replace(query="").geturl()
    raise CheckpointError(f"unsupported checkpoint URL scheme {parts.scheme!r} in {shown!r}",
                          details=["use a directory path, file:///dir, or an Azure Blob container URL with a SAS"])
