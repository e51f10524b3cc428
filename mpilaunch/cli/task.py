"""``mpilaunch status|wait|results|logs|terminate|reactivate``: follow, inspect and steer a submitted task."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from mpilaunch.cli import cliopts

if TYPE_CHECKING:
    from mpilaunch.client.api import Launcher, TaskRef


@click.command()
@cliopts.task_ref_options
@cliopts.connection_options
def status(**opts: Any) -> int:
    """Show the task's state and every instance's state now (always exits 0 if the task exists)."""
    results = cliopts.launcher(opts).results(cliopts.ref(opts))
    cliopts.show_results(results, opts["output"])
    cliopts.note(results.summary())
    return 0


@click.command()
@cliopts.task_ref_options
@cliopts.connection_options
@cliopts.wait_options
def wait(**opts: Any) -> int:
    """Wait for the task with live progress, then print the results (exit status = result).

    Ctrl-C stops waiting and leaves the task running (unless --terminate-on-interrupt).
    """
    return cliopts.wait_and_report(cliopts.launcher(opts), cliopts.ref(opts), opts)


@click.command()
@cliopts.task_ref_options
@cliopts.connection_options
@click.option("--logs", type=click.Path(file_okay=False), help="Download every instance's stdout/stderr here.")
@click.option("--outputs", type=click.Path(file_okay=False), help="Download the files the primary uploaded here.")
def results(**opts: Any) -> int:
    """Per-instance results (instance 0 = primary); exit 0 only if the task succeeded."""
    launch = cliopts.launcher(opts)
    res = launch.results(cliopts.ref(opts))
    cliopts.show_results(res, opts["output"])
    if opts["output"] == "table":
        cliopts.explain_failure(launch, res)
    if opts["logs"]:
        written = launch.download_logs(res, Path(opts["logs"]))
        cliopts.note(f"logs: {len(written)} file(s) in {opts['logs']}")
    if opts["outputs"]:
        files = launch.download_outputs(cliopts.ref(opts), Path(opts["outputs"]))
        cliopts.note(f"outputs: {len(files)} file(s) in {opts['outputs']}")
    return cliopts.exit_for(res)


@click.command()
@cliopts.task_ref_options
@cliopts.connection_options
@click.option("--instance", type=int, default=0, show_default=True, help="Which instance (0 = primary).")
@click.option("--stderr", "show_stderr", is_flag=True, help="Show stderr instead of stdout.")
@click.option("-f", "--follow", is_flag=True, help="Follow the task's output while it runs and end when it "
              "completes (exit status = result): every rank's lines tagged [rank] and the launch's messages.")
@click.option("--raw", is_flag=True, help="With -f: the instance's raw stdout.txt and stderr.txt instead.")
@click.option("--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              help="With -f: seconds between reads.")
def logs(**opts: Any) -> int:
    """Print one instance's stdout (or --stderr) as its node has it now, or follow the task's output (-f)."""
    from mpilaunch.client.results import node_file_path
    from node_runtime.errors import InvalidInput

    if opts["raw"] and not opts["follow"]:
        raise click.UsageError("--raw goes with -f (without -f, logs shows the raw file)")
    if opts["follow"] and opts["output"] == "json":
        raise click.UsageError("-f streams lines as text: --output json does not apply")
    launch = cliopts.launcher(opts)
    task = cliopts.ref(opts)
    if opts["follow"]:
        return _follow(launch, task, opts)
    res = launch.results(task)
    row = next((r for r in res.instances if r.instance == opts["instance"]), None)
    if row is None or not (row.node and row.pool and row.task_root):
        _check_instance(launch, task, opts["instance"])
        raise InvalidInput(f"instance {opts['instance']} of {task} has no node yet "
                           f"(instances known: {sorted(r.instance for r in res.instances)})")
    name = "stderr.txt" if opts["show_stderr"] else "stdout.txt"
    with launch.errors():
        data = b"".join(launch.batch.download_node_file(row.pool, row.node, node_file_path(row.task_root, name)))
    text = data.decode(errors="replace")
    if opts["output"] == "json":
        cliopts.emit_json({"job_id": res.job_id, "task_id": res.task_id, "instance": row.instance,
                           "node": row.node, "file": name, "text": text})
    else:
        click.echo(text, nl=False)
    return 0


def _check_instance(launch: Launcher, task: TaskRef, instance: int) -> None:
    """Raise :class:`InvalidInput` if the task has no instance ``instance``."""
    from node_runtime.errors import InvalidInput

    count = launch.instance_count(task)
    if not 0 <= instance < count:
        raise InvalidInput(f"no such instance: {instance} (task {task} has {count} instance(s): 0-{count - 1}, "
                           "0 = the primary)")


def _follow(launch: Launcher, task: TaskRef, opts: dict[str, Any]) -> int:
    """``logs -f``: stdout lines on stdout, stderr lines on stderr, until the task completes."""
    _check_instance(launch, task, opts["instance"])
    streams = ("stderr.txt",) if opts["show_stderr"] else ("stdout.txt", "stderr.txt")
    results = launch.follow(task, lambda line, is_err: click.echo(line, err=is_err),
                            raw=opts["raw"] or opts["show_stderr"], instance=opts["instance"], streams=streams,
                            interval=opts["interval"])
    return cliopts.exit_for(results)


@click.command()
@cliopts.task_ref_options
@cliopts.connection_options
def terminate(**opts: Any) -> int:
    """Terminate the task (every instance stops; it will not be retried)."""
    task = cliopts.ref(opts)
    cliopts.launcher(opts).terminate(task)
    _done(opts, "terminated")
    return 0


@click.command()
@cliopts.task_ref_options
@cliopts.connection_options
def reactivate(**opts: Any) -> int:
    """Run a failed task again: Batch makes it active, with its retry count reset to 0 (only completed, failed
    tasks of an active job)."""
    cliopts.launcher(opts).reactivate(cliopts.ref(opts))
    _done(opts, "reactivated")
    cliopts.note(f"follow it: {cliopts.wait_command(cliopts.ref(opts), opts)}")
    return 0


def _done(opts: dict[str, Any], what: str) -> None:
    """Say that the task was ``what`` (``terminated``, ``reactivated``), as text or JSON."""
    task = cliopts.ref(opts)
    if opts["output"] == "json":
        cliopts.emit_json({"job_id": task.job_id, "task_id": task.task_id, what: True})
    else:
        click.echo(f"{what} {task}")
