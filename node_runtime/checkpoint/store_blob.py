"""A checkpoint store in an Azure Blob container (or Azurite), addressed by a container URL with a SAS.

Writes are create-only (``If-None-Match: *``) and carry the SHA-256 of the content in the blob's metadata: when a
write's response is lost and the SDK retries it, the retry meets "BlobAlreadyExists" and we recognise the blob as our
own by its hash. azure-storage-blob is imported only when a blob store is opened.
"""

from __future__ import annotations

import ipaddress
from typing import Any, NoReturn
from urllib.parse import urlsplit

from node_runtime.checkpoint.stores import ConcurrentGetStore, check_name, sha256
from node_runtime.errors import CheckpointError

_META = "sha256"


MAX_OBJECT_BYTES = 256 * 2**20
"""Largest object written: one Put Blob, since block uploads need the 'w' permission a create-only SAS lacks."""


def parse_blob_url(url: str) -> tuple[str, str, str, str]:
    """Split a container URL into (account URL, container, prefix, SAS query).

    Host-style (``https://ACCOUNT.blob.core.windows.net/CONTAINER/PREFIX``) unless the host is an IP address,
    ``localhost`` or has no ``.blob.`` label, in which case the account is the first path segment (Azurite style).
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    segments = [s for s in parts.path.split("/") if s]
    try:
        ipaddress.ip_address(host)
        path_style = True
    except ValueError:
        path_style = host == "localhost" or ".blob." not in host
    account_segments = 1 if path_style else 0
    shown = parts._replace(query="").geturl()
    if not host or len(segments) < account_segments + 1:
        raise CheckpointError(f"checkpoint URL {shown!r} names no blob container",
                              details=["expected https://ACCOUNT.blob.core.windows.net/CONTAINER[/PREFIX]?SAS"
                                       " or http://HOST:PORT/ACCOUNT/CONTAINER[/PREFIX]?SAS"])
    account_url = f"{parts.scheme}://{parts.netloc}" + ("/" + segments[0] if path_style else "")
    container = segments[account_segments]
    prefix = "/".join(segments[account_segments + 1:])
    return account_url, container, prefix, parts.query


class BlobStore(ConcurrentGetStore):
    """Objects are block blobs ``PREFIX/NAME`` in one container."""

    def __init__(self, container_client: Any, prefix: str, location: str) -> None:
        self._container = container_client
        self._prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.location = location

    @classmethod
    def from_url(cls, url: str) -> BlobStore:
        account_url, container, prefix, sas = parse_blob_url(url)
        from azure.storage.blob import ContainerClient, ExponentialRetry

        credential: Any = sas or None
        if not sas and account_url.startswith("https://"):
            from azure.identity import DefaultAzureCredential

            credential = DefaultAzureCredential()  # e.g. the node's managed identity
        # Retries after 1, 4, 10, 28, 82 s: rides out ~2 minutes of trouble, then fails the task clearly.
        retry = ExponentialRetry(initial_backoff=1, increment_base=3, retry_total=5)
        client = ContainerClient(account_url, container, credential=credential, retry_policy=retry,
                                 connection_timeout=20, read_timeout=60, max_single_put_size=MAX_OBJECT_BYTES)
        location = f"{account_url}/{container}" + (f"/{prefix}" if prefix else "")
        return cls(client, prefix, location)

    def _fail(self, op: str, name: str, e: Exception) -> NoReturn:
        # Never str(e): service messages can echo request details; status and error code are enough.
        status = getattr(e, "status_code", None)
        code = getattr(e, "error_code", None) or type(e).__name__
        raise CheckpointError(f"blob checkpoint store {self.location!r}: {op} {name!r} failed "
                              f"({code}{f', HTTP {status}' if status else ''})") from None

    def put(self, name: str, data: bytes) -> None:
        from azure.core.exceptions import AzureError, ResourceExistsError, ResourceNotFoundError

        blob = self._prefix + check_name(name)
        if len(data) > MAX_OBJECT_BYTES:
            raise CheckpointError(f"checkpoint object {name!r} is {len(data) / 2**20:.0f} MiB: blob checkpoint stores "
                                  f"write each object in one create-only request of at most "
                                  f"{MAX_OBJECT_BYTES // 2**20} MiB; split the state into smaller parts")
        digest = sha256(data)
        try:
            self._container.upload_blob(blob, data, overwrite=False, metadata={_META: digest})
            return
        except ResourceExistsError:
            failure: AzureError | None = None
        except AzureError as e:
            if getattr(e, "status_code", None) != 403:
                self._fail("write", name, e)
            failure = e  # a create-only SAS ('c' without 'w') answers 403, not 409, when the blob exists
        try:
            theirs = self._container.get_blob_client(blob).get_blob_properties().metadata.get(_META)
        except ResourceNotFoundError:
            self._fail("write", name, failure or RuntimeError("blob vanished"))
        except AzureError as e:
            self._fail("check existing", name, e)
        if theirs != digest:
            raise CheckpointError(f"checkpoint object {name!r} already exists in {self.location!r} "
                                  "with different content (create-only store)")

    def get(self, name: str) -> bytes | None:
        from azure.core.exceptions import AzureError, ResourceNotFoundError

        try:
            data: bytes = self._container.download_blob(self._prefix + check_name(name)).readall()
            return data
        except ResourceNotFoundError:
            return None
        except AzureError as e:
            self._fail("read", name, e)

    def names(self, prefix: str) -> list[str]:
        from azure.core.exceptions import AzureError

        try:
            blobs = self._container.list_blob_names(name_starts_with=self._prefix + prefix)
            return sorted(b[len(self._prefix):] for b in blobs)
        except AzureError as e:
            self._fail("list", prefix, e)

    def delete(self, name: str) -> None:
        from azure.core.exceptions import AzureError, ResourceNotFoundError

        try:
            self._container.delete_blob(self._prefix + check_name(name))
        except ResourceNotFoundError:
            pass
        except AzureError as e:
            self._fail("delete", name, e)
