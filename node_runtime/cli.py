"""The ``node-runtime`` command line (argparse: it starts on every node in every task's critical path).

Each subcommand is a ``node_runtime.cmd_*`` module with ``configure(parser)`` and ``run(args)``, whose docstring is
its help; a module imports what its command needs only when ``run`` is called, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from node_runtime import __version__, cmd_coordinate, cmd_doctor, cmd_env, cmd_launch, cmd_stacks
from node_runtime.errors import MpilaunchError, failed, interrupted

PROG = "node-runtime"
COMMANDS = (cmd_env, cmd_coordinate, cmd_launch, cmd_stacks, cmd_doctor)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``node-runtime``; ``args.run(args)`` runs the chosen subcommand."""
    parser = argparse.ArgumentParser(
        prog=PROG, allow_abbrev=False,
        description="Per-node runtime of an mpilaunch multi-instance task: environment, coordination service, "
                    "MPI launch.")
    parser.add_argument("--version", action="version", version=f"%(prog)s, version {__version__}")
    commands = parser.add_subparsers(prog=PROG, title="commands", metavar="COMMAND", required=True)
    for module in COMMANDS:
        doc = " ".join((module.run.__doc__ or "").split())
        command = commands.add_parser(module.__name__.removeprefix("node_runtime.cmd_"), allow_abbrev=False,
                                      help=doc.split(". ")[0].rstrip(".") + ".", description=doc)
        module.configure(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``node-runtime`` on ``argv`` (default: the command line) and return its exit code.

    Usage errors exit 2 (argparse's message), :class:`MpilaunchError` becomes ``node-runtime: error: message`` and
    its ``exit_code``, Ctrl-C exits 130; a command's int result is the exit code.
    """
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # -h, --version or a usage error, already printed
        return exc.code if isinstance(exc.code, int) else 0
    try:
        result = args.run(args)
    except MpilaunchError as exc:
        return failed(PROG, exc)
    except KeyboardInterrupt:
        return interrupted(PROG)
    return result if isinstance(result, int) else 0


def entry() -> None:
    """The ``node-runtime`` program: :func:`main`, then exit at once with both streams flushed. This skips the
    interpreter's teardown (~8 ms of module finalization), which every node pays in every task; nothing of ours
    needs it (no atexit handlers, every file is closed by then)."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
