"""Remote login through the unmodified azure-batch 15.1 SDK over HTTP: Add/Update/Delete Node User and Get Remote
Login Settings on process nodes, then a real OpenSSH login to the node; Batch's validation and error bodies."""

from __future__ import annotations

import json
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from azure.batch import models as m
from azure.batch.models._models import BatchNodeRebootOptions, BatchNodeReimageOptions  # the SDK takes, unexported
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

from mpilaunch.client.nodelogin import new_key
from mpilaunch.emulator.nodes.process import ProcessProvider, isolation_available
from mpilaunch.emulator.server import EmulatorServer
from tests.support.emulator import RunningEmulator, start_emulator
from tests.support.exec_engine import wait_for
from tests.support.exec_sdk import Batch, make_pool

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(not isolation_available(), reason="per-node accounts need root and unshare")]


class Key:
    """A fresh Ed25519 key pair in ``directory``."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path, self.public = new_key(directory)


@pytest.fixture
def key(tmp_path: Path) -> Key:
    return Key(tmp_path / "key")


@pytest.fixture(scope="module")
def pool(emulator: RunningEmulator) -> Any:
    """A pool of one idle process node on the session emulator (deleted afterwards)."""
    session = Batch(emulator.client())
    session.pools.append(make_pool(session.client, 1))
    yield session.pools[0]
    session.cleanup()


def node_of(client: Any, pool_id: str) -> Any:
    return next(iter(client.list_nodes(pool_id)))


def user(name: str, key: Key | None = None, **kwargs: Any) -> m.BatchNodeUserCreateOptions:
    return m.BatchNodeUserCreateOptions(name=name, ssh_public_key=key.public if key else None, **kwargs)


def ssh(settings: Any, login: str, key: Key, command: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Real OpenSSH to the node as ``login`` with ``key``, running ``command``."""
    return subprocess.run(
        ["ssh", "-i", str(key.path), "-p", str(settings.remote_login_port), "-o", "BatchMode=yes",
         "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={tmp_path}/kh",
         "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10", f"{login}@{settings.remote_login_ip_address}", command],
        capture_output=True, text=True, timeout=60, check=False)


def error(call: Any) -> tuple[int, str, dict[str, str]]:
    """The status, Batch error code and values of a failing SDK call."""
    with pytest.raises(HttpResponseError) as caught:
        call()
    doc = caught.value.response.json()
    assert doc["message"]["value"] and caught.value.error.code == doc["code"]  # a Batch error body, as the SDK reads
    return caught.value.status_code, doc["code"], {v["key"]: v["value"] for v in doc.get("values", [])}


def test_a_node_user_logs_in_with_its_key_until_deleted(emulator: RunningEmulator, pool: str, key: Key,
                                                        tmp_path: Path) -> None:
    client = emulator.client()
    node = node_of(client, pool)
    client.create_node_user(pool, node.id, user("alice", key))
    settings = client.get_node_remote_login_settings(pool, node.id)
    assert settings.remote_login_ip_address == node.ip_address and settings.remote_login_port > 0
    assert settings.get("mpilaunchLoginName") is None  # a real account: log in by its own name
    again = client.get_node_remote_login_settings(pool, node.id)
    assert again.remote_login_port == settings.remote_login_port  # one sshd per node, started once

    done = ssh(settings, "alice", key, "id -un; id -Gn; hostname; echo $AZ_BATCH_NODE_ID $AZ_BATCH_POOL_ID; "
               "echo $HOME; ls -d $AZ_BATCH_NODE_SHARED_DIR", tmp_path)
    assert done.returncode == 0, done.stderr
    name, groups, hostname, ids, home, shared = done.stdout.split("\n")[:6]
    assert name == "alice" and "sudo" not in groups.split()  # isAdmin defaults to false
    assert hostname == node.id.lower().replace("_", "-")  # the node's own host name: the session is on the node
    assert ids == f"{node.id} {pool}" and home == "/home/alice" and shared == "/mnt/batch/tasks/shared"

    client.delete_node_user(pool, node.id, "alice")
    assert ssh(settings, "alice", key, "true", tmp_path).returncode == 255  # refused
    assert error(lambda: client.delete_node_user(pool, node.id, "alice"))[:2] == (404, "NodeUserNotFound")


