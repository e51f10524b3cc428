"""The docker node provider: nodes of container pools are docker containers on a per-pool docker network.

A pool whose ``virtualMachineConfiguration`` has a ``containerConfiguration`` gets nodes that are containers of the
pool's first ``containerImageNames`` image (the "VM"), each with its own address on the pool's network, its own host
name, and its host root directory bind-mounted at ``/mnt/batch/tasks`` (where Batch mounts ``AZ_BATCH_NODE_ROOT_DIR``
into task containers). Other pools go to the ``fallback`` provider (the process provider by default; the VM provider
of :mod:`.vm`, a subclass, when the emulator serves VM-like nodes too).

Task commands run as Batch runs container tasks: every task attempt (``tag``) gets its own task container on each
node, created from the task's ``containerSettings`` (``imageName``, ``containerRunOptions``, ``workingDirectory``;
the pool image when none are given) and sharing the node container's network stack and host name (as Batch's task
containers share the VM's); the coordination command and the command line are ``docker exec``-ed into it, so the
daemons the coordination command leaves behind (sshd) live until :meth:`kill_tag` removes the container. Commands run
as the emulator's own uid:gid (the owner of the node directories) unless the run options say ``--user``; ``/dev/shm``
is ``shm_size`` unless the run options say ``--shm-size``. Environment values reach ``docker exec`` through its
environment, never its argv, so the task secret does not show in process listings.

Fault injection (tests): :meth:`DockerProvider.kill_node` (the VM dies: node and task containers are killed),
:meth:`restart_node`, :meth:`disconnect_node` and :meth:`reconnect_node` (network partition).

Everything is labelled ``org.mpilaunch.emulator=<scope>``; :func:`remove_scope` removes all of a scope's resources.
Container and network names derive from the nodes' host root paths, so they are stable across emulator restarts;
:meth:`DockerProvider.close` stops the node containers and :meth:`DockerProvider.restore_node` starts them again.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import random
import re
import shlex
import subprocess
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

from mpilaunch.emulator.nodes import container_login
from mpilaunch.emulator.nodes.base import NONADMIN, Execution, Node, NodeError, NodeProvider
from mpilaunch.emulator.nodes.login import Edit, RemoteLogin
from mpilaunch.emulator.nodes.process import TAG_VAR, ProcessExecution, ProcessProvider
from node_runtime import proc
from node_runtime.errors import CommandFailed

NODE_ROOT = "/mnt/batch/tasks"
LABEL_SCOPE = "org.mpilaunch.emulator"
LABEL_NODE = "org.mpilaunch.node"
LABEL_POOL = "org.mpilaunch.pool"
HOST_DATA_PATHS = {"Shared": "shared", "Startup": "startup", "VfsMounts": "fsmounts", "Task": "workitems",
                   "JobPrep": "workitems", "Applications": "applications"}
"""``ContainerHostDataPath`` values and the node-root subdirectories they mount."""
SUPERNET = ipaddress.IPv4Network("10.128.0.0/9")
"""Pool networks are /24s picked at random in here, away from the host's own subnets and other docker networks."""


