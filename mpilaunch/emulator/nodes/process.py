"""The default node provider: nodes are loopback addresses (127.0.x.y) on this machine, commands local processes.

Each node has its own root directory under the emulator's data dir and its own address; every command runs in its
own process group (session) so it can be killed as a whole. When running as root with ``unshare`` available, each
command also gets the node's own host name (a UTS namespace: Open MPI needs distinct host names per node) and sees
its root at ``/mnt/batch/tasks`` (a private mount namespace), so every node has the same task paths as in Azure.
Without root, commands see the host paths (different per node) and share the host name; ``TMPDIR`` is set per node
so Open MPI's session directories do not collide.

Every command runs under a *keeper* (:mod:`.enter`): a child subreaper that runs the command as its child, reports
its exit code on a pipe, and stays alive, reaping, while any process the command left behind lives, so daemons
(sshd) are re-parented to it rather than to init however they detach. The keeper carries
``MPILAUNCH_EMULATOR_TAG=<node id>/<tag>`` in its environment; :meth:`ProcessProvider.kill_tag` freezes (SIGSTOP)
the processes carrying it plus all their descendants until no new one appears, then SIGKILLs them all. This holds
with or without namespaces, and whatever a daemon does to its session or environ (sshd's process title overwrites
the environment that carries the tag).
``MPILAUNCH_NODE_ADDRESS`` is set to the node's address (several nodes share this machine's interfaces).
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

from mpilaunch.emulator.nodes.base import NONADMIN, Execution, Node, NodeError, NodeProvider
from mpilaunch.emulator.nodes.login import Edit, ProcessLogin, RemoteLogin
from node_runtime import proc

AZURE_NODE_ROOT = "/mnt/batch/tasks"
TAG_VAR = "MPILAUNCH_EMULATOR_TAG"
MOUNT_MARK = "mpilaunch-emulator:"
"""Isolated nodes: the per-command mount namespace's tmpfs is named ``MOUNT_MARK + <tag value>`` (see :mod:`.enter`)."""
KILL_TIMEOUT = 5.0
"""Seconds to wait for killed processes to be gone."""
_ENTER = Path(__file__).with_name("enter.py")
_BASE_VARS = ("PATH", "HOME", "LANG", "LC_ALL", "USER", "LOGNAME", "SHELL", "TERM", "TZ")


def isolation_available() -> bool:
    """Whether commands can get per-node host names and Azure paths (root and ``unshare`` on PATH)."""
    return os.geteuid() == 0 and shutil.which("unshare") is not None and sys.platform.startswith("linux")


