"""Enter a process-provider node: set its host name, map its root to the Azure path, exec the command.

Run by :mod:`.process` as ``unshare --uts --mount -- python -I -S enter.py HOSTNAME ROOT NODE_ROOT CWD -- ARGV...``
(a fresh UTS and private mount namespace per command). Standard library only and no package imports, so it starts
in milliseconds. NODE_ROOT (``/mnt/batch/tasks``) is made on a small tmpfs mounted over its top directory (``/mnt``),
so nothing on the host changes; the top directory's other entries are bound back, so they stay visible. Processes
started here (sshd, orted, ...) keep the node's view.
"""

from __future__ import annotations

import ctypes
import os
import socket
import sys
from pathlib import Path

MS_BIND = 4096
MS_REC = 16384


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    args = [None if v is None else v.encode() for v in (source, target, fstype, data)]
    if libc.mount(args[0], args[1], args[2], ctypes.c_ulong(flags), args[3]) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target} failed: {os.strerror(err)}")


def _cover(top: str, keep_out: str) -> None:
    """Mount a tmpfs on ``top`` that still shows ``top``'s entries (bound back), except ``keep_out``."""
    entries: list[tuple[str, str, int]] = []
    for path in Path(top).iterdir():
        if path.name == keep_out:
            continue
        if path.is_symlink():
            entries.append((path.name, str(path.readlink()), -1))
        else:
            entries.append((path.name, "dir" if path.is_dir() else "file", os.open(path, os.O_PATH)))
    _mount("tmpfs", top, "tmpfs", 0, "size=1m,mode=755")
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


def main(args: list[str]) -> int:
    hostname, root, node_root, cwd, sep, *argv = args
    if sep != "--" or not argv:
        print("usage: enter.py HOSTNAME ROOT NODE_ROOT CWD -- ARGV...", file=sys.stderr)
        return 2
    socket.sethostname(hostname)
    parts = node_root.strip("/").split("/")
    root_fd = os.open(root, os.O_PATH)  # root itself may live under the top directory about to be covered
    _cover("/" + parts[0], keep_out=parts[1] if len(parts) > 1 else "")
    Path(node_root).mkdir(parents=True, exist_ok=True)
    _mount(f"/proc/self/fd/{root_fd}", node_root, None, MS_BIND | MS_REC, None)
    os.close(root_fd)
    os.chdir(cwd)
    try:
        os.execvp(argv[0], argv)  # noqa: S606 - replacing this process with the node's command is the point
    except OSError as exc:
        print(f"cannot execute {argv[0]!r}: {exc.strerror}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
