"""``node-runtime launch [--ppn N] [--mpi F] [--timeout S] -- COMMAND ARGS...``: the task's command line."""

from __future__ import annotations

import click


@click.command("launch", context_settings={"allow_interspersed_args": False})
@click.option("--ppn", type=click.IntRange(min=1), default=1, show_default=True, help="MPI processes per node.")
@click.option("--mpi", "flavor", type=click.Choice(["openmpi", "mpich", "intelmpi"]), default=None,
              help="The MPI implementation of mpirun (default: detected from 'mpirun --version').")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True,
              help="Seconds to wait for every node's coordination service to answer.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def launch(ppn: int, flavor: str | None, timeout: float, command: tuple[str, ...]) -> int:
    """Run COMMAND on every node of the task under mpirun (primary node only). Waits for every node's
    coordination service, streams output, forwards SIGTERM/SIGINT, exits with mpirun's exit code, writes
    launch-report.json in the working directory and stops every node's service at the end."""
    import os

    from node_runtime import launch as launching
    from node_runtime.coordinate import current_environment
    from node_runtime.mpirun import MpiFlavor

    env = current_environment()
    return launching.launch(env, os.environ, command, ppn=ppn, flavor=MpiFlavor(flavor) if flavor else None,
                            timeout=timeout)
