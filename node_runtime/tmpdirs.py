"""Node-local dirs of coordination services, ``mpl-<uid>-<hash>``: the TMPDIR its sessions get (under ``$TMPDIR``)
and its key dir (``…-keys``, see :func:`node_runtime.keys.private_base`); who owns each, and the sweep that removes
those whose service is gone.

A service stopped by ``node-runtime`` removes its own dirs; one that was killed (Batch terminating or retrying the
task, a lost node) never does. So each dir records its owner (:data:`OWNER_FILE`: the sshd's pid and its config
path), and every ``coordinate`` removes this uid's dirs whose owner is no longer that live sshd. Recording an owner
(or, for a service about to start, dropping a dead one: :func:`claim`) and the sweep hold this uid's lock in the
dirs' parent, so a sweep never takes a dir of a service still starting.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

OWNER_FILE = ".mpilaunch-owner"
ORPHAN_AGE = 3600.0
"""Seconds after which a dir without a readable owner record counts as stale (written by a version without one)."""


def base() -> Path:
    return Path(tempfile.gettempdir())


def prefix() -> str:
    return f"mpl-{os.getuid()}-"


@contextlib.contextmanager
def locked(*bases: Path) -> Iterator[None]:
    """Hold this uid's lock on its service dirs in each of ``bases`` (a file there; taken in sorted order). A lock file
    that cannot be opened (e.g. one of that name belongs to another user) is skipped -- only a concurrent start's dir
    is then at risk, never a live one's."""
    fds = []
    try:
        for directory in sorted(set(bases)):
            with contextlib.suppress(OSError):
                fds.append(os.open(directory / f"mpl-{os.getuid()}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW,
                                   0o600))
                fcntl.flock(fds[-1], fcntl.LOCK_EX)
        yield
    finally:
        for fd in fds:
            os.close(fd)


def write_owner(directory: Path, pid: int, config: Path) -> None:
    """Record that ``directory`` belongs to the sshd ``pid`` started with ``config`` (call holding :func:`locked`)."""
    (directory / OWNER_FILE).write_text(f"{pid}\n{config}\n")


def claim(directory: Path) -> None:
    """Mark ``directory`` (if it exists) as the dir of a service about to start: a record of an owner that is gone
    (the same task's service, killed) is dropped and the dir counts as fresh, so no sweep takes it before
    :func:`write_owner` names the new sshd. A live owner's dir is left as it is."""
    with locked(directory.parent):
        if owner_alive(directory) is not True:
            with contextlib.suppress(OSError):
                (directory / OWNER_FILE).unlink(missing_ok=True)
                os.utime(directory)


def owner_alive(directory: Path) -> bool | None:
    """Whether the sshd recorded in ``directory`` still runs with its config; None if there is no valid record."""
    try:
        pid_text, config = (directory / OWNER_FILE).read_text().splitlines()[:2]
        pid = int(pid_text)
    except (OSError, ValueError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    return f" {config} ".encode() in cmdline  # sshd rewrites its title: a substring (as sshd.running_pid)


def _stale(path: Path, st: os.stat_result) -> bool:
    alive = owner_alive(path)
    if alive is None:
        return time.time() - st.st_mtime > ORPHAN_AGE
    return not alive


def sweep(*keep: Path) -> list[Path]:
    """Remove this uid's service dirs whose service is gone from the directories that hold ``keep`` (which are kept);
    return those removed. Other users' dirs, symlinks and dirs of live services are left; so is a dir that cannot be
    removed (quietly: the next sweep tries again)."""
    removed = []
    for parent in sorted({path.parent for path in keep}):
        with locked(parent):
            try:
                entries = [e.name for e in os.scandir(parent) if e.name.startswith(prefix())]
            except OSError:
                continue
            for name in entries:
                path = parent / name
                if path in keep:
                    continue
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or not _stale(path, st):
                    continue
                shutil.rmtree(path, ignore_errors=True)
                if not os.path.lexists(path):
                    removed.append(path)
    return removed