def container_configuration(pool: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The pool's ``containerConfiguration``, or ``None`` for a pool without containers."""
    config: Mapping[str, Any] | None = (pool.get("virtualMachineConfiguration") or {}).get("containerConfiguration")
    return config


def docker_name(*parts: str, key: Path | str) -> str:
    """A docker-safe, readable name, made unique by a hash of ``key``."""
    slug = "-".join(re.sub(r"[^a-zA-Z0-9_.-]+", "-", p).strip("-.")[:24] for p in parts)
    return f"mpl-{slug}-{hashlib.sha256(str(key).encode()).hexdigest()[:10]}"


def bind_mounts(node: Node, entries: Sequence[Mapping[str, Any]] | None) -> list[str]:
    """``docker create`` volume options for ``containerHostBatchBindMounts``: the whole node root when absent (as
    Batch on Linux), else each listed data path at its Batch location (``Task`` and ``JobPrep``: ``workitems``)."""
    if entries is None:
        return ["-v", f"{node.root}:{NODE_ROOT}"]
    mounts: dict[str, bool] = {}
    for entry in entries:
        source = str(entry.get("source"))
        if source not in HOST_DATA_PATHS:
            raise NodeError(f"containerHostBatchBindMounts source {source!r} is not one of {sorted(HOST_DATA_PATHS)}")
        sub = HOST_DATA_PATHS[source]
        mounts[sub] = mounts.get(sub, True) and bool(entry.get("isReadOnly", False))
    options = []
    for sub, read_only in mounts.items():
        (node.root / sub).mkdir(parents=True, exist_ok=True)
        options += ["-v", f"{node.root / sub}:{NODE_ROOT}/{sub}{':ro' if read_only else ''}"]
    return options


def docker(*args: str, timeout: float = 120) -> str:
    """Run the docker CLI; its stdout. Raises :class:`CommandFailed` with docker's message on failure."""
    return proc.run(["docker", *args], timeout=timeout).stdout.decode()


def remove_scope(scope: str) -> None:
    """Remove every container and network created by providers with ``scope`` (tests; ``local down``)."""
    ids = docker("ps", "-aq", "--filter", f"label={LABEL_SCOPE}={scope}").split()
    if ids:
        proc.run(["docker", "rm", "-f", "-v", *ids], timeout=120, check=False)
    nets = docker("network", "ls", "-q", "--filter", f"label={LABEL_SCOPE}={scope}").split()
    if nets:
        proc.run(["docker", "network", "rm", *nets], timeout=120, check=False)


class DockerExecution(ProcessExecution):
    """A ``docker exec``; :meth:`kill` also kills the command inside the container (by its marker variable)."""

    def __init__(self, popen: subprocess.Popen[bytes], marker: str) -> None:
        super().__init__(popen)
        self.marker = marker

    def kill(self) -> None:
        ProcessProvider._kill_marked(lambda value: value == self.marker)
        super().kill()


class DockerProvider(NodeProvider):
    """Container-pool nodes as docker containers; see the module docstring."""

    name = "docker"

    def __init__(self, *, scope: str = "mpilaunch", shm_size: str = "1g",
                 fallback: NodeProvider | None = None) -> None:
        self.scope = scope
        self.shm_size = shm_size
        self.fallback = fallback if fallback is not None else ProcessProvider()
        self._lock = threading.Lock()
        self._node_locks: dict[str, threading.Lock] = {}
        self._live: set[str] = set()  # node containers created or restored by this provider, for close()

    # -- nodes ----------------------------------------------------------------------------------------------------
    def serves(self, pool: Mapping[str, Any]) -> bool:
        """Whether this provider makes ``pool``'s nodes (else its ``fallback`` does): container pools."""
        return container_configuration(pool) is not None

    def check_pool(self, pool: Mapping[str, Any]) -> None:
        if not self.serves(pool):
            self.fallback.check_pool(pool)

    def create_node(self, pool: Mapping[str, Any], node_id: str, root: Path, taken: Sequence[str]) -> Node:
        if not self.serves(pool):
            return self.fallback.create_node(pool, node_id, root, taken)
        return self._create(str(pool["id"]), node_id, root, taken, self._node_image(pool))

    def _node_image(self, pool: Mapping[str, Any]) -> str:
        """The image of ``pool``'s node containers (pulled if missing): its first ``containerImageNames``."""
        images = [str(i) for i in (container_configuration(pool) or {}).get("containerImageNames") or ()]
        if not images:
            raise NodeError(f"pool {pool['id']!r}: the emulator's docker nodes need a containerImageNames image")
        self._ensure_image(images[0])
        return images[0]

    def _create(self, pool_id: str, node_id: str, root: Path, taken: Sequence[str], image: str) -> Node:
        """Start the node container of ``image`` on the pool's network."""
        root.mkdir(parents=True, exist_ok=True)
        hostname = re.sub(r"[^a-z0-9-]+", "-", node_id.lower()).strip("-")[:63] or "node"
        name = docker_name(pool_id, node_id, key=root)
        with self._lock:
            network, subnet = self._network(pool_id, root.parent)
            address = self._free_address(network, subnet, taken)
            try:
                docker("run", "-d", "--name", name, "--hostname", hostname, "--network", network, "--ip", address,
                       "--init", "--shm-size", self.shm_size, "-v", f"{root}:{NODE_ROOT}",
                       "--label", f"{LABEL_SCOPE}={self.scope}", "--label", f"{LABEL_POOL}={pool_id}",
                       "--label", f"{LABEL_NODE}={name}", "--entrypoint", "sleep", image, "infinity")
            except CommandFailed as exc:
                proc.run(["docker", "rm", "-f", name], timeout=60, check=False)
                raise NodeError(f"node {node_id!r}: its container could not be started: {exc}") from exc
            self._live.add(name)
        return Node(id=node_id, pool_id=pool_id, address=address, hostname=hostname, root=root,
                    node_root=NODE_ROOT,
                    data={"provider": self.name, "container": name, "network": network, "image": image})

    def restore_node(self, node: Node) -> Node:
        if not self._mine(node):
            return self.fallback.restore_node(node)
        name = node.data["container"]
        state = proc.run(["docker", "inspect", "-f", "{{.State.Running}}", name], timeout=60, check=False)
        if state.returncode != 0:
            raise NodeError(f"node {node.id!r}: its container {name!r} no longer exists")
        if state.stdout.decode().strip() != "true":
            self._start(node)
        with self._lock:
            self._live.add(name)
        return node

    def alive(self, node: Node) -> bool:
        """Whether the node container runs (a killed or stopped one is a dead VM)."""
        if not self._mine(node):
            return self.fallback.alive(node)
        state = proc.run(["docker", "inspect", "-f", "{{.State.Running}}", node.data["container"]], timeout=60,
                         check=False)
        return state.returncode == 0 and state.stdout.decode().strip() == "true"

    def destroy_node(self, node: Node) -> None:
        if not self._mine(node):
            self.fallback.destroy_node(node)
            return
        ids = docker("ps", "-aq", "--filter", f"label={LABEL_NODE}={node.data['container']}").split()
        if ids:
            proc.run(["docker", "rm", "-f", "-v", *ids], timeout=120, check=False)
        with self._lock:
            self._live.discard(node.data["container"])
        # The pool's network goes with its last node (docker refuses while other containers use it).
        proc.run(["docker", "network", "rm", node.data["network"]], timeout=60, check=False)

    # -- commands -------------------------------------------------------------------------------------------------
    def run(self, node: Node, argv: Sequence[str], *, env: Mapping[str, str], cwd: str,
            stdout: Path, stderr: Path, tag: str, container: Mapping[str, Any] | None = None,
            user: str = NONADMIN) -> Execution:
        """As :meth:`NodeProvider.run`; nodes of other providers go to ``fallback``."""
        if not self._mine(node):
            return self.fallback.run(node, argv, env=env, cwd=cwd, stdout=stdout, stderr=stderr, tag=tag,
                                     container=container, user=user)
        return self._run(node, argv, env=env, cwd=cwd, stdout=stdout, stderr=stderr, tag=tag,
                         settings=dict(container or {}), user=user)

    def _run(self, node: Node, argv: Sequence[str], *, env: Mapping[str, str], cwd: str, stdout: Path,
             stderr: Path, tag: str, settings: Mapping[str, Any], user: str) -> Execution:
        """Run on one of this provider's nodes, in the attempt's task container made from the task's container
        ``settings``; ``user`` is ignored: commands run as the emulator's uid:gid (see the module docstring)."""
        target = self._task_container(node, tag, settings)
        workdir = [] if settings.get("workingDirectory") == "containerImageDefault" else ["-w", cwd]
        return DockerExecution(*self._exec(node, tag, target, workdir, argv, env=env, stdout=stdout, stderr=stderr))

    @staticmethod
    def _exec(node: Node, tag: str, target: str, options: Sequence[str], argv: Sequence[str], *,
              env: Mapping[str, str], stdout: Path, stderr: Path,
              stdin: int = subprocess.DEVNULL) -> tuple[subprocess.Popen[bytes], str]:
        """Start ``docker exec`` of ``argv`` in the container ``target`` with ``options``; the CLI process and the
        marker (``TAG_VAR``, naming ``node`` and ``tag``) its processes carry. ``env`` reaches them through the
        CLI's environment, not its argv."""
        marker = f"{node.id}/{tag}/{os.urandom(6).hex()}"  # not in the CLI's own environment: kill() spares it
        command = ["docker", "exec", *(f"--env={k}" for k in env), f"--env={TAG_VAR}={marker}", *options, target,
                   *argv]
        cli_env = {k: v for k, v in os.environ.items() if k != TAG_VAR} | dict(env)
        with stdout.open("ab") as out, stderr.open("ab") as err:
            popen = proc.spawn(command, env=cli_env, stdin=stdin, stdout=out.fileno(), stderr=err.fileno(),
                               new_session=True)
        return popen, marker

    def kill_tag(self, node: Node, tag: str) -> None:
        if self._mine(node):
            self._kill_tag(node, tag)
        else:
            self.fallback.kill_tag(node, tag)

    def kill_tags(self, targets: Sequence[tuple[Node, str]]) -> None:
        """As :meth:`kill_tag` for each target; the fallback's nodes all at once (one sweep on process nodes)."""
        for node, tag in targets:
            if self._mine(node):
                self._kill_tag(node, tag)
        others = [(node, tag) for node, tag in targets if not self._mine(node)]
        if others:
            self.fallback.kill_tags(others)

    def _kill_tag(self, node: Node, tag: str) -> None:
        """Kill the tag's processes on one of this provider's nodes: remove its task container."""
        proc.run(["docker", "rm", "-f", "-v", self._task_name(node, tag)], timeout=120, check=False)

    def close(self) -> None:
        """Stop this provider's node containers (VMs deallocated while the emulator is down; ``restore_node``
        starts them again) and close the fallback provider."""
        with self._lock:
            live, self._live = sorted(self._live), set()
        if live:
            proc.run(["docker", "stop", "-t", "0", *live], timeout=120, check=False)
        self.fallback.close()

    # -- remote login (see .container_login) -----------------------------------------------------------------------
    def edit_users(self, node: Node, edit: Edit) -> None:
        if self._mine(node):
            container_login.edit_users(node, edit)
        else:
            self.fallback.edit_users(node, edit)

    def remote_login(self, node: Node, env: Mapping[str, str]) -> RemoteLogin:
        if self._mine(node):
            return container_login.remote_login(node, env)
        return self.fallback.remote_login(node, env)

    # -- fault injection ------------------------------------------------------------------------------------------
    def kill_node(self, node: Node) -> None:
        """The node's VM dies: SIGKILL its node container and every task container on it."""
        if not self._mine(node):
            self.fallback.kill_node(node)
            return
        ids = docker("ps", "-q", "--filter", f"label={LABEL_NODE}={node.data['container']}").split()
        if ids:
            proc.run(["docker", "kill", *ids], timeout=60, check=False)

    def restart_node(self, node: Node) -> None:
        """Start a killed node's container again (a rebooted VM: same address, host name and files)."""
        if self._mine(node):
            self._start(node)
        else:
            self.fallback.restart_node(node)

    def disconnect_node(self, node: Node) -> None:
        """Cut the node (and its task containers) off the pool network; processes keep running."""
        docker("network", "disconnect", "--force", node.data["network"], node.data["container"])

    def reconnect_node(self, node: Node) -> None:
        """Undo :meth:`disconnect_node` (same address)."""
        docker("network", "connect", "--ip", node.address, node.data["network"], node.data["container"])

    # -- internals ------------------------------------------------------------------------------------------------
    def _mine(self, node: Node) -> bool:
        return node.data.get("provider") == self.name

    def _start(self, node: Node) -> None:
        try:
            docker("start", node.data["container"])
        except CommandFailed as exc:
            raise NodeError(f"node {node.id!r}: its container could not be started: {exc}") from exc

    @staticmethod
    def _ensure_image(image: str) -> None:
        if proc.run(["docker", "image", "inspect", image], timeout=60, check=False).returncode == 0:
            return
        try:
            docker("pull", "-q", image, timeout=1800)
        except CommandFailed as exc:
            raise NodeError(f"container image {image!r} is not available locally and cannot be pulled: "
                            f"{exc.stderr.strip()[-300:]}") from exc

    @staticmethod
    def _task_name(node: Node, tag: str) -> str:
        return docker_name(node.pool_id, node.id, tag, key=f"{node.data['container']}/{tag}")

    def _node_lock(self, node: Node) -> threading.Lock:
        with self._lock:
            return self._node_locks.setdefault(node.data["container"], threading.Lock())

    def _task_container(self, node: Node, tag: str, settings: Mapping[str, Any]) -> str:
        """The attempt's task container on ``node``, created and started on first use."""
        name = self._task_name(node, tag)
        with self._node_lock(node):  # nodes in parallel, one task container per node and tag
            if proc.run(["docker", "inspect", "-f", "{{.Id}}", name], timeout=60, check=False).returncode == 0:
                return name
            running = proc.run(["docker", "inspect", "-f", "{{.State.Running}}", node.data["container"]],
                               timeout=60, check=False)
            if running.stdout.decode().strip() != "true":
                raise NodeError(f"node {node.id!r} is down: its container {node.data['container']!r} is not running")
            image = str(settings.get("imageName") or node.data["image"])
            try:
                options = shlex.split(str(settings.get("containerRunOptions") or ""))
            except ValueError as exc:
                raise CommandFailed(["docker", "create"], None, str(exc),
                                    reason=f"got unparsable containerRunOptions {settings['containerRunOptions']!r}"
                                    ) from exc
            self._ensure_image(image)
            create = ["docker", "create", "--name", name, "--network", f"container:{node.data['container']}",
                      "--init", "--shm-size", self.shm_size, "--user", f"{os.getuid()}:{os.getgid()}",
                      *bind_mounts(node, settings.get("containerHostBatchBindMounts")),
                      "--label", f"{LABEL_SCOPE}={self.scope}",
                      "--label", f"{LABEL_NODE}={node.data['container']}", *options,
                      "--entrypoint", "sleep", image, "infinity"]
            proc.run(create, timeout=120)
            try:
                docker("start", name)
            except CommandFailed:
                proc.run(["docker", "rm", "-f", name], timeout=60, check=False)
                raise
        return name

    def _network(self, pool_id: str, pool_dir: Path) -> tuple[str, ipaddress.IPv4Network]:
        """The pool's network (created with a free /24 on first use); its name and subnet."""
        name = docker_name(pool_id, key=pool_dir)
        for _ in range(20):
            found = proc.run(["docker", "network", "inspect", "-f", "{{(index .IPAM.Config 0).Subnet}}", name],
                             timeout=60, check=False)
            if found.returncode == 0:
                return name, ipaddress.IPv4Network(found.stdout.decode().strip())
            subnet = self._pick_subnet()
            created = proc.run(["docker", "network", "create", "--subnet", str(subnet),
                                "--label", f"{LABEL_SCOPE}={self.scope}", "--label", f"{LABEL_POOL}={pool_id}",
                                name], timeout=60, check=False)
            if created.returncode == 0:
                return name, subnet
            # Lost a race (another emulator took the subnet or made this network): look again.
        raise NodeError(f"pool {pool_id!r}: no docker network could be created for it")

    @staticmethod
    def _pick_subnet() -> ipaddress.IPv4Network:
        local = [ipaddress.IPv4Interface(f"{a.address}/{a.netmask}").network
                 for addrs in psutil.net_if_addrs().values() for a in addrs
                 if a.family.name == "AF_INET" and a.netmask]
        for _ in range(100):
            offset = random.randrange(SUPERNET.num_addresses // 256) * 256  # noqa: S311 - not crypto
            subnet = ipaddress.IPv4Network((int(SUPERNET.network_address) + offset, 24))
            if not any(subnet.overlaps(net) for net in local):
                return subnet
        raise NodeError(f"no free /24 for a pool network in {SUPERNET}")

    @staticmethod
    def _free_address(network: str, subnet: ipaddress.IPv4Network, taken: Sequence[str]) -> str:
        listed = docker("network", "inspect", "-f", "{{range .Containers}}{{.IPv4Address}} {{end}}", network)
        used = {a.split("/")[0] for a in listed.split()} | set(taken)
        for host in list(subnet.hosts())[1:]:  # .1 is docker's gateway
            if str(host) not in used:
                return str(host)
        raise NodeError(f"docker network {network!r} ({subnet}) has no free address left")
