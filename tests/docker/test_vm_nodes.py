"""VM-like nodes: the unmodified azure-batch SDK over HTTP -> the emulator -> containers of the bare VM image.

One pool (metadata ``mpilaunch-emulator-nodes=vm``, one node) serves the module: its admin StartTask records that the
node lacks Python, sshd and Open MPI, installs a Debian package with apt, writes a marker in ``/opt`` and leaves a
daemon behind that detaches, clears its environment and drops its groups. Tasks then run as the non-admin task user
(or as root with an admin auto-user). The last test kills the node's "VM" and restarts it.
"""

from __future__ import annotations

import secrets
import shlex
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from azure.batch import models as m

from mpilaunch.emulator.defaults import KIND_METADATA, KIND_VM
from mpilaunch.emulator.nodes.docker import DockerProvider
from mpilaunch.emulator.nodes.vm import TASK_USER, VmProvider
from mpilaunch.emulator.server import EmulatorServer
from tests.docker.test_emulator_docker import DockerEmulator, completed, text
from tests.support.docker import SESSION_PREFIX, DockerScope, docker
from tests.support.exec_engine import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

DAEMON, TASK_DAEMON = "4242", "4343"
"""The arguments of the ``sleep`` daemons the StartTask and a task leave behind."""
START_TASK = f"""
for c in python3 sshd mpirun ssh; do command -v "$c" || echo "missing $c"; done
set -e
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -yq --no-install-recommends openssh-client >/dev/null
command -v ssh
echo installed >/opt/vm-marker
setsid -f env -i setpriv --clear-groups /bin/sh -c 'echo $$ >"$1"; exec /bin/sleep {DAEMON}' sh "$PWD/daemon.pid" \
    </dev/null >/dev/null 2>&1
"""
TASK = f"""
id -un; id -u
command -v ssh
cat /opt/vm-marker
touch /opt/written 2>/dev/null && echo opt-writable || echo opt-read-only
echo result >result.txt
stat -c %U "$AZ_BATCH_TASK_DIR"
setsid -f /bin/sleep {TASK_DAEMON} </dev/null >/dev/null 2>&1
"""


def bash(script: str) -> str:
    return shlex.join(["/bin/bash", "-c", script])


def start_emulator(data_dir: Path, scope: str, image: str) -> DockerEmulator:
    """An in-process emulator whose VM pools get VM-like nodes of ``image`` labelled ``scope``."""
    provider = DockerProvider(scope=scope, shm_size="256m",
                              fallback=VmProvider(image=image, scope=scope, shm_size="256m"))
    server = EmulatorServer(data_dir, host="127.0.0.1", port=0, provider=provider)
    server.start()
    return DockerEmulator(server, provider, image)


def vm_pool(emu: DockerEmulator, start_task: str | None = None) -> str:
    pool_id = f"vmpool-{uuid.uuid4().hex[:6]}"
    emu.client().create_pool(m.BatchPoolCreateOptions(
        id=pool_id, vm_size="standard_d2s_v3", target_dedicated_nodes=1, enable_inter_node_communication=True,
        task_slots_per_node=1, metadata=[m.BatchMetadataItem(name=KIND_METADATA, value=KIND_VM)],
        virtual_machine_configuration=m.VirtualMachineConfiguration(
            image_reference=m.BatchVmImageReference(publisher="canonical", offer="0001-com-ubuntu-server-jammy",
                                                    sku="22_04-lts"),
            node_agent_sku_id="batch.node.ubuntu 22.04"),
        start_task=None if start_task is None else m.BatchStartTask(
            command_line=bash(start_task), wait_for_success=True,
            user_identity=m.UserIdentity(auto_user=m.AutoUserSpecification(
                scope=m.AutoUserScope.POOL, elevation_level=m.ElevationLevel.ADMIN)))))
    return pool_id


