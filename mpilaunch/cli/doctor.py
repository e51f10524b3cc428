"""``mpilaunch doctor``: a short diagnostic task that checks, on every node, what an MPI job needs.

The task is an ordinary mpilaunch multi-instance task (built by :meth:`Launcher.build` from a :class:`TaskSpec`, the
normal coordination command on every node, pre-flight checks first) whose primary runs ``node-runtime doctor``
instead of ``node-runtime launch`` (see :mod:`node_runtime.doctor`). It needs no Blob storage: nothing is uploaded,
and the report comes back with Batch's node-file API from the primary's working directory.
"""

from __future__ import annotations

import secrets
import shlex
import sys
from datetime import datetime, timedelta, timezone
from typing import Any

import click

from mpilaunch.cli import cliopts
from node_runtime.contract import DEFAULT_SSH_PORT, PROGRAM
from node_runtime.fabric import SHM_MOUNT

WALL_TIME = timedelta(minutes=10)  # a doctor that hangs is ended by Batch
REPORT_PATH = "wd/doctor.json"  # in the primary's task directory (wd: its working directory)
COLUMNS = {"service": "service", "versions": "versions", "fabric": "fabric", "shm": SHM_MOUNT, "disk": "disk",
           "clock": "clock", "reach": "reach"}
"""Each check's column heading, in the order of :data:`node_runtime.doctor.CHECKS`."""


def new_task_id() -> str:
    return f"doctor-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def node_argv(opts: dict[str, Any]) -> list[str]:
    """``node-runtime doctor`` with the options the user gave (sizes in bytes)."""
    from node_runtime.doctor import parse_size

    argv = [PROGRAM, "doctor"]
    for option, name in (("--ppn", "ppn"), ("--threads-per-rank", "threads_per_rank"),
                         ("--max-clock-skew", "max_clock_skew"), ("--timeout", "service_timeout")):
        if opts.get(name) is not None:
            argv += [option, f"{opts[name]:g}" if isinstance(opts[name], float) else str(opts[name])]
    if opts.get("min_free_disk") is not None:
        argv += ["--min-free-disk", str(parse_size(opts["min_free_disk"]))]
    return argv


def spec_for(opts: dict[str, Any]) -> Any:
    """The validated :class:`TaskSpec` of the doctor task (its ``argv`` is the primary's command)."""
    from mpilaunch.cli.submit import container_from
    from mpilaunch.client.spec import TaskSpec

    container = container_from(opts)
    return TaskSpec(job_id=opts["job"], task_id=opts["task_id"] or new_task_id(), nodes=opts["nodes"],
                    argv=tuple(node_argv(opts)), container=container, wall_time=WALL_TIME, retries=0,
                    display_name="mpilaunch doctor", ssh_port=opts["ssh_port"], upload_logs=False).validate()


@click.command()
@click.option("-n", "--nodes", type=click.IntRange(min=1), default=2, show_default=True,
              help="Number of nodes to check (instances).")
@click.option("--pool", help="Pool id [MPILAUNCH_POOL]; --local uses pool 'local'.")
@click.option("--ppn", type=click.IntRange(min=1), help="Ranks per node /dev/shm must hold (default: as launch "
                                                       "picks: the node's physical cores / threads per rank).")
@click.option("--threads-per-rank", type=click.IntRange(min=1), help="OpenMP threads per rank (for the default "
                                                                    "--ppn).")
