"""Per-task SSH keys derived from ``MPILAUNCH_TASK_SECRET``, and the files the ssh client and sshd read.

Every node derives the same Ed25519 user key and host key from the secret (HKDF-SHA256, one ``info`` label per key),
so no key ever travels between nodes, none is baked into an image, and the client can verify host keys against a
derived ``known_hosts`` instead of turning checking off. Key material is never logged or put into messages, and
never written where Batch's file APIs serve files (below the node root): see :func:`private_base`.
"""

from __future__ import annotations

import base64
import contextlib
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node_runtime.contract import SECRET_VARIABLE
from node_runtime.env import MIN_SECRET_BYTES
from node_runtime.errors import InvalidEnvironment, ServiceError

_SALT = b"mpilaunch/task-keys/v1"
SERVICE_DIR_NAME = ".mpilaunch"
RUNTIME_DIRS = (Path("/dev/shm"), Path("/tmp"))  # noqa: S108 (checked by private_base before use)
"""Where key dirs go when ``$XDG_RUNTIME_DIR`` is unset or unfit: a tmpfs first (the keys then never reach a disk)."""


@dataclass(frozen=True, repr=False)
class TaskKeys:
    """The two derived keys: OpenSSH private key text and ``ssh-ed25519 AAAA...`` public lines."""

    user_private: bytes
    user_public: str
    host_private: bytes
    host_public: str

    def __repr__(self) -> str:  # never show private material
        return f"TaskKeys(user={self.user_public.split()[1][:12]}..., host={self.host_public.split()[1][:12]}...)"


def derive_private_keys(secret: str) -> tuple[Any, Any]:
    """The task's user and host keys (Ed25519 private key objects) derived from the (validated, base64url) secret:
    same secret, same keys."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    raw = base64.urlsafe_b64decode(secret.rstrip("=") + "=" * (-len(secret.rstrip("=")) % 4))
    if len(raw) < MIN_SECRET_BYTES:
        raise InvalidEnvironment([f"{SECRET_VARIABLE} (value hidden): decodes to fewer than {MIN_SECRET_BYTES} bytes"])
    seeds = (HKDF(algorithm=hashes.SHA256(), length=32, salt=_SALT, info=label).derive(raw)
             for label in (b"user-key", b"host-key"))
    user, host = (Ed25519PrivateKey.from_private_bytes(seed) for seed in seeds)
    return user, host


def derive_keys(secret: str) -> TaskKeys:
    """Derive the task's user and host keys from the (validated, base64url) secret, as OpenSSH files."""
    from cryptography.hazmat.primitives import serialization

    def one(key: Any) -> tuple[bytes, str]:
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        return private, public.decode()

    user, host = derive_private_keys(secret)
    user_private, user_public = one(user)
    host_private, host_public = one(host)
    return TaskKeys(user_private, user_public, host_private, host_public)


@dataclass(frozen=True)
class KeyFiles:
    """Where a node keeps the task's files: ``directory`` (``$AZ_BATCH_TASK_SHARED_DIR/.mpilaunch``, which Batch's
    file APIs serve) holds nothing secret; the keys, ``authorized_keys`` and ``known_hosts`` are in ``private``, a 0700
    directory outside the node root (see :func:`private_base`)."""

    directory: Path
    private: Path

    @property
    def user_key(self) -> Path:
        return self.private / "id_ed25519"

    @property
    def host_key(self) -> Path:
        return self.private / "ssh_host_ed25519_key"

    @property
    def authorized_keys(self) -> Path:
        return self.private / "authorized_keys"

    @property
    def known_hosts(self) -> Path:
        return self.private / "known_hosts"


def private_base(node_root: Path | None, environ: Mapping[str, str],
                 candidates: Sequence[Path] = RUNTIME_DIRS) -> Path:
    """Where the task's key dir goes: ``$XDG_RUNTIME_DIR``, else the first of ``candidates``, that is a directory
    outside ``node_root`` (Batch's file APIs serve every file below the node root) in which no other user can remove
    or replace our entries (ours or root's, and writable only by its owner unless sticky, like /tmp). Raises
    :class:`ServiceError` naming each candidate and why it is unfit if none fits."""
    runtime = environ.get("XDG_RUNTIME_DIR", "")
    refused = []
    for base in ([Path(runtime)] if runtime else []) + list(candidates):
        why = _unfit(base, node_root)
        if why is None:
            return base.resolve()
        refused.append(f"{base}: {why}")
    raise ServiceError("no private directory for the task's keys outside the Batch node root "
                       f"{node_root} (whose files Batch's file APIs serve)", details=refused)


