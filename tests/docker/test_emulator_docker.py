"""End to end: the unmodified azure-batch SDK over HTTP -> the emulator -> docker nodes of the task image.

A container pool (``containerConfiguration`` with the task image) gets three node containers; a multi-instance task
with ``containerSettings`` runs ``node-runtime coordinate`` on each and ``node-runtime launch`` on the primary, whose
mpi4py ranks must land on the three containers. Killing a node container mid-task fails the attempt and makes the
node ``unusable`` (as Azure marks a node it lost), so Batch's whole-task retry waits for three healthy nodes; once the
node is back, it restarts and the retry succeeds. And the `mpilaunch` CLI
(`pool create --container-image`, `run --image` with inputs through Azurite) runs its example on the docker nodes.
"""

from __future__ import annotations

import json
import shlex
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest
from azure.batch import BatchClient
from azure.batch import models as m
from azure.core.credentials import AzureNamedKeyCredential

from mpilaunch.emulator import defaults
from mpilaunch.emulator.nodes.base import Node
from mpilaunch.emulator.nodes.docker import DockerProvider
from mpilaunch.emulator.server import EmulatorServer
from tests.support.docker import DockerScope, docker
from tests.support.exec_engine import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

RANKS = """
import json, os, socket, sys, time
import psutil
from mpi4py import MPI
comm = MPI.COMM_WORLD
comm.Barrier()
if comm.rank == 0 and len(sys.argv) > 1:
    print("ready", flush=True)
    time.sleep(float(sys.argv[1]))
addresses = sorted(a.address for v in psutil.net_if_addrs().values() for a in v
                   if a.family == socket.AF_INET and not a.address.startswith("127."))
total = comm.allreduce(comm.rank + 1)
shm = os.statvfs("/dev/shm")
rows = comm.gather({"rank": comm.rank, "hostname": socket.gethostname(), "addresses": addresses, "sum": total,
                    "shm_mb": shm.f_blocks * shm.f_frsize // 2**20,
                    "probes": sorted(p for p in os.listdir("/") if p.startswith("mpl-probe"))})
if comm.rank == 0:
    print("\\n".join(json.dumps(r) for r in rows), flush=True)
"""


class Emulator(Protocol):
    """What the helpers below need: an in-process :class:`DockerEmulator` or a ``mpilaunch emulator serve``."""

    image: str

    def client(self) -> Any: ...


@dataclass
class DockerEmulator:
    server: EmulatorServer
    provider: DockerProvider
    image: str

    def client(self) -> Any:
        return BatchClient(self.server.endpoint, AzureNamedKeyCredential(defaults.ACCOUNT, defaults.KEY))

    def restart(self) -> None:
        """Stop the emulator (its provider stops the node containers) and start it again on its data and port."""
        port = int(self.server.endpoint.rsplit(":", 1)[1])
        self.server.stop()
        self.server, self.provider = start_docker_emulator(self.server.data_dir, self.provider.scope, port)

    def node(self, pool_id: str, node_id: str) -> Node:
        engine: Any = self.server.engine
        node: Node | None = engine.ctx.node_of(self.server.store.get("node", (pool_id,), node_id))
        assert node is not None
        return node


def start_docker_emulator(data_dir: Path, scope: str, port: int = 0) -> tuple[EmulatorServer, DockerProvider]:
    """An emulator (HTTP on 127.0.0.1) whose engine runs container pools on docker nodes labelled ``scope``."""
    provider = DockerProvider(scope=scope, shm_size="256m")
    server = EmulatorServer(data_dir, host="127.0.0.1", port=port, provider=provider)
    server.start()
    return server, provider


@pytest.fixture
def docker_emulator(docker_image: str, docker_scope: DockerScope, tmp_path: Path) -> Iterator[DockerEmulator]:
    emu = DockerEmulator(*start_docker_emulator(tmp_path / "emulator", docker_scope.prefix), docker_image)
    try:
        yield emu
    finally:
        emu.server.stop()


