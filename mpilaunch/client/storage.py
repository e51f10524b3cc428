"""Blob storage for task inputs and outputs: parallel, content-addressed uploads and least-privilege SAS URLs.

Inputs are stored as ``inputs/<md5>/<name>``: a file whose content is already there is not uploaded again (the
blob's Content-MD5 is compared with the local file's), and a later upload never changes what a queued or retried
task downloads. Nodes get a read-only SAS; the primary's output uploads get a create/write-only SAS. Both expire
after the task's time budget (see :func:`sas_expiry`). Authentication: connection string, account key, or Entra ID
(user delegation SAS).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

from mpilaunch.client.config import StorageConfig, default_credential
from node_runtime.errors import InvalidInput

INPUT_PREFIX = "inputs"
UploadMonitor = Callable[[int], AbstractContextManager[Callable[[int], None]]]
"""Given the bytes an upload sends, a context in which the function it yields hears of every file sent (the
CLI's progress bar: :func:`mpilaunch.cli.progress.upload_bar`)."""
QUEUE_MARGIN = timedelta(hours=12)
NO_WALL_TIME_EXPIRY = timedelta(days=7)
MAX_DELEGATION = timedelta(days=7)  # user delegation keys live at most 7 days
RUNTIME_SAS_VALIDITY = timedelta(days=365)  # a pool's StartTask downloads the runtime whenever a node (re)starts


@dataclass(frozen=True)
class StagedFile:
    """A file already in Blob storage: ``url`` (with a read SAS) lands at ``file_path`` in the task directory."""

    url: str = field(repr=False)
    file_path: str
    file_mode: str | None = None


def runtime_sas_expiry(now: datetime | None = None) -> datetime:
    """When the runtime's download links (StartTask resource files) expire: :data:`RUNTIME_SAS_VALIDITY` on."""
    return (now or datetime.now(timezone.utc)) + RUNTIME_SAS_VALIDITY


def sas_expiry(wall_time: timedelta | None, retries: int, now: datetime | None = None) -> datetime:
    """When SAS URLs for a task expire: every attempt's wall time plus a margin for queueing; 7 days if unbounded."""
    now = now or datetime.now(timezone.utc)
    if wall_time is None or retries < 0:
        return now + NO_WALL_TIME_EXPIRY
    return now + wall_time * (retries + 1) + QUEUE_MARGIN


@dataclass(frozen=True)
class LocalFile:
    """A local file to stage: ``path`` on this machine, ``rel`` its path in the task directory."""

    path: Path
    rel: str
    md5: bytes
    size: int
    executable: bool

    @property
    def blob_name(self) -> str:
        return f"{INPUT_PREFIX}/{self.md5.hex()}/{Path(self.rel).name}"


@dataclass(frozen=True)
class UploadReport:
    """What :meth:`StagingStore.upload` did: every file, and which were actually sent."""

    files: tuple[LocalFile, ...]
    uploaded: tuple[LocalFile, ...]

    @property
    def skipped(self) -> int:
        return len(self.files) - len(self.uploaded)


def _md5(path: Path) -> bytes:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.digest()


def walk_inputs(paths: Sequence[Path]) -> list[LocalFile]:
    """Every file under ``paths``; a file lands at its name, a directory's files under the directory's name."""
    found: list[tuple[Path, str]] = []
    for top in paths:
        if top.is_file():
            found.append((top, top.name))
        elif top.is_dir():
            for root, dirs, files in os.walk(top):
                dirs.sort()
                found += [(Path(root) / f, (Path(root) / f).relative_to(top.parent).as_posix()) for f in sorted(files)]
        else:
            raise InvalidInput(f"input {str(top)!r} is neither a file nor a directory")
    return [LocalFile(p, rel, _md5(p), p.stat().st_size, os.access(p, os.X_OK)) for p, rel in found]


class StagingStore:
    """One storage account and container, able to upload inputs and mint SAS URLs."""

    def __init__(self, config: StorageConfig, credential: Any = None) -> None:
        from azure.storage.blob import BlobServiceClient

        self.config = config
        self._account_key: str | None = None
        if config.connection_string:
            self.service = BlobServiceClient.from_connection_string(config.connection_string)
            self._account_key = getattr(self.service.credential, "account_key", None)
        elif config.key:
            self.service = BlobServiceClient(config.account_url, credential={
                "account_name": config.account or "", "account_key": config.key})
            self._account_key = config.key
        else:
            self.service = BlobServiceClient(config.account_url, credential=credential or default_credential())
        self.container = self.service.get_container_client(config.container)

    @property
    def account_name(self) -> str:
        return str(self.service.account_name)

    def ensure_container(self) -> None:
        from azure.core.exceptions import ResourceExistsError

        with contextlib.suppress(ResourceExistsError):
            self.container.create_container()

    @property
    def max_sas_validity(self) -> timedelta | None:
        """How long a SAS this store mints can be valid at most (user delegation keys: 7 days), or ``None``."""
        return None if self._account_key else MAX_DELEGATION

    def container_sas_url(self, permission: str, expiry: datetime) -> str:
        """The container URL with a SAS of ``permission`` (e.g. ``"r"``, ``"cw"``) valid until ``expiry``."""
        from azure.storage.blob import generate_container_sas

        return f"{self.container.url}?{self._sas(generate_container_sas, permission, expiry)}"

    def blob_sas_url(self, name: str, permission: str, expiry: datetime) -> str:
        """Blob ``name``'s URL with a SAS of ``permission`` for that blob alone, valid until ``expiry``."""
        from azure.storage.blob import generate_blob_sas

        sas = self._sas(generate_blob_sas, permission, expiry, blob_name=name)
        return f"{self.container.get_blob_client(name).url}?{sas}"

    def _sas(self, generate: Callable[..., str], permission: str, expiry: datetime, **target: str) -> str:
        start = datetime.now(timezone.utc) - timedelta(minutes=5)  # tolerate clock skew between us and the nodes
        if self._account_key:
            return generate(self.account_name, self.config.container, account_key=self._account_key,
                            permission=permission, expiry=expiry, start=start, **target)
        expiry = min(expiry, start + MAX_DELEGATION)
        key = self.service.get_user_delegation_key(start, expiry)
        return generate(self.account_name, self.config.container, user_delegation_key=key,
                        permission=permission, expiry=expiry, start=start, **target)

    def upload(self, files: Sequence[LocalFile], *, workers: int = 8,
               on_progress: Callable[[int], None] | None = None) -> UploadReport:
        """Upload ``files`` in parallel, skipping those whose blob already holds the same content (same MD5)."""
        self.ensure_container()

        def one(f: LocalFile) -> LocalFile | None:
            sent = None if self._has(f) else self._put(f)
            if on_progress:
                on_progress(f.size)
            return sent

        unique = list({f.blob_name: f for f in files}.values())
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            sent = [f for f in pool.map(one, unique) if f is not None]
        return UploadReport(tuple(files), tuple(sent))

    def _has(self, f: LocalFile) -> bool:
        from azure.core.exceptions import ResourceNotFoundError

        try:
            props = self.container.get_blob_client(f.blob_name).get_blob_properties()
        except ResourceNotFoundError:
            return False
        md5 = props.content_settings.content_md5
        return md5 is not None and bytes(md5) == f.md5

    def _put(self, f: LocalFile) -> LocalFile:
        from azure.storage.blob import ContentSettings

        with f.path.open("rb") as fh:
            self.container.get_blob_client(f.blob_name).upload_blob(
                fh, length=f.size, overwrite=True, max_concurrency=2,
                content_settings=ContentSettings(content_md5=bytearray(f.md5)))
        return f

    def staged(self, files: Sequence[LocalFile], read_sas_url: str) -> list[StagedFile]:
        """Resource-file references for uploaded ``files``, readable through ``read_sas_url``'s SAS."""
        base, _, sas = read_sas_url.partition("?")
        return [StagedFile(f"{base}/{quote(f.blob_name)}?{sas}", f.rel, "0755" if f.executable else None)
                for f in files]

    def list_names(self, prefix: str) -> list[str]:
        return [b.name for b in self.container.list_blobs(name_starts_with=prefix)]

    def download(self, name: str) -> bytes:
        return bytes(self.container.get_blob_client(name).download_blob().readall())
