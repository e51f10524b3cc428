"""Click options and output helpers shared by the client commands (no Azure import here: ``--help`` stays fast)."""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from node_runtime.errors import INTERRUPTED

if TYPE_CHECKING:
    from mpilaunch.client.api import Launcher, TaskRef
    from mpilaunch.client.results import TaskResults

F = TypeVar("F", bound=Callable[..., Any])
DEFAULT_JOB = "mpilaunch"
TAIL_LINES = 8  # stderr lines shown when a task failed


def stack(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    def apply(f: F) -> F:
        for d in reversed(decorators):
            f = d(f)
        return f
    return apply


connection_options = stack(
    click.option("--local", is_flag=True, help="Use the local emulator + Azurite (`mpilaunch local up`)."),
    click.option("--profile", help="Profile of the profile file (MPILAUNCH_PROFILE; file: MPILAUNCH_CONFIG)."),
    click.option("--endpoint", help="Batch account URL [AZURE_BATCH_ENDPOINT]."),
    click.option("--account", help="Batch account name [AZURE_BATCH_ACCOUNT]; the key comes from "
                                    "AZURE_BATCH_ACCESS_KEY or the profile, else Entra ID is used."),
    click.option("--storage-account", help="Storage account [AZURE_STORAGE_ACCOUNT] (or "
                                            "AZURE_STORAGE_CONNECTION_STRING)."),
    click.option("--container", help="Blob container for inputs/outputs [MPILAUNCH_CONTAINER, default mpilaunch]."),
    click.option("--output", "output", type=click.Choice(["table", "json"]), default="table", show_default=True,
                 help="Output format."),
)

task_ref_options = stack(
    click.argument("task_id"),
    click.option("--job", default=DEFAULT_JOB, show_default=True, envvar="MPILAUNCH_JOB", help="Job id."),
)


def launcher(opts: dict[str, Any], *, local_nodes: int | None = None) -> Launcher:
    """A :class:`Launcher` from the connection options (``local_nodes``: start local services if needed)."""
    from mpilaunch.client.api import Launcher

    if opts.get("local"):
        return Launcher.local(local_nodes)
    flags = {"batch_endpoint": opts.get("endpoint"), "batch_account": opts.get("account"),
             "storage_account": opts.get("storage_account"), "container": opts.get("container"),
             "pool": opts.get("pool")}
    return Launcher.from_environment(flags, profile=opts.get("profile"))


def ref(opts: dict[str, Any]) -> TaskRef:
    from mpilaunch.client.api import TaskRef

    return TaskRef(opts["job"], opts["task_id"])


CONNECTION_FLAGS = ("profile", "endpoint", "account", "storage_account", "container")


def task_command(verb: str, task: TaskRef, opts: dict[str, Any]) -> str:
    """``mpilaunch VERB --job J T`` with the connection flags in use, so that it works when pasted."""
    words = ["mpilaunch", verb, "--job", task.job_id, task.task_id] + (["--local"] if opts.get("local") else [])
    for name in CONNECTION_FLAGS:
        if opts.get(name):
            words += [f"--{name.replace('_', '-')}", str(opts[name])]
    return shlex.join(words)


def wait_command(task: TaskRef, opts: dict[str, Any]) -> str:
    """The command that follows ``task``: ``mpilaunch wait --job J T [--local] [connection flags]``."""
    return task_command("wait", task, opts)


def emit_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2))


def note(message: str) -> None:
    """A human message on stderr (never mixed into --output json on stdout)."""
    click.echo(message, err=True)


def show_results(results: TaskResults, output: str) -> None:
    from mpilaunch.cli.tabulate import render_table
    from mpilaunch.client.results import results_json

    if output == "json":
        click.echo(results_json(results))
        return
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    console.print(render_table(results))
    for line in results.notes():
        note(line)