@dataclass
class VmPool:
    emu: DockerEmulator
    pool_id: str
    node_id: str
    job_id: str

    def run(self, script: str, *, admin: bool = False) -> tuple[Any, str]:
        """Run ``script`` as a task (as the admin auto-user with ``admin``); the completed task and its stdout."""
        client, task_id = self.emu.client(), f"t-{uuid.uuid4().hex[:6]}"
        identity = m.UserIdentity(auto_user=m.AutoUserSpecification(elevation_level=m.ElevationLevel.ADMIN))
        client.create_task(self.job_id, m.BatchTaskCreateOptions(id=task_id, command_line=bash(script),
                                                                 user_identity=identity if admin else None))
        task = completed(self.emu, self.job_id, task_id, timeout=60)
        return task, text(client.download_task_file(self.job_id, task_id, "stdout.txt"))

    def node_file(self, path: str) -> str:
        return text(self.emu.client().download_node_file(self.pool_id, self.node_id, path))


@pytest.fixture(scope="module")
def emu(vm_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerEmulator]:
    scope = DockerScope(f"{SESSION_PREFIX}-{secrets.token_hex(3)}")
    emulator = start_emulator(tmp_path_factory.mktemp("vm") / "emulator", scope.prefix, vm_image)
    try:
        yield emulator
    finally:
        emulator.server.stop()
        scope.cleanup()


@pytest.fixture(scope="module")
def pool(emu: DockerEmulator) -> VmPool:
    client = emu.client()
    pool_id = vm_pool(emu, START_TASK)
    nodes = wait_for(lambda: [n for n in client.list_nodes(pool_id) if n.state in (
        m.BatchNodeState.IDLE, m.BatchNodeState.START_TASK_FAILED, m.BatchNodeState.UNUSABLE)], 180,
        "the VM node to run its StartTask")
    job_id = f"job-{uuid.uuid4().hex[:6]}"
    client.create_job(m.BatchJobCreateOptions(id=job_id, pool_info=m.BatchPoolInfo(pool_id=pool_id)))
    vm = VmPool(emu, pool_id, nodes[0].id, job_id)
    assert nodes[0].state == m.BatchNodeState.IDLE, (nodes[0].errors, vm.node_file("startup/stderr.txt"))
    return vm


def test_start_task_installs_as_admin_on_a_bare_node(pool: VmPool) -> None:
    client = pool.emu.client()
    assert [(i.name, i.value) for i in client.get_pool(pool.pool_id).metadata] == [(KIND_METADATA, KIND_VM)]
    node = client.get_node(pool.pool_id, pool.node_id)
    assert (node.start_task_info.result, node.start_task_info.exit_code) == (m.BatchTaskExecutionResult.SUCCESS, 0)
    # Bare before the StartTask: no Python, sshd, Open MPI or ssh; then apt installed ssh.
    out = pool.node_file("startup/stdout.txt")
    assert out.splitlines() == ["missing python3", "missing sshd", "missing mpirun", "missing ssh", "/usr/bin/ssh"]
    provider_node = pool.emu.node(pool.pool_id, pool.node_id)
    assert provider_node.data["provider"] == "vm"
    assert docker("inspect", "-f", "{{.Config.Image}} {{.Config.Hostname}}", provider_node.data["container"]
                  ).stdout.split() == [pool.emu.image, provider_node.hostname]


def test_tasks_run_as_the_task_user_unless_admin(pool: VmPool) -> None:
    task, out = pool.run(TASK)
    assert (task.execution_info.result, task.execution_info.exit_code) == (m.BatchTaskExecutionResult.SUCCESS, 0)
    # The non-admin task user sees what the StartTask installed, cannot write /opt, owns its task directory.
    assert out.splitlines() == [TASK_USER, "1000", "/usr/bin/ssh", "installed", "opt-read-only", TASK_USER]
    client = pool.emu.client()
    assert text(client.download_task_file(pool.job_id, task.id, "wd/result.txt")) == "result\n"
    admin, out = pool.run("id -u; touch /opt/written && echo opt-writable", admin=True)
    assert admin.execution_info.exit_code == 0 and out.splitlines() == ["0", "opt-writable"]
    container = pool.emu.node(pool.pool_id, pool.node_id).data["container"]
    assert f"sleep {TASK_DAEMON}" not in docker("top", container).stdout  # the first task's daemon went with it


