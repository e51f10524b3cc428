"""Live progress of a waiting task on stderr: a rich live line on a terminal, state changes otherwise, a line for
each requeue saying which node caused it, and the task's live output above the live line."""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

import click

from mpilaunch.client.results import TaskResults


def describe(results: TaskResults, elapsed: float) -> str:
    """``job/task: running | primary running on node-0 | subtasks: 2 running | 12s``."""
    primary = results.instances[0]
    where = f" on {primary.node}" if primary.node else ""
    subs = Counter(r.state or "pending" for r in results.instances[1:])
    counts = ", ".join(f"{n} {state}" for state, n in sorted(subs.items())) or "none reported yet"
    retry = f" | retry {results.retry_count}" if results.retry_count else ""
    requeue = f" | requeued {results.requeue_count}" if results.requeue_count else ""
    return (f"{results.job_id}/{results.task_id}: {results.state} | primary {primary.state or 'pending'}{where} | "
            f"subtasks: {counts}{retry}{requeue} | {elapsed:.0f}s")


class Progress:
    """Context manager; call :meth:`update` with each poll's results."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self._live: Any = None
        self._last = ""
        self._start = time.monotonic()
        self._requeues = 0
        self._nodes: list[str] = []

    def __enter__(self) -> Progress:
        if self.enabled:
            from rich.console import Console
            from rich.live import Live

            self._live = Live("", console=Console(stderr=True), transient=True, refresh_per_second=4)
            self._live.__enter__()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if self._live is not None:
            self._live.__exit__(et, ev, tb)

    def update(self, results: TaskResults) -> None:
        if results.requeue_count > self._requeues:  # nodes of the previous look: the requeue may have moved it
            for note in results.notes(self._nodes):
                self._say(note)
        self._requeues = results.requeue_count
        self._nodes = [r.node for r in results.instances if r.node]
        line = describe(results, time.monotonic() - self._start)
        if self._live is not None:
            self._live.update(line)
            return
        state = line.rsplit(" | ", 1)[0]  # without the elapsed time
        if state != self._last:
            click.echo(line, err=True)
            self._last = state

    def _say(self, message: str) -> None:
        """A line that stays (above the live line on a terminal)."""
        if self._live is not None:
            self._live.console.print(message, markup=False, highlight=False)
        else:
            click.echo(message, err=True)

    def output(self, line: str, is_err: bool = False) -> None:
        """A line of the task's live output (``is_err``: from a stderr stream; both go to stderr here), as the
        program wrote it (its colours kept on a terminal)."""
        if self._live is not None:
            from rich.text import Text

            self._live.console.print(Text.from_ansi(line), highlight=False, soft_wrap=True)
        else:
            click.echo(line, err=True)


@contextlib.contextmanager
def upload_bar(total: int) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr for an upload of ``total`` bytes; yields the function that advances it."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, TextColumn
    from rich.progress import Progress as Bar

    with Bar(TextColumn("uploading inputs"), BarColumn(), DownloadColumn(), console=Console(stderr=True),
             transient=True) as bar:
        task = bar.add_task("upload", total=total)
        yield lambda n: bar.advance(task, n)
