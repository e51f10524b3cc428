"""A shell on a compute node through Batch's own APIs (``mpilaunch ssh``): a temporary node user, OpenSSH, cleanup.

:func:`open_session` adds a node user named ``mpl<hex>`` (Add Node User: a fresh Ed25519 public key, an expiry,
``isAdmin`` false unless asked), asks where to connect (Get Remote Login Settings: address and port), runs the
system's ``ssh`` with the private key (kept in a private temporary directory, deleted afterwards) and deletes the user
when ssh ends, on Ctrl-C, SIGTERM or SIGHUP too. If the client dies before that (SIGKILL, a lost machine), the user
stays until its expiry; Batch documents the expiry of Linux users with a precision of a day.

For a task, the node is the one the chosen instance ran on (its results row), and the session starts in the task's
working directory there (``<node root>/<taskRootDirectory>/wd``) if the user may enter it, else in its home, saying
so. Node host keys: Batch publishes none, so the first login to a node trusts its key (``accept-new``), stored per
node in ``$MPILAUNCH_HOME/known_hosts``; a later login to the same node (a reboot keeps its key) is checked against it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from node_runtime.errors import InvalidInput, MpilaunchError

if TYPE_CHECKING:
    from mpilaunch.client.api import Launcher
    from mpilaunch.client.results import TaskResults

NODE_ROOTS = ("/mnt/batch/tasks", "/mnt/resource/batch/tasks")
"""Where Linux images put ``AZ_BATCH_NODE_ROOT_DIR``, tried after the variable itself (a login shell may lack it)."""
SSH_PORT = 22
LOGIN_NAME_PROPERTY = "mpilaunchLoginName"
"""The emulator's addition to remote login settings on nodes without accounts of their own (never sent by Azure)."""
NAT_DOC = "https://learn.microsoft.com/azure/batch/pool-endpoint-configuration"
INTERRUPTS = (signal.SIGTERM, signal.SIGHUP)
"""Signals that end a session like Ctrl-C: the node user is deleted before the client exits."""


@dataclass(frozen=True)
class Target:
    """The node to log in to, and the task whose working directory to start in (if any)."""

    pool: str
    node: str
    task_root: str | None = None
    """The task's ``taskRootDirectory`` as Batch reports it (relative to the node root)."""
    instance: int | None = None


@dataclass(frozen=True)
class Login:
    """Where and as whom ssh connects."""

    address: str
    port: int
    user: str


def target_for(results: TaskResults, instance: int) -> Target:
    """The node instance ``instance`` of a task ran (or runs) on; :class:`InvalidInput` if there is none."""
    rows = {r.instance: r for r in results.instances}
    row = rows.get(instance)
    task = f"{results.job_id}/{results.task_id}"
    if row is None:
        raise InvalidInput(f"task {task} has no instance {instance} (instances: {sorted(rows)})")
    if not (row.node and row.pool):
        raise InvalidInput(f"instance {instance} of task {task} has no node yet (state {results.state}): wait until "
                           "it runs")
    return Target(row.pool, row.node, row.task_root, instance)


def new_user_name() -> str:
    """A fresh node user name: ``mpl`` + 8 hex digits (a valid Linux name, within Batch's 20 characters)."""
    return f"mpl{secrets.token_hex(4)}"


