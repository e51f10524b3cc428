"""``mpilaunch job list|delete`` and ``mpilaunch list``: the jobs of an account and the tasks of a job."""

from __future__ import annotations

from typing import Any

import click

from mpilaunch.client import cliopts
from mpilaunch.client.confirm import confirm
from mpilaunch.client.inventory import TASK_STATES
from mpilaunch.client.tabulate import Column, show_rows

TASK_COLUMNS: list[Column] = [
    ("task", lambda r: r.id), ("state", lambda r: r.state), ("instances", lambda r: r.instances),
    ("result", lambda r: r.result), ("exit", lambda r: r.exit_code), ("start", lambda r: r.start),
    ("duration", lambda r: None if r.duration_s is None else f"{r.duration_s:g}s")]


@click.group()
def job() -> None:
    """Manage Batch jobs (a job groups tasks on one pool)."""


@job.command("list")
@click.option("--pool", help="Only the jobs of this pool.")
@cliopts.connection_options
def list_jobs(**opts: Any) -> int:
    """List the account's jobs: state and pool."""
    from mpilaunch.client.inventory import job_rows

    launch = cliopts.launcher(opts)
    with launch.errors():
        rows = job_rows(launch.batch, opts["pool"])
    show_rows(rows, [("job", lambda r: r.id), ("state", lambda r: r.state), ("pool", lambda r: r.pool),
                     ("created", lambda r: r.created)], opts["output"], empty="no jobs")
    return 0


@job.command()
@click.argument("job_id")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@cliopts.connection_options
def delete(**opts: Any) -> int:
    """Delete JOB_ID and all its tasks (running ones are terminated). Asks first unless --yes."""
    from mpilaunch.client.inventory import task_rows

    launch = cliopts.launcher(opts)
    with launch.errors():
        tasks = task_rows(launch.batch, opts["job_id"])
    running = sum(t.state != "completed" for t in tasks)
    confirm(f"delete job {opts['job_id']} and its {len(tasks)} task(s) ({running} not completed)?", opts["yes"])
    with launch.errors():
        launch.batch.begin_delete_job(opts["job_id"])
    if opts["output"] == "json":
        cliopts.emit_json({"job_id": opts["job_id"], "deleting": True, "tasks": len(tasks)})
    else:
        click.echo(f"job {opts['job_id']}: deleting ({len(tasks)} task(s))")
    return 0


@click.command("list")
@click.option("--job", default=cliopts.DEFAULT_JOB, show_default=True, envvar="MPILAUNCH_JOB", help="Job id.")
@click.option("--state", type=click.Choice(TASK_STATES), help="Only tasks in this state.")
@cliopts.connection_options
def list_tasks(**opts: Any) -> int:
    """List the tasks of a job, one row each (id, state, instances, result, start, duration)."""
    from mpilaunch.client.inventory import task_rows

    launch = cliopts.launcher(opts)
    with launch.errors():
        rows = task_rows(launch.batch, opts["job"], opts["state"])
    show_rows(rows, TASK_COLUMNS, opts["output"], empty=f"no tasks in job {opts['job']}"
              + (f" in state {opts['state']}" if opts["state"] else ""))
    return 0
