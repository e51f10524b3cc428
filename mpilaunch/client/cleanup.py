"""Removing finished tasks and what the client staged for them in Blob storage (``delete`` and ``cleanup``).

A task is ours when its coordination command is the runtime's; other tasks of the account are never deleted, but
their resource files count as references. Inputs are content-addressed (``inputs/<md5>/<name>``) and shared between
tasks, so an input goes only when no remaining task of any job refers to it. Logs (``outputs/J/T/logs/``) go with
their task; the outputs the primary uploaded (``outputs/J/T/outputs/``) only when asked.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import unquote, urlsplit

from mpilaunch.client.storage import INPUT_PREFIX
from node_runtime.contract import COORDINATION_COMMAND_LINE
from node_runtime.errors import InvalidInput


@dataclass(frozen=True)
class Plan:
    """What a cleanup removes: Batch tasks ``(job, task)`` and blobs ``(name, size)``."""

    tasks: list[tuple[str, str]] = field(default_factory=list)
    blobs: list[tuple[str, int]] = field(default_factory=list)
    inputs_kept: int = 0  # inputs of removed tasks that another task still refers to

    @property
    def size(self) -> int:
        return sum(size for _, size in self.blobs)

    def to_json(self) -> dict[str, Any]:
        return {"tasks": [{"job_id": j, "task_id": t} for j, t in self.tasks],
                "blobs": [{"name": n, "size": s} for n, s in self.blobs], "bytes": self.size,
                "inputs_kept": self.inputs_kept}


def ours(task: Any) -> bool:
    """Whether mpilaunch submitted ``task`` (its coordination command is the node runtime's)."""
    settings = task.multi_instance_settings
    return getattr(settings, "coordination_command_line", None) == COORDINATION_COMMAND_LINE


def input_blobs(task: Any, container_url: str) -> set[str]:
    """The names of the blobs under ``inputs/`` of ``container_url`` that ``task``'s resource files download."""
    files = [*(getattr(task.multi_instance_settings, "common_resource_files", None) or []),
             *(task.resource_files or [])]
    base = urlsplit(container_url)
    names = set()
    for f in files:
        url = urlsplit(f.http_url or "")
        if (url.netloc, url.path.startswith(base.path.rstrip("/") + "/")) == (base.netloc, True):
            name = unquote(url.path[len(base.path.rstrip("/")) + 1:])
            if name.startswith(f"{INPUT_PREFIX}/"):
                names.add(name)
    return names


def doomed(task: Any, *, task_id: str | None, before: datetime | None) -> bool:
    """Whether ``task`` is to go: ours, completed, and the one named or ended before ``before``."""
    if not ours(task) or str(getattr(task.state, "value", task.state)) != "completed":
        return False
    if task_id is not None:
        return bool(task.id == task_id)
    end = getattr(task.execution_info, "end_time", None)
    return before is None or (end is not None and end <= before)


def plan(batch: Any, store: Any, jobs: Sequence[str] | None, *, task_id: str | None = None,
         older_than: timedelta | None = None, outputs: bool = False, now: datetime) -> Plan:
    """What to remove among ``jobs``' tasks (``None``: every job's): ``task_id`` (of the one job given), or every
    finished task that ended more than ``older_than`` ago."""
    before = None if older_than is None else now - older_than
    gone: list[tuple[str, Any]] = []
    referenced: set[str] = set()
    for job in (j.id for j in batch.list_jobs()):
        for task in batch.list_tasks(job):
            if (jobs is None or job in jobs) and doomed(task, task_id=task_id, before=before):
                gone.append((job, task))
            else:
                referenced |= input_blobs(task, store.container.url)
    if task_id is not None and not gone:
        _explain_missing(batch, (jobs or [''])[0], task_id)
    candidates = set().union(*(input_blobs(t, store.container.url) for _, t in gone))
    sizes = _sizes(store, [f"{INPUT_PREFIX}/"] if candidates - referenced else [])
    blobs = [(n, sizes[n]) for n in sorted(candidates - referenced) if n in sizes]
    for job, task in gone:
        prefixes = [f"outputs/{job}/{task.id}/logs/"] + ([f"outputs/{job}/{task.id}/outputs/"] if outputs else [])
        blobs += sorted(_sizes(store, prefixes).items())
    return Plan([(j, t.id) for j, t in gone], blobs, len(candidates & referenced))


def _sizes(store: Any, prefixes: Iterable[str]) -> dict[str, int]:
    return {b.name: int(b.size or 0) for p in prefixes for b in store.container.list_blobs(name_starts_with=p)}


def _explain_missing(batch: Any, job: str, task_id: str) -> None:
    task = batch.get_task(job, task_id)  # a missing task raises Batch's own TaskNotFound
    if not ours(task):
        raise InvalidInput(f"task {job}/{task_id} was not submitted by mpilaunch: delete it with your own tools")
    raise InvalidInput(f"task {job}/{task_id} is {getattr(task.state, 'value', task.state)}, not completed: "
                       f"terminate it first (mpilaunch terminate --job {job} {task_id})")


def carry_out(batch: Any, store: Any, plan: Plan) -> None:
    """Delete the planned tasks, then their blobs (a blob already gone is fine)."""
    from azure.core.exceptions import ResourceNotFoundError

    for job, task in plan.tasks:
        with contextlib.suppress(ResourceNotFoundError):
            batch.delete_task(job, task)
    for name, _ in plan.blobs:
        with contextlib.suppress(ResourceNotFoundError):
            store.container.delete_blob(name)