def _unfit(base: Path, node_root: Path | None) -> str | None:
    """Why ``base`` cannot hold key dirs, or None if it can."""
    if not base.is_absolute():
        return "not an absolute path"
    try:
        real = base.resolve(strict=True)
        info = real.stat()
    except OSError as exc:
        return f"unusable ({exc.strerror})"
    problems = (
        (not stat.S_ISDIR(info.st_mode), "not a directory"),
        (node_root is not None and real.is_relative_to(node_root.resolve()), f"inside the node root {node_root}"),
        (info.st_uid not in (os.getuid(), 0), f"owned by uid {info.st_uid}"),
        (bool(info.st_mode & 0o022) and not info.st_mode & stat.S_ISVTX, "writable by others and not sticky"),
        (not os.access(real, os.W_OK | os.X_OK), "not writable"),
    )
    return next((why for bad, why in problems if bad), None)


def host_pattern(address: str, port: int) -> str:
    """The name ssh looks up in known_hosts for ``address`` on a non-default ``port``."""
    return f"[{address}]:{port}" if port != 22 else address


def known_hosts_text(keys: TaskKeys, hosts: Sequence[str], port: int) -> str:
    """One known_hosts line that pins the derived host key for every host of the task on ``port``."""
    return ",".join(host_pattern(h, port) for h in hosts) + f" {keys.host_public}\n"


def write_key_files(files: KeyFiles, keys: TaskKeys, hosts: Sequence[str], port: int) -> None:
    """Write the keys, authorized_keys and known_hosts (0600 in the private 0700 directory), replacing what differs."""
    ensure_private_dir(files.private)
    wanted = {
        files.user_key: keys.user_private,
        files.user_key.with_name("id_ed25519.pub"): (keys.user_public + "\n").encode(),
        files.host_key: keys.host_private,
        files.host_key.with_name("ssh_host_ed25519_key.pub"): (keys.host_public + "\n").encode(),
        files.authorized_keys: (keys.user_public + " mpilaunch-task\n").encode(),
        files.known_hosts: known_hosts_text(keys, hosts, port).encode(),
    }
    for path, content in wanted.items():
        if path.suffix != ".pub" and path.name.startswith(("id_", "ssh_host_")) and _same_private_key(path, keys):
            continue  # OpenSSH private files embed a random check word: compare the key, not the bytes
        write_private_file(path, content)


def _same_private_key(path: Path, keys: TaskKeys) -> bool:
    public = keys.user_public if path.name.startswith("id_") else keys.host_public
    try:
        current_public = path.with_name(path.name + ".pub").read_text().strip()
        private_ok = path.stat().st_size > 0 and stat.S_IMODE(path.stat().st_mode) == 0o600
    except OSError:
        return False
    return private_ok and current_public == public


def ensure_private_dir(directory: Path) -> None:
    """Create ``directory`` as 0700; refuse one owned by someone else, or a symlink (it would let them swap or read
    our keys)."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = directory.lstat()
    except OSError as exc:
        raise ServiceError(f"cannot create {directory}: {exc.strerror}; refusing to keep keys there") from exc
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise ServiceError(f"{directory} is not a directory owned by uid {os.getuid()}; refusing to keep keys there")
    if stat.S_IMODE(info.st_mode) != 0o700:
        directory.chmod(0o700)


def write_private_file(path: Path, content: bytes) -> None:
    """Atomically write ``content`` to ``path`` with mode 0600 (never world-readable, not even briefly)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, content)
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    tmp.replace(path)


def forget_secret() -> None:
    """Drop the task secret from this process's environment (once its keys are on disk): from ``os.environ``, so no
    child inherits it, and from what ``/proc/PID/environ`` shows others (the value is overwritten in place with
    ``*``; skipped where /proc cannot do it). The process's memory may still hold the value."""
    os.environ.pop(SECRET_VARIABLE, None)  # unsetenv: nothing refers to the copy in the initial block any more
    name = SECRET_VARIABLE.encode() + b"="
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = Path("/proc/self/stat").read_bytes().rsplit(b")", 1)[1].split()
        start, end = int(fields[47]), int(fields[48])  # env_start, env_end: fields 50 and 51 of proc_pid_stat(5)
        block = Path("/proc/self/environ").read_bytes()
        offset = 0
        with Path("/proc/self/mem").open("r+b", buffering=0) as memory:
            for entry in block.split(b"\0"):
                if entry.startswith(name) and start + offset + len(entry) <= end:
                    memory.seek(start + offset + len(name))
                    memory.write(b"*" * (len(entry) - len(name)))
                offset += len(entry) + 1
