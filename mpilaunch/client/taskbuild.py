"""Pure builders from a :class:`~mpilaunch.client.spec.TaskSpec` to azure-batch 15.1 models (no network).

The task is a multi-instance task: every instance downloads the common resource files into its task directory and
runs ``node-runtime coordinate`` (start and verify sshd, then exit); the primary then runs
``node-runtime launch [--ppn N] [--threads-per-rank T] [--mpi F] [--fabric F] [--hang-timeout D]
[--no-abort-on-exception] -- ARGV``. Batch runs no shell, so the command line is quoted with :func:`shlex.join` and
the node splits it back into exactly the user's argv.
"""

from __future__ import annotations

import base64
import glob
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

from azure.batch import models as bm

from mpilaunch.client.spec import BindMount, ContainerSpec, TaskSpec
from mpilaunch.client.storage import StagedFile
from node_runtime.contract import (
    CHECKPOINT_VARIABLE,
    COORDINATION_COMMAND_LINE,
    EXPORT_VARIABLE,
    NODE_COUNT_VARIABLE,
    RUNTIME_VERSION,
    SECRET_VARIABLE,
    SSH_PORT_VARIABLE,
    VERSION_VARIABLE,
    launch_command_line,
)
from node_runtime.errors import InvalidRequest

# Batch refuses larger Add Task bodies (RequestEntityTooLarge); the exact limit is not documented, 1 MiB is safe.
MAX_REQUEST_BYTES = 1024 * 1024
LOG_PATTERN = "../std*.txt"
# Common resource files land in AZ_BATCH_TASK_SHARED_DIR, the parent of the working directory "wd" where the ranks
# run; placing them under "wd/" lets the user's relative paths (``python3 app.py``) work on every node.
COMMON_FILES_DIR = "wd"


@dataclass(frozen=True)
class OutputTarget:
    """Where the primary uploads outputs and logs: a container URL with a write SAS, and a blob prefix."""

    container_url: str = field(repr=False)
    prefix: str


def new_task_secret() -> str:
    """A fresh per-task secret: 32 random bytes, base64url without padding."""
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()


def environment_settings(spec: TaskSpec, secret: str) -> list[bm.EnvironmentSetting]:
    """The task's environment: our contract variables first (:mod:`node_runtime.contract`), then the user's
    (exported to every rank)."""
    env = [(NODE_COUNT_VARIABLE, str(spec.nodes)), (SECRET_VARIABLE, secret), (SSH_PORT_VARIABLE, str(spec.ssh_port)),
           (VERSION_VARIABLE, RUNTIME_VERSION)]
    if spec.env:
        env.append((EXPORT_VARIABLE, ",".join(name for name, _ in spec.env)))
    if spec.checkpoint_url:
        env.append((CHECKPOINT_VARIABLE, spec.checkpoint_url))
    env += list(spec.env)
    return [bm.EnvironmentSetting(name=n, value=v) for n, v in env]


def resource_files(files: Sequence[StagedFile], under: str = "") -> list[bm.ResourceFile]:
    """Batch resource files, one per staged blob, at ``under/file_path``."""
    return [bm.ResourceFile(http_url=f.url, file_path=f"{under}/{f.file_path}" if under else f.file_path,
                            file_mode=f.file_mode) for f in files]


def bind_mount(mount: BindMount) -> bm.ContainerHostBatchBindMountEntry:
    """One container bind mount of a Batch host data path."""
    return bm.ContainerHostBatchBindMountEntry(source=mount.source, is_read_only=mount.read_only)


def container_settings(container: ContainerSpec) -> bm.BatchTaskContainerSettings:
    """Container settings: image, registry, run options, bind mounts; the working directory is the task's."""
    registry = None
    if container.registry is not None:
        reg = container.registry
        identity = bm.BatchNodeIdentityReference(resource_id=reg.identity) if reg.identity else None
        registry = bm.ContainerRegistryReference(registry_server=reg.server, username=reg.username,
                                                 password=reg.password, identity_reference=identity)
    return bm.BatchTaskContainerSettings(
        image_name=container.image,
        container_run_options=container.all_run_options or None,
        registry=registry,
        working_directory="taskWorkingDirectory",
        container_host_batch_bind_mounts=[bind_mount(m) for m in container.bind_mounts] or None,
    )


