"""Remote login to emulator nodes: the user accounts of Batch's Add/Update/Delete Node User, and an OpenSSH sshd.

On Azure a Linux node runs sshd; ``POST .../nodes/{id}/users`` makes an OS account (``isAdmin``: an administrator;
an ``sshPublicKey`` in its ``~/.ssh/authorized_keys``, a ``password``, an ``expiryTime``), and ``GET
.../remoteloginsettings`` says where to connect. The emulator keeps the accounts where the node's OS would (so a
reimaged or preempted node comes back without them and a rebooted one keeps them, as on Azure) and starts the node's
sshd on the first Get Remote Login Settings:

* **Isolated process nodes** (emulator as root with ``unshare``): each node has its own user database. The sshd runs
  in the node's namespaces (its host name, ``/mnt/batch/tasks``) with the node's ``/etc/passwd``, ``/etc/shadow``,
  ``/etc/group`` and ``/home`` bind-mounted over the host's in its private mount namespace (:mod:`.overlay`): host
  accounts are all there (their passwords blanked), the node's users are added with uids from :data:`FIRST_UID`. The
  host's files never change. Logins are real non-root users (admins are in the ``sudo`` group); sessions see the
  node as its tasks do.
* **Other process nodes** (the emulator runs as an ordinary user, whose sshd can log in no one else): every user of
  the node logs in as the emulator's OS account (``RemoteLogin.login_name``), with its key in an authorized_keys
  file the emulator writes. Passwords cannot be used there.
* **Docker and VM-like nodes**: real ``useradd``/``userdel`` in the node container and an sshd started there (port
  22 of the node's address) if the image has one (VM-like nodes have it once their StartTask installed the runtime);
  else remote login is refused with the reason (:class:`LoginUnsupported`).

Every key line carries ``expiry-time`` (sshd refuses the key after ``expiryTime``, to the second) and accounts carry
the expiry date (sshd refuses a login on the day after, Linux's day precision, which Batch documents); the API treats
an expired user as gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpilaunch.emulator.nodes.base import ADMIN, AccountTaken, Execution, LoginUnsupported, Node, NodeError
from node_runtime import proc, sshd
from node_runtime.errors import CommandFailed, ServiceError

if TYPE_CHECKING:
    from mpilaunch.emulator.nodes.process import ProcessProvider

LOGIN_TAG = "remote-login"
"""The tag of a node's sshd (killed with the node, never by a task's teardown)."""
LOGIN_GROUP = "mpl-login"
"""The group of a node's users: the only accounts its sshd lets in (``AllowGroups``)."""
ADMIN_GROUP = "sudo"
FIRST_UID = 20000
START_TIMEOUT = 10.0
KEY_TYPES = ("ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
             "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com")
"""The OpenSSH public key types a node user's ``sshPublicKey`` may have."""


@dataclass(frozen=True)
class LoginUser:
    """One node user account as Batch's Add/Update User made it (the password only as a crypt(3) hash)."""

    name: str
    is_admin: bool
    expiry: datetime
    ssh_public_key: str | None = None
    password_hash: str | None = None
    uid: int = 0
    """The account's uid on nodes where the emulator picks it (isolated process nodes), else 0."""

    def expired(self, now: datetime | None = None) -> bool:
        return (now or datetime.now(timezone.utc)) >= self.expiry

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "isAdmin": self.is_admin, "expiryTime": self.expiry.isoformat(),
                "sshPublicKey": self.ssh_public_key, "passwordHash": self.password_hash, "uid": self.uid}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> LoginUser:
        return cls(str(doc["name"]), bool(doc.get("isAdmin")), datetime.fromisoformat(str(doc["expiryTime"])),
                   doc.get("sshPublicKey"), doc.get("passwordHash"), int(doc.get("uid") or 0))


@dataclass(frozen=True)
class RemoteLogin:
    """Where a node's sshd listens, and (nodes without accounts of their own) the OS account everyone logs in as."""

    address: str
    port: int
    login_name: str | None = None


Users = dict[str, LoginUser]
Edit = Callable[[Users], None]


# -- pure builders -----------------------------------------------------------------------------------------------------
def key_expiry(user: LoginUser) -> str:
    """sshd's ``expiry-time`` value for the user's expiry (UTC, to the second)."""
    return user.expiry.astimezone(timezone.utc).strftime("%Y%m%d%H%M%SZ")


def authorized_keys(users: Iterable[LoginUser]) -> str:
    """authorized_keys lines: each user's key, refused by sshd after the user's expiry."""
    return "".join(f'expiry-time="{key_expiry(u)}" {u.ssh_public_key}\n' for u in users if u.ssh_public_key)