class ProcessExecution(Execution):
    """A command running as a local process group: under its keeper (:mod:`.enter`), which reports the command's
    exit code on the pipe ``status``, or (``status=None``) a plain process whose exit is the command's.

    With a keeper, the command ends when the keeper reports (the keeper itself may live on, holding the command's
    daemons until :meth:`ProcessProvider.kill_tag`); a keeper that died without reporting (killed) gives its own
    exit status.
    """

    def __init__(self, popen: subprocess.Popen[bytes], status: int | None = None) -> None:
        self._popen = popen
        self._status = status
        self._code: int | None = None
        self._lock = threading.Lock()
        self.pid = popen.pid

    @staticmethod
    def _signal_code(rc: int) -> int:
        return 128 - rc if rc < 0 else rc

    def _collect(self, timeout: float | None) -> int | None:
        with self._lock:
            status = self._status
            if self._code is None and status is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._code = self._signal_code(self._popen.wait(timeout))
            elif self._code is None and status is not None:
                ready, _, _ = select.select([status], [], [], timeout)
                if ready:
                    data = os.read(status, 64)
                    self._code = int(data) if data.strip() else self._signal_code(self._popen.wait())
                    os.close(status)
            self._popen.poll()  # reap the keeper once it is gone
            return self._code

    def poll(self) -> int | None:
        return self._collect(0)

    def wait(self, timeout: float | None = None) -> int | None:
        return self._collect(timeout)

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
        self._down: set[str] = set()  # ids of killed nodes (kill_node), until restart_node
        self.login = ProcessLogin(self)  # remote login: node users and sshd (see .login)

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
        if node.data.get("provider", self.name) != self.name:  # e.g. a docker node, the emulator now without docker
            raise NodeError(f"node {node.id!r} is a {node.data['provider']} node, which this emulator does not run "
                            "now (see emulator serve --nodes)")
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
            stdout: Path, stderr: Path, tag: str, container: Mapping[str, Any] | None = None,
            user: str = NONADMIN) -> Execution:
        """As :meth:`NodeProvider.run`; ``container`` is ignored (a container task's commands run on the node), and
        so is ``user``: every command runs as the emulator's user."""
        full = self.base_env(node) | dict(env)
        full["MPILAUNCH_NODE_ADDRESS"] = node.address
        full[TAG_VAR] = f"{node.id}/{tag}"
        keeper = [sys.executable, "-I", "-S", str(_ENTER)]
        read_end, write_end = os.pipe()
        if node.data.get("isolated"):
            command = ["unshare", "--uts", "--mount", "--propagation", "private", "--", *keeper,
                       "--node", node.hostname, str(node.root), node.node_root, MOUNT_MARK + full[TAG_VAR],
                       str(write_end), cwd, "--", *argv]
            workdir: str | None = None
        else:
            command, workdir = [*keeper, str(write_end), cwd, "--", *argv], cwd
        try:
            with stdout.open("ab") as out, stderr.open("ab") as err:
                popen = proc.spawn(command, env=full, cwd=workdir, stdout=out.fileno(), stderr=err.fileno(),
                                   new_session=True, pass_fds=[write_end])
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        return ProcessExecution(popen, read_end)

    def kill_tag(self, node: Node, tag: str) -> None:
        self._kill_marked(lambda value: value == f"{node.id}/{tag}")

    def kill_tags(self, targets: Sequence[tuple[Node, str]]) -> None:
        """One sweep for all ``targets`` (each sweep scans the whole process table a few times: per node, an
        attempt's teardown grew with nodes x processes)."""
        values = {f"{node.id}/{tag}" for node, tag in targets}
        if values:
            self._kill_marked(values.__contains__)

    def destroy_node(self, node: Node) -> None:
        self._kill_marked(lambda value: value.startswith(f"{node.id}/"))
        self.login.forget(node)  # the node's disk is gone: its users too (a reboot, kill_node, keeps them)

    def alive(self, node: Node) -> bool:
        """Up unless :meth:`kill_node` killed it (and :meth:`restart_node` has not brought it back)."""
        with self._lock:
            return node.id not in self._down

    def kill_node(self, node: Node) -> None:
        """The node fails: it is down (:meth:`alive`) and every process any command started on it is killed."""
        with self._lock:
            self._down.add(node.id)
        self._kill_marked(lambda value: value.startswith(f"{node.id}/"))

    def restart_node(self, node: Node) -> None:
        with self._lock:
            self._down.discard(node.id)

    def edit_users(self, node: Node, edit: Edit) -> None:
        self.login.edit_users(node, edit)

    def remote_login(self, node: Node, env: Mapping[str, str]) -> RemoteLogin:
        return self.login.remote_login(node, env)

    def close(self) -> None:
        self.login.close()

    @staticmethod
    def _kill_marked(match: Callable[[str], bool]) -> None:
        """SIGKILL every process whose tag matches and all their descendants (see :func:`kill_found`)."""
        kill_found(lambda: _marked(match))


def kill_nodes(node_ids: Collection[str]) -> int:
    """SIGKILL every process any command started on the nodes ``node_ids`` (of any emulator, running or not: e.g.
    what a killed emulator left), with their descendants, in one sweep; returns how many were found first."""
    ids = set(node_ids)
    if not ids:
        return 0
    found = len(_marked(lambda value: value.split("/", 1)[0] in ids))
    if found:
        kill_found(lambda: _marked(lambda value: value.split("/", 1)[0] in ids))
    return found