def new_key(directory: Path) -> tuple[Path, str]:
    """A fresh Ed25519 key: its private key file (OpenSSH format, 0600, in ``directory``) and public key line."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    path = directory / "id_ed25519"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                  serialization.NoEncryption()))
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return path, public.decode()


def remote_command(task_root: str | None, command: Sequence[str]) -> str:
    """What the node's shell runs: enter the task's working directory (if any, and allowed), then ``command`` (its
    words joined with spaces, as ssh does) or a login shell (pure)."""
    run = " ".join(command) if command else 'exec "${SHELL:-/bin/sh}" -l'
    if not task_root:
        return run
    rel = task_root.replace("\\", "/").strip("/") + "/wd"
    roots = " ".join(['"${AZ_BATCH_NODE_ROOT_DIR:-}"', *NODE_ROOTS])
    note = shlex.quote(f"mpilaunch ssh: cannot enter the task's working directory ({rel}) on this node; starting "
                       "in ") + '"$HOME"'
    return (f"mpl_in=; for mpl_root in {roots}; do "
            f'if [ -n "$mpl_root" ] && cd "$mpl_root"/{shlex.quote(rel)} 2>/dev/null; then mpl_in=1; break; fi; '
            f'done; [ -n "$mpl_in" ] || echo {note} >&2; unset mpl_in mpl_root; {run}')


def host_key_alias(endpoint: str, target: Target) -> str:
    """The name a node's host key is stored under: node, pool and account host (addresses and NAT ports are reused
    across nodes)."""
    return f"{target.node}.{target.pool}.{urlsplit(endpoint).hostname or endpoint}"


def ssh_argv(login: Login, key: Path, *, known_hosts: Path, alias: str, tty: bool, remote: str,
             options: Sequence[str] = ()) -> list[str]:
    """The OpenSSH command line of a session (pure)."""
    argv = ["ssh", "-i", str(key), "-p", str(login.port), "-l", login.user,
            "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none", "-o", "BatchMode=yes",
            "-o", "PasswordAuthentication=no", "-o", "KbdInteractiveAuthentication=no",
            "-o", f"UserKnownHostsFile={known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=accept-new", "-o", f"HostKeyAlias={alias}", "-o", "CheckHostIP=no",
            "-o", "ConnectTimeout=30", "-o", "ServerAliveInterval=30", "-o", "LogLevel=ERROR",
            "-t" if tty else "-T"]
    for option in options:
        argv += ["-o", option]
    return [*argv, login.address, remote]


@contextlib.contextmanager
def interrupts_as_keyboard() -> Iterator[None]:
    """SIGTERM and SIGHUP raise :class:`KeyboardInterrupt` here (so cleanup runs as on Ctrl-C)."""
    def handler(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in INTERRUPTS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Ignore Ctrl-C, SIGTERM and SIGHUP (the node user's deletion must not be cut short)."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, *INTERRUPTS)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def ssh_warnings(batch: Any, pool_id: str) -> list[str]:
    """Why ssh may not reach the pool's nodes on Azure: no inbound NAT pool for port 22 (Batch no longer maps SSH
    by default for pools created with API 2024-07-01 or later, or after 30 November 2025)."""
    pool = batch.get_pool(pool_id)
    network = getattr(pool, "network_configuration", None)
    endpoints = getattr(network, "endpoint_configuration", None)
    nat = list(getattr(endpoints, "inbound_nat_pools", None) or [])
    if any(getattr(n, "backend_port", None) == SSH_PORT for n in nat):
        return []
    return [f"pool {pool_id} has no inbound NAT pool for SSH (backend port {SSH_PORT}) in its "
            "networkConfiguration.endpointConfiguration: pools created with API version 2024-07-01 or later (and "
            f"every pool created after 30 November 2025) accept no SSH connection without one ({NAT_DOC})"]


def open_session(launch: Launcher, target: Target, command: Sequence[str], *, admin: bool = False,
                 expiry: timedelta = timedelta(hours=2), tty: bool | None = None, options: Sequence[str] = (),
                 note: Callable[[str], None] = print, check_pool: bool = True) -> tuple[int, dict[str, Any]]:
    """Log in to ``target`` (see the module docstring) and run ``command`` there (a login shell if empty); returns
    ssh's exit status (the command's; 255: ssh failed; 130: interrupted) and what happened (for ``--output json``).
    """
    from azure.batch import models as bm

    if check_pool:
        with launch.errors():
            for warning in ssh_warnings(launch.batch, target.pool):
                note(f"warning: {warning}")
    name = new_user_name()
    tty = bool(not command and sys.stdin.isatty()) if tty is None else tty
    until = datetime.now(timezone.utc) + expiry
    report: dict[str, Any] = {"pool": target.pool, "node": target.node, "instance": target.instance, "user": name,
                              "expiry_time": until.isoformat(), "admin": admin}
    with tempfile.TemporaryDirectory(prefix="mpilaunch-ssh-") as tmp:  # 0700; the key goes with it
        key, public = new_key(Path(tmp))
        created = False
        try:
            with interrupts_as_keyboard():
                with launch.errors():
                    try:
                        launch.batch.create_node_user(target.pool, target.node, bm.BatchNodeUserCreateOptions(
                            name=name, is_admin=admin, expiry_time=until, ssh_public_key=public))
                    except KeyboardInterrupt:
                        created = True  # perhaps: the request may have reached the service
                        raise
                    created = True
                    settings = launch.batch.get_node_remote_login_settings(target.pool, target.node)
                login = Login(settings.remote_login_ip_address, int(settings.remote_login_port),
                              str(settings.get(LOGIN_NAME_PROPERTY) or name))
                report.update(address=login.address, port=login.port, login=login.user)
                home = _known_hosts()
                argv = ssh_argv(login, key, known_hosts=home, tty=tty, options=options,
                                alias=host_key_alias(launch.settings.batch.endpoint, target),
                                remote=remote_command(target.task_root, command))
                code = _run(argv)
        except KeyboardInterrupt:
            code = 130
        finally:
            if created:
                with uninterrupted():
                    report["user_deleted"] = _delete(launch, target, name, note)
    report["exit_code"] = code
    return code, report


def _known_hosts() -> Path:
    from mpilaunch.client.config import home

    directory = home()
    directory.mkdir(parents=True, exist_ok=True)
    return directory / "known_hosts"


def _run(argv: list[str]) -> int:
    """Run ssh in the foreground; Ctrl-C reaches it too (the terminal's process group), then we wait for it."""
    try:
        child = subprocess.Popen(argv)
    except FileNotFoundError as exc:
        raise InvalidInput("mpilaunch ssh needs OpenSSH's ssh client on PATH (apt install openssh-client)") from exc
    try:
        return child.wait()
    except KeyboardInterrupt:  # Ctrl-C reached ssh too; SIGTERM/SIGHUP only us: end ssh then
        for stop in (None, child.terminate, child.kill):
            if stop is not None:
                stop()
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(2)
                break
        raise


def _delete(launch: Launcher, target: Target, name: str, note: Callable[[str], None]) -> bool:
    """Delete the session's node user; on failure say how it ends anyway."""
    from azure.core.exceptions import ResourceNotFoundError

    try:
        with launch.errors(), contextlib.suppress(ResourceNotFoundError):  # gone with its node, or expired
            launch.batch.delete_node_user(target.pool, target.node, name)
    except MpilaunchError as exc:
        note(f"warning: could not delete node user {name} on {target.pool}/{target.node} ({exc}); it expires "
             "by itself, or delete it: az batch node user delete --pool-id "
             f"{target.pool} --node-id {target.node} --user-name {name}")
        return False
    return True