def container_pool(emu: Emulator, nodes: int) -> str:
    client = emu.client()
    pool_id = f"dpool-{uuid.uuid4().hex[:6]}"
    client.create_pool(m.BatchPoolCreateOptions(
        id=pool_id, vm_size="standard_d2s_v3", target_dedicated_nodes=nodes, enable_inter_node_communication=True,
        task_slots_per_node=1,
        virtual_machine_configuration=m.VirtualMachineConfiguration(
            image_reference=m.BatchVmImageReference(publisher="microsoft-dsvm", offer="ubuntu-hpc", sku="2204"),
            node_agent_sku_id="batch.node.ubuntu 22.04",
            container_configuration=m.BatchContainerConfiguration(
                type=m.ContainerType.DOCKER_COMPATIBLE, container_image_names=[emu.image]))))
    wait_for(lambda: [n.state for n in client.list_nodes(pool_id)] == [m.BatchNodeState.IDLE] * nodes, 120,
             f"{nodes} idle docker nodes")
    job_id = f"job-{uuid.uuid4().hex[:6]}"
    client.create_job(m.BatchJobCreateOptions(id=job_id, pool_info=m.BatchPoolInfo(pool_id=pool_id)))
    return job_id


def add_mpi_task(emu: Emulator, job_id: str, *rank_args: str, retries: int = 0,
                 run_options: str = "--shm-size 512m") -> str:
    task_id = f"mpi-{uuid.uuid4().hex[:6]}"
    argv = ["node-runtime", "launch", "--ppn", "1", "--", "/opt/mpilaunch/bin/python", "-c", RANKS, *rank_args]
    emu.client().create_task(job_id, m.BatchTaskCreateOptions(
        id=task_id, command_line=shlex.join(argv),
        container_settings=m.BatchTaskContainerSettings(image_name=emu.image,
                                                        container_run_options=run_options),
        multi_instance_settings=m.MultiInstanceSettings(number_of_instances=3,
                                                        coordination_command_line="node-runtime coordinate"),
        constraints=m.BatchTaskConstraints(max_task_retry_count=retries),
        environment_settings=[m.EnvironmentSetting(name="AZ_BATCH_NODE_COUNT", value="3"),
                              m.EnvironmentSetting(name="MPILAUNCH_TASK_SECRET",
                                                   value=uuid.uuid4().hex + uuid.uuid4().hex)]))
    return task_id


def completed(emu: Emulator, job_id: str, task_id: str, timeout: float = 150) -> Any:
    client = emu.client()
    return wait_for(lambda: (t := client.get_task(job_id, task_id)).state == m.BatchTaskState.COMPLETED and t,
                    timeout, f"task {task_id} completed")


def text(chunks: Any) -> str:
    return b"".join(chunks).decode()


