"""Rows of plain data as a rich table on stdout, or as JSON (``--output json``): the listings' one presentation."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import click


class Row(Protocol):
    def to_json(self) -> dict[str, Any]: ...


Column = tuple[str, Callable[[Any], object]]  # heading, cell of a row


def show_rows(rows: Sequence[Row], columns: Sequence[Column], output: str, *, empty: str) -> None:
    """Print ``rows`` as a table of ``columns`` (``empty`` on stderr when there are none), or as a JSON list."""
    if output == "json":
        click.echo(json.dumps([r.to_json() for r in rows], indent=2))
        return
    if not rows:
        click.echo(empty, err=True)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(*(heading for heading, _ in columns), box=None, pad_edge=False)
    for row in rows:
        table.add_row(*("" if (v := cell(row)) is None else str(v) for _, cell in columns))
    console = Console()
    (console if console.is_terminal else Console(width=200)).print(table)
