"""Which node providers ``mpilaunch emulator serve --nodes`` runs: ``process``, ``docker`` or ``auto``.

A pool chooses its kind of node: a ``containerConfiguration`` asks for container nodes, metadata
``mpilaunch-emulator-nodes=vm`` (:data:`~mpilaunch.emulator.defaults.KIND_METADATA`) without one for VM-like nodes,
anything else for process nodes. ``--nodes`` says what this emulator gives each kind:

* ``process``: process nodes for all pools but VM pools, which are refused when created; container tasks' commands
  run on the node as plain processes.
* ``docker``: container pools get docker nodes (:class:`~.docker.DockerProvider`), VM pools VM-like nodes
  (:class:`~.vm.VmProvider`), other pools process nodes; the docker engine must answer when the emulator starts.
* ``auto`` (default): ``docker`` when the docker engine answers, else process nodes that refuse container and VM pools
  with a clear error when the pool is created (:class:`DockerlessProvider`).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mpilaunch.emulator.defaults import KIND_METADATA, KIND_VM, VM_IMAGE
from mpilaunch.emulator.nodes.base import Node, NodeError, NodeProvider
from mpilaunch.emulator.nodes.docker import DockerProvider, container_configuration
from mpilaunch.emulator.nodes.process import ProcessProvider
from mpilaunch.emulator.nodes.vm import VmProvider, wants_vm
from node_runtime import proc
from node_runtime.errors import CommandFailed, InvalidInput

NODE_KINDS = ("auto", "docker", "process")


def docker_unusable() -> str | None:
    """Why the docker engine cannot run nodes here, or ``None`` when ``docker info`` answers."""
    if shutil.which("docker") is None:
        return "the docker CLI is not installed"
    try:
        done = proc.run(["docker", "info", "--format", "{{.ServerVersion}}"], timeout=30, check=False)
    except CommandFailed as exc:
        return f"'docker info' failed: {exc}"
    if done.returncode != 0:
        return f"the docker engine does not answer: {done.stderr.decode(errors='replace').strip()[-200:]}"
    return None


class DockerlessProvider(ProcessProvider):
    """Process nodes that refuse the pools whose nodes need docker, saying ``why`` there is none: VM pools, and
    container pools too unless ``containers_as_processes`` (``--nodes process``)."""

    def __init__(self, why: str, *, containers_as_processes: bool = False) -> None:
        super().__init__()
        self.why = why
        self.containers_as_processes = containers_as_processes

    def check_pool(self, pool: Mapping[str, Any]) -> None:
        if wants_vm(pool):
            raise NodeError(f"pool {pool.get('id')!r} asks for VM-like nodes (metadata {KIND_METADATA}={KIND_VM}), but "
                            f"this emulator cannot run them: {self.why}. VM-like nodes are docker containers: start "
                            "docker (scripts/setup) and serve with --nodes auto or docker")
        if container_configuration(pool) is not None and not self.containers_as_processes:
            raise NodeError(f"pool {pool.get('id')!r} has a containerConfiguration, but this emulator cannot run "
                            f"docker nodes: {self.why}. Start docker (scripts/setup) and restart the emulator, or "
                            f"serve with --nodes process to run container tasks as plain processes")

    def create_node(self, pool: Mapping[str, Any], node_id: str, root: Path, taken: Sequence[str]) -> Node:
        self.check_pool(pool)
        return super().create_node(pool, node_id, root, taken)


def make_provider(kind: str, *, docker_scope: str = "mpilaunch", vm_image: str = VM_IMAGE) -> NodeProvider:
    """The node provider for ``--nodes KIND`` (see the module docstring); docker and VM-like nodes are labelled
    ``docker_scope``, VM-like nodes are containers of ``vm_image``."""
    if kind not in NODE_KINDS:
        raise ValueError(f"unknown node provider kind {kind!r}; expected one of {NODE_KINDS}")
    if kind == "process":
        return DockerlessProvider("it serves --nodes process", containers_as_processes=True)
    why = docker_unusable()
    if why is None:
        return DockerProvider(scope=docker_scope, fallback=VmProvider(image=vm_image, scope=docker_scope))
    if kind == "docker":
        raise InvalidInput(f"--nodes docker: {why} (start it with scripts/setup, or use --nodes process)")
    return DockerlessProvider(why)


def describe(provider: NodeProvider) -> str:
    """One line for ``serve``'s banner: what nodes pools get."""
    if isinstance(provider, DockerProvider) and isinstance(provider.fallback, VmProvider):
        return (f"docker containers for container pools, containers of {provider.fallback.image} for VM pools "
                f"(scope {provider.scope}), processes for others")
    if isinstance(provider, DockerlessProvider) and provider.containers_as_processes:
        return "processes (container tasks' commands run as plain processes); VM pools are refused"
    if isinstance(provider, DockerlessProvider):
        return f"processes; container and VM pools are refused ({provider.why})"
    return "processes"
