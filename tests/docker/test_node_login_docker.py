"""Remote login to docker nodes (real accounts in the node container, the image's sshd) and VM-like nodes without an
sshd (refused, saying why), through the unmodified azure-batch SDK over HTTP."""

from __future__ import annotations

from pathlib import Path

import pytest
from azure.batch import models as m
from azure.core.exceptions import HttpResponseError

from tests.docker.test_emulator_docker import DockerEmulator, container_pool
from tests.docker.test_node_actions import emu  # noqa: F401 - the fixture: docker and VM-like nodes
from tests.docker.test_vm_nodes import vm_pool
from tests.emulator.test_node_login import Key, ssh
from tests.support.docker import docker
from tests.support.exec_engine import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_a_docker_node_user_is_a_real_account_in_the_node_container(emu: DockerEmulator,  # noqa: F811
                                                                    tmp_path: Path) -> None:
    client = emu.client()
    job_id = container_pool(emu, 1)
    pool_id = client.get_job(job_id).pool_info.pool_id
    node = next(iter(client.list_nodes(pool_id)))
    key = Key(tmp_path / "key")
    client.create_node_user(pool_id, node.id, m.BatchNodeUserCreateOptions(name="judy", ssh_public_key=key.public,
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
        client.create_node_user(pool_id, node.id, m.BatchNodeUserCreateOptions(name="root",
                                                                               ssh_public_key=key.public))
    assert (taken.value.status_code, taken.value.error.code) == (409, "NodeUserExists")


def test_a_vm_node_without_sshd_refuses_remote_login_saying_why(emu: DockerEmulator,  # noqa: F811
                                                                tmp_path: Path) -> None:
    client = emu.client()
    pool_id = vm_pool(emu)  # no StartTask: the bare image has no sshd
    node = wait_for(lambda: next((n for n in client.list_nodes(pool_id) if n.state == m.BatchNodeState.IDLE), None),
                    120, "an idle VM-like node")
    key = Key(tmp_path / "key")
    client.create_node_user(pool_id, node.id, m.BatchNodeUserCreateOptions(name="kim", ssh_public_key=key.public))
    with pytest.raises(HttpResponseError) as refused:
        client.get_node_remote_login_settings(pool_id, node.id)
    assert (refused.value.status_code, refused.value.error.code) == (409, "OperationNotValidOnNode")
    assert "no OpenSSH server (sshd)" in refused.value.response.text()
    client.delete_node_user(pool_id, node.id, "kim")
