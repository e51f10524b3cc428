"""Remote login to docker and VM-like nodes: real accounts in the node container, and an sshd started there.

The node container plays the VM (:mod:`.docker`, :mod:`.vm`), so its own ``/etc/passwd`` holds the node's users, as
a VM's does: ``useradd``/``usermod``/``userdel`` run in it as root (``docker exec -u 0``), keys go to the user's
``~/.ssh/authorized_keys`` (with ``expiry-time``), the account expires on its expiry date, passwords arrive already
hashed (``chpasswd -e``). A reimaged or preempted node is a new container (the users are gone), a rebooted one the
same container (they stay). The users the API made are listed in :data:`STATE` (root-only).

The sshd is the image's own (``/usr/sbin/sshd``; VM-like nodes get it from the StartTask that installs the runtime),
started on first use on port 22 of the node's address with the config of :func:`~.login.render_sshd_config`; a node
without one refuses remote login (:class:`~.base.LoginUnsupported`) saying so.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence

from mpilaunch.emulator.nodes.base import AccountTaken, LoginUnsupported, Node, NodeError
from mpilaunch.emulator.nodes.login import (
    ADMIN_GROUP,
    LOGIN_GROUP,
    Edit,
    LoginUser,
    RemoteLogin,
    Users,
    authorized_keys,
    render_sshd_config,
)
from node_runtime import proc

STATE = "/var/lib/mpilaunch-emulator/login"
"""The login state's directory in the node container (users.json, host key, sshd_config, pid file, log)."""
SSH_PORT = 22
START_WAIT = 10.0
"""Seconds a started sshd has to answer."""
_locks: dict[str, threading.Lock] = {}
_locks_lock = threading.Lock()


def _lock(node: Node) -> threading.Lock:
    with _locks_lock:
        return _locks.setdefault(node.data["container"], threading.Lock())


def root_exec(node: Node, argv: Sequence[str], stdin: bytes | None = None, *, check: bool = True,
              timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` as root in the node container."""
    return proc.run(["docker", "exec", "-i", "-u", "0", node.data["container"], *argv], input=stdin or b"",
                    timeout=timeout, check=check)


def sh(node: Node, script: str, *args: str, stdin: bytes | None = None,
       check: bool = True) -> subprocess.CompletedProcess[bytes]:
    """Run a fixed shell ``script`` with positional ``args`` as root in the node container."""
    return root_exec(node, ["sh", "-c", script, "sh", *args], stdin, check=check)


def expire_date(user: LoginUser) -> str:
    """useradd's ``--expiredate``: the day after the expiry's date (the account lives through its expiry day)."""
    from datetime import timedelta, timezone

    try:
        return (user.expiry.astimezone(timezone.utc) + timedelta(days=1)).strftime("%Y-%m-%d")
    except OverflowError:  # 9999-12-31
        return "9999-12-31"


# Shell scripts run in the node container (arguments, never interpolated).
_TAKEN = 'getent passwd "$1" >/dev/null || getent group "$1" >/dev/null'
_ADD = ('groupadd -f "$3" && useradd --create-home --user-group --shell /bin/bash --expiredate "$2" '
        '--groups "$3" "$1" && { [ "$4" != admin ] || ! getent group "$5" >/dev/null || usermod -aG "$5" "$1"; }')
_SET = ('usermod --expiredate "$2" "$1" && h=$(getent passwd "$1" | cut -d: -f6) && umask 077 && '
        'mkdir -p "$h/.ssh" && cat > "$h/.ssh/authorized_keys" && chown -R "$1:" "$h/.ssh"')
_WRITE = 'mkdir -p "$(dirname "$1")" && umask 077 && cat > "$1"'


def _read(node: Node) -> Users:
    done = root_exec(node, ["cat", f"{STATE}/users.json"], check=False)
    if done.returncode != 0:
        return {}
    return {d["name"]: LoginUser.from_json(d) for d in json.loads(done.stdout)}


def edit_users(node: Node, edit: Edit) -> None:
    """:meth:`~.base.NodeProvider.edit_users` for a container node."""
    with _lock(node):
        before = _read(node)
        users = dict(before)
        edit(users)
        for name in set(before) - set(users):
            sh(node, 'userdel --force --remove "$1" 2>/dev/null; true', name)
        for name, user in users.items():
            if name not in before:
                if sh(node, _TAKEN, name, check=False).returncode == 0:
                    raise AccountTaken(f"the node has an account or group named {name!r} already")
                sh(node, _ADD, name, expire_date(user), LOGIN_GROUP, "admin" if user.is_admin else "", ADMIN_GROUP)
            if before.get(name) != user:
                sh(node, _SET, name, expire_date(user), stdin=authorized_keys([user]).encode())
                root_exec(node, ["chpasswd", "-e"], f"{name}:{user.password_hash or '*'}\n".encode())
        sh(node, _WRITE, f"{STATE}/users.json",
           stdin=json.dumps([u.to_json() for u in users.values()], indent=1).encode())


def _listening(address: str, wait: float = 0.0) -> bool:
    """Whether an sshd answers on the node's port 22 (trying for ``wait`` seconds)."""
    deadline = time.monotonic() + wait
    while True:
        with contextlib.suppress(OSError), socket.create_connection((address, SSH_PORT), timeout=2) as s:
            if s.recv(4).startswith(b"SSH-"):
                return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def remote_login(node: Node, env: Mapping[str, str]) -> RemoteLogin:
    """:meth:`~.base.NodeProvider.remote_login` for a container node."""
    with _lock(node):
        if _listening(node.address):
            return RemoteLogin(node.address, SSH_PORT)
        found = sh(node, "command -v sshd || ls /usr/sbin/sshd", check=False)
        if found.returncode != 0:
            raise LoginUnsupported(f"node {node.id} has no OpenSSH server (sshd) to log in to: install "
                                   "openssh-server in its image (VM-like nodes: the StartTask of pool create "
                                   "--install-runtime does)")
        sshd = found.stdout.decode().split()[0]
        key = f"{STATE}/ssh_host_ed25519_key"
        sh(node, 'mkdir -p "$(dirname "$1")" /run/sshd && { [ -f "$1" ] || ssh-keygen -q -t ed25519 -N "" -f "$1"; }',
           key)
        config = render_sshd_config(listen=f"{node.address}:{SSH_PORT}", host_key=key, env=env,
                                    pid_file=f"{STATE}/sshd.pid")
        sh(node, _WRITE, f"{STATE}/sshd_config", stdin=config.encode())
        done = root_exec(node, [sshd, "-f", f"{STATE}/sshd_config", "-E", f"{STATE}/sshd.log"], check=False)
        if done.returncode != 0 or not _listening(node.address, START_WAIT):
            log = root_exec(node, ["tail", "-n", "5", f"{STATE}/sshd.log"], check=False).stdout.decode()
            raise NodeError(f"the sshd of node {node.id} did not start: "
                            f"{(done.stderr.decode() + log).strip() or 'no message'} "
                            f"(command: {shlex.join([sshd, '-f', f'{STATE}/sshd_config'])})")
        return RemoteLogin(node.address, SSH_PORT)
