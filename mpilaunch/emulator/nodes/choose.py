"""Which node provider ``mpilaunch emulator serve --nodes`` runs: ``process``, ``docker`` or ``auto``.

* ``process``: every node is a process node; container tasks' commands run on the node as plain processes.
* ``docker``: container pools get docker nodes (:class:`~.docker.DockerProvider`), other pools process nodes; the
  docker engine must answer when the emulator starts.
* ``auto`` (default): ``docker`` when the docker engine answers, else process nodes that refuse container pools
  with a clear error when the pool is created (:class:`DockerlessProvider`).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mpilaunch.emulator.nodes.base import Node, NodeError, NodeProvider
from mpilaunch.emulator.nodes.docker import DockerProvider, container_configuration
from mpilaunch.emulator.nodes.process import ProcessProvider
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
    """Process nodes that refuse container pools, saying why docker is unusable (``--nodes auto`` without docker)."""

    def __init__(self, why: str) -> None:
        super().__init__()
        self.why = why

    def check_pool(self, pool: Mapping[str, Any]) -> None:
        if container_configuration(pool) is not None:
            raise NodeError(f"pool {pool.get('id')!r} has a containerConfiguration, but this emulator cannot run "
                            f"docker nodes: {self.why}. Start docker (scripts/setup) and restart the emulator, or "
                            f"serve with --nodes process to run container tasks as plain processes")

    def create_node(self, pool: Mapping[str, Any], node_id: str, root: Path, taken: Sequence[str]) -> Node:
        self.check_pool(pool)
        return super().create_node(pool, node_id, root, taken)


def make_provider(kind: str, *, docker_scope: str = "mpilaunch") -> NodeProvider:
    """The node provider for ``--nodes KIND`` (see the module docstring); docker nodes are labelled ``docker_scope``."""
    if kind not in NODE_KINDS:
        raise ValueError(f"unknown node provider kind {kind!r}; expected one of {NODE_KINDS}")
    if kind == "process":
        return ProcessProvider()
    why = docker_unusable()
    if why is None:
        return DockerProvider(scope=docker_scope)
    if kind == "docker":
        raise InvalidInput(f"--nodes docker: {why} (start it with scripts/setup, or use --nodes process)")
    return DockerlessProvider(why)


def describe(provider: NodeProvider) -> str:
    """One line for ``serve``'s banner: what nodes pools get."""
    if isinstance(provider, DockerProvider):
        return f"docker containers for container pools (scope {provider.scope}), processes for others"
    if isinstance(provider, DockerlessProvider):
        return f"processes; container pools are refused ({provider.why})"
    return "processes (container tasks' commands run as plain processes)"
