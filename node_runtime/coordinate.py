"""Start, verify and stop this node's coordination service from a :class:`NodeEnvironment`."""

from __future__ import annotations

from mpilaunch.errors import InvalidEnvironment
from node_runtime import keys, sshd
from node_runtime.env import SECRET_VARIABLE, NodeEnvironment


def service(env: NodeEnvironment) -> sshd.Service:
    """This node's service (address, task port, files under the task's shared dir)."""
    return sshd.service_for(env.shared_dir, env.current_address, env.ssh_port)


def prepare(env: NodeEnvironment) -> sshd.Service:
    """Write the derived keys and known_hosts and the ssh client config for this node; needs the task secret."""
    if env.task_secret is None:
        raise InvalidEnvironment([f"{SECRET_VARIABLE} is not set: the coordination service's keys derive from it "
                                  "(the mpilaunch client sets it on every multi-instance task)"])
    svc = service(env)
    keys.write_key_files(svc.files, keys.derive_keys(env.task_secret), env.hosts, env.ssh_port)
    sshd.write_client_config(svc)
    return svc


def start_service(env: NodeEnvironment, sshd_path: str | None = None) -> tuple[str, int]:
    """Make this node's service run and answer a real ssh handshake; returns (status, pid)."""
    svc = prepare(env)
    binary = sshd.find_sshd(sshd_path)
    status = sshd.ensure(svc, binary)
    pid = sshd.running_pid(svc)
    return status, pid if pid is not None else -1


def stop_service(env: NodeEnvironment) -> bool:
    """Stop this node's service; returns whether one was running."""
    return sshd.stop(service(env))
