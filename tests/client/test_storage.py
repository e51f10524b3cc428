"""Input staging and SAS URLs against a real Azurite."""

from __future__ import annotations

import os
import urllib.parse
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from azure.core.exceptions import HttpResponseError
from azure.storage.blob import BlobClient, ContainerClient

from mpilaunch.client.api import Launcher
from mpilaunch.client.config import BatchConfig, Settings, StorageConfig
from mpilaunch.client.spec import TaskSpec
from mpilaunch.client.storage import StagingStore, sas_expiry, walk_inputs
from node_runtime.errors import BatchError, InvalidInput
from tests.support.azurite import Azurite

pytestmark = pytest.mark.azurite


@pytest.fixture
def store(azurite: Azurite) -> StagingStore:
    return StagingStore(StorageConfig(connection_string=azurite.connection_string, container=f"t{uuid.uuid4().hex}"))


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "app.py").write_text("print('hi')\n")
    (tmp_path / "app.py").chmod(0o755)
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_text("a")
    (data / "sub" / "b.bin").write_bytes(os.urandom(3 * 1024 * 1024))
    return tmp_path


def test_walk_inputs_keeps_directory_names(tree: Path) -> None:
    files = walk_inputs([tree / "app.py", tree / "data"])
    assert [f.rel for f in files] == ["app.py", "data/a.txt", "data/sub/b.bin"]
    assert files[0].executable and not files[1].executable
    assert files[1].blob_name == "inputs/0cc175b9c0f1b6a831c399e269772661/a.txt"  # md5("a")
    with pytest.raises(InvalidInput, match="nowhere"):
        walk_inputs([tree / "nowhere"])


def test_upload_skips_unchanged_content(store: StagingStore, tree: Path) -> None:
    files = walk_inputs([tree / "app.py", tree / "data"])
    seen: list[int] = []
    first = store.upload(files, on_progress=seen.append)
    assert len(first.uploaded) == 3 and first.skipped == 0
    assert sum(seen) == sum(f.size for f in files)
    assert store.upload(files).uploaded == ()
    (tree / "data" / "a.txt").write_text("changed")
    again = store.upload(walk_inputs([tree / "app.py", tree / "data"]))
    assert [f.rel for f in again.uploaded] == ["data/a.txt"] and again.skipped == 2
    names = store.list_names("inputs/")
    assert len(names) == 4  # the old a.txt stays: a queued task may still need it


def test_upload_replaces_blob_with_wrong_content(store: StagingStore, tree: Path) -> None:
    [f] = walk_inputs([tree / "app.py"])
    store.ensure_container()
    store.container.upload_blob(f.blob_name, b"corrupt", overwrite=True)
    assert len(store.upload([f]).uploaded) == 1
    assert store.download(f.blob_name) == (tree / "app.py").read_bytes()


def test_read_sas_reads_but_cannot_write(store: StagingStore, tree: Path) -> None:
    files = walk_inputs([tree / "data"])
    store.upload(files)
    url = store.container_sas_url("r", datetime.now(UTC) + timedelta(hours=1))
    staged = store.staged(files, url)
    assert [s.file_path for s in staged] == ["data/a.txt", "data/sub/b.bin"]
    assert BlobClient.from_blob_url(staged[0].url).download_blob().readall() == b"a"
    with pytest.raises(HttpResponseError) as err:
        BlobClient.from_blob_url(staged[0].url).upload_blob(b"x", overwrite=True)
    assert err.value.status_code == 403
    assert "sp=r&" in staged[0].url or staged[0].url.endswith("sp=r")


def test_write_sas_creates_but_cannot_read(store: StagingStore) -> None:
    store.ensure_container()
    url = store.container_sas_url("cw", datetime.now(UTC) + timedelta(hours=1))
    container = ContainerClient.from_container_url(url)
    container.upload_blob("outputs/x.txt", b"result")
    assert store.download("outputs/x.txt") == b"result"
    with pytest.raises(HttpResponseError) as err:
        container.get_blob_client("outputs/x.txt").download_blob().readall()
    assert err.value.status_code == 403


def test_expired_sas_is_refused(store: StagingStore, tree: Path) -> None:
    files = walk_inputs([tree / "app.py"])
    store.upload(files)
    [staged] = store.staged(files, store.container_sas_url("r", datetime.now(UTC) - timedelta(minutes=1)))
    with pytest.raises(HttpResponseError) as err:
        BlobClient.from_blob_url(staged.url).download_blob().readall()
    assert err.value.status_code == 403
    assert staged.file_mode == "0755"


def test_account_key_configuration(azurite: Azurite, tree: Path) -> None:
    store = StagingStore(StorageConfig(account=azurite.account, key=azurite.key, endpoint=azurite.blob_endpoint,
                                    container=f"k{uuid.uuid4().hex}"))
    files = walk_inputs([tree / "app.py"])
    assert len(store.upload(files).uploaded) == 1
    url = store.container_sas_url("r", datetime.now(UTC) + timedelta(hours=1))
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    assert query["sp"] == ["r"] and "sig" in query


def test_storage_failures_during_submit_are_errors_not_tracebacks(azurite: Azurite, tree: Path) -> None:
    key = "A" * 86 + "=="  # well-formed base64, not the account's key
    connection = azurite.connection_string.replace(azurite.key, key)
    launcher = Launcher(Settings(BatchConfig("http://127.0.0.1:1", "acct", "a2V5"),
                                 StorageConfig(connection_string=connection, container=f"e{uuid.uuid4().hex}")))
    spec = TaskSpec(job_id="j", task_id="t", nodes=2, argv=("python3", "app.py"), inputs=(tree / "app.py",))
    with pytest.raises(BatchError, match=r"^403: ") as err:
        launcher.build(spec)
    assert key not in str(err.value) and azurite.key not in str(err.value)


def test_sas_expiry_follows_wall_time() -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    assert sas_expiry(timedelta(hours=2), 1, now) == now + timedelta(hours=4 + 12)
    assert sas_expiry(timedelta(hours=2), 0, now) == now + timedelta(hours=14)
    assert sas_expiry(None, 0, now) == now + timedelta(days=7)
    assert sas_expiry(timedelta(hours=1), -1, now) == now + timedelta(days=7)