def test_add_twice_update_and_admin(emulator: RunningEmulator, pool: str, tmp_path: Path) -> None:
    client = emulator.client()
    node = node_of(client, pool).id
    first, second = Key(tmp_path / "a"), Key(tmp_path / "b")
    client.create_node_user(pool, node, user("bob", first, is_admin=True))
    assert error(lambda: client.create_node_user(pool, node, user("bob", second)))[:2] == (409, "NodeUserExists")
    settings = client.get_node_remote_login_settings(pool, node)
    assert "sudo" in ssh(settings, "bob", first, "id -Gn", tmp_path).stdout.split()

    # Replace: every updatable property is replaced; the old key no longer opens the account, the new one does.
    client.replace_node_user(pool, node, "bob", m.BatchNodeUserReplaceOptions(ssh_public_key=second.public))
    assert ssh(settings, "bob", first, "true", tmp_path).returncode == 255
    done = ssh(settings, "bob", second, "id -Gn", tmp_path)
    assert done.returncode == 0 and "sudo" in done.stdout.split(), done.stderr  # isAdmin is not updatable
    assert error(lambda: client.replace_node_user(
        pool, node, "nobody-here", m.BatchNodeUserReplaceOptions(ssh_public_key=second.public)))[:2] == (
        404, "NodeUserNotFound")
    client.delete_node_user(pool, node, "bob")


def test_an_expired_user_cannot_log_in_and_is_gone(emulator: RunningEmulator, pool: str, key: Key,
                                                   tmp_path: Path) -> None:
    client = emulator.client()
    node = node_of(client, pool).id
    soon = datetime.now(timezone.utc) + timedelta(seconds=3)
    client.create_node_user(pool, node, user("carol", key, expiry_time=soon))
    settings = client.get_node_remote_login_settings(pool, node)
    assert ssh(settings, "carol", key, "true", tmp_path).returncode == 0
    time.sleep(max(0.0, (soon - datetime.now(timezone.utc)).total_seconds()) + 1.5)
    assert ssh(settings, "carol", key, "true", tmp_path).returncode == 255  # sshd refuses the expired key
    assert error(lambda: client.delete_node_user(pool, node, "carol"))[:2] == (404, "NodeUserNotFound")
    client.create_node_user(pool, node, user("carol", key))  # the name is free again
    client.delete_node_user(pool, node, "carol")


def test_a_password_is_stored_only_as_a_hash(emulator: RunningEmulator, pool: str) -> None:
    client = emulator.client()
    node = node_of(client, pool).id
    client.create_node_user(pool, node, m.BatchNodeUserCreateOptions(name="dave", password="s3cret-Pa55"))
    state = emulator.data_dir / "nodes" / pool / f"{node}.login"
    users = {u["name"]: u for u in json.loads((state / "users.json").read_text())}
    assert users["dave"]["passwordHash"].startswith("$6$") and users["dave"]["sshPublicKey"] is None
    shadow = (state / "etc" / "shadow").read_text()
    assert "s3cret" not in shadow + (state / "users.json").read_text()
    assert f"dave:{users['dave']['passwordHash']}:" in shadow
    assert (state / "users.json").stat().st_mode & 0o777 == 0o600
    client.delete_node_user(pool, node, "dave")