def test_start_task_daemons_do_not_outlive_it(pool: VmPool) -> None:
    assert pool.node_file("startup/wd/daemon.pid").strip().isdigit()  # it did start
    container = pool.emu.node(pool.pool_id, pool.node_id).data["container"]
    assert f"sleep {DAEMON}" not in docker("top", container).stdout


def test_pool_without_the_metadata_gets_process_nodes(emu: DockerEmulator) -> None:
    client, pool_id = emu.client(), f"plain-{uuid.uuid4().hex[:6]}"
    client.create_pool(m.BatchPoolCreateOptions(id=pool_id, vm_size="standard_d2s_v3", target_dedicated_nodes=1))
    node = wait_for(lambda: [n for n in client.list_nodes(pool_id) if n.state == m.BatchNodeState.IDLE], 30,
                    "an idle process node")[0]
    assert node.ip_address.startswith("127.")  # a loopback address: a process node
    assert "provider" not in emu.node(pool_id, node.id).data
    client.begin_delete_pool(pool_id, polling_interval=0)


def test_missing_vm_image_makes_the_node_unusable_naming_the_script(vm_image: str, tmp_path: Path) -> None:
    absent = f"mpilaunch-vm:absent-{secrets.token_hex(3)}"
    emu = start_emulator(tmp_path / "emulator", f"{SESSION_PREFIX}-{secrets.token_hex(3)}", absent)
    try:
        pool_id = vm_pool(emu)
        node = wait_for(lambda: [n for n in emu.client().list_nodes(pool_id)
                                 if n.state == m.BatchNodeState.UNUSABLE], 30, "the unusable node")[0]
        assert [e.code for e in node.errors] == ["NodeCreationFailed"]
        assert f"the VM image {absent!r}" in node.errors[0].message
        assert f"scripts/build-vm-image {absent}" in node.errors[0].message
    finally:
        emu.server.stop()


def test_killed_vm_node_is_lost_then_reboots_and_reruns_its_start_task(pool: VmPool) -> None:
    """Last: the node's "VM" dies mid-task and comes back with its disk (the StartTask finds ssh installed)."""
    client, task_id = pool.emu.client(), f"long-{uuid.uuid4().hex[:6]}"
    first = client.get_node(pool.pool_id, pool.node_id).start_task_info.start_time
    client.create_task(pool.job_id, m.BatchTaskCreateOptions(id=task_id, command_line="sleep 120"))
    wait_for(lambda: client.get_task(pool.job_id, task_id).state == m.BatchTaskState.RUNNING, 30, "the long task")
    node = pool.emu.node(pool.pool_id, pool.node_id)
    pool.emu.provider.kill_node(node)
    lost = wait_for(lambda: (n := client.get_node(pool.pool_id, pool.node_id)).state == m.BatchNodeState.UNUSABLE
                    and n, 30, "the killed node to be unusable")
    assert [e.code for e in lost.errors] == ["NodeLost"]
    requeued = wait_for(lambda: (t := client.get_task(pool.job_id, task_id)).execution_info.requeue_count == 1 and t,
                        30, "the requeue of the lost node's task")
    assert requeued.state == m.BatchTaskState.ACTIVE and requeued.execution_info.retry_count == 0
    client.delete_task(pool.job_id, task_id)  # or it would run again on the node once it is back

    pool.emu.provider.restart_node(node)
    wait_for(lambda: client.get_node(pool.pool_id, pool.node_id).state == m.BatchNodeState.IDLE, 120,
             "the rebooted node to rerun its StartTask")
    again = client.get_node(pool.pool_id, pool.node_id)
    assert not again.errors and again.start_task_info.start_time > first
    assert pool.node_file("startup/stdout.txt").splitlines() == [
        "missing python3", "missing sshd", "missing mpirun", "/usr/bin/ssh", "/usr/bin/ssh"]
    task, out = pool.run("id -un; cat /opt/vm-marker")
    assert task.execution_info.exit_code == 0 and out.splitlines() == [TASK_USER, "installed"]
