"""What an account holds, a row each: pools, jobs and tasks, read through a ``BatchClient`` (no presentation here).

The rows are plain data with ``to_json``; the CLI renders them. Every listing is one paged Batch call (plus one call
per pool for ``pool show``'s nodes), so their cost does not grow with anything but what is listed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from node_runtime.errors import InvalidInput

TASK_STATES = ("active", "preparing", "running", "completed")


def _str(value: Any) -> str | None:
    """An SDK enum or string as its plain value (``None`` stays ``None``)."""
    return None if value is None else str(getattr(value, "value", value))


def _time(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


@dataclass(frozen=True)
class PoolRow:
    """A pool: its state and nodes, current and target, dedicated and Spot."""

    id: str
    state: str | None
    allocation_state: str | None
    vm_size: str | None
    dedicated: int
    target_dedicated: int
    spot: int
    target_spot: int
    created: str | None
    node_states: dict[str, int] = field(default_factory=dict)  # only filled by pool_detail
    nodes: list[dict[str, Any]] = field(default_factory=list)  # only filled by pool_detail

    @property
    def busy_nodes(self) -> int:
        """Nodes running a task now."""
        return self.node_states.get("running", 0)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def pool_row(pool: Any, nodes: Iterable[Any] = ()) -> PoolRow:
    """A :class:`PoolRow` from a ``BatchPool`` (and, for detail, its ``BatchNode`` list)."""
    listed = [{"id": n.id, "state": _str(n.state), "ip_address": getattr(n, "ip_address", None),
               "spot": bool(getattr(n, "is_dedicated", True) is False)} for n in nodes]
    return PoolRow(
        id=pool.id, state=_str(pool.state), allocation_state=_str(pool.allocation_state), vm_size=pool.vm_size,
        dedicated=pool.current_dedicated_nodes or 0, target_dedicated=pool.target_dedicated_nodes or 0,
        spot=pool.current_low_priority_nodes or 0, target_spot=pool.target_low_priority_nodes or 0,
        created=_time(pool.creation_time), node_states=dict(Counter(n["state"] for n in listed)), nodes=listed)


def pool_rows(batch: Any) -> list[PoolRow]:
    """Every pool of the account."""
    return [pool_row(p) for p in batch.list_pools()]


def pool_detail(batch: Any, pool_id: str) -> PoolRow:
    """One pool with its nodes."""
    return pool_row(batch.get_pool(pool_id), batch.list_nodes(pool_id))


@dataclass(frozen=True)
class JobRow:
    """A job: its state and pool."""

    id: str
    state: str | None
    pool: str | None
    created: str | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def job_rows(batch: Any, pool: str | None = None) -> list[JobRow]:
    """Every job of the account (or of ``pool``)."""
    rows = [JobRow(j.id, _str(j.state), getattr(j.pool_info, "pool_id", None), _time(j.creation_time))
            for j in batch.list_jobs()]
    return [r for r in rows if pool is None or r.pool == pool]


@dataclass(frozen=True)
class TaskRow:
    """A task as ``mpilaunch list`` shows it: one row however many instances it has."""

    id: str
    state: str | None
    instances: int
    result: str | None
    exit_code: int | None
    start: str | None
    duration_s: float | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def task_row(task: Any) -> TaskRow:
    """A :class:`TaskRow` from a ``BatchTask``."""
    info = task.execution_info
    start = getattr(info, "start_time", None)
    end = getattr(info, "end_time", None)
    settings = task.multi_instance_settings
    return TaskRow(
        id=task.id, state=_str(task.state), instances=getattr(settings, "number_of_instances", None) or 1,
        result=_str(getattr(info, "result", None)), exit_code=getattr(info, "exit_code", None), start=_time(start),
        duration_s=round((end - start).total_seconds(), 1) if start and end else None)


def task_rows(batch: Any, job_id: str, state: str | None = None) -> list[TaskRow]:
    """The tasks of ``job_id``, optionally only those in ``state`` (filtered by Batch, not here)."""
    if state is not None and state not in TASK_STATES:
        raise InvalidInput(f"task state {state!r} is not one of {', '.join(TASK_STATES)}")
    listed = batch.list_tasks(job_id, filter=f"state eq '{state}'" if state else None)
    return [task_row(t) for t in listed]
