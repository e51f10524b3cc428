"""The ``mpilaunch`` command line. Subcommands live in their own modules and are imported on use."""

from __future__ import annotations

import click

from mpilaunch import __version__
from mpilaunch.cli.clickutil import LazyGroup, entry_point

# name -> "module:click command"; each module imports the Azure SDKs only inside its functions.
COMMANDS: dict[str, str] = {
    "emulator": "mpilaunch.cli.emulator:emulator",
    "submit": "mpilaunch.cli.submit:submit",
    "run": "mpilaunch.cli.submit:run",
    "status": "mpilaunch.cli.task:status",
    "wait": "mpilaunch.cli.task:wait",
    "results": "mpilaunch.cli.task:results",
    "logs": "mpilaunch.cli.task:logs",
    "ssh": "mpilaunch.cli.ssh:ssh",
    "terminate": "mpilaunch.cli.task:terminate",
    "reactivate": "mpilaunch.cli.task:reactivate",
    "pool": "mpilaunch.cli.pool:pool",
    "job": "mpilaunch.cli.job:job",
    "list": "mpilaunch.cli.job:list_tasks",
    "delete": "mpilaunch.cli.job:delete_task",
    "cleanup": "mpilaunch.cli.job:cleanup",
    "local": "mpilaunch.cli.local:local",
    "doctor": "mpilaunch.cli.doctor:doctor",
}


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mpilaunch")
def cli() -> None:
    """Run mpi4py programs on N nodes as Azure Batch multi-instance tasks, on Azure or locally."""


main = entry_point(cli, "mpilaunch")
