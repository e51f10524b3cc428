"""The docker node provider with real containers of the task image, and the real node runtime inside them."""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import psutil
import pytest

from mpilaunch.emulator import multiinstance as mi
from mpilaunch.emulator.nodes.base import Execution, Node, NodeError
from mpilaunch.emulator.nodes.docker import NODE_ROOT, DockerProvider
from node_runtime.errors import CommandFailed
from tests.support.docker import REPO, DockerScope, docker
from tests.support.exec_engine import wait_for

pytestmark = pytest.mark.slow
PROBE = REPO / "tests" / "programs" / "mpi_probe.py"
JOB, TASK = "job-d", "task-d"


def container_pool(image: str, pool_id: str = "dpool") -> dict[str, object]:
    return {"id": pool_id, "virtualMachineConfiguration": {
        "containerConfiguration": {"type": "dockerCompatible", "containerImageNames": [image]}}}


@pytest.fixture
def provider(docker_scope: DockerScope) -> DockerProvider:
    return DockerProvider(scope=docker_scope.prefix, shm_size="256m")


@pytest.fixture
def make_nodes(provider: DockerProvider, docker_image: str, tmp_path: Path) -> Iterator[object]:
    def make(count: int) -> list[Node]:
        pool = container_pool(docker_image)
        nodes: list[Node] = []
        for i in range(count):
            nodes.append(provider.create_node(pool, f"tvm-{i}", tmp_path / "nodes" / "dpool" / f"tvm-{i}",
                                              [n.address for n in nodes]))
        return nodes

    yield make


def wait(execution: Execution, timeout: float = 60) -> int:
    code = execution.wait(timeout)
    if code is None:
        execution.kill()
        raise AssertionError(f"command still running after {timeout} s")
    return code


def run(provider: DockerProvider, node: Node, argv: Sequence[str], tag: str = "t1", *,
        env: dict[str, str] | None = None, cwd: str = NODE_ROOT, **kwargs: object) -> tuple[int, str]:
    out = node.root / f"out-{secrets.token_hex(3)}.txt"
    execution = provider.run(node, argv, env=env or {}, cwd=cwd, stdout=out, stderr=out, tag=tag,
                             **kwargs)  # type: ignore[arg-type]
    return wait(execution), out.read_text()


def test_nodes_are_containers_with_own_address_hostname_and_batch_root(
        provider: DockerProvider, make_nodes: object, tmp_path: Path) -> None:
    nodes = make_nodes(3)  # type: ignore[operator]
    addresses = [n.address for n in nodes]
    assert len(set(addresses)) == 3
    subnet = ipaddress.IPv4Network(f"{addresses[0]}/24", strict=False)
    assert all(ipaddress.IPv4Address(a) in subnet for a in addresses)
    assert {n.node_root for n in nodes} == {NODE_ROOT}
    for node in nodes:
        (node.root / "marker").write_text(node.id)
        code, out = run(provider, node, ["bash", "-c", 'hostname; ip -4 -br addr show eth0; echo "$(cat "$1/marker")"; '
                                         'df -m /dev/shm | tail -n1', "_", NODE_ROOT])
        assert code == 0, out
        hostname, ipline, marker, shm = out.splitlines()[:4]
        assert hostname == node.hostname == node.id
        assert f"{node.address}/24" in ipline
        assert marker == node.id
        assert shm.split()[1] == "256"
    # Nodes survive a JSON round trip and an emulator restart: close() stops the node containers, a new provider's
    # restore_node starts them again, with the same address and host name.
    again = Node.from_json(json.loads(json.dumps(nodes[0].to_json())))
    provider.close()
    running = docker("inspect", "-f", "{{.State.Running}}", *(n.data["container"] for n in nodes)).stdout.split()
    assert running == ["false"] * 3
    restarted = DockerProvider(scope=provider.scope, shm_size="256m")
    assert restarted.restore_node(again) == nodes[0]
    assert run(restarted, again, ["hostname", "-I"], tag="t2")[1].split() == [again.address]
    for node in nodes[1:]:
        restarted.restore_node(node)
    # A pool without a container configuration goes to the fallback (process) provider.
    plain = provider.create_node({"id": "plain"}, "tvm-p", tmp_path / "plain", [])
    assert plain.data.get("provider") != "docker" and plain.address.startswith("127.")
    # destroy_node removes the node's containers (and the pool network with the last node).
    for node in nodes:
        provider.destroy_node(node)
    assert docker("ps", "-aq", "--filter", f"label=org.mpilaunch.emulator={provider.scope}").stdout.strip() == ""
    assert docker("network", "ls", "-q", "--filter",
                  f"label=org.mpilaunch.emulator={provider.scope}").stdout.strip() == ""


