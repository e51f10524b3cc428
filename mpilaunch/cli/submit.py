"""``mpilaunch submit`` and ``mpilaunch run``: an MPI program on N nodes as one multi-instance task."""

from __future__ import annotations

import os
import secrets
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click

from mpilaunch.cli import cliopts
from mpilaunch.client.pools import DEFAULT_VM_SIZE, PoolSpec
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
from node_runtime.errors import InvalidInput

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
    click.option("--auto-pool", is_flag=True,
                 help="Give the task a pool of its own, created with its job and deleted by Batch when the task "
                      "ends, success or failure (the job is the task id unless --job is given)."),
    click.option("--vm-size", help=f"VM size of the --auto-pool [default: {DEFAULT_VM_SIZE}]."),
    click.option("--spot", type=click.IntRange(min=0), help="How many of the --auto-pool's nodes are Spot nodes."),
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
    click.option("--hang-timeout", metavar="DURATION",
                 help="End the task when no rank wrote output and no checkpoint was committed for DURATION, e.g. "
                      "10m: every rank's Python stack goes to hang-report.json, the task fails with exit code 124 "
                      "(docs/node-runtime.md, \"Hang watchdog\")."),
    click.option("--no-abort-on-exception", is_flag=True,
                 help="Run a Python program as given. Without it, `python3 app.py` runs as `python3 -m mpi4py "
                      "app.py` does: an uncaught exception on any rank calls MPI_Abort and ends the whole job at "
                      "once (instead of the other ranks waiting forever)."),
    click.option("--retries", type=int, default=0, show_default=True, help="Task retries (-1: unlimited)."),
    click.option("--elevated", is_flag=True, help="Run as the pool's admin auto-user."),
    click.option("--display-name", help="Task display name."),
    click.option("--ssh-port", type=int, default=DEFAULT_SSH_PORT, show_default=True, help="Coordination (sshd) port."),
    click.option("--checkpoint", "--checkpoint-url", "checkpoint", metavar="LOCATION",
                 help="Checkpoint location for mpilaunch.checkpoint (MPILAUNCH_CHECKPOINT_URL): /abs/dir, "
                      "file:///dir, a Blob container[/prefix] URL (the client adds a least-privilege SAS) or "
                      "blob:PREFIX (PREFIX in the container <--container>-checkpoints)."),
    click.option("--no-logs", is_flag=True, help="Do not upload ../std*.txt to Blob storage."),
    cliopts.connection_options,
)


def new_task_id() -> str:
    return f"mpi-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def container_from(opts: dict[str, Any]) -> ContainerSpec | None:
    """The container of ``--image`` and its options (those a command lacks count as not given), or None."""
    bind_mounts, mounts = opts.get("bind_mount", ()), opts.get("mounts", ())
    if not opts["image"]:
        if bind_mounts or opts["registry"] or mounts or opts["container_run_options"]:
            raise click.UsageError("--bind-mount, --mount, --registry and --container-run-options need --image")
        return None
    registry = None
    if opts["registry"]:
        registry = Registry(opts["registry"], opts["registry_user"],
                            os.environ.get("MPILAUNCH_REGISTRY_PASSWORD"), opts["registry_identity"])
    return ContainerSpec(opts["image"], tuple(BindMount.parse(b) for b in bind_mounts), registry,
                         opts["container_run_options"], tuple(HostMount.parse(m) for m in mounts))


def spec_from(opts: dict[str, Any]) -> TaskSpec:
    """The validated :class:`TaskSpec` for the command's options."""
    container = container_from(opts)
    return TaskSpec(
        job_id=opts["job"], task_id=opts["task_id"] or new_task_id(), nodes=opts["nodes"], argv=tuple(opts["argv"]),
        ppn=opts["ppn"], mpi=opts["mpi"], fabric=opts["fabric"], threads_per_rank=opts["threads_per_rank"],
        inputs=tuple(opts["inputs"]), primary_inputs=tuple(opts["primary_inputs"]),
        outputs=tuple(opts["collect"]), env=parse_env(opts["env"]), container=container,
        wall_time=parse_duration(opts["wall_time"]) if opts["wall_time"] else None, retries=opts["retries"],
        hang_timeout=parse_duration(opts["hang_timeout"]) if opts["hang_timeout"] else None,
        abort_on_exception=not opts["no_abort_on_exception"],
        elevated=opts["elevated"], display_name=opts["display_name"], ssh_port=opts["ssh_port"],
        checkpoint_url=opts["checkpoint"], upload_logs=not opts["no_logs"],
    ).validate()


def _specs(opts: dict[str, Any]) -> tuple[TaskSpec, PoolSpec | None]:
    """The task's spec and, with ``--auto-pool``, the spec of its own pool (its job is then the task id unless
    ``--job`` is given: the job lives and dies with the pool)."""
    if not opts["auto_pool"]:
        if opts["vm_size"] or opts["spot"]:
            raise click.UsageError("--vm-size and --spot need --auto-pool (a pool of its own for the task)")
        return spec_from(opts), None
    if opts["pool"]:
        raise click.UsageError("--auto-pool creates the task's pool: leave out --pool")
    opts["task_id"] = opts["task_id"] or new_task_id()
    if click.get_current_context().get_parameter_source("job") is click.core.ParameterSource.DEFAULT:
        opts["job"] = opts["task_id"]
    spec = spec_from(opts)
    spot = opts["spot"] or 0
    if spot > spec.nodes:
        raise InvalidInput(f"--spot {spot} is more than the task's {spec.nodes} node(s)")
    pool = PoolSpec(spec.job_id, spec.nodes - spot, spot, opts["vm_size"] or DEFAULT_VM_SIZE,
                    container_images=(spec.container.image,) if spec.container else (),
                    install_runtime=not opts["local"] and spec.container is None).validate()
    return spec, pool


def _monitor() -> Any:
    """The upload's progress bar, on a terminal only."""
    from mpilaunch.cli.progress import upload_bar

    return upload_bar if sys.stderr.isatty() else None


def _submit(opts: dict[str, Any]) -> tuple[Any, Any]:
    spec, pool = _specs(opts)
    warn = lambda w: cliopts.note(f"warning: {w}")  # noqa: E731
    if pool is None:
        launch = cliopts.launcher(opts, local_nodes=spec.nodes)
        return launch, launch.submit(spec, pool=opts["pool"], monitor=_monitor(), warn=warn)
    launch = cliopts.launcher(opts, local_nodes=1 if opts["local"] else None)  # local: start the services if needed
    return launch, launch.submit_auto_pool(spec, pool, monitor=_monitor(), warn=warn)


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

    spec, auto_pool = _specs(opts)
    try:  # what is configured, read offline; a missing configuration only leaves placeholders
        launch = cliopts.launcher(opts)
        container, pool = launch.store.container.url, opts["pool"] or launch.settings.pool
    except MpilaunchError:
        container, pool = None, opts["pool"] or ("local" if opts["local"] else None)
    doc = dry_run(spec, container_url=container, pool=pool, auto_pool=auto_pool)
    if opts["output"] == "json":
        cliopts.emit_json(doc)
        return 0
    cliopts.emit_json({k: doc[k] for k in ("add_job", "task")} if "add_job" in doc else doc["task"])
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
