"""``mpilaunch submit`` and ``mpilaunch run``: an MPI program on N nodes as one multi-instance task."""

from __future__ import annotations

import os
import secrets
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click

from mpilaunch.client import cliopts
from mpilaunch.client.spec import (
    BindMount,
    ContainerSpec,
    HostMount,
    Registry,
    TaskSpec,
    parse_duration,
    parse_env,
)
from node_runtime.contract import DEFAULT_FABRIC, DEFAULT_SSH_PORT, FABRICS, FLAVORS

# mpilaunch's options end at the program's first word (or at `--`): nothing after it is ever read as ours, and an
# unknown option before it is an error (exit 2, with click's "did you mean"), not the start of the program
PROGRAM_FIRST = {"allow_interspersed_args": False}

task_options = cliopts.stack(
    click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED),
    click.option("-n", "--nodes", type=int, default=2, show_default=True, help="Number of nodes (instances)."),
    click.option("--ppn", type=int, help="MPI processes per node (default: the node's physical cores / threads "
                                         "per rank, as the runtime detects them)."),
    click.option("--threads-per-rank", type=int, help="OpenMP threads per rank for hybrid MPI+OpenMP "
                                                      "(OMP_NUM_THREADS; each rank bound to that many cores)."),
    click.option("--mpi", type=click.Choice(FLAVORS), help="MPI flavor on the nodes (default openmpi)."),
    click.option("--fabric", type=click.Choice(FABRICS), default=DEFAULT_FABRIC, show_default=True,
                 help="auto: UCX over InfiniBand when every node has it, else TCP; ucx; tcp (docs/fabric.md)."),
    click.option("--pool", help="Pool id [MPILAUNCH_POOL]; --local uses pool 'local'."),
    click.option("--job", default=cliopts.DEFAULT_JOB, show_default=True, envvar="MPILAUNCH_JOB",
                 help="Job id (created on the pool if missing)."),
    click.option("--task-id", help="Task id (default: mpi-<UTC time>-<random>)."),
    click.option("-i", "--input", "inputs", multiple=True, type=click.Path(exists=True, path_type=Path),
                 help="File or directory every node gets in its task directory (repeatable)."),
    click.option("--primary-input", "primary_inputs", multiple=True, type=click.Path(exists=True, path_type=Path),
                 help="File or directory only the primary gets (repeatable)."),
    click.option("--collect", multiple=True, help="Output file pattern uploaded from the primary's working "
                                                  "directory to Blob storage when the task ends (repeatable)."),
    click.option("-e", "--env", "env", multiple=True, help="NAME=VALUE exported to every rank (repeatable)."),
    click.option("--image", help="Run in this container image (the pool needs a container configuration)."),
    click.option("--bind-mount", multiple=True, help="Batch host path mounted in the container: SOURCE[:ro] "
                                                     "(Shared, Startup, VfsMounts, Task, JobPrep, Applications)."),
    click.option("--mount", "mounts", multiple=True, help="Host path into the container: HOST:CONTAINER[:ro] "
                                                         "(repeatable)."),
    click.option("--registry", help="Private registry server of --image."),
    click.option("--registry-user", help="Registry user; the password comes from MPILAUNCH_REGISTRY_PASSWORD."),
    click.option("--registry-identity", help="ARM id of the pool's managed identity for the registry."),
    click.option("--container-run-options", default="", help="Extra `docker create` options."),
    click.option("--wall-time", help="Maximum wall time per attempt, e.g. 30m, 2h, 01:30:00."),
    click.option("--retries", type=int, default=0, show_default=True, help="Task retries (-1: unlimited)."),
    click.option("--elevated", is_flag=True, help="Run as the pool's admin auto-user."),
    click.option("--display-name", help="Task display name."),
    click.option("--ssh-port", type=int, default=DEFAULT_SSH_PORT, show_default=True, help="Coordination (sshd) port."),
    click.option("--checkpoint", "--checkpoint-url", "checkpoint", metavar="LOCATION",
                 help="Checkpoint location for node_runtime.checkpoint (MPILAUNCH_CHECKPOINT_URL): /abs/dir, "
                      "file:///dir, a Blob container[/prefix] URL (the client adds a least-privilege SAS) or "
                      "blob:PREFIX (the storage container, under checkpoints/PREFIX)."),
    click.option("--no-logs", is_flag=True, help="Do not upload ../std*.txt to Blob storage."),
    cliopts.connection_options,
)


