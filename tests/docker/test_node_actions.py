"""Batch's node actions on container nodes, through the unmodified azure-batch SDK: a VM-like node (a bare OS
container) rebooted keeps its disk and reruns its StartTask, reimaged gets a fresh container (what the StartTask or a
task installed is gone); a Spot VM-like node and a Spot docker node preempted come back with their ids, files lost."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from azure.batch import models as m
from azure.batch.models._models import (  # the SDK takes them, but does not export them
    BatchNodeDisableSchedulingOptions,
    BatchNodeRebootOptions,
    BatchNodeReimageOptions,
)
from azure.core.rest import HttpRequest

from mpilaunch.emulator.defaults import API_VERSION, KIND_METADATA, KIND_VM
from tests.docker.test_emulator_docker import DockerEmulator, completed, text
from tests.docker.test_vm_nodes import bash, start_emulator
from tests.support.docker import SESSION_PREFIX, DockerScope
from tests.support.exec_engine import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

BOOT = 'echo x >>"$AZ_BATCH_NODE_SHARED_DIR/boots"'
"""The StartTask: one ``x`` in ``shared/boots`` per run on the node."""


@pytest.fixture
def emu(vm_image: str, docker_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerEmulator]:
    scope = DockerScope(f"{SESSION_PREFIX}-{secrets.token_hex(3)}")
    emulator = start_emulator(tmp_path_factory.mktemp("actions") / "emulator", scope.prefix, vm_image)
    emulator.image = docker_image
    try:
        yield emulator
    finally:
        emulator.server.stop()
        scope.cleanup()


def pool(emu: DockerEmulator, *, vm: bool) -> str:
    """One dedicated and one Spot node, VM-like (``vm``) or docker nodes of the task image, each running
    :data:`BOOT`; returns the pool id once both are idle."""
    client, pool_id = emu.client(), f"{'vm' if vm else 'dk'}-{uuid.uuid4().hex[:6]}"
    container = None if vm else m.BatchContainerConfiguration(type=m.ContainerType.DOCKER_COMPATIBLE,
                                                               container_image_names=[emu.image])
    client.create_pool(m.BatchPoolCreateOptions(
        id=pool_id, vm_size="standard_d2s_v3", target_dedicated_nodes=1, target_low_priority_nodes=1,
        enable_inter_node_communication=True, task_slots_per_node=1,
        metadata=[m.BatchMetadataItem(name=KIND_METADATA, value=KIND_VM)] if vm else None,
        virtual_machine_configuration=m.VirtualMachineConfiguration(
            image_reference=m.BatchVmImageReference(publisher="canonical", offer="0001-com-ubuntu-server-jammy",
                                                    sku="22_04-lts"),
            node_agent_sku_id="batch.node.ubuntu 22.04", container_configuration=container),
        start_task=m.BatchStartTask(command_line=bash(BOOT), wait_for_success=True, user_identity=m.UserIdentity(
            auto_user=m.AutoUserSpecification(scope=m.AutoUserScope.POOL, elevation_level=m.ElevationLevel.ADMIN)))))
    idle(client, pool_id)
    return pool_id


def idle(client: Any, pool_id: str) -> None:
    try:
        wait_for(lambda: [n.state for n in client.list_nodes(pool_id)] == [m.BatchNodeState.IDLE] * 2, 60,
                 f"both nodes of {pool_id} idle")
    except AssertionError:
        nodes = list(client.list_nodes(pool_id))
        raise AssertionError([(n.id, n.state, n.errors, n.start_task_info) for n in nodes]
                             + [text(client.download_node_file(pool_id, n.id, "startup/stderr.txt"))
                                for n in nodes if n.state == m.BatchNodeState.START_TASK_FAILED]) from None


def boots(client: Any, pool_id: str, node_id: str) -> str:
    return text(client.download_node_file(pool_id, node_id, "shared/boots"))


def node_ids(client: Any, pool_id: str) -> tuple[str, str]:
    nodes = list(client.list_nodes(pool_id))
    return (next(n.id for n in nodes if n.is_dedicated), next(n.id for n in nodes if not n.is_dedicated))


def preempt(client: Any, pool_id: str, spot: str) -> None:
    response = client.send_request(HttpRequest("POST", f"/pools/{pool_id}/nodes/{spot}/mpilaunch-fault",
                                               params={"api-version": API_VERSION},
                                               json={"fault": "preempt", "downSeconds": 0.5}))
    assert response.status_code == 202, response.text()
    wait_for(lambda: client.get_node(pool_id, spot).state != m.BatchNodeState.IDLE, 10, "the preemption")
    idle(client, pool_id)
    assert boots(client, pool_id, spot) == "x\n"  # same id, files lost, StartTask ran once on the new node


def test_reboot_reimage_and_preempt_on_vm_like_and_docker_nodes(emu: DockerEmulator) -> None:
    client = emu.client()
    vm_pool, docker_pool = pool(emu, vm=True), pool(emu, vm=False)
    dedicated, spot = node_ids(client, vm_pool)
    job_id = f"job-{uuid.uuid4().hex[:6]}"
    client.create_job(m.BatchJobCreateOptions(id=job_id, pool_info=m.BatchPoolInfo(pool_id=vm_pool)))
    admin = m.UserIdentity(auto_user=m.AutoUserSpecification(elevation_level=m.ElevationLevel.ADMIN))
    for i in range(2):  # the node's "VM disk": one of the two tasks lands on each node
        client.create_task(job_id, m.BatchTaskCreateOptions(id=f"mark-{i}", command_line=bash("touch /opt/mark"),
                                                            user_identity=admin))
    assert all(completed(emu, job_id, f"mark-{i}", timeout=60).execution_info.exit_code == 0 for i in range(2))

    client.begin_reboot_node(vm_pool, dedicated, BatchNodeRebootOptions(node_reboot_kind="requeue"),
                             polling_interval=0.2).result()
    idle(client, vm_pool)
    assert boots(client, vm_pool, dedicated) == "x\nx\n"  # files kept, StartTask ran again
    client.begin_reimage_node(vm_pool, dedicated, BatchNodeReimageOptions(node_reimage_option="requeue"),
                              polling_interval=0.2).result()
    idle(client, vm_pool)
    assert boots(client, vm_pool, dedicated) == "x\n"  # the OS disk is new
    client.disable_node_scheduling(vm_pool, spot, BatchNodeDisableSchedulingOptions(
        node_disable_scheduling_option="requeue"))  # so the next task lands on the reimaged node
    client.create_task(job_id, m.BatchTaskCreateOptions(
        id="look", command_line=bash("test -e /opt/mark && echo kept || echo gone")))
    look = completed(emu, job_id, "look", timeout=60)
    assert look.node_info.node_id == dedicated and look.execution_info.exit_code == 0
    assert text(client.download_task_file(job_id, "look", "stdout.txt")) == "gone\n"
    client.enable_node_scheduling(vm_pool, spot)

    preempt(client, vm_pool, spot)
    preempt(client, docker_pool, node_ids(client, docker_pool)[1])