@pytest.mark.parametrize("user", [None, "1000:1000"], ids=["emulator-user", "image-user"])
def test_multi_instance_mpi_task_with_the_node_runtime(provider: DockerProvider, make_nodes: object,
                                                      user: str | None) -> None:
    """Coordination command on every node, then `node-runtime launch` on the primary, as the engine runs them;
    as the emulator's own user (root here), and as the image's non-root user (who owns the task dirs, as on Azure)."""
    nodes: list[Node] = make_nodes(3)  # type: ignore[operator]
    secret = secrets.token_urlsafe(32)
    instances = [mi.Instance(i, n.id, n.address) for i, n in enumerate(nodes)]
    settings = [{"name": "AZ_BATCH_NODE_COUNT", "value": "3"}, {"name": "MPILAUNCH_TASK_SECRET", "value": secret}]
    task_dirs = []
    for node in nodes:
        task_dir = node.root / mi.task_rel_dir(JOB, TASK)
        (task_dir / "wd").mkdir(parents=True)
        shutil.copy(PROBE, task_dir / "mpi_probe.py")  # a common resource file
        task_dirs.append(task_dir)
        if user is not None:
            subprocess.run(["chown", "-R", user, str(node.root)], check=True)
    container = None if user is None else {"containerRunOptions": f"--user {user}"}
    uid = os.getuid() if user is None else int(user.split(":")[0])

    def start(index: int, argv: list[str]) -> Execution:
        env = mi.instance_env(account="acct", account_url="http://127.0.0.1:1", pool_id="dpool", job_id=JOB,
                              task_id=TASK, node_root=NODE_ROOT, instances=instances, index=index,
                              primary_port=6000, multi_instance=True, task_settings=settings)
        node = nodes[index]
        return provider.run(node, argv, env=env, cwd=node.node_path(task_dirs[index] / "wd"),
                            stdout=task_dirs[index] / "stdout.txt", stderr=task_dirs[index] / "stderr.txt",
                            tag="attempt-1", container=container)

    coordination = [start(i, ["node-runtime", "coordinate"]) for i in range(3)]
    for i, execution in enumerate(coordination):
        assert wait(execution) == 0, (task_dirs[i] / "stderr.txt").read_text()
    for proc in psutil.process_iter(["cmdline"]):  # the secret is never on a command line
        assert secret not in " ".join(proc.info["cmdline"] or ())
    shared = nodes[0].node_path(task_dirs[0])
    primary = start(0, ["node-runtime", "launch", "--ppn", "1", "--", "/opt/mpilaunch/bin/python",
                        f"{shared}/mpi_probe.py"])
    code = wait(primary, 120)
    stdout = (task_dirs[0] / "stdout.txt").read_text()
    assert code == 0, stdout + (task_dirs[0] / "stderr.txt").read_text()
    ranks = [json.loads(line) for line in stdout.splitlines() if line.startswith("{") and '"rank"' in line]
    assert [r["rank"] for r in ranks] == [0, 1, 2]
    assert [r["hostname"] for r in ranks] == [n.hostname for n in nodes]
    assert all(n.address in r["addresses"] for r, n in zip(ranks, nodes, strict=True))
    assert {r["allreduce"] for r in ranks} == {6}
    assert (task_dirs[0] / "wd" / "launch-report.json").stat().st_uid == uid  # written by the task's user
    # The attempt's task containers (and the sshd daemons in them) go with kill_tag.
    for node in nodes:
        provider.kill_tag(node, "attempt-1")
    left = docker("ps", "-aq", "--filter", f"label=org.mpilaunch.emulator={provider.scope}").stdout.split()
    assert len(left) == 3  # only the node containers


