"""VM-like nodes: every node is a container of a bare OS image that plays the pool's VM.

A pool without a ``containerConfiguration`` whose ``metadata`` has ``mpilaunch-emulator-nodes`` = ``vm``
(:data:`~mpilaunch.emulator.defaults.KIND_METADATA`) gets these nodes (Batch gives metadata no meaning; the emulator
reads this one name). The image (``mpilaunch-vm:bookworm`` by default, built by ``scripts/build-vm-image``) is a bare
Debian: no Python, Open MPI, OpenSSH or mpilaunch, so the pool's StartTask installs them as it must on a stock Azure
VM. It is never pulled: a missing image makes the node ``unusable`` with a message naming the script.

The node container is made as docker nodes' are (:class:`~.docker.DockerProvider`: the pool's network, its own
address and host name, the node root bind-mounted at ``/mnt/batch/tasks``, ``--shm-size``, labels, ``kill_node``/
``restart_node``), but there are no task containers: every command is ``docker exec``-ed into the node container,
as Batch's agent runs commands on the VM. The user follows the command's ``userIdentity`` as in Azure: the admin
auto-user is root; the non-admin one (the default) is :data:`TASK_USER` (uid and gid :data:`TASK_UID`), created in
each node when the node is made. Its task directory (``AZ_BATCH_TASK_DIR``, else its working directory) is given to
it first, as Batch makes task directories owned by the task's user.

Processes are tracked by cgroup, as an init system tracks services: every command starts behind a gate (:data:`GATE`,
a shell waiting for one line on stdin) until the emulator has moved it into a cgroup of its own (node, tag) under
the node container's; everything it starts then stays in that cgroup, since processes of an unprivileged container
cannot move themselves — daemons that detach, clear their environment and drop their groups included.
:meth:`VmProvider.kill_tag` freezes and kills the cgroup's processes and removes it. That needs root on the host
(the cgroup files, and ``/proc`` of the container's processes): as another user, VM pools are refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import psutil

from mpilaunch.emulator.defaults import KIND_METADATA, KIND_VM, VM_IMAGE
from mpilaunch.emulator.nodes.base import ADMIN, Execution, Node, NodeError, NodeProvider
from mpilaunch.emulator.nodes.docker import DockerExecution, DockerProvider, container_configuration, docker
from mpilaunch.emulator.nodes.process import TAG_VAR, kill_found
from node_runtime import proc
from node_runtime.errors import CommandFailed

TASK_USER = "_azbatch"
TASK_UID = 1000
"""Uid and gid of :data:`TASK_USER`, the non-admin auto-user (what it writes in the node root is uid 1000's on the
host)."""
GATE = ["/bin/sh", "-c", 'read -r _ && exec "$@"', "sh"]
"""Prefix of every command: it waits for the line the emulator writes once the command is in its cgroup."""
START_TIMEOUT = 60.0
"""Seconds a ``docker exec`` may take to start its command."""


def wants_vm(pool: Mapping[str, Any]) -> bool:
    """Whether ``pool`` asks for VM-like nodes: no ``containerConfiguration``, metadata :data:`KIND_METADATA` =
    ``vm``."""
    return container_configuration(pool) is None and any(
        item.get("name") == KIND_METADATA and item.get("value") == KIND_VM for item in pool.get("metadata") or ())


class VmProvider(DockerProvider):
    """VM-like nodes for the pools that ask for them (:func:`wants_vm`), other pools to ``fallback``; see the
    module docstring."""

    name = "vm"

    def __init__(self, *, image: str = VM_IMAGE, scope: str = "mpilaunch", shm_size: str = "1g",
                 fallback: NodeProvider | None = None) -> None:
        super().__init__(scope=scope, shm_size=shm_size, fallback=fallback)
        self.image = image

    def serves(self, pool: Mapping[str, Any]) -> bool:
        return wants_vm(pool)

    def check_pool(self, pool: Mapping[str, Any]) -> None:
        if self.serves(pool) and os.geteuid() != 0:
            raise NodeError(f"pool {pool.get('id')!r} asks for VM-like nodes (metadata {KIND_METADATA}={KIND_VM}), "
                            "which need the emulator to run as root (it tracks their processes by cgroup)")
        super().check_pool(pool)

    def _node_image(self, pool: Mapping[str, Any]) -> str:
        if proc.run(["docker", "image", "inspect", self.image], timeout=60, check=False).returncode != 0:
            raise NodeError(f"the VM image {self.image!r} of pool {pool['id']!r} does not exist; build it with "
                            f"scripts/build-vm-image {self.image}")
        return self.image

    def _create(self, pool_id: str, node_id: str, root: Path, taken: Sequence[str], image: str) -> Node:
        """The node container, with :data:`TASK_USER` added."""
        node = super()._create(pool_id, node_id, root, taken, image)
        try:
            docker("exec", node.data["container"], "useradd", "--uid", str(TASK_UID), "--user-group",
                   "--create-home", "--shell", "/bin/bash", TASK_USER)
        except CommandFailed as exc:
            proc.run(["docker", "rm", "-f", node.data["container"]], timeout=60, check=False)
            raise NodeError(f"node {node_id!r}: the task user could not be created: {exc}") from exc
        return node

    def _run(self, node: Node, argv: Sequence[str], *, env: Mapping[str, str], cwd: str, stdout: Path,
             stderr: Path, tag: str, settings: Mapping[str, Any], user: str) -> Execution:
        """Run in the node container as ``user`` (see the module docstring); container ``settings`` are ignored."""
        if user != ADMIN:
            _give(node.host_path(env.get("AZ_BATCH_TASK_DIR", cwd)))
        parent = self._cgroup(node)
        if parent is None:
            raise NodeError(f"node {node.id!r} is down: its container {node.data['container']!r} is not running")
        group = parent / _group_name(tag)
        group.mkdir(exist_ok=True)
        options = ["-i", "--user", "root" if user == ADMIN else TASK_USER, "-w", cwd]
        popen, marker = self._exec(node, tag, node.data["container"], options, [*GATE, *argv], env=env,
                                   stdout=stdout, stderr=stderr, stdin=subprocess.PIPE)
        gate, execution = popen.stdin, DockerExecution(popen, marker)
        assert gate is not None
        try:
            _admit(popen, gate, f"{TAG_VAR}={marker}".encode(), parent, group)
        except BaseException:
            execution.kill()
            raise
        finally:
            with contextlib.suppress(BrokenPipeError):
                gate.close()  # the line _admit wrote goes now
        return execution

    def _kill_tag(self, node: Node, tag: str) -> None:
        """Kill every process in the tag's cgroup on the node and remove it."""
        parent = self._cgroup(node)
        if parent is None:  # the container is down: so is every process it had
            return
        group = parent / _group_name(tag)
        kill_found(lambda: _members(group))
        with contextlib.suppress(OSError):
            group.rmdir()

    @staticmethod
    def _cgroup(node: Node) -> Path | None:
        """The host directory of the node container's cgroup; ``None`` when the container is not running."""
        found = proc.run(["docker", "inspect", "-f", "{{.State.Pid}}", node.data["container"]], timeout=60,
                         check=False)
        pid = found.stdout.decode().strip()
        return cgroup_dir(int(pid)) if found.returncode == 0 and pid.isdigit() and pid != "0" else None


