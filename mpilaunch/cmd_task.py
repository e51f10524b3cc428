"""``mpilaunch status|wait|results|logs|terminate|reactivate``: follow, inspect and steer a submitted task."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from mpilaunch.client import cliopts


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
def logs(**opts: Any) -> int:
    """Print one instance's stdout (or --stderr) as its node has it now."""
    from mpilaunch.client.results import node_file_path
    from node_runtime.errors import InvalidInput

    launch = cliopts.launcher(opts)
    res = launch.results(cliopts.ref(opts))
    rows = {r.instance: r for r in res.instances}
    row = rows.get(opts["instance"])
    if row is None or not (row.node and row.pool and row.task_root):
        raise InvalidInput(f"instance {opts['instance']} of {res.job_id}/{res.task_id} has no node yet "
                           f"(instances known: {sorted(rows)})")
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
