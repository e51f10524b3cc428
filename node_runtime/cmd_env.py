"""``node-runtime env``: show what this node learns from its environment (or every problem with it)."""

from __future__ import annotations

import json

import click

from node_runtime.env import NodeEnvironment


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the model as JSON.")
def env(as_json: bool) -> None:
    """Print this node's environment model; exit 2 listing every problem if it is invalid."""
    model = NodeEnvironment.current()
    data = model.to_dict()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    width = max(map(len, data))
    for name, value in data.items():
        shown = "-" if value in (None, "", []) else ",".join(map(str, value)) if isinstance(value, list) else value
        click.echo(f"{name:<{width}}  {shown}")
