"""The default node provider: nodes are loopback addresses (127.0.x.y) on this machine, commands local processes.

Each node has its own root directory under the emulator's data dir and its own address; every command runs in its
own process group (session) so it can be killed as a whole. When running as root with ``unshare`` available, each
command also gets the node's own host name (a UTS namespace: Open MPI needs distinct host names per node) and sees
its root at ``/mnt/batch/tasks`` (a private mount namespace), so every node has the same task paths as in Azure.
Without root, commands see the host paths (different per node) and share the host name; ``TMPDIR`` is set per node
so Open MPI's session directories do not collide.

Every process gets ``MPILAUNCH_EMULATOR_TAG=<node id>/<tag>`` in its environment; :meth:`ProcessProvider.kill_tag`
kills the processes carrying it plus their descendants, which catches daemons (sshd) that left the process group.
``MPILAUNCH_NODE_ADDRESS`` is set to the node's address (several nodes share this machine's interfaces).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

from mpilaunch import proc
from mpilaunch.emulator.nodes.base import Execution, Node, NodeError, NodeProvider

AZURE_NODE_ROOT = "/mnt/batch/tasks"
TAG_VAR = "MPILAUNCH_EMULATOR_TAG"
KILL_TIMEOUT = 5.0
"""Seconds to wait for killed processes to be gone."""
_ENTER = Path(__file__).with_name("enter.py")
_BASE_VARS = ("PATH", "HOME", "LANG", "LC_ALL", "USER", "LOGNAME", "SHELL", "TERM", "TZ")


def isolation_available() -> bool:
    """Whether commands can get per-node host names and Azure paths (root and ``unshare`` on PATH)."""
    return os.geteuid() == 0 and shutil.which("unshare") is not None and sys.platform.startswith("linux")


class ProcessExecution(Execution):
    """A command running as a local process group."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.pid = popen.pid

    @staticmethod
    def _code(rc: int | None) -> int | None:
        return None if rc is None else (128 - rc if rc < 0 else rc)

    def poll(self) -> int | None:
        return self._code(self._popen.poll())

    def wait(self, timeout: float | None = None) -> int | None:
        try:
            return self._code(self._popen.wait(timeout))
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self._popen.poll()


class ProcessProvider(NodeProvider):
    """Nodes as loopback addresses and process groups on this machine; see the module docstring."""

    name = "process"

    def __init__(self, isolate: bool | None = None) -> None:
        self.isolate = isolation_available() if isolate is None else isolate
        if self.isolate and not isolation_available():
            raise NodeError("per-node namespaces need root and 'unshare' (util-linux); use isolate=False")
        self._lock = threading.Lock()
        self._given: set[str] = set()  # addresses handed out, not yet in the engine's store

    def create_node(self, pool: Mapping[str, Any], node_id: str, root: Path, taken: Sequence[str]) -> Node:
        root.mkdir(parents=True, exist_ok=True)
        (root / "tmp").mkdir(exist_ok=True)
        with self._lock:
            used = set(taken) | self._given
            for _ in range(1000):
                address = f"127.0.{random.randint(1, 254)}.{random.randint(1, 254)}"  # noqa: S311 - not crypto
                if address not in used:
                    break
            else:
                raise NodeError(f"no free loopback address for node {node_id!r}")
            self._given.add(address)
        hostname = node_id.lower().replace("_", "-")[:63]
        node_root = AZURE_NODE_ROOT if self.isolate else str(root)
        return Node(id=node_id, pool_id=str(pool["id"]), address=address, hostname=hostname, root=root,
                    node_root=node_root, data={"isolated": "1" if self.isolate else ""})

    def restore_node(self, node: Node) -> Node:
        if bool(node.data.get("isolated")) and not isolation_available():
            raise NodeError(f"node {node.id!r} was created with per-node namespaces, which need root now too")
        node.root.mkdir(parents=True, exist_ok=True)
        return node

    def base_env(self, node: Node) -> dict[str, str]:
        """The environment every command starts from: login-ish basics, this Python's bin dir first on PATH."""
        env = {k: os.environ[k] for k in _BASE_VARS if k in os.environ}
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])
        if not node.data.get("isolated"):
            env["TMPDIR"] = str(node.root / "tmp")
        return env

    def run(self, node: Node, argv: Sequence[str], *, env: Mapping[str, str], cwd: str,
            stdout: Path, stderr: Path, tag: str) -> Execution:
        full = self.base_env(node) | dict(env)
        full["MPILAUNCH_NODE_ADDRESS"] = node.address
        full[TAG_VAR] = f"{node.id}/{tag}"
        if node.data.get("isolated"):
            command = ["unshare", "--uts", "--mount", "--propagation", "private", "--",
                       sys.executable, "-I", "-S", str(_ENTER), node.hostname, str(node.root), node.node_root,
                       cwd, "--", *argv]
            workdir: str | None = None
        else:
            command, workdir = list(argv), cwd
        with stdout.open("ab") as out, stderr.open("ab") as err:
            popen = proc.spawn(command, env=full, cwd=workdir, stdout=out.fileno(), stderr=err.fileno(),
                               new_session=True)
        return ProcessExecution(popen)

    def kill_tag(self, node: Node, tag: str) -> None:
        self._kill_marked(lambda value: value == f"{node.id}/{tag}")

    def destroy_node(self, node: Node) -> None:
        self._kill_marked(lambda value: value.startswith(f"{node.id}/"))

    @staticmethod
    def _kill_marked(match: Callable[[str], bool]) -> None:
        """SIGKILL every process whose tag matches and all their descendants, scanning again until none is left
        (a process can fork between a scan and its death; the child inherits the tag)."""
        deadline = time.monotonic() + KILL_TIMEOUT
        while (victims := _marked(match)) and time.monotonic() < deadline:
            for p in victims:
                with contextlib.suppress(psutil.Error):
                    p.kill()
            while victims and time.monotonic() < deadline:
                victims = [p for p in victims if _alive(p)]
                time.sleep(0.005 if victims else 0)


def _marked(match: Callable[[str], bool]) -> list[psutil.Process]:
    """Live processes whose tag matches, with all their descendants, from one pass over the process table."""
    procs: dict[int, psutil.Process] = {}
    children: dict[int, list[int]] = {}
    stack: list[int] = []
    for p in psutil.process_iter(["ppid", "environ"]):
        procs[p.pid] = p
        children.setdefault(p.info["ppid"] or 0, []).append(p.pid)
        value = (p.info["environ"] or {}).get(TAG_VAR)
        if value is not None and match(value):
            stack.append(p.pid)
    found: set[int] = set()
    while stack:
        pid = stack.pop()
        if pid not in found:
            found.add(pid)
            stack.extend(children.get(pid, ()))
    return [procs[pid] for pid in found]


def _alive(p: psutil.Process) -> bool:
    """Still running (a zombie is dead: orphans may wait long for a reaper that does not reap)."""
    try:
        return bool(p.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False