@pytest.mark.parametrize(("body", "status", "code", "prop"), [
    ({"name": "x" * 21, "sshPublicKey": "KEY"}, 400, "InvalidPropertyValue", "name"),
    ({"name": "-dash", "sshPublicKey": "KEY"}, 400, "InvalidPropertyValue", "name"),
    ({"name": "a b", "sshPublicKey": "KEY"}, 400, "InvalidPropertyValue", "name"),
    ({"name": "1234", "sshPublicKey": "KEY"}, 400, "InvalidPropertyValue", "name"),
    ({"name": "", "sshPublicKey": "KEY"}, 400, "InvalidPropertyValue", "name"),
    ({"sshPublicKey": "KEY"}, 400, "MissingRequiredProperty", "name"),
    ({"name": "eve"}, 400, "MissingRequiredProperty", "sshPublicKey"),
    ({"name": "eve", "password": ""}, 400, "MissingRequiredProperty", "sshPublicKey"),
    ({"name": "eve", "sshPublicKey": "ssh-ed25519 not-base64!"}, 400, "InvalidPropertyValue", "sshPublicKey"),
    ({"name": "eve", "sshPublicKey": "KEY\nssh-ed25519 AAAA"}, 400, "InvalidPropertyValue", "sshPublicKey"),
    ({"name": "eve", "sshPublicKey": "ssh-dss AAAAB3NzaC1kc3M="}, 400, "InvalidPropertyValue", "sshPublicKey"),
    ({"name": "eve", "sshPublicKey": "ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIA=="}, 400, "InvalidPropertyValue",
     "sshPublicKey"),
    ({"name": "eve", "sshPublicKey": "KEY", "expiryTime": "2001-01-01T00:00:00Z"}, 400, "InvalidPropertyValue",
     "expiryTime"),
    ({"name": "eve", "sshPublicKey": "KEY", "expiryTime": "tomorrow"}, 400, "InvalidPropertyValue", "expiryTime"),
    ({"name": "eve", "sshPublicKey": "KEY", "isAdmin": "yes"}, 400, "InvalidPropertyValue", "isAdmin"),
    ({"name": "eve", "password": "a\nb"}, 400, "InvalidPropertyValue", "password"),
    ({"name": ["eve"], "sshPublicKey": "KEY"}, 400, "InvalidPropertyValue", "name"),
    ({"name": "root", "sshPublicKey": "KEY"}, 409, "NodeUserExists", None),  # the node's OS has that account
    ({"name": "mpl-login", "sshPublicKey": "KEY"}, 409, "NodeUserExists", None),
])
def test_add_user_is_validated_as_batch_does(emulator: RunningEmulator, pool: str, key: Key, body: dict[str, Any],
                                             status: int, code: str, prop: str | None) -> None:
    node = node_of(emulator.client(), pool).id
    if body.get("sshPublicKey") == "KEY":
        body = {**body, "sshPublicKey": key.public}
    elif isinstance(body.get("sshPublicKey"), str):
        body = {**body, "sshPublicKey": body["sshPublicKey"].replace("KEY", key.public)}
    resp = emulator.raw("POST", f"/pools/{pool}/nodes/{node}/users", json_body=body)
    assert resp.status_code == status, resp.text
    doc = resp.json()
    assert doc["code"] == code and doc["message"]["value"]
    if prop:
        assert {"key": "PropertyName", "value": prop} in doc["values"]
    assert "s3cret" not in resp.text


@pytest.mark.parametrize(("method", "suffix", "body"), [
    ("POST", "users", {"name": "frank", "sshPublicKey": "KEY"}),
    ("PUT", "users/frank", {"sshPublicKey": "KEY"}),
    ("DELETE", "users/frank", None),
    ("GET", "remoteloginsettings", None),
])
def test_missing_pools_and_nodes_are_404s(emulator: RunningEmulator, pool: str, key: Key, method: str, suffix: str,
                                          body: dict[str, Any] | None) -> None:
    body = {k: key.public if v == "KEY" else v for k, v in body.items()} if body else None
    node = node_of(emulator.client(), pool).id
    for path, code in ((f"/pools/no-such-pool/nodes/{node}/{suffix}", "PoolNotFound"),
                       (f"/pools/{pool}/nodes/tvmps_nope_d/{suffix}", "NodeNotFound")):
        resp = emulator.raw(method, path, json_body=body)
        assert (resp.status_code, resp.json()["code"]) == (404, code), resp.text


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b'"name"', b"null"])
def test_bad_bodies_are_400s(emulator: RunningEmulator, pool: str, raw: bytes) -> None:
    node = node_of(emulator.client(), pool).id
    for method, suffix in (("POST", "users"), ("PUT", "users/someone")):
        resp = emulator.raw(method, f"/pools/{pool}/nodes/{node}/{suffix}", data=raw,
                            headers={"Content-Type": "application/json; odata=minimalmetadata"})
        assert resp.status_code == 400 and resp.json()["code"], resp.text


