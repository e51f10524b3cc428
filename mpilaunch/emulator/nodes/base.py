"""The node-provider interface: how the emulator's engine gets compute nodes and runs commands on them.

A provider turns "pool P needs node N" into something that can run processes: local process groups on a loopback
address (:mod:`.process`, the default), one docker container per node (:mod:`.docker`) or one bare-OS container per
node that plays the VM (:mod:`.vm`). The engine owns everything else
(scheduling, Batch directory layout, resource files, environment, state); a provider only does four things:

* :meth:`NodeProvider.create_node` — make a node whose root directory (``AZ_BATCH_NODE_ROOT_DIR``) is the host
  directory ``root`` (the engine creates it and writes files there; the node must see the same files, e.g. through a
  bind mount) and give it an IPv4 address the other nodes of the pool can reach.
* :meth:`NodeProvider.run` — start one command on a node, with exactly the environment given (plus the provider's
  base environment, e.g. ``PATH``), its working directory as the node sees it, stdout/stderr written to host
  files, and the elevation level of its Batch ``userIdentity`` (:data:`ADMIN` or :data:`NONADMIN`). No shell:
  ``argv`` is executed as is. Returns an :class:`Execution` to wait on or kill.
* :meth:`NodeProvider.kill_tag` — kill every process started on a node by commands run with a given ``tag``,
  including daemons they left behind (a coordination command starts sshd and exits). The engine uses one tag per
  task attempt and calls this when the attempt ends, so no process of a finished task survives.
  :meth:`NodeProvider.kill_tags` does it for many (node, tag) pairs at once (one process-table scan for all the
  nodes of an attempt on the process provider).
* :meth:`NodeProvider.destroy_node` — kill everything on the node and release it (the engine removes ``root``).

After an emulator restart the engine calls :meth:`NodeProvider.restore_node` for every node in its store (and
:meth:`kill_tag` for the attempts that were running), so :class:`Node` must survive a JSON round trip
(:meth:`Node.to_json`/:meth:`Node.from_json`); keep provider state (container ids, ...) in ``Node.data``.

Paths: the engine builds every path a command sees from :attr:`Node.node_root` (e.g. ``/mnt/batch/tasks`` when the
provider maps each node's root there, as Azure does), and reads/writes files through :attr:`Node.root`. Use
:meth:`Node.node_path` to translate.

All methods are called from engine threads, possibly concurrently for different nodes; implementations must be
thread-safe. Errors: raise :class:`node_runtime.errors.CommandFailed` (cannot start a command) or
:class:`NodeError` (the node itself is broken); the engine turns them into Batch failure info.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node_runtime.errors import MpilaunchError

if TYPE_CHECKING:
    from collections.abc import Callable

    from mpilaunch.emulator.nodes.login import LoginUser, RemoteLogin

ADMIN, NONADMIN = "admin", "nonadmin"
"""The elevation levels of Batch's auto-user, as :meth:`NodeProvider.run` takes them."""


class NodeError(MpilaunchError):
    """A node could not be created, restored or used; the message names the node and the cause."""


class LoginUnsupported(NodeError):
    """This node cannot be logged in to (its kind, or its image has no sshd); the message says why."""


class AccountTaken(NodeError):
    """The user name is an account (or group) the node's OS has already."""


@dataclass(frozen=True)
class Node:
    """A compute node as the engine knows it (JSON round-trippable; stored in the node doc's ``_node``)."""

    id: str
    """The Batch node id (``BatchNode.id``)."""
    pool_id: str
    address: str
    """IPv4 address other nodes use (``BatchNode.ipAddress``, the entries of ``AZ_BATCH_HOST_LIST``)."""
    hostname: str
    """The node's host name as its processes see it (Open MPI needs distinct names per node)."""
    root: Path
    """Host path of the node root: where the emulator reads and writes the node's files."""
    node_root: str
    """The same directory as the node's processes see it (``AZ_BATCH_NODE_ROOT_DIR``)."""
    data: Mapping[str, str] = field(default_factory=dict)
    """Provider-private state (container id, ...), persisted with the node."""

    def node_path(self, host_path: Path) -> str:
        """Translate a host path inside :attr:`root` to the path the node's processes see."""
        rel = Path(host_path).relative_to(self.root)
        return self.node_root if rel == Path() else f"{self.node_root.rstrip('/')}/{rel.as_posix()}"

    def host_path(self, node_path: str) -> Path:
        """Translate a path the node's processes see inside :attr:`node_root` to the host path (the inverse)."""
        return self.root / Path(node_path).relative_to(self.node_root)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "pool_id": self.pool_id, "address": self.address, "hostname": self.hostname,
                "root": str(self.root), "node_root": self.node_root, "data": dict(self.data)}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Node:
        return cls(id=doc["id"], pool_id=doc["pool_id"], address=doc["address"], hostname=doc["hostname"],
                   root=Path(doc["root"]), node_root=doc["node_root"], data=dict(doc.get("data", {})))


