"""The ``mpilaunch`` command line. Subcommands live in their own modules and are imported on use."""

from __future__ import annotations

import click

from mpilaunch import __version__
from mpilaunch.clickutil import LazyGroup, entry_point

# name -> "module:click command"; each module imports the Azure SDKs only inside its functions.
COMMANDS: dict[str, str] = {
    "emulator": "mpilaunch.emulator.cli:emulator",
    "submit": "mpilaunch.cmd_submit:submit",
    "run": "mpilaunch.cmd_submit:run",
    "status": "mpilaunch.cmd_task:status",
    "wait": "mpilaunch.cmd_task:wait",
    "results": "mpilaunch.cmd_task:results",
    "logs": "mpilaunch.cmd_task:logs",
    "ssh": "mpilaunch.cmd_ssh:ssh",
    "terminate": "mpilaunch.cmd_task:terminate",
    "reactivate": "mpilaunch.cmd_task:reactivate",
    "pool": "mpilaunch.cmd_pool:pool",
    "job": "mpilaunch.cmd_job:job",
    "list": "mpilaunch.cmd_job:list_tasks",
    "delete": "mpilaunch.cmd_job:delete_task",
    "cleanup": "mpilaunch.cmd_job:cleanup",
    "local": "mpilaunch.cmd_local:local",
    "doctor": "mpilaunch.cmd_doctor:doctor",
}


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mpilaunch")
def cli() -> None:
    """Run mpi4py programs on N nodes as Azure Batch multi-instance tasks, on Azure or locally."""


main = entry_point(cli, "mpilaunch")