def test_a_reboot_keeps_users_and_a_reimage_loses_them(batch: Batch, emulator: RunningEmulator, key: Key,
                                                        tmp_path: Path) -> None:
    client = batch.client
    pool_id = batch.pool(1)
    node = node_of(client, pool_id).id
    client.create_node_user(pool_id, node, user("grace", key))
    client.get_node_remote_login_settings(pool_id, node)

    def idle() -> bool:
        return bool(client.get_node(pool_id, node).state == m.BatchNodeState.IDLE)

    poller = client.begin_reboot_node(pool_id, node, BatchNodeRebootOptions(node_reboot_kind="requeue"),
                                      polling_interval=0)
    status, code, _ = error(lambda: client.create_node_user(pool_id, node, user("heidi", key)))
    assert status == 409 and code in ("NodeBeingRebooted", "NodeBeingStarted")
    poller.result()
    wait_for(idle, 30, "the rebooted node idle")
    settings = client.get_node_remote_login_settings(pool_id, node)  # the sshd died with the reboot: started again
    done = ssh(settings, "grace", key, "id -un", tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "grace", done.stderr

    client.begin_reimage_node(pool_id, node, BatchNodeReimageOptions(node_reimage_option="requeue"),
                              polling_interval=0).result()
    wait_for(idle, 30, "the reimaged node idle")
    settings = client.get_node_remote_login_settings(pool_id, node)
    assert ssh(settings, "grace", key, "true", tmp_path).returncode == 255
    with pytest.raises(ResourceNotFoundError):
        client.delete_node_user(pool_id, node, "grace")


def test_users_survive_an_emulator_restart(tmp_path: Path, key: Key) -> None:
    """A restart is a reboot: the node keeps its users and its host key; its sshd starts again on first use."""
    with start_emulator(tmp_path / "data") as emu:
        client = emu.client()
        pool_id = make_pool(client, 1)
        node = node_of(client, pool_id).id
        client.create_node_user(pool_id, node, user("leo", key))
        known = host_key(client.get_node_remote_login_settings(pool_id, node), tmp_path / "known")
        emu.restart()
        client = emu.client()
        wait_for(lambda: client.get_node(pool_id, node).state == m.BatchNodeState.IDLE, 60, "the node idle again")
        after = client.get_node_remote_login_settings(pool_id, node)
        done = subprocess.run(  # the host key recorded before the restart must match
            ["ssh", "-i", str(key.path), "-p", str(after.remote_login_port), "-o", "BatchMode=yes",
             "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known}", "-o", "HostKeyAlias=node",
             "-o", "IdentitiesOnly=yes", f"leo@{after.remote_login_ip_address}", "id -un"],
            capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0 and done.stdout.strip() == "leo", done.stderr


def host_key(settings: Any, known: Path) -> Path:
    """Record the node's host key now, under the name ``node``, in ``known``."""
    scan = subprocess.run(["ssh-keyscan", "-t", "ed25519", "-p", str(settings.remote_login_port),
                           settings.remote_login_ip_address], capture_output=True, text=True, timeout=30, check=True)
    known.write_text(f"node {scan.stdout.strip().splitlines()[0].split(None, 1)[1]}\n")
    return known


def test_nodes_without_accounts_of_their_own_map_users_to_the_emulators(tmp_path: Path, key: Key) -> None:
    """Process nodes without per-node namespaces (an emulator run by an ordinary user): every node user logs in as
    the emulator's OS account, which remote login settings name (``mpilaunchLoginName``); keys and expiry hold."""
    import getpass

    server = EmulatorServer(tmp_path / "data", port=0, provider=ProcessProvider(isolate=False))
    server.start()
    try:
        from azure.batch import BatchClient
        from azure.core.credentials import AzureNamedKeyCredential

        from mpilaunch.emulator import defaults

        client = BatchClient(server.endpoint, AzureNamedKeyCredential(defaults.ACCOUNT, defaults.KEY))
        pool_id = make_pool(client, 1)
        node = node_of(client, pool_id)
        client.create_node_user(pool_id, node.id, user("ivan", key))
        settings = client.get_node_remote_login_settings(pool_id, node.id)
        login = settings.get("mpilaunchLoginName")
        assert login == getpass.getuser()
        done = ssh(settings, login, key, "echo $AZ_BATCH_NODE_ID; pwd", tmp_path)
        assert done.returncode == 0 and done.stdout.split() == [node.id, str(Path.home())], done.stderr
        client.delete_node_user(pool_id, node.id, "ivan")
        assert ssh(settings, login, key, "true", tmp_path).returncode == 255
    finally:
        server.stop()
    assert not [p for p in _sshd_of(tmp_path)]  # the emulator's stop ends the node's sshd


def _sshd_of(directory: Path) -> list[int]:
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        if any(str(directory) in part for part in p.info["cmdline"] or ()) and "sshd" in " ".join(
                p.info["cmdline"] or ()):
            found.append(p.pid)
    return found
