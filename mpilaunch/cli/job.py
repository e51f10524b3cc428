"""``mpilaunch job list|delete``, ``list``, ``delete`` and ``cleanup``: jobs, the tasks of a job, and their removal."""

from __future__ import annotations

from typing import Any

import click

from mpilaunch.cli import cliopts
from mpilaunch.cli.confirm import confirm
from mpilaunch.cli.tabulate import Column, show_rows
from mpilaunch.client.inventory import TASK_STATES

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


cleanup_options = cliopts.stack(
    click.option("--outputs", is_flag=True, help="Also remove the output files the primary uploaded."),
    click.option("--dry-run", is_flag=True, help="Only show what would go."),
    click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation."),
)


@click.command("delete")
@cliopts.task_ref_options
@cleanup_options
@cliopts.connection_options
def delete_task(**opts: Any) -> int:
    """Delete a finished task and what was staged for it: its logs in Blob storage, its inputs unless another
    task uses them (outputs are kept unless --outputs)."""
    return _clean(opts, [opts["job"]], task_id=opts["task_id"], older_than=None)


@click.command()
@click.option("--job", envvar="MPILAUNCH_JOB", help="Only this job's tasks [default: every job's].")
@click.option("--older-than", default="7d", show_default=True,
              help="Only tasks that ended longer ago than this (e.g. 12h, 7d; 0 for all).")
@cleanup_options
@cliopts.connection_options
def cleanup(**opts: Any) -> int:
    """Delete the finished tasks mpilaunch submitted, with their staged inputs and logs (as `delete` does)."""
    from mpilaunch.client.spec import parse_duration

    older = parse_duration(opts["older_than"]) if opts["older_than"] not in ("0", "0s") else None
    return _clean(opts, [opts["job"]] if opts["job"] else None, task_id=None, older_than=older)


def _clean(opts: dict[str, Any], jobs: list[str] | None, *, task_id: str | None, older_than: Any) -> int:
    from datetime import datetime, timezone

    from mpilaunch.client.cleanup import carry_out, plan

    launch = cliopts.launcher(opts)
    with launch.errors(), launch.storage_errors():
        todo = plan(launch.batch, launch.store, jobs, task_id=task_id, older_than=older_than, outputs=opts["outputs"],
                    now=datetime.now(timezone.utc))
    if opts["output"] == "json":
        cliopts.emit_json({**todo.to_json(), "deleted": not opts["dry_run"]})
    else:
        for job_id, task in todo.tasks:
            click.echo(f"task  {job_id}/{task}")
        for name, size in todo.blobs:
            click.echo(f"blob  {name}  ({_size(size)})")
        cliopts.note(f"{len(todo.tasks)} task(s), {len(todo.blobs)} blob(s), {_size(todo.size)}"
                     + (f"; {todo.inputs_kept} input(s) kept: other tasks use them" if todo.inputs_kept else ""))
    if opts["dry_run"] or not (todo.tasks or todo.blobs):
        return 0
    confirm(f"delete these {len(todo.tasks)} task(s) and {len(todo.blobs)} blob(s)?", opts["yes"])
    with launch.errors(), launch.storage_errors():
        carry_out(launch.batch, launch.store, todo)
    cliopts.note("deleted")
    return 0


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
