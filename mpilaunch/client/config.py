"""Where to find Batch and Storage: flags > environment > profile file (the local emulator's: :func:`.local.settings`).

Environment variables (the names Azure tools use)::

    AZURE_BATCH_ENDPOINT, AZURE_BATCH_ACCOUNT, AZURE_BATCH_ACCESS_KEY
    AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT [+ AZURE_STORAGE_KEY] [+ AZURE_STORAGE_BLOB_ENDPOINT]
    MPILAUNCH_POOL, MPILAUNCH_PROFILE, MPILAUNCH_CONFIG (profile file, default ~/.mpilaunch/config.toml)

The profile file is TOML with one table per profile (``[default]``, ``[prod]``...) holding the keys of
:data:`PROFILE_KEYS`. Without a Batch key or a storage key/connection string, Entra ID (``DefaultAzureCredential``)
is used. Keys are kept out of ``repr`` and messages.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the backport (a dependency of the client there)
    import tomli as tomllib
from typing import Any

from node_runtime.errors import InvalidInput

# profile key -> environment variable
PROFILE_KEYS: dict[str, str] = {
    "batch_endpoint": "AZURE_BATCH_ENDPOINT",
    "batch_account": "AZURE_BATCH_ACCOUNT",
    "batch_key": "AZURE_BATCH_ACCESS_KEY",
    "storage_connection_string": "AZURE_STORAGE_CONNECTION_STRING",
    "storage_account": "AZURE_STORAGE_ACCOUNT",
    "storage_key": "AZURE_STORAGE_KEY",
    "storage_endpoint": "AZURE_STORAGE_BLOB_ENDPOINT",
    "pool": "MPILAUNCH_POOL",
    "container": "MPILAUNCH_CONTAINER",
}
DEFAULT_CONTAINER = "mpilaunch"


def home() -> Path:
    """mpilaunch's per-user directory (``$MPILAUNCH_HOME`` or ``~/.mpilaunch``)."""
    return Path(os.environ.get("MPILAUNCH_HOME") or Path.home() / ".mpilaunch")


def default_credential() -> Any:
    """Entra ID: ``DefaultAzureCredential`` (environment, managed identity, Azure CLI, ...)."""
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential()


@dataclass(frozen=True)
class BatchConfig:
    """A Batch account: endpoint URL, account name, and a shared key (``None``: use Entra ID)."""

    endpoint: str
    account: str | None = None
    key: str | None = field(default=None, repr=False)

    def client(self, credential: Any = None) -> Any:
        """A ``BatchClient``: shared key if there is one, else ``credential`` or ``DefaultAzureCredential``."""
        from azure.batch import BatchClient
        from azure.core.credentials import AzureNamedKeyCredential

        if self.key:
            if not self.account:
                raise InvalidInput("a Batch access key needs the account name too (AZURE_BATCH_ACCOUNT)")
            return BatchClient(self.endpoint, AzureNamedKeyCredential(self.account, self.key))
        return BatchClient(self.endpoint, credential or default_credential())


@dataclass(frozen=True)
class StorageConfig:
    """A Blob storage account by connection string, by account (+ key), or by endpoint; and our container."""

    connection_string: str | None = field(default=None, repr=False)
    account: str | None = None
    key: str | None = field(default=None, repr=False)
    endpoint: str | None = None
    container: str = DEFAULT_CONTAINER

    @property
    def account_url(self) -> str:
        if self.endpoint:
            return self.endpoint.rstrip("/")
        if self.account:
            return f"https://{self.account}.blob.core.windows.net"
        raise InvalidInput("no storage account: set AZURE_STORAGE_CONNECTION_STRING or AZURE_STORAGE_ACCOUNT")


@dataclass(frozen=True)
class Settings:
    """Everything a command needs to reach the services."""

    batch: BatchConfig
    storage: StorageConfig | None
    pool: str | None = None
    local: bool = False


def load_profile(name: str | None, environ: Mapping[str, str]) -> dict[str, str]:
    """The named profile (default ``default``) from the profile file; {} if the file or default profile is absent."""
    path = Path(environ.get("MPILAUNCH_CONFIG") or home() / "config.toml")
    wanted = name or environ.get("MPILAUNCH_PROFILE")
    if not path.exists():
        if wanted:
            raise InvalidInput(f"profile {wanted!r} asked for, but the profile file {str(path)!r} does not exist")
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InvalidInput(f"cannot read profile file {str(path)!r}: {exc}") from exc
    profile = data.get(wanted or "default")
    if profile is None:
        if wanted:
            raise InvalidInput(f"profile {wanted!r} not found in {str(path)!r} (has: {', '.join(sorted(data))})")
        return {}
    unknown = sorted(set(profile) - set(PROFILE_KEYS))
    if unknown or not isinstance(profile, dict):
        raise InvalidInput(f"unknown keys {unknown} in profile {wanted or 'default'!r} of {str(path)!r}; "
                           f"known: {', '.join(PROFILE_KEYS)}")
    return {k: str(v) for k, v in profile.items()}


def resolve_settings(flags: Mapping[str, str | None], environ: Mapping[str, str] | None = None,
            profile: str | None = None) -> Settings:
    """Merge flags (keys of :data:`PROFILE_KEYS`) > environment > profile into :class:`Settings`."""
    environ = os.environ if environ is None else environ
    prof = load_profile(profile, environ)
    values = {key: flags.get(key) or environ.get(var) or prof.get(key) for key, var in PROFILE_KEYS.items()}
    endpoint = values["batch_endpoint"]
    if not endpoint:
        raise InvalidInput("no Batch endpoint: pass --endpoint, set AZURE_BATCH_ENDPOINT, add batch_endpoint to a "
                           "profile, or use --local")
    batch = BatchConfig(endpoint, values["batch_account"], values["batch_key"])
    storage = None
    if values["storage_connection_string"] or values["storage_account"] or values["storage_endpoint"]:
        storage = StorageConfig(values["storage_connection_string"], values["storage_account"],
                                values["storage_key"], values["storage_endpoint"],
                                values["container"] or DEFAULT_CONTAINER)
    return Settings(batch, storage, values["pool"])
