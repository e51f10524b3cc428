"""Tables: rows of plain data as a rich table on stdout or as JSON (``--output json``), and a task's results."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import click

from mpilaunch.client.results import TaskResults, clock


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


def render_table(results: TaskResults) -> Any:
    """A rich ``Table`` of the instances."""
    from rich.table import Table

    again = f"  attempt={results.attempt} (requeued {results.requeue_count}, " \
        f"{results.retries_used})" if results.attempt > 1 else ""
    first = results.first_failure
    table = Table(title=f"{results.job_id}/{results.task_id}  state={results.state}  "
                        f"result={results.outcome or results.result or '-'}{again}", title_justify="left",
                  caption=f"first failure: {first.summary}" if first is not None and not results.ended else None,
                  caption_justify="left")
    for col in ("instance", "node", "state", "exit code", "result", "start", "end", "duration", "failure"):
        table.add_column(col, justify="right" if col in ("instance", "exit code", "duration") else "left",
                         no_wrap=col != "failure", min_width=30 if col == "failure" else None)
    for r in results.instances:
        outcome = results.instance_outcome(r)
        style = "red" if r.failed or outcome not in (None, "success") else None
        table.add_row(
            f"{r.instance}{' (primary)' if r.instance == 0 else ''}", r.node or "-", r.state or "-",
            "-" if r.exit_code is None else str(r.exit_code), outcome or r.result or "-", clock(r.start),
            clock(r.end), "-" if r.duration is None else f"{r.duration:.1f}s", str(r.failure) if r.failure else "",
            style=style)
    return table