def kill_found(find: Callable[[], list[psutil.Process]]) -> None:
    """SIGKILL every process ``find`` returns, rescanning until it returns none (or :data:`KILL_TIMEOUT`).

    They are first frozen (SIGSTOP), rescanning until no new one appears: a stopped process cannot fork, and a
    process forked just before is found by the next scan (``find`` returns descendants too), so nothing escapes
    between a scan and the kill. Keepers die last, after reaping the others (PID 1 may not reap: no zombies pile up).
    """
    deadline = time.monotonic() + KILL_TIMEOUT
    while (victims := _frozen(find, deadline)) and time.monotonic() < deadline:
        keepers = [p for p in victims if str(_ENTER) in (getattr(p, "info", {}).get("cmdline") or ())]
        others = [p for p in victims if p not in keepers]
        _kill(others, deadline)
        for p in keepers:
            with contextlib.suppress(psutil.Error):
                p.resume()
        reaped = min(deadline, time.monotonic() + 1.0)
        while any(p.is_running() for p in others) and time.monotonic() < reaped:  # zombies too
            time.sleep(0.005)
        _kill(keepers, deadline)


def _kill(victims: list[psutil.Process], deadline: float) -> None:
    """SIGKILL ``victims`` and wait (until ``deadline``) until they are dead."""
    for p in victims:
        with contextlib.suppress(psutil.Error):
            p.kill()
    while victims and time.monotonic() < deadline:
        victims = [p for p in victims if _alive(p)]
        time.sleep(0.005 if victims else 0)


def _frozen(find: Callable[[], list[psutil.Process]], deadline: float) -> list[psutil.Process]:
    """The found processes, each stopped with SIGSTOP, after a scan that found no new one (or at ``deadline``)."""
    frozen: dict[int, psutil.Process] = {}
    while time.monotonic() < deadline:
        new = [p for p in find() if p.pid not in frozen]
        if not new:
            break
        for p in new:
            with contextlib.suppress(psutil.Error):
                p.suspend()
            frozen[p.pid] = p
    return list(frozen.values())


def _marked(match: Callable[[str], bool]) -> list[psutil.Process]:
    """Live processes whose tag matches, with all their descendants, from one pass over the process table.

    The tag is read from a process's environment or, on isolated nodes, from its mount namespace (see
    :data:`MOUNT_MARK`), which catches even a daemon whose keeper was killed and which cleared its environment.
    """
    procs: dict[int, psutil.Process] = {}
    children: dict[int, list[int]] = {}
    namespaces: dict[str, list[int]] = {}
    own = _mount_namespace("self")
    stack: list[int] = []
    for p in psutil.process_iter(["ppid", "environ", "cmdline"]):
        procs[p.pid] = p
        children.setdefault(p.info["ppid"] or 0, []).append(p.pid)
        value = (p.info["environ"] or {}).get(TAG_VAR)
        if value is not None and match(value):
            stack.append(p.pid)
        elif (ns := _mount_namespace(str(p.pid))) is not None and ns != own:
            namespaces.setdefault(ns, []).append(p.pid)
    for pids in namespaces.values():
        value = _namespace_tag(pids)
        if value is not None and match(value):
            stack.extend(pids)
    found: set[int] = set()
    while stack:
        pid = stack.pop()
        if pid not in found:
            found.add(pid)
            stack.extend(children.get(pid, ()))
    return [procs[pid] for pid in found]


def _mount_namespace(pid: str) -> str | None:
    try:
        return str(Path(f"/proc/{pid}/ns/mnt").readlink())
    except OSError:
        return None


def _namespace_tag(pids: list[int]) -> str | None:
    """The tag in the mount namespace of ``pids`` (one namespace), from the first one still readable."""
    for pid in pids:
        try:
            lines = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            fields = line.split(" - ", 1)[-1].split()  # after the separator: fstype, source, super options
            if len(fields) >= 2 and fields[0] == "tmpfs" and fields[1].startswith(MOUNT_MARK):
                return fields[1][len(MOUNT_MARK):]
        return None
    return None


def _alive(p: psutil.Process) -> bool:
    """Still running (a zombie is dead: orphans may wait long for a reaper that does not reap)."""
    try:
        return bool(p.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False