def explain_failure(launch: Launcher, results: TaskResults) -> None:
    """On stderr, why a failed task failed: the first failing rank's own last stderr lines (from the primary's launch
    report: the program's lines, not MPI's), else the last program lines of each failing instance's stderr.txt (MPI's
    and launch's messages left out); each ends with the exact command that shows the rest. Nothing for a task that
    succeeded or that someone terminated."""
    from mpilaunch.client.results import stderr_tail

    if not results.completed or results.succeeded or results.ended == "terminated":
        return
    local = " --local" if getattr(launch.settings, "local", False) else ""
    rest = f"mpilaunch logs --job {results.job_id} {results.task_id} --stderr{local}"
    first = results.first_failure
    if first is not None and first.stderr_tail:
        who = f"rank {first.rank}" if first.rank is not None else "the failing rank"
        note(f"{who} stderr (last lines):" + "".join(f"\n  | {line}" for line in first.stderr_tail[-TAIL_LINES:])
             + f"\n  the rest: {rest}")
        return
    for row in results.causes():
        with launch.errors():
            tail = stderr_tail(launch.batch, row, TAIL_LINES)
        if tail:
            instance = f" --instance {row.instance}" if row.instance else ""
            note(f"instance {row.instance} stderr (last lines):" + "".join(f"\n  | {line}" for line in tail)
                 + f"\n  the rest: {rest}{instance}")


def exit_for(results: TaskResults) -> int:
    """0 if the task succeeded; raise :class:`TaskFailed` naming the failed instances otherwise."""
    from node_runtime.errors import MpilaunchError, TaskFailed

    if results.succeeded:
        note(results.summary())
        return 0
    if not results.completed:
        raise MpilaunchError(f"{results.summary()}: not complete yet (`mpilaunch wait --job {results.job_id} "
                             f"{results.task_id}`)")
    raise TaskFailed(results.summary())


def wait_and_report(launch: Launcher, task: TaskRef, opts: dict[str, Any]) -> int:
    """Wait with live progress and live output (unless ``no_output``), handle Ctrl-C, print results, fetch logs; the
    exit status follows the result."""
    from pathlib import Path

    from mpilaunch.cli.progress import Progress

    progress = Progress(enabled=sys.stderr.isatty())
    timeout, interval = opts.get("timeout"), opts.get("interval") or 1.0
    try:
        with progress:
            if opts.get("no_output"):
                results = launch.wait(task, timeout=timeout, interval=interval, on_update=progress.update)
            else:
                results = launch.follow(task, progress.output, raw=bool(opts.get("raw_output")), timeout=timeout,
                                        interval=interval, on_update=progress.update)
    except KeyboardInterrupt:
        if opts.get("terminate_on_interrupt"):
            launch.terminate(task)
            note(f"interrupted: terminated task {task}")
        else:
            note(f"interrupted: task {task} keeps running. Resume with: {wait_command(task, opts)}"
                 f"  (stop it: {task_command('terminate', task, opts)})")
        raise click.exceptions.Exit(INTERRUPTED) from None
    show_results(results, opts["output"])
    if opts["output"] == "table":
        explain_failure(launch, results)
    if opts.get("logs"):
        written = launch.download_logs(results, Path(opts["logs"]))
        note(f"logs: {len(written)} file(s) in {opts['logs']}")
    return exit_for(results)


wait_options = stack(
    click.option("--timeout", type=float, help="Give up waiting after this many seconds (the task keeps running)."),
    click.option("--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
                 help="Seconds between reads of the live output, and between the task's state polls at first "
                      "(those back off to 15 s while nothing changes)."),
    click.option("--terminate-on-interrupt", is_flag=True, help="On Ctrl-C, terminate the task instead of leaving "
                                                               "it running."),
    click.option("--logs", type=click.Path(file_okay=False), help="Download every instance's stdout/stderr here."),
    click.option("--no-output", is_flag=True, help="Do not show the task's output while it runs (progress only)."),
    click.option("--raw-output", is_flag=True, help="Show the primary's raw stdout/stderr while the task runs, "
                                                     "instead of every rank's lines tagged [rank]."),
)
