"""``mpilaunch local up|down|status``: the Batch emulator and Azurite in the background, for offline work."""

from __future__ import annotations

from typing import Any

import click

from mpilaunch.client.cliopts import emit_json

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
