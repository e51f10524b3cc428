"""The store contract, on a directory and on Azurite: create-only, durable names, corruption detected."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from node_runtime.checkpoint import Store, open_store
from node_runtime.checkpoint.store_blob import BlobStore, parse_blob_url
from node_runtime.checkpoint.store_local import LocalStore
from node_runtime.checkpoint.stores import seal, unseal
from node_runtime.errors import CheckpointError
from tests.checkpoint.conftest import blob_container_url


def test_put_get_names_delete(store: Store) -> None:
    assert store.get("a/b") is None
    assert store.names("") == []
    store.put("a/b", b"one")
    store.put("a/c.x", b"two")
    store.put("z", b"")
    assert store.get("a/b") == b"one"
    assert store.get("z") == b""
    assert store.names("") == ["a/b", "a/c.x", "z"]
    assert store.names("a/") == ["a/b", "a/c.x"]
    assert store.names("a/c") == ["a/c.x"]
    assert store.get_many(["a/c.x", "nope", "a/b"]) == [b"two", None, b"one"]
    store.delete("a/b")
    store.delete("a/b")  # deleting what is gone is fine
    assert store.names("a") == ["a/c.x"]


def test_put_is_create_only(store: Store) -> None:
    store.put("obj", b"ours")
    store.put("obj", b"ours")  # a retried identical write is recognised as our own
    with pytest.raises(CheckpointError, match=r"already exists .* different content"):
        store.put("obj", b"theirs")
    assert store.get("obj") == b"ours"


@pytest.mark.parametrize("name", ["", "/abs", "a//b", "../up", "a/../b", ".hidden", "a/.tmp", "sp ace", "a/"])
def test_bad_names_are_refused(store: Store, name: str) -> None:
    with pytest.raises(CheckpointError, match="invalid checkpoint object name"):
        store.put(name, b"x")


def test_seal_detects_truncation_and_corruption() -> None:
    sealed = seal(b"payload" * 100)
    assert unseal(sealed, "x") == b"payload" * 100
    with pytest.raises(CheckpointError, match="torn write"):
        unseal(sealed[:-3], "part p")
    flipped = bytearray(sealed)
    flipped[-1] ^= 1
    with pytest.raises(CheckpointError, match="SHA-256 mismatch"):
        unseal(bytes(flipped), "part p")
    with pytest.raises(CheckpointError, match="not a sealed"):
        unseal(b"garbage", "part p")
    with pytest.raises(CheckpointError, match="not a sealed"):
        unseal(b"", "part p")


def test_local_put_is_durable_and_leaves_no_temp_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "d")
    store.put("x/y/z", b"data")
    assert (tmp_path / "d/x/y/z").read_bytes() == b"data"
    assert sorted(p.name for p in (tmp_path / "d/x/y").iterdir()) == ["z"]
    # a writer killed between its temp file and the link leaves a dot-file, which is never listed or read as data
    (tmp_path / "d/x/y/.z2.123.abcd.tmp").write_bytes(b"half")
    assert store.names("") == ["x/y/z"]
    store.delete("x/y/z")
    assert (tmp_path / "d/x/y").is_dir()  # still holds the stray temp file: not removed


def test_local_delete_prunes_empty_directories(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "d")
    store.put("s/1/p", b"1")
    store.delete("s/1/p")
    assert list((tmp_path / "d").iterdir()) == []


def test_local_write_errors_name_the_location(tmp_path: Path) -> None:
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "a").write_text("a file where a directory is needed")
    with pytest.raises(CheckpointError, match="cannot write checkpoint object 'a/b'"):
        LocalStore(tmp_path / "ro").put("a/b", b"x")
    with pytest.raises(CheckpointError, match="is not a directory"):
        LocalStore(tmp_path / "ro" / "a")


def test_open_store_by_url(tmp_path: Path) -> None:
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    s = open_store(f"file://{tmp_path}/c")
    assert isinstance(s, LocalStore) and s.location == f"{tmp_path}/c"
    s = open_store(environ={"MPILAUNCH_CHECKPOINT_URL": f"file://{tmp_path}/e"})
    assert s.location == f"{tmp_path}/e"
    with pytest.raises(CheckpointError, match="MPILAUNCH_CHECKPOINT_URL"):
        open_store(environ={})
    with pytest.raises(CheckpointError, match="scheme 'ftp'"):
        open_store("ftp://host/x?secret=1")
    with pytest.raises(CheckpointError, match="names host 'otherhost'"):
        open_store("file://otherhost/x")


def test_blob_url_parsing_and_no_secret_in_errors() -> None:
    assert parse_blob_url("https://acct.blob.core.windows.net/ck/a/b?sv=1&sig=SECRET") == (
        "https://acct.blob.core.windows.net", "ck", "a/b", "sv=1&sig=SECRET")
    assert parse_blob_url("http://127.0.0.1:10000/devstoreaccount1/ck?sig=S") == (
        "http://127.0.0.1:10000/devstoreaccount1", "ck", "", "sig=S")
    assert parse_blob_url("http://azurite:10000/devstoreaccount1/ck/p")[:3] == (
        "http://azurite:10000/devstoreaccount1", "ck", "p")
    for bad in ("https://acct.blob.core.windows.net/?sig=SECRET", "http://127.0.0.1:1/devstoreaccount1?sig=SECRET"):
        with pytest.raises(CheckpointError, match="names no blob container") as err:
            parse_blob_url(bad)
        assert "SECRET" not in str(err.value)


@pytest.mark.azurite
def test_blob_store_location_hides_the_sas(azurite: Any) -> None:
    store = open_store(blob_container_url(azurite))
    assert isinstance(store, BlobStore)
    assert "sig" not in store.location and store.location.endswith("/run-1")


@pytest.mark.azurite
def test_blob_errors_are_checkpoint_errors_without_the_sas(azurite: Any) -> None:
    url = blob_container_url(azurite, permission="rl")  # cannot create
    with pytest.raises(CheckpointError, match=r"write 'x' failed \(AuthorizationPermissionMismatch, HTTP 403\)") \
            as err:
        open_store(url).put("x", b"1")
    assert "sig=" not in str(err.value)


@pytest.mark.azurite
def test_blob_lost_response_retry_is_recognised_as_ours(azurite: Any) -> None:
    """The first PUT reaches the server but its response is lost; the SDK retries and meets BlobAlreadyExists."""
    from azure.core.exceptions import ServiceResponseError
    from azure.core.pipeline.transport import RequestsTransport
    from azure.storage.blob import ContainerClient, LinearRetry

    from node_runtime.checkpoint.store_blob import parse_blob_url as parse

    class LosesFirstPutResponse(RequestsTransport):  # type: ignore[misc]
        lost = 0

        def send(self, request: Any, **kwargs: Any) -> Any:
            response = super().send(request, **kwargs)
            if request.method == "PUT" and not self.lost:
                type(self).lost += 1
                raise ServiceResponseError("connection reset while reading the response (simulated)")
            return response

    account_url, container, prefix, sas = parse(blob_container_url(azurite))
    client = ContainerClient(account_url, container, credential=sas, transport=LosesFirstPutResponse(),
                             retry_policy=LinearRetry(backoff=0, random_jitter_range=0, retry_total=3))
    store = BlobStore(client, prefix, "test")
    store.put("obj", b"ours")
    assert LosesFirstPutResponse.lost == 1
    assert store.get("obj") == b"ours"
    with pytest.raises(CheckpointError, match="different content"):
        store.put("obj", b"other")


def test_local_store_survives_hard_link_less_file_systems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    def no_links(src: Any, dst: Any) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    store = LocalStore(tmp_path)
    store.put("a", b"1")
    store.put("a", b"1")
    with pytest.raises(CheckpointError, match="different content"):
        store.put("a", b"2")
    assert store.get("a") == b"1"


@pytest.mark.azurite
def test_blob_objects_beyond_one_sdk_block_still_write_create_only(azurite: Any,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_store(blob_container_url(azurite))  # an rcdl SAS: block uploads ('w') would be refused
    big = os.urandom(65 * 2**20)  # past the SDK's default 64 MiB single-put size
    store.put("steps/1/part-0", big)
    assert store.get("steps/1/part-0") == big
    monkeypatch.setattr("node_runtime.checkpoint.store_blob.MAX_OBJECT_BYTES", 2**20)
    with pytest.raises(CheckpointError, match=r"'steps/1/part-1' is 2 MiB.*at most 1 MiB"):
        store.put("steps/1/part-1", os.urandom(2 * 2**20))
    assert store.names("steps/1/") == ["steps/1/part-0"]