def test_container_settings_are_honoured(provider: DockerProvider, make_nodes: object, docker_image: str,
                                         docker_scope: DockerScope) -> None:
    (node,) = make_nodes(1)  # type: ignore[operator]
    alt = f"{docker_scope.prefix}-alt:1"
    docker("tag", docker_image, alt)
    try:
        settings = {"imageName": alt, "workingDirectory": "containerImageDefault",
                    "containerRunOptions": "--user 1000:1000 --shm-size 64m --env 'FROM_OPTIONS=a b'"}
        code, out = run(provider, node, ["bash", "-c", 'id -u; pwd; df -m /dev/shm | tail -n1; echo "$FROM_OPTIONS"'],
                        container=settings)
        assert code == 0, out
        uid, cwd, shm, from_options = out.splitlines()[:4]
        assert (uid, cwd, shm.split()[1], from_options) == ("1000", "/home/mpi", "64", "a b")
        ids = docker("ps", "-q", "--filter", f"label=org.mpilaunch.emulator={provider.scope}").stdout.split()
        images = sorted(docker("inspect", "-f", "{{.Config.Image}}", *ids).stdout.split())
        assert images == sorted([alt, docker_image])  # the node container and the task's container
        # Default settings: the pool image, the task working directory, the emulator's own user.
        (node.root / "startup").mkdir(exist_ok=True)
        code, out = run(provider, node, ["bash", "-c", "id -u; pwd"], tag="t2", cwd=f"{NODE_ROOT}/startup")
        assert code == 0, out
        assert out.splitlines()[:2] == [str(os.getuid()), f"{NODE_ROOT}/startup"]
        with pytest.raises(CommandFailed, match="containerRunOptions"):
            run(provider, node, ["true"], tag="t3", container={"containerRunOptions": "--env 'unclosed"})
        # containerHostBatchBindMounts: only the listed data paths, read-only where asked.
        mounts = [{"source": "Shared", "isReadOnly": True}, {"source": "Task"}]
        code, out = run(provider, node, ["bash", "-c", f"exec 2>&1; ls {NODE_ROOT}; touch {NODE_ROOT}/workitems/w && "
                                         f"touch {NODE_ROOT}/shared/s"], tag="t4",
                        container={"containerHostBatchBindMounts": mounts})
        assert code != 0 and "Read-only file system" in out
        assert out.split()[:2] == ["shared", "workitems"]
        assert (node.root / "workitems" / "w").exists() and not (node.root / "shared" / "s").exists()
        with pytest.raises(NodeError, match="'Scratch'"):
            run(provider, node, ["true"], tag="t5", container={"containerHostBatchBindMounts": [{"source": "Scratch"}]})
    finally:
        for tag in ("t1", "t2", "t3", "t4", "t5"):
            provider.kill_tag(node, tag)
        docker("rmi", alt, check=False)


def test_kill_kill_tag_and_node_faults(provider: DockerProvider, make_nodes: object) -> None:
    a, b = make_nodes(2)  # type: ignore[operator]
    out = b.root / "sleep.txt"
    duration = f"300.{os.getpid()}"  # a command line no other process on this machine has

    def sleepers() -> list[psutil.Process]:
        return [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", duration]]

    sleeping = provider.run(b, ["sleep", duration], env={}, cwd=NODE_ROOT, stdout=out, stderr=out, tag="t1")
    wait_for(lambda: len(sleepers()) == 1, 30, "the command to start in the container")
    sleeping.kill()  # kills the command inside the container, not just the docker CLI
    assert wait(sleeping, 20) != 0
    assert not sleepers()
    # A daemon that outlives its command dies with the attempt's task container.
    code, _ = run(provider, b, ["bash", "-c", f"setsid sleep {duration} >/dev/null 2>&1 < /dev/null &"], tag="t1")
    assert code == 0 and len(sleepers()) == 1
    provider.kill_tag(b, "t1")
    assert not sleepers()

    listener = ["python", "-c", "import socket, time; s = socket.create_server(('', 7000)); time.sleep(300)"]
    probe = ["python", "-c", f"import socket; socket.create_connection(({b.address!r}, 7000), timeout=2)"]
    server = provider.run(b, listener, env={}, cwd=NODE_ROOT, stdout=out, stderr=out, tag="t2")
    deadline = time.monotonic() + 20
    while run(provider, a, probe, tag="t2")[0] != 0:
        assert time.monotonic() < deadline, "the listener on node b never answered"
        time.sleep(0.2)
    provider.disconnect_node(b)
    assert run(provider, a, probe, tag="t2")[0] != 0
    provider.reconnect_node(b)
    assert run(provider, a, probe, tag="t2")[0] == 0
    provider.kill_node(b)  # the VM dies: its commands end, its address stops answering
    assert wait(server, 20) != 0
    assert run(provider, a, probe, tag="t2")[0] != 0
    provider.kill_tag(b, "t2")
    provider.restart_node(b)
    assert run(provider, b, ["hostname", "-I"], tag="t3")[1].split() == [b.address]
