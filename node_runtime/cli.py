"""The ``node-runtime`` command line. Subcommands live in their own modules and are imported on use."""

from __future__ import annotations

import click

from mpilaunch import __version__
from mpilaunch.clickutil import LazyGroup, entry_point

COMMANDS: dict[str, str] = {
    "env": "node_runtime.cmd_env:env",
    "coordinate": "node_runtime.cmd_coordinate:coordinate",
    "launch": "node_runtime.cmd_launch:launch",
}


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="node-runtime")
def cli() -> None:
    """Per-node runtime of an mpilaunch multi-instance task: environment, coordination service, MPI launch."""


main = entry_point(cli, "node-runtime")
