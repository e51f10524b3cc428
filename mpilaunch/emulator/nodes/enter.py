"""Run one command on a process-provider node and keep every process it leaves behind findable.

Run by :mod:`.process` as ``python -I -S enter.py STATUS_FD CWD -- ARGV...``, or, for isolated nodes, as
``unshare --uts --mount -- python -I -S enter.py --node HOSTNAME ROOT NODE_ROOT MARK STATUS_FD CWD -- ARGV...`` (a
fresh UTS and private mount namespace per command). Standard library only and no package imports, so it starts in
milliseconds.

With ``--node`` it first sets the node's host name and maps its root to the Azure path: NODE_ROOT
(``/mnt/batch/tasks``) is made on a small tmpfs mounted over its top directory (``/mnt``), so nothing on the host
changes; the top directory's other entries are bound back, so they stay visible. Processes started here (sshd,
orted, ...) keep the node's view. The tmpfs is named MARK (``mpilaunch-emulator:<tag>``): every process in the
namespace, whatever it did to its environment and however it detached, can be found by its ``/proc/PID/mountinfo``.

Then it becomes the command's *keeper*: a child subreaper (``PR_SET_CHILD_SUBREAPER``) that runs ARGV as its child,
writes the command's exit code (``128 + signal`` if killed) to STATUS_FD when it exits, and stays alive, reaping, as
long as any process the command left behind lives. Daemons (the coordination sshd) are re-parented to the keeper
instead of init however they detach (setsid, double fork) and whatever they do to their argv/environ (sshd's
process title overwrites the environment that carries the emulator's tag): the keeper keeps the tag in its own
environment, so "the tagged processes and their descendants" is every process of the command. The keeper ignores
SIGTERM/SIGINT/SIGHUP/SIGQUIT (a command signalling its own process group must not orphan its daemons); the emulator
kills it with SIGKILL.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
from pathlib import Path

MS_BIND = 4096
MS_REC = 16384
PR_SET_CHILD_SUBREAPER = 36
IGNORED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
USAGE = "usage: enter.py [--node HOSTNAME ROOT NODE_ROOT MARK] STATUS_FD CWD -- ARGV..."


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    args = [None if v is None else v.encode() for v in (source, target, fstype, data)]
    if _libc().mount(args[0], args[1], args[2], ctypes.c_ulong(flags), args[3]) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target} failed: {os.strerror(err)}")


def _cover(top: str, keep_out: str, source: str) -> None:
    """Mount a tmpfs (named ``source``) on ``top`` that still shows ``top``'s entries (bound back), except
    ``keep_out``."""
    entries: list[tuple[str, str, int]] = []
    for path in Path(top).iterdir():
        if path.name == keep_out:
            continue
        if path.is_symlink():
            entries.append((path.name, str(path.readlink()), -1))
        else:
            entries.append((path.name, "dir" if path.is_dir() else "file", os.open(path, os.O_PATH)))
    _mount(source, top, "tmpfs", 0, "size=1m,mode=755")
    for name, kind, fd in entries:
        target = Path(top, name)
        if fd < 0:
            target.symlink_to(kind)
            continue
        if kind == "dir":
            target.mkdir()
        else:
            target.touch()
        _mount(f"/proc/self/fd/{fd}", str(target), None, MS_BIND | MS_REC, None)
        os.close(fd)


def enter_node(hostname: str, root: str, node_root: str, mark: str) -> None:
    """Take the node's host name and see its root at ``node_root`` (needs fresh UTS and mount namespaces); ``mark``
    names the tmpfs, so the namespace itself says whose it is (in ``/proc/PID/mountinfo``)."""
    socket.sethostname(hostname)
    parts = node_root.strip("/").split("/")
    root_fd = os.open(root, os.O_PATH)  # root itself may live under the top directory about to be covered
    _cover("/" + parts[0], keep_out=parts[1] if len(parts) > 1 else "", source=mark)
    Path(node_root).mkdir(parents=True, exist_ok=True)
    _mount(f"/proc/self/fd/{root_fd}", node_root, None, MS_BIND | MS_REC, None)
    os.close(root_fd)


def keep(argv: list[str], status_fd: int) -> int:
    """Run ``argv`` as a child, report its exit code on ``status_fd``, then reap until no descendant is left."""
    if _libc().prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print(f"prctl(PR_SET_CHILD_SUBREAPER) failed: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
        return 125
    os.set_inheritable(status_fd, False)
    for signum in IGNORED:
        signal.signal(signum, signal.SIG_IGN)
    pid = os.fork()
    if pid == 0:
        for signum in IGNORED:
            signal.signal(signum, signal.SIG_DFL)
        try:
            os.execvp(argv[0], argv)  # noqa: S606 - running the node's command is the point
        except OSError as exc:
            print(f"cannot execute {argv[0]!r}: {exc.strerror}", file=sys.stderr)
        os._exit(127)
    code = 125
    while True:
        try:
            done, status = os.wait()  # the command, or any orphan re-parented to us
        except ChildProcessError:
            return code
        if done == pid:
            code = os.waitstatus_to_exitcode(status)
            code = 128 - code if code < 0 else code
            os.write(status_fd, f"{code}\n".encode())
            os.close(status_fd)


def main(args: list[str]) -> int:
    node: list[str] = []
    if args[:1] == ["--node"]:
        node, args = args[1:5], args[5:]
    if len(args) < 4 or args[2] != "--" or not args[0].isdigit():
        print(USAGE, file=sys.stderr)
        return 2
    status_fd, cwd, argv = int(args[0]), args[1], args[3:]
    if node:
        enter_node(*node)
    os.chdir(cwd)
    return keep(argv, status_fd)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