class Execution(ABC):
    """One command started by :meth:`NodeProvider.run`."""

    @abstractmethod
    def poll(self) -> int | None:
        """The exit code if the command has exited, else ``None``. Killed by signal ``s``: ``128 + s``."""

    @abstractmethod
    def wait(self, timeout: float | None = None) -> int | None:
        """Wait up to ``timeout`` seconds (forever if ``None``); the exit code, or ``None`` if still running."""

    @abstractmethod
    def kill(self) -> None:
        """Kill the command and its process group at once (SIGKILL); idempotent. Daemons: see ``kill_tag``."""


class NodeProvider(ABC):
    """Creates nodes and runs commands on them; see the module docstring for the contract."""

    name: str = "abstract"

    @abstractmethod
    def create_node(self, pool: Mapping[str, Any], node_id: str, root: Path, taken: Sequence[str]) -> Node:
        """Create node ``node_id`` of ``pool`` (the pool doc, ``BatchPool``-shaped) with host root dir ``root``.

        ``taken`` lists the addresses of the emulator's other nodes (a provider that picks addresses itself must
        avoid them). Returns when the node can run commands.
        """

    def check_pool(self, pool: Mapping[str, Any]) -> None:  # noqa: B027 - optional hook with a no-op default
        """Raise :class:`NodeError` (saying why) if this provider cannot make nodes for ``pool``; checked when the
        pool is added, so the request fails instead of its nodes."""

    def alive(self, node: Node) -> bool:
        """Whether the node is up (its "VM" runs). The engine asks after a failed attempt, marks a node that is not
        ``unusable`` (so retries go elsewhere or wait), and asks again until it is back. Default: always up."""
        return True

    def kill_node(self, node: Node) -> None:
        """The node fails: every process on it ends at once and :meth:`alive` says no until :meth:`restart_node`
        (files, address and host name stay, as a VM's disk does)."""
        raise NodeError(f"the {self.name} provider cannot kill node {node.id!r}")

    def restart_node(self, node: Node) -> None:
        """Bring a node :meth:`kill_node` killed up again."""
        raise NodeError(f"the {self.name} provider cannot restart node {node.id!r}")

    @abstractmethod
    def restore_node(self, node: Node) -> Node:
        """Make a node from a previous emulator run usable again (e.g. start its stopped container)."""

    @abstractmethod
    def run(self, node: Node, argv: Sequence[str], *, env: Mapping[str, str], cwd: str,
            stdout: Path, stderr: Path, tag: str, container: Mapping[str, Any] | None = None,
            user: str = NONADMIN) -> Execution:
        """Start ``argv`` on ``node`` (no shell) with ``env`` added to the provider's base environment.

        ``cwd`` is a node path (see :meth:`Node.node_path`); ``stdout``/``stderr`` are host files, opened for
        append so successive commands of one task can share them. ``tag`` marks every process the command starts
        (including daemons) for :meth:`kill_tag`. ``container`` is the task's ``containerSettings`` (if any):
        providers with container nodes run the command in it; others run it on the node as is. ``user`` is
        :data:`ADMIN` (Batch's admin auto-user) or :data:`NONADMIN`; providers whose nodes have such users run
        the command as the matching one, others as they run every command.
        """

    @abstractmethod
    def kill_tag(self, node: Node, tag: str) -> None:
        """Kill (SIGKILL) every process on ``node`` started with ``tag`` and their descendants; idempotent."""

    def kill_tags(self, targets: Sequence[tuple[Node, str]]) -> None:
        """:meth:`kill_tag` for every ``(node, tag)`` of ``targets`` (an attempt's nodes, or every node at a
        restart). Providers that find processes by scanning override it to scan once for all of them; the default
        calls :meth:`kill_tag` for each. Raises the first error after trying every target."""
        first: MpilaunchError | None = None
        for node, tag in targets:
            try:
                self.kill_tag(node, tag)
            except MpilaunchError as exc:
                first = first or exc
        if first is not None:
            raise first

    @abstractmethod
    def destroy_node(self, node: Node) -> None:
        """Kill every process on ``node`` and release its resources; idempotent. ``node.root`` is left alone."""

    def close(self) -> None:  # noqa: B027 - optional hook with a no-op default
        """Release provider-wide resources when the engine stops (nodes stay, for a restart)."""

    # Remote login (Batch's Add/Update/Delete Node User, Get Remote Login Settings): see :mod:`.login`.
    def edit_users(self, node: Node, edit: Callable[[dict[str, LoginUser]], None]) -> None:
        """Apply ``edit`` to the node's user accounts (by name) atomically, then make the node's OS match them;
        :class:`AccountTaken` if a new name is an account the node has already. A reimaged or preempted
        node loses them, a rebooted one keeps them. Default: :class:`LoginUnsupported`."""
        raise LoginUnsupported(f"remote login is not supported on {self.name} nodes")

    def remote_login(self, node: Node, env: Mapping[str, str]) -> RemoteLogin:
        """Start the node's sshd unless it runs (its sessions get ``env``); where it listens. Default:
        :class:`LoginUnsupported`."""
        raise LoginUnsupported(f"remote login is not supported on {self.name} nodes")
