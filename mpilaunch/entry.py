"""The ``mpilaunch`` program's entry point: a node install (``pip install mpilaunch``, without the ``client`` extra)
has the command but not the client's dependencies, and gets told how to install them instead of a traceback."""

from __future__ import annotations

import sys

CLIENT_EXTRA = "mpilaunch[client]"
CLIENT_MODULES = ("click", "rich", "azure", "tomli")


def main() -> None:
    try:
        from mpilaunch.cli import main as cli_main
    except ModuleNotFoundError as exc:
        # a client dependency, or the client itself (the task image carries only what programs import)
        if exc.name != "mpilaunch.cli" and (exc.name is None or exc.name.split(".")[0] not in CLIENT_MODULES):
            raise
        print(f"mpilaunch: error: the client needs its dependencies (module {exc.name!r} is missing): "
              f"pip install \"{CLIENT_EXTRA}\"", file=sys.stderr)
        sys.exit(2)
    cli_main()