def expiry_days(user: LoginUser) -> int:
    """The shadow ``expire`` field (days since the epoch, the first day the account is refused): the day after the
    expiry's date, so the account lives until the end of its expiry day (Linux's precision)."""
    return int(user.expiry.astimezone(timezone.utc).timestamp() // 86400) + 1


def overlay_files(passwd: str, shadow: str, group: str, users: Iterable[LoginUser]) -> tuple[str, str, str]:
    """A node's ``/etc/passwd``, ``/etc/shadow`` and ``/etc/group``: the host's accounts (their passwords blanked:
    no host password opens a node) plus the node's users, each with a private group, all in :data:`LOGIN_GROUP`,
    admins in :data:`ADMIN_GROUP` (pure)."""
    users = sorted(users, key=lambda u: u.uid)
    out_passwd = [line for line in passwd.splitlines() if line.strip()]
    out_shadow = []
    for line in shadow.splitlines():
        fields = line.split(":")
        if len(fields) >= 2:
            fields[1] = "*"
            out_shadow.append(":".join(fields))
    out_group = []
    admins = [u.name for u in users if u.is_admin]
    for line in group.splitlines():
        fields = line.split(":")
        if len(fields) == 4 and fields[0] == ADMIN_GROUP and admins:
            fields[3] = ",".join([m for m in fields[3].split(",") if m] + admins)
        if line.strip():
            out_group.append(":".join(fields))
    for u in users:
        out_passwd.append(f"{u.name}:x:{u.uid}:{u.uid}::/home/{u.name}:/bin/bash")
        out_shadow.append(f"{u.name}:{u.password_hash or '*'}:{int(time.time() // 86400)}:0:99999:7::"
                          f"{expiry_days(u)}:")
        out_group.append(f"{u.name}:x:{u.uid}:")
    out_group.append(f"{LOGIN_GROUP}:x:{FIRST_UID - 1}:{','.join(u.name for u in users)}")
    return ("\n".join(out_passwd) + "\n", "\n".join(out_shadow) + "\n", "\n".join(out_group) + "\n")


def taken_names(passwd: str, group: str) -> set[str]:
    """The account and group names of an ``/etc/passwd`` and ``/etc/group`` (pure)."""
    return {line.split(":", 1)[0] for text in (passwd, group) for line in text.splitlines() if ":" in line}


def taken_ids(passwd: str, group: str) -> set[int]:
    """The uids and gids of an ``/etc/passwd`` and ``/etc/group`` (pure)."""
    ids = set()
    for text in (passwd, group):
        for line in text.splitlines():
            fields = line.split(":")
            if len(fields) > 2 and fields[2].isdigit():
                ids.add(int(fields[2]))
    return ids


def render_sshd_config(*, listen: str, host_key: str, env: Mapping[str, str], pid_file: str = "none",
                       mapped: str | None = None, keys_file: str = ".ssh/authorized_keys",
                       passwords: bool = True) -> str:
    """The login sshd's config (pure). ``mapped``: the one account every user logs in as (its keys in
    ``keys_file``); else only members of :data:`LOGIN_GROUP` get in. Sessions get ``env`` (values sshd_config cannot
    quote are left out)."""
    allow = f"AllowUsers {mapped}" if mapped else f"AllowGroups {LOGIN_GROUP}"
    settings = " ".join(f'"{k}={v}"' for k, v in sorted(env.items()) if not set(v) & {'"', "\\", "\n", "\r"})
    return "\n".join([
        "# mpilaunch emulator: the node's remote login (generated; do not edit)",
        f"ListenAddress {listen}",
        f"HostKey {host_key}",
        f"PidFile {pid_file}",
        f"AuthorizedKeysFile {keys_file}",
        "AuthorizedKeysCommand none",
        allow,
        "PubkeyAuthentication yes",
        f"PasswordAuthentication {'yes' if passwords and not mapped else 'no'}",
        "KbdInteractiveAuthentication no",
        "PermitEmptyPasswords no",
        f"PermitRootLogin {'prohibit-password' if mapped == 'root' else 'no'}",
        "UsePAM no",
        "StrictModes no",
        "UseDNS no",
        "PrintMotd no",
        "X11Forwarding no",
        "AllowTcpForwarding yes",
        "Subsystem sftp internal-sftp",
        *([f"SetEnv {settings}"] if settings else []),
        "LogLevel INFO",
        "",
    ])


def hash_password(password: str) -> str:
    """The SHA-512 crypt(3) hash of ``password`` (``$6$...``, what ``/etc/shadow`` and ``chpasswd -e`` take), made
    by ``openssl passwd -6``; the password goes on its stdin, never on a command line."""
    try:
        done = proc.run(["openssl", "passwd", "-6", "-stdin"], input=password.encode() + b"\n", timeout=30)
    except CommandFailed as exc:
        raise LoginUnsupported(f"passwords need the openssl command on the emulator's machine: {exc}") from exc
    return done.stdout.decode().strip()


def find_sshd() -> str:
    """The machine's sshd (as the coordination service finds it)."""
    try:
        return str(sshd.find_sshd())
    except ServiceError as exc:
        raise LoginUnsupported(f"remote login to process nodes needs OpenSSH's sshd on the emulator's machine: "
                               f"{exc}") from exc


def wait_listening(address: str, port: int, alive: Callable[[], bool], log: Path, timeout: float = START_TIMEOUT
                   ) -> None:
    """Return once something accepts on ``address:port``; :class:`NodeError` with the log's tail if the sshd
    (``alive``) ends first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((address, port), timeout=1):
            return
        if not alive():
            break
        time.sleep(0.05)
    tail = log.read_text(errors="replace").strip().splitlines()[-5:] if log.exists() else []
    raise NodeError(f"the node's sshd did not start on {address}:{port}" + (f": {' / '.join(tail)}" if tail else ""))


def free_port(address: str, preferred: int = 0) -> int:
    """``preferred`` if it is free on ``address``, else any free port there."""
    for port in ([preferred] if preferred else []) + [0]:
        with contextlib.suppress(OSError), socket.socket() as s:
            s.bind((address, port))
            return int(s.getsockname()[1])
    raise NodeError(f"no free port on {address}")


def write_in_place(path: Path, text: str, mode: int = 0o644) -> None:
    """Rewrite ``path`` keeping its inode (files bind-mounted into a running node must stay the same file)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.truncate()
    path.chmod(mode)


# -- process nodes ----------------------------------------------------------------------------------------------------
_OVERLAY = Path(__file__).with_name("overlay.py")
_HOST_FILES = ("passwd", "shadow", "group")


class ProcessLogin:
    """Remote login to one :class:`~.process.ProcessProvider`'s nodes; see the module docstring.

    A node's login state lives next to its root (``<root>.login/``: host-only, never served by the file APIs, gone
    with the pool): ``users.json``, the host key (kept across reboots, new after a reimage), ``sshd_config``, the
    log, and on isolated nodes ``etc/`` (the node's user database) and ``home/``.
    """

    def __init__(self, provider: ProcessProvider) -> None:
        self.provider = provider
        self._lock = threading.Lock()
        self._node_locks: dict[str, threading.Lock] = {}
        self._running: dict[str, tuple[Node, Execution, int]] = {}

    @staticmethod
    def state_dir(node: Node) -> Path:
        return node.root.with_name(node.root.name + ".login")

    def _node_lock(self, node: Node) -> threading.Lock:
        with self._lock:
            return self._node_locks.setdefault(node.id, threading.Lock())

    def _isolated(self, node: Node) -> bool:
        return bool(node.data.get("isolated"))

    def _mapped(self, node: Node) -> str | None:
        return None if self._isolated(node) else pwd.getpwuid(os.getuid()).pw_name

    # -- users ----------------------------------------------------------------------------------------------------
    def _read(self, node: Node) -> Users:
        try:
            docs = json.loads((self.state_dir(node) / "users.json").read_text())
        except FileNotFoundError:
            return {}
        return {d["name"]: LoginUser.from_json(d) for d in docs}

    def edit_users(self, node: Node, edit: Edit) -> None:
        with self._node_lock(node):
            before = self._read(node)
            users = dict(before)
            edit(users)
            state = self.state_dir(node)
            state.mkdir(mode=0o711, exist_ok=True)
            if self._isolated(node):
                users = self._place(before, users)
            write_in_place(state / "users.json", json.dumps([u.to_json() for u in users.values()], indent=1), 0o600)
            if self._isolated(node):
                self._write_accounts(node, state, before, users)
            else:
                write_in_place(state / "authorized_keys", authorized_keys(users.values()), 0o600)

    @staticmethod
    def _host(name: str) -> str:
        return Path("/etc", name).read_text()

    def _place(self, before: Users, users: Users) -> Users:
        """Refuse names the host has; give new users free uids (kept across updates)."""
        passwd, group = self._host("passwd"), self._host("group")
        taken = taken_names(passwd, group) | {LOGIN_GROUP}
        ids = taken_ids(passwd, group) | {u.uid for u in before.values()}
        placed = {}
        for name, user in users.items():
            if name in taken:
                raise AccountTaken(f"the node has an account or group named {name!r} already")
            uid = before[name].uid if name in before else user.uid
            if not uid:
                uid = next(i for i in range(FIRST_UID, FIRST_UID + 100000) if i not in ids)
                ids.add(uid)
            placed[name] = replace(user, uid=uid)
        return placed

    def _write_accounts(self, node: Node, state: Path, before: Users, users: Users) -> None:
        etc = state / "etc"
        etc.mkdir(mode=0o755, exist_ok=True)
        texts = overlay_files(self._host("passwd"), self._host("shadow"), self._host("group"), users.values())
        for name, text in zip(_HOST_FILES, texts, strict=True):
            write_in_place(etc / name, text, 0o640 if name == "shadow" else 0o644)
        home = state / "home"
        home.mkdir(mode=0o755, exist_ok=True)
        for name in set(before) - set(users):
            shutil.rmtree(home / name, ignore_errors=True)
        path = os.pathsep.join([str(Path(sys.executable).parent), "$PATH"])
        for user in users.values():
            ssh = home / user.name / ".ssh"
            ssh.mkdir(mode=0o700, parents=True, exist_ok=True)
            profile = home / user.name / ".profile"
            if not profile.exists():  # the emulator's Python, node-runtime and mpirun on PATH, as tasks have them
                profile.write_text(f'PATH="{path}"\nexport PATH\n')
            write_in_place(ssh / "authorized_keys", authorized_keys([user]), 0o600)
            for p in (home / user.name, ssh, profile, ssh / "authorized_keys"):
                os.chown(p, user.uid, user.uid)
            (home / user.name).chmod(0o700)

    # -- sshd -----------------------------------------------------------------------------------------------------
    def remote_login(self, node: Node, env: Mapping[str, str]) -> RemoteLogin:
        with self._node_lock(node):
            running = self._running.get(node.id)
            if running is not None and running[1].poll() is None:
                return RemoteLogin(node.address, running[2], self._mapped(node))
            if running is None:  # an sshd of an earlier emulator run may still hold the port
                self.provider.kill_tag(node, LOGIN_TAG)
            port = self._start(node, env)
            return RemoteLogin(node.address, port, self._mapped(node))

    def _start(self, node: Node, env: Mapping[str, str]) -> int:
        daemon = find_sshd()
        state = self.state_dir(node)
        state.mkdir(mode=0o711, exist_ok=True)
        host_key = state / "ssh_host_ed25519_key"
        if not host_key.exists():
            proc.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{node.id}", "-f", str(host_key)],
                     timeout=30)
        previous = state / "port"
        port = free_port(node.address, int(previous.read_text()) if previous.exists() else 0)
        previous.write_text(str(port))
        mapped = self._mapped(node)
        if mapped:
            (state / "authorized_keys").touch(mode=0o600)
        base = self.provider.base_env(node)  # the node's PATH (the emulator's Python first), TMPDIR if per node
        session = {k: base[k] for k in ("PATH", "TMPDIR") if k in base} | {"MPILAUNCH_NODE_ADDRESS": node.address}
        config = render_sshd_config(listen=f"{node.address}:{port}", host_key=str(host_key), env=session | dict(env),
                                    mapped=mapped, keys_file=str(state / "authorized_keys") if mapped
                                    else ".ssh/authorized_keys")
        (state / "sshd_config").write_text(config)
        argv = [daemon, "-D", "-e", "-f", str(state / "sshd_config")]
        if self._isolated(node):
            if not (state / "etc" / "passwd").exists():
                self._write_accounts(node, state, {}, {})
            binds = [(state / "etc" / n, f"/etc/{n}") for n in _HOST_FILES] + [(state / "home", "/home")]
            argv = [sys.executable, "-I", "-S", str(_OVERLAY), *(f"{src}={dst}" for src, dst in binds), "--", *argv]
            sshd.PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        log = state / "sshd.log"
        log.write_bytes(b"")
        try:
            execution = self.provider.run(node, argv, env={}, cwd=node.node_root, stdout=log, stderr=log,
                                          tag=LOGIN_TAG, user=ADMIN)
        except CommandFailed as exc:
            raise NodeError(f"the node's sshd could not be started: {exc}") from exc
        try:
            wait_listening(node.address, port, lambda: execution.poll() is None, log)
        except NodeError:
            self.provider.kill_tag(node, LOGIN_TAG)
            raise
        self._running[node.id] = (node, execution, port)
        return port

    def stop(self, node: Node) -> None:
        """Stop the node's sshd (its sessions too), if it runs."""
        with self._node_lock(node):
            if self._running.pop(node.id, None) is not None:
                self.provider.kill_tag(node, LOGIN_TAG)

    def forget(self, node: Node) -> None:
        """The node's disk is gone (reimage, preemption, removal): its users and host key too."""
        with self._node_lock(node):
            self._running.pop(node.id, None)
            shutil.rmtree(self.state_dir(node), ignore_errors=True)

    def close(self) -> None:
        """Stop every sshd this provider started (the emulator stops)."""
        with self._lock:
            running = list(self._running.values())
        for node, _execution, _port in running:
            self.stop(node)
