"""Remote login to docker nodes (real accounts in the node container, the image's sshd) and VM-like nodes without an
sshd (refused, saying why), through the unmodified azure-batch SDK over HTTP."""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.batch import models as m
from azure.core.exceptions import HttpResponseError

from mpilaunch.client.nodelogin import new_key
from tests.docker.test_emulator_docker import DockerEmulator, container_pool
from tests.docker.test_vm_nodes import start_emulator, vm_pool
from tests.support.docker import SESSION_PREFIX, DockerScope, docker
from tests.support.exec_engine import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def emu(docker_image: str, vm_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerEmulator]:
    """An emulator with docker nodes of the task image and VM-like nodes of the bare image."""
    scope = DockerScope(f"{SESSION_PREFIX}-{secrets.token_hex(3)}")
    emulator = start_emulator(tmp_path_factory.mktemp("login") / "emulator", scope.prefix, vm_image)
    emulator.image = docker_image
    try:
        yield emulator
    finally:
        emulator.server.stop()
        scope.cleanup()


def ssh(settings: Any, login: str, key: Path, command: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ssh", "-i", str(key), "-p", str(settings.remote_login_port), "-o", "BatchMode=yes", "-o",
         "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={tmp_path}/kh",
         "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10", f"{login}@{settings.remote_login_ip_address}", command],
        capture_output=True, text=True, timeout=60, check=False)


def test_a_docker_node_user_is_a_real_account_in_the_node_container(emu: DockerEmulator, tmp_path: Path) -> None:
    client = emu.client()
    job_id = container_pool(emu, 1)
    pool_id = client.get_job(job_id).pool_info.pool_id
    node = next(iter(client.list_nodes(pool_id)))
    key, public = new_key(tmp_path)
    client.create_node_user(pool_id, node.id, m.BatchNodeUserCreateOptions(name="judy", ssh_public_key=public,
                                                                           is_admin=True))
    settings = client.get_node_remote_login_settings(pool_id, node.id)
    assert (settings.remote_login_ip_address, settings.remote_login_port) == (node.ip_address, 22)
    done = ssh(settings, "judy", key, "id -un; id -Gn; hostname; echo $AZ_BATCH_NODE_ID", tmp_path)
    assert done.returncode == 0, done.stderr
    name, groups, hostname, node_id = done.stdout.split("\n")[:4]
    container = emu.node(pool_id, node.id).data["container"]
    assert name == "judy" and "sudo" in groups.split() and node_id == node.id
    assert hostname == docker("inspect", "-f", "{{.Config.Hostname}}", container).stdout.strip()
    assert docker("exec", container, "getent", "passwd", "judy").stdout.startswith("judy:")

    client.delete_node_user(pool_id, node.id, "judy")
    assert docker("exec", container, "getent", "passwd", "judy", check=False).returncode != 0
    assert ssh(settings, "judy", key, "true", tmp_path).returncode == 255
    with pytest.raises(HttpResponseError) as taken:  # an account the image has already
        client.create_node_user(pool_id, node.id, m.BatchNodeUserCreateOptions(name="root", ssh_public_key=public))
    assert (taken.value.status_code, taken.value.error.code) == (409, "NodeUserExists")


def test_a_vm_node_without_sshd_refuses_remote_login_saying_why(emu: DockerEmulator, tmp_path: Path) -> None:
    client = emu.client()
    pool_id = vm_pool(emu)  # no StartTask: the bare image has no sshd
    node = wait_for(lambda: next((n for n in client.list_nodes(pool_id) if n.state == m.BatchNodeState.IDLE), None),
                    120, "an idle VM-like node")
    _key, public = new_key(tmp_path)
    client.create_node_user(pool_id, node.id, m.BatchNodeUserCreateOptions(name="kim", ssh_public_key=public))
    with pytest.raises(HttpResponseError) as refused:
        client.get_node_remote_login_settings(pool_id, node.id)
    assert (refused.value.status_code, refused.value.error.code) == (409, "OperationNotValidOnNode")
    assert "no OpenSSH server (sshd)" in refused.value.response.text()
    client.delete_node_user(pool_id, node.id, "kim")