def new_task_id() -> str:
    return f"mpi-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def spec_from(opts: dict[str, Any]) -> TaskSpec:
    """The validated :class:`TaskSpec` for the command's options."""
    container = None
    if opts["image"]:
        registry = None
        if opts["registry"]:
            registry = Registry(opts["registry"], opts["registry_user"],
                                os.environ.get("MPILAUNCH_REGISTRY_PASSWORD"), opts["registry_identity"])
        container = ContainerSpec(opts["image"], tuple(BindMount.parse(b) for b in opts["bind_mount"]), registry,
                                  opts["container_run_options"], tuple(HostMount.parse(m) for m in opts["mounts"]))
    elif opts["bind_mount"] or opts["registry"] or opts["mounts"]:
        raise click.UsageError("--bind-mount, --mount and --registry need --image")
    return TaskSpec(
        job_id=opts["job"], task_id=opts["task_id"] or new_task_id(), nodes=opts["nodes"], argv=tuple(opts["argv"]),
        ppn=opts["ppn"], mpi=opts["mpi"], fabric=opts["fabric"], threads_per_rank=opts["threads_per_rank"],
        inputs=tuple(opts["inputs"]), primary_inputs=tuple(opts["primary_inputs"]),
        outputs=tuple(opts["collect"]), env=parse_env(opts["env"]), container=container,
        wall_time=parse_duration(opts["wall_time"]) if opts["wall_time"] else None, retries=opts["retries"],
        elevated=opts["elevated"], display_name=opts["display_name"], ssh_port=opts["ssh_port"],
        checkpoint_url=opts["checkpoint"], upload_logs=not opts["no_logs"],
    ).validate()


def _submit(opts: dict[str, Any]) -> tuple[Any, Any]:
    spec = spec_from(opts)
    launch = cliopts.launcher(opts, local_nodes=spec.nodes)
    task = launch.submit(spec, pool=opts["pool"], progress=sys.stderr.isatty(),
                         warn=lambda w: cliopts.note(f"warning: {w}"))
    return launch, task


@click.command(context_settings=PROGRAM_FIRST, short_help="Submit a program as a multi-instance task and return.")
@task_options
@click.option("--dry-run", is_flag=True, help="Print the Add Task JSON (secrets masked) and the pool checks, and "
                                              "send nothing: no upload, no job, no task.")
def submit(**opts: Any) -> int:
    """Submit ARGV (e.g. `-- python3 app.py`) as a multi-instance task and return."""
    if opts["dry_run"]:
        return _dry_run(opts)
    _, task = _submit(opts)
    if opts["output"] == "json":
        cliopts.emit_json({"job_id": task.job_id, "task_id": task.task_id})
    else:
        click.echo(f"submitted {task}")
        cliopts.note(f"follow it: {cliopts.wait_command(task, opts)}")
    return 0


def _dry_run(opts: dict[str, Any]) -> int:
    from mpilaunch.client.dryrun import dry_run
    from node_runtime.errors import MpilaunchError

    spec = spec_from(opts)
    try:  # what is configured, read offline; a missing configuration only leaves placeholders
        launch = cliopts.launcher(opts)
        container, pool = launch.store.container.url, opts["pool"] or launch.settings.pool
    except MpilaunchError:
        container, pool = None, opts["pool"] or ("local" if opts["local"] else None)
    doc = dry_run(spec, container_url=container, pool=pool)
    if opts["output"] == "json":
        cliopts.emit_json(doc)
        return 0
    cliopts.emit_json(doc["task"])
    cliopts.note(f"dry run: nothing was sent. The task would go to {doc['pool']}, after these checks:"
                 + "".join(f"\n  - {check}" for check in doc["pool_checks"]))
    return 0


@click.command(context_settings=PROGRAM_FIRST)
@task_options
@cliopts.wait_options
def run(**opts: Any) -> int:
    """Submit ARGV, wait for it with live progress, print the per-instance results (exit status = result)."""
    launch, task = _submit(opts)
    cliopts.note(f"submitted {task}")
    return cliopts.wait_and_report(launch, task, opts)
