"""Fixtures of the checkpoint tests: a store of each kind, behind one contract."""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from node_runtime.checkpoint import Store, open_store


def blob_container_url(azurite: Any, permission: str = "rcdl") -> str:
    """A fresh container on Azurite and a container URL with a SAS of ``permission`` (no 'w': create-only)."""
    from azure.storage.blob import BlobServiceClient, ContainerSasPermissions, generate_container_sas

    name = f"ck-{uuid.uuid4().hex[:12]}"
    BlobServiceClient.from_connection_string(azurite.connection_string).create_container(name)
    sas = generate_container_sas(azurite.account, name, account_key=azurite.key,
                                 permission=ContainerSasPermissions.from_string(permission),
                                 expiry=datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=2))
    return f"{azurite.blob_endpoint}/{name}/run-1?{sas}"


@pytest.fixture(params=["local", pytest.param("blob", marks=pytest.mark.azurite)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "ckpt")
    return blob_container_url(request.getfixturevalue("azurite"))


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    yield open_store(store_url)