@click.option("--max-clock-skew", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Seconds a node's clock may differ from the primary's.")
@click.option("--min-free-disk", default="1G", show_default=True,
              help="Free space every node's task directory must have (e.g. 500M, 20G).")
@click.option("--job", default=cliopts.DEFAULT_JOB, show_default=True, envvar="MPILAUNCH_JOB",
              help="Job id (created on the pool if missing).")
@click.option("--task-id", help="Task id (default: doctor-<UTC time>-<random>).")
@click.option("--ssh-port", type=int, default=DEFAULT_SSH_PORT, show_default=True,
              help="Coordination (sshd) port, the task port the nodes must reach.")
@click.option("--image", help="Run in this container image (pools with a container configuration).")
@click.option("--registry", help="Private registry server of --image.")
@click.option("--registry-user", help="Registry user; the password comes from MPILAUNCH_REGISTRY_PASSWORD.")
@click.option("--registry-identity", help="ARM id of the pool's managed identity for the registry.")
@click.option("--container-run-options", default="", help="Extra `docker create` options (e.g. --shm-size=1g).")
@click.option("--service-timeout", type=click.FloatRange(min=0, min_open=True),
              help="Seconds the primary waits for every node's coordination service, and again for every node's "
                   "answers (default 30).")
@click.option("--timeout", type=float, default=600.0, show_default=True,
              help="Give up waiting for the task after this many seconds (it keeps running).")
@cliopts.connection_options
def doctor(**opts: Any) -> int:
    """Check N nodes of a pool for what MPI jobs need, with a short diagnostic task: TCP between the nodes on their
    MPI interface and on the task port, the same Python, mpi4py and MPI versions everywhere, /dev/shm for the ranks
    per node, clock skew, free disk in the task directory and the fabric. Prints a per-node table in which every
    problem comes with its fix; exit status 0 only if every check passed."""
    from node_runtime.doctor import parse_size

    parse_size(opts["min_free_disk"])  # a bad size is refused before anything is submitted
    spec = spec_for(opts)
    launch = cliopts.launcher(opts, local_nodes=spec.nodes)
    ref = submit(launch, spec, opts["pool"])
    cliopts.note(f"doctor: task {ref} checks {spec.nodes} node(s)")
    results = wait(launch, ref, opts)
    report = fetch_report(launch, results)
    if report is None:
        from node_runtime.errors import TaskFailed

        cliopts.explain_failure(launch, results)
        raise TaskFailed(f"{results.summary()}: the doctor wrote no report (see `mpilaunch logs --job {ref.job_id} "
                         f"{ref.task_id} --stderr`)")
    report = {**report, "job_id": ref.job_id, "task_id": ref.task_id, "task": results.summary()}
    if opts["output"] == "json":
        cliopts.emit_json(report)
    else:
        show_table(report)
    verdict = "every check passed" if report["ok"] else f"{report['problems']} problem(s)"
    cliopts.note(f"doctor: {verdict} on {len(report['nodes'])} node(s) (task {ref})")
    return 0 if report["ok"] and results.succeeded else 1


def submit(launch: Any, spec: Any, pool: str | None) -> Any:
    """Pre-flight, build (the normal multi-instance task; the primary's command is the doctor's), add the task."""
    from mpilaunch.client.api import TaskRef

    for warning in launch.preflight(spec, pool):
        cliopts.note(f"warning: {warning}")
    task = launch.build(spec)
    task.command_line = shlex.join(spec.argv)
    launch.ensure_job(spec.job_id, launch.pool_for(spec, pool))
    with launch.errors():
        launch.batch.create_task(spec.job_id, task)
    return TaskRef(spec.job_id, spec.task_id)


def wait(launch: Any, ref: Any, opts: dict[str, Any]) -> Any:
    """The task's results once it completed (live progress on a terminal); Ctrl-C terminates it."""
    from mpilaunch.cli.progress import Progress
    from node_runtime.errors import INTERRUPTED

    progress = Progress(enabled=sys.stderr.isatty())
    try:
        with progress:
            return launch.wait(ref, timeout=opts["timeout"], interval=0.5, max_interval=2.0,
                               on_update=progress.update)
    except KeyboardInterrupt:
        launch.terminate(ref)
        cliopts.note(f"interrupted: terminated task {ref}")
        raise click.exceptions.Exit(INTERRUPTED) from None


def fetch_report(launch: Any, results: Any) -> dict[str, Any] | None:
    """The primary's doctor.json (None if it has none: the task failed before the doctor wrote it)."""
    import json

    from azure.core.exceptions import ResourceNotFoundError

    from mpilaunch.client.results import node_file_path

    primary = results.instances[0]
    if not (primary.node and primary.pool and primary.task_root):
        return None
    with launch.errors():
        try:
            data = b"".join(launch.batch.download_node_file(primary.pool, primary.node,
                                                            node_file_path(primary.task_root, REPORT_PATH)))
        except ResourceNotFoundError:
            return None
    try:
        report = json.loads(data)
    except ValueError:
        return None
    return report if isinstance(report, dict) else None


def render_tables(report: dict[str, Any]) -> list[Any]:
    """Rich tables: a row per node with a column per check, then every problem with its fix (nodes with the same
    problem share a row)."""
    from rich.table import Table
    from rich.text import Text

    limits = report.get("limits") or {}
    verdict = "every check passed" if report["ok"] else f"{report['problems']} problem(s)"
    nodes = Table(title=f"doctor {report.get('job_id')}/{report.get('task_id')}: {verdict}  (ranks per node "
                        f"{limits.get('ppn')}, task port {limits.get('ssh_port')})", title_justify="left")
    nodes.add_column("node", no_wrap=True)
    for name in COLUMNS.values():
        nodes.add_column(name, no_wrap=True)
    problems: dict[tuple[str, str, str], list[str]] = {}
    for row in report["nodes"]:
        node = Text(f"{row['host']}{' (primary)' if row['primary'] else ''}")
        if row.get("node_id"):
            node.append(f"\n{row['node_id']}", style="dim")
        cells = []
        for check in row["checks"]:
            failed = check["status"] == "fail"
            cells.append(Text(("✗ " if failed else "") + check["summary"],
                              style="red" if failed else "dim" if check["status"] == "skip" else "green"))
            if failed:
                problems.setdefault((check["check"], check["problem"], check["fix"]), []).append(row["host"])
        nodes.add_row(node, *cells)
    if not problems:
        return [nodes]
    fixes = Table(title="problems and their fixes", title_justify="left", show_lines=True)
    fixes.add_column("node(s)")
    fixes.add_column("check", no_wrap=True)
    fixes.add_column("problem", style="red", ratio=1)
    fixes.add_column("fix", ratio=1)
    for (check, problem, fix), hosts in problems.items():
        fixes.add_row(Text("\n".join(hosts)), Text(COLUMNS.get(check, check)), Text(problem), Text(fix))
    return [nodes, fixes]


def show_table(report: dict[str, Any]) -> None:
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    for table in render_tables(report):
        console.print(table)
    if report.get("fabric"):
        cliopts.note(str(report["fabric"]))