def output_files(patterns: Sequence[str], target: OutputTarget, *, logs: bool = True) -> list[bm.OutputFile]:
    """Upload ``patterns`` on success or failure to ``target`` (under ``prefix/outputs``); logs under ``prefix/logs``.

    For multi-instance tasks Batch uploads output files from the primary only.
    """
    def upload(pattern: str, path: str) -> bm.OutputFile:
        dest = bm.OutputFileBlobContainerDestination(container_url=target.container_url, path=path)
        return bm.OutputFile(file_pattern=pattern, destination=bm.OutputFileDestination(container=dest),
                             upload_options=bm.OutputFileUploadConfiguration(upload_condition="taskCompletion"))

    prefix = target.prefix.strip("/")
    # a pattern naming one file (no wildcard) makes `path` that blob's own name, not a folder (OutputFile, Batch
    # REST reference): without its name, every such file would land on the blob `outputs`
    files = [upload(p, f"{prefix}/outputs" if glob.has_magic(p) else f"{prefix}/outputs/{p.lstrip('/')}")
             for p in patterns]
    if logs:
        files.append(upload(LOG_PATTERN, f"{prefix}/logs"))
    return files


def build_task(
    spec: TaskSpec,
    *,
    common_files: Sequence[StagedFile] = (),
    primary_files: Sequence[StagedFile] = (),
    outputs: OutputTarget | None = None,
    secret: str | None = None,
) -> bm.BatchTaskCreateOptions:
    """The validated Add Task request for ``spec`` (a fresh task secret unless ``secret`` is given)."""
    spec.validate()
    if spec.outputs and outputs is None:
        raise InvalidRequest(f"output patterns {list(spec.outputs)} need an output container")
    constraints = bm.BatchTaskConstraints(
        max_wall_clock_time=spec.wall_time, max_task_retry_count=spec.retries)
    task = bm.BatchTaskCreateOptions(
        id=spec.task_id,
        display_name=spec.display_name,
        command_line=launch_command_line(spec.argv, ppn=spec.ppn, mpi=spec.mpi, fabric=spec.fabric,
                                         threads_per_rank=spec.threads_per_rank,
                                         hang_timeout=spec.hang_timeout.total_seconds() if spec.hang_timeout
                                         else None, abort_on_exception=spec.abort_on_exception),
        multi_instance_settings=bm.MultiInstanceSettings(
            number_of_instances=spec.nodes,
            coordination_command_line=COORDINATION_COMMAND_LINE,
            common_resource_files=resource_files(common_files, COMMON_FILES_DIR) or None,
        ),
        resource_files=resource_files(primary_files) or None,
        output_files=output_files(spec.outputs, outputs, logs=spec.upload_logs) if outputs else None,
        environment_settings=environment_settings(spec, secret or new_task_secret()),
        container_settings=container_settings(spec.container) if spec.container else None,
        constraints=constraints,
        required_slots=1,
        user_identity=bm.UserIdentity(auto_user=bm.AutoUserSpecification(
            scope="pool", elevation_level="admin" if spec.elevated else "nonadmin")),
    )
    validate_request(task)
    return task


def request_body(task: bm.BatchTaskCreateOptions) -> bytes:
    """The JSON body the SDK will send for ``task``."""
    return json.dumps(task.as_dict(), separators=(",", ":")).encode()


def validate_request(task: bm.BatchTaskCreateOptions) -> None:
    """Apply the Add Task rules the service enforces, raising :class:`InvalidRequest` naming the value."""
    if task.required_slots not in (None, 1):
        raise InvalidRequest(f"requiredSlots is {task.required_slots}: multi-instance tasks must use 1")
    size = len(request_body(task))
    if size > MAX_REQUEST_BYTES:
        mis = task.multi_instance_settings
        n = len(task.resource_files or []) + len((mis.common_resource_files if mis else None) or [])
        raise InvalidRequest(
            f"the task request is {size} bytes, over the {MAX_REQUEST_BYTES}-byte limit "
            f"({n} resource files): pack many small inputs into one archive")