def test_three_node_mpi4py_task_on_three_containers(docker_emulator: DockerEmulator) -> None:
    emu, client = docker_emulator, docker_emulator.client()
    job_id = container_pool(emu, 3)
    task_id = add_mpi_task(emu, job_id)
    task = completed(emu, job_id, task_id)
    stdout = text(client.download_task_file(job_id, task_id, "stdout.txt"))
    stderr = text(client.download_task_file(job_id, task_id, "stderr.txt"))
    assert (task.execution_info.result, task.execution_info.exit_code) == (
        m.BatchTaskExecutionResult.SUCCESS, 0), stdout + stderr

    pool_id = task.node_info.pool_id
    subtasks = sorted(client.list_subtasks(job_id, task_id), key=lambda s: s.id)
    node_ids = [task.node_info.node_id] + [s.node_info.node_id for s in subtasks]
    nodes = [emu.node(pool_id, n) for n in node_ids]
    assert len({n.address for n in nodes}) == 3
    # Every rank ran in its own node container: that node's host name and address, all in one allreduce.
    ranks = [json.loads(line) for line in stdout.splitlines() if line.startswith('{"rank"')]
    assert [r["rank"] for r in ranks] == [0, 1, 2]
    assert sorted(r["hostname"] for r in ranks) == sorted(n.hostname for n in nodes)
    for rank in ranks:
        node = next(n for n in nodes if n.hostname == rank["hostname"])
        assert rank["addresses"] == [node.address]
        assert rank["sum"] == 6
        assert rank["shm_mb"] == 512  # the task's containerRunOptions reached its containers
    # Per-subtask results: each non-primary instance completed on its own container and started its sshd there.
    for sub, node in zip(subtasks, nodes[1:], strict=True):
        assert (sub.state, sub.exit_code, sub.result) == (m.BatchSubtaskState.COMPLETED, 0,
                                                          m.BatchTaskExecutionResult.SUCCESS)
        out = text(client.download_node_file(pool_id, sub.node_info.node_id,
                                             f"{sub.node_info.task_root_directory}/stdout.txt"))
        assert f"sshd on {node.address}:" in out
    # The node containers are the nodes: distinct host names, the pool's image; no task container outlives the task.
    containers = docker("ps", "-q", "--filter", f"label=org.mpilaunch.emulator={emu.provider.scope}").stdout.split()
    assert sorted(docker("inspect", "-f", "{{.Config.Hostname}}", *containers).stdout.split()) == sorted(
        n.hostname for n in nodes)


def test_killed_node_is_unusable_and_the_requeued_task_waits_for_it(docker_emulator: DockerEmulator) -> None:
    emu, client = docker_emulator, docker_emulator.client()
    job_id = container_pool(emu, 3)
    task_id = add_mpi_task(emu, job_id, "20", retries=1)

    def ready() -> bool:
        try:
            return "ready" in text(client.download_task_file(job_id, task_id, "stdout.txt"))
        except Exception:  # the file appears once the command line started
            return False

    wait_for(ready, 120, "the ranks to start")
    running = client.get_task(job_id, task_id)
    subtask = next(iter(client.list_subtasks(job_id, task_id)))
    victim = emu.node(running.node_info.pool_id, subtask.node_info.node_id)
    emu.provider.kill_node(victim)  # the VM of one instance dies mid-task

    lost = wait_for(lambda: (n := client.get_node(victim.pool_id, victim.id)).state == m.BatchNodeState.UNUSABLE
                    and n, 30, "the killed node to be unusable")
    assert [e.code for e in lost.errors] == ["NodeLost"]
    # Node loss requeues the whole task without counting a retry (as Azure's recovery operations do); with one node
    # of three down, the requeued task waits.
    requeued = wait_for(lambda: (t := client.get_task(job_id, task_id)).execution_info.requeue_count == 1 and t, 30,
                        "the requeue")
    assert requeued.execution_info.retry_count == 0
    for _ in range(6):  # the retry is not placed on the dead node (which would fail it at once): it waits
        waiting = client.get_task(job_id, task_id)
        assert waiting.state == m.BatchTaskState.ACTIVE, waiting.execution_info
        assert client.get_node(victim.pool_id, victim.id).state == m.BatchNodeState.UNUSABLE
        time.sleep(0.5)

    emu.provider.restart_node(victim)  # the VM comes back: the node restarts and the retry runs on the 3 nodes
    wait_for(lambda: client.get_node(victim.pool_id, victim.id).state in (m.BatchNodeState.IDLE,
                                                                         m.BatchNodeState.RUNNING), 60,
             "the restarted node")
    assert not client.get_node(victim.pool_id, victim.id).errors
    task = completed(emu, job_id, task_id, timeout=120)
    info = task.execution_info
    assert (info.result, info.retry_count, info.requeue_count) == (m.BatchTaskExecutionResult.SUCCESS, 0, 1)


