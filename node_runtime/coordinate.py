"""Start, verify and stop this node's coordination service from a :class:`NodeEnvironment`."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Mapping
from pathlib import Path

from node_runtime import fabric, keys, sshd, tmpdirs
from node_runtime.addresses import local_addresses, parse_address
from node_runtime.contract import RUNTIME_VERSION, SECRET_VARIABLE, VERSION_VARIABLE
from node_runtime.env import NodeEnvironment, parse_bool, parse_endpoint
from node_runtime.errors import InvalidEnvironment, ServiceError

WAIT_PER_NODE = 0.3
"""Seconds the primary's wait for the services grows by per remote node (see :func:`wait_timeout`)."""


def wait_timeout(timeout: float, remote_nodes: int) -> float:
    """How long the primary waits for the services of ``remote_nodes`` other nodes when asked for ``timeout``:
    ``timeout + WAIT_PER_NODE * remote_nodes`` (30 s for 3 nodes becomes 30.6 s, for 100 nodes 59.7 s).

    The logins are one ssh client and one sshd connection each, all at once: their CPU (~60-80 ms per login here,
    more on a loaded machine) is spent on the primary's cores, so the last one answers after a time that grows
    linearly with the node count; a fixed deadline that suits 3 nodes gives up on a large task whose nodes are all
    fine (issue 13: 78 of 99 hosts "no answer" at 30 s). ``WAIT_PER_NODE`` is over 10x the per-node wait measured
    with 100 emulated nodes on 2 cores at load 40+ (2.5 s for 99 logins: docs/benchmarks.md, "Emulator at
    scale")."""
    return timeout + WAIT_PER_NODE * max(remote_nodes, 0)


def current_environment(environ: Mapping[str, str] | None = None) -> NodeEnvironment:
    """:meth:`NodeEnvironment.current` without enumerating every interface (psutil, ~10 ms) when binding tells: the
    primary's address is the one of ``AZ_BATCH_MASTER_NODE``, another node's the one host-list address that is this
    machine's (a socket binds only to those). Otherwise (or to report a problem) the interfaces are enumerated."""
    environ = os.environ if environ is None else environ
    with contextlib.suppress(ValueError):
        if parse_bool(environ.get("AZ_BATCH_IS_CURRENT_NODE_MASTER", "")):
            candidates = [parse_endpoint(environ.get("AZ_BATCH_MASTER_NODE", ""))[0]]
        else:
            candidates = [parse_address(h) for h in environ.get("AZ_BATCH_HOST_LIST", "").split(",")]
        mine = [a for a in candidates if is_local_address(a)]
        if len(mine) == 1:
            return NodeEnvironment.from_environ(environ, local_addresses=mine)
    return NodeEnvironment.from_environ(environ, local_addresses=local_addresses())


def is_local_address(address: str) -> bool:
    """Whether ``address`` is one of this machine's (binding to it works; never trusted where the kernel allows
    binding to foreign addresses: then False, and the caller enumerates the interfaces)."""
    family, version = (socket.AF_INET6, "ipv6") if ":" in address else (socket.AF_INET, "ipv4")
    try:
        if Path(f"/proc/sys/net/{version}/ip_nonlocal_bind").read_text().strip() != "0":
            return False
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((address, 0))
    except OSError:
        return False
    return True


def service(env: NodeEnvironment) -> sshd.Service:
    """This node's service (address, task port, files under the task's shared dir, keys outside the node root)."""
    return sshd.service_for(env.shared_dir, env.current_address, env.ssh_port, node_root=env.node_root_dir)


def prepare(env: NodeEnvironment) -> sshd.Service:
    """Write the derived keys and known_hosts and the ssh client config for this node; needs the task secret."""
    if env.task_secret is None:
        raise InvalidEnvironment([f"{SECRET_VARIABLE} is not set: the coordination service's keys derive from it "
                                  "(the mpilaunch client sets it on every multi-instance task)"])
    svc = service(env)
    tmpdirs.claim(svc.files.private)
    keys.write_key_files(svc.files, keys.derive_keys(env.task_secret), env.hosts, env.ssh_port)
    sshd.write_client_config(svc)
    return svc


def check_version(env: NodeEnvironment) -> None:
    """Refuse a node whose runtime is not the version of the client that built the task (when the client said)."""
    if env.client_version and env.client_version != RUNTIME_VERSION:
        raise ServiceError(
            f"node {env.node_id} runs mpilaunch runtime {RUNTIME_VERSION}, but the client that submitted the task "
            f"runs {env.client_version} ({VERSION_VARIABLE})",
            details=[f"fix: install runtime {env.client_version} on the pool's nodes: recreate the pool with "
                     "`mpilaunch pool create --install-runtime` from that client, or rebuild the task image "
                     "(scripts/build-image) from the same source"])


def start_service(env: NodeEnvironment, sshd_path: str | None = None) -> tuple[str, int, fabric.NodeFabric]:
    """Check the runtime version, then make this node's service run and answer a real ssh handshake, and record
    what the node offers MPI (detected meanwhile) for the primary; returns (status, pid, detection)."""
    check_version(env)
    binary = sshd.find_sshd(sshd_path)
    detected = fabric.detect_in_background(env.current_address, sshd.clean_environ(), env.node_shared_dir)
    svc = prepare(env)
    node = detected()
    fabric.write_node_file(svc.files.directory, node)  # before the service answers: the primary reads it then
    try:
        status = sshd.ensure(svc, binary)
    finally:  # the dirs of earlier services that were killed, not stopped (a leftover that ensure evicted too)
        tmpdirs.sweep(svc.tmp_dir, svc.files.private)
    pid = sshd.running_pid(svc)
    return status, pid if pid is not None else -1, node


def stop_service(env: NodeEnvironment) -> bool:
    """Stop this node's service; returns whether one was running."""
    return sshd.stop(service(env))
