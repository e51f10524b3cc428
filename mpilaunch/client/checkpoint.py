"""Where a task keeps its checkpoints: ``--checkpoint LOCATION`` parsed and checked (pure), then made usable.

Accepted forms (see docs/checkpointing.md):

- ``/abs/dir`` or ``file:///abs/dir``: a directory on the nodes (a shared mount), passed as is;
- ``https://ACCOUNT.blob.core.windows.net/CONTAINER[/PREFIX]`` or, path-style (Azurite),
  ``http://HOST:PORT/ACCOUNT/CONTAINER[/PREFIX]``, without a SAS: the client creates the container if needed and
  appends a container SAS granting exactly what the checkpoint stores use (:data:`PERMISSION`), signed like the
  input SAS (account key, or Entra user delegation) and expiring with it (:func:`~.storage.sas_expiry`);
- ``blob:PREFIX``: ``PREFIX`` in the container ``<configured container>-checkpoints``, with such a SAS;
- a Blob URL that already carries a SAS: passed unchanged once its permissions are checked.

Nothing here prints a SAS: :attr:`CheckpointLocation.shown` is the location without its query.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from node_runtime.errors import CheckpointError, InvalidInput

if TYPE_CHECKING:
    from mpilaunch.client.config import StorageConfig
    from mpilaunch.client.storage import StagingStore

# What node_runtime.checkpoint.store_blob does: download + get properties (r), create-only upload (c), delete of old
# batches and checkpoints (d), list (l). No 'w': a SAS without it cannot overwrite an object.
PERMISSION = "rcdl"
SHORT_SCHEME = "blob"
CONTAINER_SUFFIX = "-checkpoints"
"""``blob:PREFIX`` lives in ``<configured container>-checkpoints``: a container SAS cannot be narrowed to a prefix, so
the ranks' SAS must not cover the container holding every task's inputs and outputs."""
FORMS = ("an absolute directory path on the nodes, file:///DIR, https://ACCOUNT.blob.core.windows.net/CONTAINER"
         "[/PREFIX], http://HOST:PORT/ACCOUNT/CONTAINER[/PREFIX] (path-style, e.g. Azurite), or blob:PREFIX "
         "(PREFIX in the container <configured container>-checkpoints)")
_CONTAINER = re.compile(r"[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,62}")
_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._=-]*")


@dataclass(frozen=True)
class CheckpointLocation:
    """A parsed ``--checkpoint`` value.

    ``kind``: ``"directory"`` (path or file URL, used as is), ``"signed"`` (a Blob URL with a SAS, used as is),
    ``"blob"`` (a Blob URL needing a SAS) or ``"configured"`` (``blob:PREFIX``: the configured container).
    """

    text: str = field(repr=False)
    kind: str
    shown: str
    account_url: str | None = None
    container: str | None = None
    prefix: str = ""

    @property
    def needs_sas(self) -> bool:
        return self.kind in ("blob", "configured")


def _bad(text: str, why: str) -> InvalidInput:
    shown = urlsplit(text)._replace(query="", fragment="").geturl() if "?" in text else text
    return InvalidInput(f"invalid checkpoint location {shown!r}: {why}", details=[f"expected {FORMS}"])


def _check_prefix(text: str, prefix: str) -> None:
    bad = [s for s in prefix.split("/") if not _SEGMENT.fullmatch(s)]
    if bad:
        raise _bad(text, f"prefix segment {bad[0]!r} is not letters, digits and '._=-' (not starting with '.')")


def _split_blob(text: str) -> tuple[str, str, str, str]:
    """(account URL, container, prefix, query) the way the nodes will read the URL (store_blob.parse_blob_url)."""
    from node_runtime.checkpoint.store_blob import parse_blob_url

    try:
        return parse_blob_url(text)
    except CheckpointError as exc:
        raise _bad(text, "it names no blob container") from exc


def parse_location(text: str) -> CheckpointLocation:
    """Check ``text`` (no network) and say what it is; :class:`InvalidInput` naming the value otherwise."""
    text = text.strip()
    if not text:
        raise _bad(text, "it is empty")
    if text.startswith("/"):
        return CheckpointLocation(text, "directory", text)
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if not scheme:
        raise _bad(text, "a directory must be an absolute path (the nodes resolve nothing relative to your machine)")
    if parts.fragment:
        raise _bad(text, "a fragment ('#...') has no meaning here")
    if scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/") or parts.query:
            raise _bad(text, "use file:///absolute/path (no host, no query)")
        return CheckpointLocation(text, "directory", text)
    if scheme == SHORT_SCHEME:
        prefix = parts.path.strip("/")
        if parts.netloc or parts.query or not prefix:
            raise _bad(text, f"use {SHORT_SCHEME}:PREFIX, e.g. {SHORT_SCHEME}:sweep-1")
        _check_prefix(text, prefix)
        return CheckpointLocation(text, "configured", text, prefix=prefix)
    if scheme not in ("http", "https"):
        raise _bad(text, f"unknown scheme {parts.scheme!r}")
    return _parse_blob(text)


def _parse_blob(text: str) -> CheckpointLocation:
    parts = urlsplit(text)
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise _bad(text, "malformed port") from None
    shown = parts._replace(query="").geturl()
    account_url, container, prefix, query = _split_blob(text)
    if parts.scheme.lower() == "http" and not urlsplit(account_url).path:  # host-style: real Azure, not an emulator
        raise _bad(shown, "use https for Azure storage (a SAS must not travel in clear text)")
    if not _CONTAINER.fullmatch(container):
        raise _bad(shown, f"{container!r} is not a valid container name (3-63 lowercase letters, digits and "
                          "single hyphens, starting and ending with a letter or digit)")
    if query:
        _check_sas(shown, query)
        return CheckpointLocation(text, "signed", shown, account_url, container, prefix)
    if prefix:
        _check_prefix(shown, prefix)
    return CheckpointLocation(text, "blob", shown, account_url, container, prefix)


def _sas_fields(query: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(query, keep_blank_values=True).items()}


def _check_sas(shown: str, query: str) -> None:
    """A SAS the user brought: it must let the store read, create, delete and list, and must not have expired."""
    sas = _sas_fields(query)
    if "sig" not in sas:
        raise _bad(shown, "its query is not a SAS (no 'sig'): drop the query and let mpilaunch mint one")
    if sas.get("sr", "c") not in ("c", "d"):
        raise _bad(shown, f"its SAS is for resource {sas['sr']!r}: a container (sr=c) or directory SAS is needed "
                          "(the store lists and creates blobs)")
    granted = set(sas.get("sp", ""))
    missing = [p for p in "rdl" if p not in granted] + ([] if granted & {"c", "w"} else ["c"])
    if missing:
        raise _bad(shown, f"its SAS grants {sas.get('sp', '')!r}, the checkpoint store also needs "
                          f"{''.join(missing)!r} (needs {PERMISSION!r})")
    expiry = _expiry(sas.get("se", ""))
    if expiry is not None and expiry <= datetime.now(timezone.utc):
        raise _bad(shown, f"its SAS expired at {sas['se']}")


def _expiry(text: str) -> datetime | None:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def sas_warnings(location: CheckpointLocation, needed_until: datetime) -> list[str]:
    """Warnings about a SAS the user brought: more rights than needed, or an expiry before ``needed_until``."""
    if location.kind != "signed":
        return []
    sas = _sas_fields(urlsplit(location.text).query)
    granted = sas.get("sp", "")
    extra = sorted(set(granted) - set(PERMISSION) - ({"w"} if "c" not in granted else set()))
    warnings = []
    if "srt" in sas:
        warnings.append(f"the SAS of checkpoint location {location.shown!r} is an account SAS (every container of "
                        "the account); omit the SAS and mpilaunch mints a container SAS")
    if extra:
        warnings.append(f"the SAS of checkpoint location {location.shown!r} grants {''.join(extra)!r} beyond what "
                        f"checkpoint stores need ({PERMISSION!r}); omit the SAS and mpilaunch mints a minimal one")
    expiry = _expiry(sas.get("se", ""))
    if expiry is not None and expiry < needed_until:
        warnings.append(f"the SAS of checkpoint location {location.shown!r} expires at {sas['se']}, before the task's "
                        f"time budget ends ({needed_until:%Y-%m-%dT%H:%M:%SZ}); retries after that will fail")
    return warnings


def store_for(location: CheckpointLocation, storage: StorageConfig | None, credential: Any = None) -> StagingStore:
    """The :class:`StagingStore` able to create ``location``'s container and sign for it.

    The configured account's key (or connection string) signs when the URL is on that account; any other account
    gets an Entra ID user-delegation SAS (``credential``, default ``DefaultAzureCredential``).
    """
    from mpilaunch.client.config import StorageConfig
    from mpilaunch.client.storage import StagingStore

    if location.kind == "configured":
        if storage is None:
            raise InvalidInput(f"checkpoint location {location.shown!r} needs a configured storage account: set "
                               "AZURE_STORAGE_CONNECTION_STRING or AZURE_STORAGE_ACCOUNT, or give a full URL")
        container = checkpoint_container(storage.container)
        if not _CONTAINER.fullmatch(container):
            raise InvalidInput(f"checkpoint location {location.shown!r}: container {container!r} (the configured "
                               f"container {storage.container!r} + {CONTAINER_SUFFIX!r}) is not a valid container "
                               "name; use a shorter --container or give a full blob URL")
        return StagingStore(dataclasses.replace(storage, container=container), credential)
    assert location.account_url and location.container
    if storage is not None:
        same = StagingStore(dataclasses.replace(storage, container=location.container), credential)
        if same.service.url.rstrip("/").lower() == location.account_url.lower():
            return same
    return StagingStore(StorageConfig(endpoint=location.account_url, container=location.container), credential)


def checkpoint_container(container: str) -> str:
    """The container ``blob:PREFIX`` locations use, next to the configured ``container``."""
    return container + CONTAINER_SUFFIX


def signed_url(location: CheckpointLocation, store: StagingStore, expiry: datetime) -> str:
    """Create the container if missing; the location's URL with a :data:`PERMISSION` container SAS until ``expiry``."""
    from azure.core.exceptions import AzureError

    try:
        store.ensure_container()
        base, _, sas = store.container_sas_url(PERMISSION, expiry).partition("?")
    except AzureError as exc:  # never str(exc): a service message may echo the request
        code = getattr(exc, "error_code", None) or type(exc).__name__
        status = getattr(exc, "status_code", None)
        raise CheckpointError(f"cannot prepare checkpoint location {location.shown!r}: container "
                              f"{store.config.container!r} at {store.service.url.rstrip('/')} answered {code}"
                              f"{f' (HTTP {status})' if status else ''}") from None
    return f"{base}/{location.prefix}?{sas}" if location.prefix else f"{base}?{sas}"


def usable_url(text: str, storage: StorageConfig | None, expiry: datetime, credential: Any = None) -> str:
    """The value of ``MPILAUNCH_CHECKPOINT_URL`` for ``--checkpoint text``: as given, or signed (see module doc)."""
    location = parse_location(text)
    if not location.needs_sas:
        return location.text
    return signed_url(location, store_for(location, storage, credential), expiry)
