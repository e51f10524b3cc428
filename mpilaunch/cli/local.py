"""``mpilaunch local up|down|status``: the Batch emulator and Azurite in the background, for offline work."""

from __future__ import annotations

from typing import Any

import click

from mpilaunch.cli.cliopts import emit_json

output_option = click.option("--output", type=click.Choice(["table", "json"]), default="table", show_default=True)


@click.group()
def local() -> None:
    """Start, stop or inspect the local emulator + Azurite (state in ~/.mpilaunch/local)."""


def _print(info: dict[str, Any], output: str) -> None:
    if output == "json":
        emit_json(info)
        return
    for key, value in info.items():
        click.echo(f"{key:16} {value}")


@local.command()
@click.option("-n", "--nodes", type=int, default=3, show_default=True, help="Nodes of pool 'local'.")
@output_option
def up(nodes: int, output: str) -> int:
    """Start the emulator and Azurite (if not running) and make pool 'local' have NODES nodes."""
    from mpilaunch.client import local as services

    services.up(nodes)
    _print(services.status(), output)
    return 0


@local.command()
@output_option
def down(output: str) -> int:
    """Stop the local emulator and Azurite."""
    from mpilaunch.client import local as services

    stopped = services.down()
    if output == "json":
        emit_json({"stopped": stopped})
    else:
        click.echo("stopped " + ", ".join(stopped) if stopped else "nothing was running")
    return 0


@local.command()
@output_option
def status(output: str) -> int:
    """Show the local endpoints and whether the services run (exit 1 if not)."""
    from mpilaunch.client import local as services

    info = services.status()
    _print(info, output)
    return 0 if info["running"] else 1


@local.command()
@click.argument("kind", type=click.Choice(["preempt", "reboot", "kill"]))
@click.argument("node", required=False)
@click.option("--random", "pick", is_flag=True, help="Hit a random fit node instead of NODE.")
@click.option("--pool", default="local", show_default=True, help="Pool of the node.")
@click.option("--when", type=click.Choice(["now", "running"]), default="now", show_default=True,
              help="'running': wait until a task runs on the node (or, with --random, on any node) first.")
@click.option("--down", type=click.FloatRange(0, 3600), default=2.0, show_default=True,
              help="Seconds a preempted or killed node stays down.")
def fault(kind: str, node: str | None, *, pick: bool, pool: str, when: str, down: float) -> int:
    """Preempt, reboot or kill a node of the local emulator, to rehearse what Azure does to tasks offline.

    preempt (Spot nodes only): the node is preempted, its files are lost, its tasks are requeued; it comes back with
    the same id. reboot: Batch's reboot (running tasks requeued, StartTask rerun). kill: the node fails, everything
    on it ends, its tasks are requeued. A requeue does not use one of the task's retries: checkpoint your work.
    """
    from mpilaunch.client import local as services
    from node_runtime.errors import InvalidInput

    if pick == (node is not None):
        raise InvalidInput("give either a NODE id or --random")
    target = services.fault(services.batch_client(), kind, node, pool_id=pool, when_running=when == "running",
                            down=down)
    click.echo(f"{kind}: node {target} of pool {pool}")
    return 0