def cgroup_dir(pid: int) -> Path:
    """The host directory of process ``pid``'s cgroup: in the cgroup v2 hierarchy when mounted, else in v1's
    ``pids`` hierarchy."""
    mounts: dict[str, str] = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields, fs = line.split(" - ", 1)
        fstype, _source, options = fs.split()[:3]
        if fstype == "cgroup2":
            mounts.setdefault("", fields.split()[4])
        elif fstype == "cgroup":
            for option in options.split(","):
                mounts.setdefault(option, fields.split()[4])
    paths: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _hierarchy, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path
    for key in ("", "pids"):
        if key in mounts and key in paths and (found := Path(mounts[key] + paths[key])).is_dir():
            return found
    raise NodeError(f"the cgroup of process {pid} is not found (neither cgroup v2 nor v1's pids hierarchy is "
                    "mounted where /proc/self/mountinfo says)")


def _group_name(tag: str) -> str:
    return f"mpilaunch-{hashlib.sha256(tag.encode()).hexdigest()[:16]}"


def _pids(group: Path) -> list[str]:
    """The pids in cgroup ``group`` (none if it is gone)."""
    try:
        return (group / "cgroup.procs").read_text().split()
    except OSError:
        return []


def _members(group: Path) -> list[psutil.Process]:
    """The processes in cgroup ``group``."""
    found = []
    for pid in _pids(group):
        with contextlib.suppress(psutil.Error):
            found.append(psutil.Process(int(pid)))
    return found


def _admit(popen: subprocess.Popen[bytes], gate: IO[bytes], entry: bytes, parent: Path, group: Path) -> None:
    """Move the gated command whose environment has ``entry`` from cgroup ``parent`` into ``group``, then write its
    line to ``gate``, its stdin (buffered: it goes when the caller closes ``gate``).

    Returns at once if the ``docker exec`` ends first (it could not start the command: its message is in the
    command's stderr, its exit code is the execution's).
    """
    deadline = time.monotonic() + START_TIMEOUT
    while popen.poll() is None:
        for pid in _pids(parent):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:  # gone already
                continue
            if entry in environ.split(b"\0"):
                try:
                    (group / "cgroup.procs").write_text(pid)
                except OSError as exc:
                    raise NodeError(f"cannot move a command into its cgroup {group}: {exc}") from exc
                gate.write(b"\n")
                return
        if time.monotonic() >= deadline:
            raise NodeError(f"docker exec did not start its command within {START_TIMEOUT:.0f}s")
        time.sleep(0.005)


def _give(directory: Path) -> None:
    """Make :data:`TASK_USER` own ``directory`` and everything in it, unless it owns ``directory`` already. The
    engine makes task directories afresh (root's) for each attempt, so this runs before any process of the task
    could have made anything there to follow."""
    if directory.stat().st_uid == TASK_UID:
        return
    for path in [directory, *directory.rglob("*")]:
        with contextlib.suppress(FileNotFoundError):
            os.chown(path, TASK_UID, TASK_UID, follow_symlinks=False)
