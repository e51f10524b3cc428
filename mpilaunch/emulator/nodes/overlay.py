"""Bind-mount files over others in this mount namespace, then run a command: an isolated node's own user database.

Run by :mod:`.login` as the command of a node (so inside the node's private mount namespace, see :mod:`.enter`):
``python -I -S overlay.py SRC=DST... -- ARGV...``. Each SRC (a file or directory of the node's login state) is
bind-mounted over DST (``/etc/passwd``, ``/home``, ...); the host's own files never change, and nothing outside
this namespace sees the mounts. Standard library only, like :mod:`.enter`.
"""

from __future__ import annotations

import os
import subprocess
import sys

USAGE = "usage: overlay.py SRC=DST... -- ARGV..."


def main(args: list[str]) -> int:
    if "--" not in args or args.index("--") == len(args) - 1:
        print(USAGE, file=sys.stderr)
        return 2
    split = args.index("--")
    pairs, argv = args[:split], args[split + 1:]
    for pair in pairs:
        source, sep, target = pair.partition("=")
        if not sep:
            print(USAGE, file=sys.stderr)
            return 2
        done = subprocess.run(["mount", "--bind", source, target], check=False)
        if done.returncode != 0:
            print(f"overlay.py: cannot bind {source} on {target}", file=sys.stderr)
            return 125
    try:
        os.execvp(argv[0], argv)  # noqa: S606 - running the node's command is the point
    except OSError as exc:
        print(f"overlay.py: cannot execute {argv[0]!r}: {exc.strerror}", file=sys.stderr)
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