@pytest.mark.azurite
def test_mpilaunch_cli_runs_a_container_task_on_docker_nodes(
        docker_emulator: DockerEmulator, azurite: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`mpilaunch pool create --container-image` + `mpilaunch run --image`: inputs via Azurite, ranks in containers."""
    from mpilaunch.cli import cli
    from mpilaunch.cli.clickutil import run_cli

    for name, value in {"AZURE_BATCH_ENDPOINT": docker_emulator.server.endpoint,
                        "AZURE_BATCH_ACCOUNT": defaults.ACCOUNT, "AZURE_BATCH_ACCESS_KEY": defaults.KEY,
                        "AZURE_STORAGE_CONNECTION_STRING": azurite.connection_string,
                        "MPILAUNCH_CONFIG": str(tmp_path / "no-profile.toml"),
                        "MPILAUNCH_HOME": str(tmp_path / "home")}.items():
        monkeypatch.setenv(name, value)
    for name in ("MPILAUNCH_PROFILE", "MPILAUNCH_POOL", "AZURE_STORAGE_ACCOUNT", "AZURE_STORAGE_KEY"):
        monkeypatch.delenv(name, raising=False)

    def mpilaunch(*args: str) -> tuple[int, str, str]:
        code = run_cli(cli, "mpilaunch", list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    pool_id, image = f"dcli-{uuid.uuid4().hex[:6]}", docker_emulator.image
    code, _, err = mpilaunch("pool", "create", pool_id, "--nodes", "3", "--container-image", image)
    assert code == 0, err
    wait_for(lambda: [n.state for n in docker_emulator.client().list_nodes(pool_id)] == ["idle"] * 3, 120,
             "3 idle docker nodes")
    hello = Path(__file__).resolve().parents[2] / "examples" / "hello_mpi.py"
    code, out, err = mpilaunch("run", "--pool", pool_id, "-n", "3", "--image", image, "-i", str(hello),
                               "--timeout", "150", "--logs", str(tmp_path / "logs"), "--", "python3", "hello_mpi.py")
    assert code == 0, out + err
    primary = (tmp_path / "logs" / "instance-0" / "stdout.txt").read_text()
    nodes = [docker_emulator.node(pool_id, d.id) for d in docker_emulator.client().list_nodes(pool_id)]
    assert {n.data["provider"] for n in nodes} == {"docker"}
    assert f"3 distinct host(s): {', '.join(sorted(n.hostname for n in nodes))}" in primary
    # Each instance's coordination command started sshd on its container's own address.
    logs = "".join((tmp_path / "logs" / f"instance-{i}" / "stdout.txt").read_text() for i in range(3))
    assert all(f"sshd on {n.address}:" in logs for n in nodes), logs


def test_docker_nodes_survive_an_emulator_restart(docker_emulator: DockerEmulator) -> None:
    emu = docker_emulator
    job_id = container_pool(emu, 3)
    first = completed(emu, job_id, add_mpi_task(emu, job_id))
    assert first.execution_info.result == m.BatchTaskExecutionResult.SUCCESS
    pool_id = first.node_info.pool_id
    before = {n.id: n.ip_address for n in emu.client().list_nodes(pool_id)}
    containers = [emu.node(pool_id, n).data["container"] for n in before]

    emu.restart()  # the node containers are stopped while the emulator is down, and started again by its recovery
    wait_for(lambda: [n.state for n in emu.client().list_nodes(pool_id)] == [m.BatchNodeState.IDLE] * 3, 60,
             "3 idle nodes after the restart")
    assert docker("inspect", "-f", "{{.State.Running}}", *containers).stdout.split() == ["true"] * 3
    assert {n.id: n.ip_address for n in emu.client().list_nodes(pool_id)} == before
    again = completed(emu, job_id, add_mpi_task(emu, job_id))
    assert again.execution_info.result == m.BatchTaskExecutionResult.SUCCESS
