"""Checkpoint stores: a tiny create-only object interface, chosen by URL, plus checksummed framing.

A store holds immutable objects under ``/``-separated names. ``put`` is *create-only*: writing a name that exists
succeeds only if the existing content is byte-identical (so a retried write whose response was lost is recognised as
our own) and raises :class:`~node_runtime.errors.CheckpointError` otherwise. Every object we write is *sealed*: a header
line carries the SHA-256 and length of the payload, so a torn or corrupted object is detected on read, never used.

URLs: ``file:///abs/dir`` or a plain path (local or shared directory), ``https://ACCOUNT.blob.core.windows.net/
CONTAINER[/PREFIX][?SAS]`` (Azure Blob) and ``http://HOST:PORT/ACCOUNT/CONTAINER[/PREFIX]?SAS`` (Azurite, path-style).
"""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from node_runtime.contract import CHECKPOINT_VARIABLE
from node_runtime.errors import CheckpointError

ENV_URL = CHECKPOINT_VARIABLE
_MAGIC = b"MPLCKPT1"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._=-]*(/[A-Za-z0-9_][A-Za-z0-9._=-]*)*")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def seal(payload: bytes) -> bytes:
    """Frame ``payload`` with its SHA-256 and length so that truncation or corruption is detectable."""
    return b"%s %s %d\n" % (_MAGIC, sha256(payload).encode(), len(payload)) + payload


def unseal(data: bytes, what: str) -> bytes:
    """Return the payload of a sealed object, or raise CheckpointError saying why ``what`` is corrupt."""
    header, sep, payload = data.partition(b"\n")
    parts = header.split(b" ")
    if not sep or len(parts) != 3 or parts[0] != _MAGIC:
        raise CheckpointError(f"{what} is corrupt: not a sealed checkpoint object")
    try:
        length = int(parts[2])
    except ValueError:
        raise CheckpointError(f"{what} is corrupt: bad length field") from None
    if len(payload) != length:
        raise CheckpointError(f"{what} is corrupt: {len(payload)} bytes, header says {length} (torn write?)")
    if sha256(payload) != parts[1].decode(errors="replace"):
        raise CheckpointError(f"{what} is corrupt: SHA-256 mismatch")
    return payload


def check_name(name: str) -> str:
    """Object names: ``/``-separated segments of letters, digits and ``._=-``, never starting with a dot."""
    if not _NAME.fullmatch(name):
        raise CheckpointError(f"invalid checkpoint object name {name!r}")
    return name


class Store(ABC):
    """A create-only object store. ``location`` is safe to print (never contains a SAS)."""

    location: str

    @abstractmethod
    def put(self, name: str, data: bytes) -> None:
        """Durably create ``name``; identical existing content is success, different content is CheckpointError."""

    @abstractmethod
    def get(self, name: str) -> bytes | None:
        """The object's bytes, or None if it does not exist."""

    @abstractmethod
    def names(self, prefix: str) -> list[str]:
        """Sorted names of the objects whose name starts with ``prefix``."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove ``name`` if it exists."""

    def get_many(self, names: Iterable[str]) -> list[bytes | None]:
        """``get`` of several objects, in order (remote stores fetch them concurrently)."""
        return [self.get(n) for n in names]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r})"


class ConcurrentGetStore(Store):
    """Base for remote stores: ``get_many`` runs requests on a small thread pool."""

    workers = 16

    def get_many(self, names: Iterable[str]) -> list[bytes | None]:
        names = list(names)
        if len(names) < 2:
            return [self.get(n) for n in names]
        with ThreadPoolExecutor(min(self.workers, len(names))) as pool:
            return list(pool.map(self.get, names))


class DelegatingStore(Store):
    """Forwards every operation to ``inner``: the base of store wrappers (instrumentation, fault injection)."""

    def __init__(self, inner: Store) -> None:
        self.inner, self.location = inner, inner.location

    def put(self, name: str, data: bytes) -> None:
        self.inner.put(name, data)

    def get(self, name: str) -> bytes | None:
        return self.inner.get(name)

    def names(self, prefix: str) -> list[str]:
        return self.inner.names(prefix)

    def delete(self, name: str) -> None:
        self.inner.delete(name)

    def get_many(self, names: Iterable[str]) -> list[bytes | None]:
        return self.inner.get_many(names)
