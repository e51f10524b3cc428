"""Per-instance results of a multi-instance task: rows, table, stable JSON, parallel log download.

Instance 0 is the primary (from Get Task); instances 1..N-1 come from List Subtasks, every page. Requeues (a node
lost, preempted, rebooted or removed: Batch runs the whole task again without using a retry) come from the task's
execution info, what happened to nodes from the pool's List Nodes; :meth:`TaskResults.notes` puts both in words. A
failed task's first failure (which rank, on which node, how: :class:`FirstFailure`) comes from the primary's
``launch-report.json``, read with the Batch file API (:func:`fetch_first_failure`). An instance of a terminated (or
timed out) task is never a success: its outcome says ``terminated`` (``timed out``), whatever the instance's own record
says (Azure ends the subtasks of a terminated task asynchronously, after the primary). The JSON document
(``results_json``) follows ``results.schema.json`` next to this module; docs/client.md describes it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from node_runtime.contract import LAUNCH_REPORT_NAME

SCHEMA_ID = "mpilaunch.results/2"  # /2: first_failure, outcome (task and instances)
SCHEMA_PATH = Path(__file__).with_name("results.schema.json")
LOG_FILES = ("stdout.txt", "stderr.txt")
ENDED_WITH_TASK = "TaskEnded"  # a subtask stopped because another instance failed: not a cause
ENDED_WORDS = (("maxwallclocktime", "timed out"), ("timed out", "timed out"), ("user request", "terminated"),
               ("terminated", "terminated"))
"""How a ``TaskEnded`` failure's message reads as an outcome (first match; otherwise ``ended``)."""
HEALTHY_STATES = ("idle", "running")
NODE_WORDS = {"preempted": "was preempted", "unusable": "went down", "rebooting": "is rebooting",
              "reimaging": "is being reimaged", "leavingpool": "is leaving the pool",
              "starttaskfailed": "failed its StartTask", "offline": "is offline (scheduling disabled)"}
"""How a node state reads in a sentence; other states read ``is STATE``."""
NODE_FIELDS = ("id", "state", "errors", "isDedicated")
"""What List Nodes must return for :func:`node_events`."""


def _str(value: Any) -> str | None:
    return None if value is None else str(getattr(value, "value", value))


@dataclass(frozen=True)
class Failure:
    category: str | None
    code: str | None
    message: str | None

    def __str__(self) -> str:
        return ": ".join(p for p in (self.code, self.message) if p) or (self.category or "failed")


def ended_word(failure: Failure | None) -> str | None:
    """``terminated``, ``timed out`` or ``ended`` for a ``TaskEnded`` failure (None for any other)."""
    if failure is None or failure.code != ENDED_WITH_TASK:
        return None
    message = (failure.message or "").lower()
    return next((word for key, word in ENDED_WORDS if key in message), "ended")


@dataclass(frozen=True)
class FirstFailure:
    """Which rank failed first, on which node, how (``launch-report.json``'s ``first_failure``, written by the
    primary's ``node-runtime launch``; ``how`` is one of node_runtime.failure.HOWS)."""

    how: str
    summary: str
    rank: int | None = None
    node: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    signal_name: str | None = None
    exception: str | None = None
    evidence: tuple[str, ...] = ()
    stderr_tail: tuple[str, ...] = ()
    """The failing rank's own last stderr lines (without MPI's messages)."""

    @classmethod
    def from_report(cls, doc: Any) -> FirstFailure | None:
        """From a launch report (a dict); None if it has no usable ``first_failure``."""
        ff = doc.get("first_failure") if isinstance(doc, dict) else None
        if not isinstance(ff, dict) or not isinstance(ff.get("how"), str) or not isinstance(ff.get("summary"), str):
            return None

        def num(key: str) -> int | None:
            value = ff.get(key)
            return value if isinstance(value, int) and not isinstance(value, bool) else None

        def text(key: str) -> str | None:
            value = ff.get(key)
            return value if isinstance(value, str) else None

        def lines(key: str) -> tuple[str, ...]:
            value = ff.get(key)
            return tuple(str(x) for x in value) if isinstance(value, list) else ()

        return cls(ff["how"], ff["summary"], num("rank"), text("node"), num("exit_code"), num("signal"),
                   text("signal_name"), text("exception"), lines("evidence"), lines("stderr_tail"))

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "node": self.node, "how": self.how, "summary": self.summary,
                "exit_code": self.exit_code, "signal": self.signal, "signal_name": self.signal_name,
                "exception": self.exception, "evidence": list(self.evidence), "stderr_tail": list(self.stderr_tail)}


@dataclass(frozen=True)
class InstanceResult:
    """One instance (0 = primary) of a multi-instance task."""

    instance: int
    node: str | None
    pool: str | None
    state: str | None
    exit_code: int | None
    result: str | None
    start: datetime | None
    end: datetime | None
    failure: Failure | None
    task_root: str | None

    @property
    def duration(self) -> float | None:
        if self.start is None or self.end is None:
            return None
        return (self.end - self.start).total_seconds()

    @property
    def failed(self) -> bool:
        return self.result == "failure" or self.failure is not None or (self.exit_code or 0) != 0

    def to_json(self, outcome: str | None = None) -> dict[str, Any]:
        return {
            "instance": self.instance, "primary": self.instance == 0, "node": self.node, "state": self.state,
            "exit_code": self.exit_code, "result": self.result, "outcome": outcome,
            "start_time": self.start.isoformat() if self.start else None,
            "end_time": self.end.isoformat() if self.end else None,
            "duration_seconds": self.duration, "failure": _failure_json(self.failure),
        }


@dataclass(frozen=True)
class NodeEvent:
    """A node of the task's pool that cannot run tasks now (not idle or running), with its errors."""

    node: str
    state: str
    dedicated: bool | None
    errors: tuple[Failure, ...] = ()

    def words(self) -> str:
        """``node tvmps_1 was preempted``; errors in parentheses."""
        why = "; ".join(str(e) for e in self.errors)
        return (f"node {self.node} {NODE_WORDS.get(self.state, f'is {self.state}')}"
                + (f" ({why})" if why else ""))

    def to_json(self, instance: int | None) -> dict[str, Any]:
        return {"node": self.node, "state": self.state, "dedicated": self.dedicated, "instance": instance,
                "errors": [_failure_json(e) for e in self.errors], "description": self.words()}


def node_events(nodes: Iterable[Any]) -> tuple[NodeEvent, ...]:
    """The :class:`NodeEvent`\\ s of a List Nodes answer (its nodes that are not idle or running)."""
    events = []
    for node in nodes:
        state = _str(node.state) or "unknown"
        if state not in HEALTHY_STATES:
            errors = tuple(Failure(None, e.code, e.message) for e in node.errors or ())
            events.append(NodeEvent(node.id, state, node.is_dedicated, errors))
    return tuple(events)


def _failure_json(failure: Failure | None) -> dict[str, Any] | None:
    if failure is None:
        return None
    return {"category": failure.category, "code": failure.code, "message": failure.message}


def _failure(info: Any) -> Failure | None:
    if info is None:
        return None
    return Failure(_str(info.category), info.code, info.message)


def primary_row(task: Any) -> InstanceResult:
    """Instance 0 from a ``BatchTask``."""
    ex, node = task.execution_info, task.node_info
    return InstanceResult(
        0, node.node_id if node else None, node.pool_id if node else None, _str(task.state),
        ex.exit_code if ex else None, _str(ex.result) if ex else None, ex.start_time if ex else None,
        ex.end_time if ex else None, _failure(ex.failure_info) if ex else None,
        node.task_root_directory if node else None)


def subtask_row(sub: Any) -> InstanceResult:
    """Instance ``sub.id`` from a ``BatchSubtask``."""
    node = sub.node_info
    return InstanceResult(
        int(sub.id), node.node_id if node else None, node.pool_id if node else None, _str(sub.state),
        sub.exit_code, _str(sub.result), sub.start_time, sub.end_time, _failure(sub.failure_info),
        node.task_root_directory if node else None)


@dataclass(frozen=True)
class TaskResults:
    """The task's own outcome plus one row per instance, ordered by instance."""

    job_id: str
    task_id: str
    state: str | None
    result: str | None
    exit_code: int | None
    failure: Failure | None
    retry_count: int
    instances: tuple[InstanceResult, ...]
    requeue_count: int = 0
    last_requeue_time: datetime | None = None
    max_retries: int | None = None
    """The task's ``maxTaskRetryCount`` (-1: unlimited; ``None``: not known)."""
    node_events: tuple[NodeEvent, ...] = ()
    pool_nodes: frozenset[str] | None = None
    """Every node id of the pool when it was listed (``None``: not listed; nodes are listed only for a requeued or
    failed task)."""
    first_failure: FirstFailure | None = None
    """Which rank failed first (a failed task's launch-report.json; ``None``: not known)."""

    @property
    def ended(self) -> str | None:
        """``terminated`` / ``timed out`` / ``ended``: the task was ended from outside (terminate, its wall clock, a
        node taken with the terminate option); None otherwise."""
        return ended_word(self.failure) if self.completed else None

    @property
    def outcome(self) -> str | None:
        """``success``, ``failure``, ``terminated``, ``timed out`` or ``ended`` once completed (None before)."""
        if not self.completed:
            return None
        return self.ended or ("success" if self.succeeded else "failure")

    def instance_outcome(self, row: InstanceResult) -> str | None:
        """An instance's outcome: as the task's when the task was ended from outside (unless the instance failed on
        its own before), else ``success``/``failure`` once it completed (``ended`` when another instance's failure
        ended it)."""
        own = ended_word(row.failure)
        if self.ended and (own is not None or not row.failed or row.state != "completed"):
            return self.ended
        if row.state != "completed":
            return None
        return own or ("failure" if row.failed else "success")

    @property
    def attempt(self) -> int:
        """Which run of the task this is (or was, once completed): 1 + retries + requeues."""
        return 1 + self.retry_count + self.requeue_count

    @property
    def retries_used(self) -> str:
        """``retries used: 1 of 3`` (``of unlimited`` for -1)."""
        of = "" if self.max_retries is None else (
            " of unlimited" if self.max_retries == -1 else f" of {self.max_retries}")
        return f"retries used: {self.retry_count}{of}"

    def _node_words(self, node: str) -> str | None:
        """What happened to ``node``, if it cannot run tasks now or left the pool."""
        for event in self.node_events:
            if event.node == node:
                return event.words()
        if self.pool_nodes is not None and node not in self.pool_nodes:
            return f"node {node} was removed from the pool"
        return None

    def notes(self, earlier_nodes: Iterable[str] = ()) -> list[str]:
        """Requeues and node events in words: ``node tvmps_1 was preempted; the task was requeued (attempt 2);
        retries used: 0 of 0``. ``earlier_nodes``: nodes an earlier look saw the task on (the requeued attempt's
        nodes may be gone from the rows already)."""
        ours = list(dict.fromkeys([*earlier_nodes, *(r.node for r in self.instances if r.node)]))
        said = [w for w in map(self._node_words, ours) if w]
        notes = []
        if self.requeue_count:
            times = "" if self.requeue_count == 1 else f" {self.requeue_count} times"
            when = f", last at {clock(self.last_requeue_time)}" if self.last_requeue_time else ""
            cause = "; ".join(said) or "Batch took a node of the task away (lost, preempted, rebooted or removed)"
            notes.append(f"{cause}; the task was requeued{times} (attempt {self.attempt}{when}); "
                         f"{self.retries_used}")
        elif said:
            notes.extend(said)
        others = [e for e in self.node_events if e.node not in ours]
        if others and not self.completed:
            notes.append(f"pool nodes that cannot run tasks now: {', '.join(f'{e.node} ({e.state})' for e in others)}")
        return notes

    @property
    def completed(self) -> bool:
        return self.state == "completed"

    @property
    def succeeded(self) -> bool:
        return self.completed and self.result == "success"

    def failed_instances(self) -> list[InstanceResult]:
        return [r for r in self.instances if r.failed]

    def causes(self) -> list[InstanceResult]:
        """The failed instances, without those only ended because the task ended (unless that is all)."""
        failed = self.failed_instances()
        return [r for r in failed if not (r.failure and r.failure.code == ENDED_WITH_TASK)] or failed

    def summary(self) -> str:
        """One line: the task's outcome, naming failed instances and why."""
        head = f"task {self.job_id}/{self.task_id}: {self.state}"
        if not self.completed:
            return head
        if self.succeeded:
            return f"{head}, success on {len(self.instances)} instance(s)"
        if self.ended:
            return f"{head}, {self.ended} ({self.failure})"
        if self.first_failure is not None:
            return f"{head}, failure: {self.first_failure.summary}"
        parts = [f"instance {r.instance} on {r.node or '?'}: "
                 + ("no exit code" if r.exit_code is None else f"exit code {r.exit_code}")
                 + (f" ({r.failure})" if r.failure else "") for r in self.causes()]
        why = "; ".join(parts) or str(self.failure or f"exit code {self.exit_code}")
        return f"{head}, failure: {why}"

    def to_json(self) -> dict[str, Any]:
        where = {r.node: r.instance for r in reversed(self.instances) if r.node}
        return {
            "schema": SCHEMA_ID, "job_id": self.job_id, "task_id": self.task_id, "state": self.state,
            "result": self.result, "outcome": self.outcome, "exit_code": self.exit_code,
            "retry_count": self.retry_count, "failure": _failure_json(self.failure),
            "first_failure": None if self.first_failure is None else self.first_failure.to_json(),
            "instances": [r.to_json(self.instance_outcome(r)) for r in self.instances],
            "max_task_retry_count": self.max_retries, "requeue_count": self.requeue_count,
            "last_requeue_time": self.last_requeue_time.isoformat() if self.last_requeue_time else None,
            "attempt": self.attempt,
            "node_events": [e.to_json(where.get(e.node)) for e in self.node_events], "notes": self.notes(),
        }


def lists_nodes(task: Any) -> bool:
    """Whether the pool's nodes say something about ``task``: it was requeued or it failed."""
    ex = task.execution_info
    return ex is not None and bool(ex.requeue_count or _str(ex.result) == "failure")


def build_results(job_id: str, task: Any, subtasks: Iterable[Any], nodes: Iterable[Any] | None = None,
                  first_failure: FirstFailure | None = None) -> TaskResults:
    """Combine Get Task and List Subtasks answers (the emulator may also list the primary as subtask 0) and, if
    given, the pool's List Nodes answer and the first failure of the primary's launch report."""
    rows = {0: primary_row(task)}
    for sub in subtasks:
        row = subtask_row(sub)
        if row.instance != 0:
            rows[row.instance] = row
    ex = task.execution_info
    listed = list(nodes or ())
    return TaskResults(
        job_id, task.id, _str(task.state), _str(ex.result) if ex else None, ex.exit_code if ex else None,
        _failure(ex.failure_info) if ex else None, ex.retry_count if ex else 0,
        tuple(rows[i] for i in sorted(rows)), (ex.requeue_count or 0) if ex else 0,
        ex.last_requeue_time if ex else None, task.constraints.max_task_retry_count if task.constraints else None,
        node_events(listed), None if nodes is None else frozenset(n.id for n in listed), first_failure)


def wants_launch_report(task: Any) -> bool:
    """Whether ``task`` (a ``BatchTask``) failed after its primary ran: its launch report says which rank failed."""
    ex = task.execution_info
    return (_str(task.state) == "completed" and ex is not None and _str(ex.result) == "failure"
            and task.node_info is not None and bool(task.node_info.task_root_directory))


def fetch_first_failure(client: Any, task: Any) -> FirstFailure | None:
    """The first failure in ``task``'s ``wd/launch-report.json`` on its primary node (download_node_file); None if
    the node no longer has it, launch did not write one, or it names none."""
    from azure.core.exceptions import HttpResponseError

    node = task.node_info
    if not (node and node.pool_id and node.node_id and node.task_root_directory):
        return None
    try:
        data = b"".join(client.download_node_file(node.pool_id, node.node_id,
                                                  node_file_path(node.task_root_directory, f"wd/{LAUNCH_REPORT_NAME}")))
        return FirstFailure.from_report(json.loads(data))
    except (HttpResponseError, ValueError):  # gone (404), not readable, not JSON
        return None


def results_json(results: TaskResults) -> str:
    return json.dumps(results.to_json(), indent=2)


def clock(value: datetime | None) -> str:
    """``HH:MM:SS`` of ``value`` (``-`` if unknown)."""
    return value.strftime("%H:%M:%S") if value else "-"


def node_file_path(task_root: str, name: str) -> str:
    """The node-file API path of ``name`` in a task root given as Batch reports it (``\\workitems\\...``)."""
    return task_root.replace("\\", "/").strip("/") + "/" + name


_MPI_LINE = re.compile(r"^(\[[^\]\s]+:\d+\] |node-runtime: (launch|coordinate): |=+$|\s*$)")
"""Lines that are not the program's: Open MPI's ``[host:pid] ...``, launch's own, Hydra's ``=====`` frames, blanks."""


def program_lines(lines: Sequence[str]) -> list[str]:
    """``lines`` of a stderr.txt without MPI's messages (Open MPI's help blocks between ``-----`` lines, its
    ``[host:pid]`` lines, Hydra's ``=====`` frame, launch's own lines, blank lines)."""
    out, in_block = [], False
    for line in lines:
        if line.startswith("-" * 20):
            in_block = not in_block
            continue
        if not in_block and not _MPI_LINE.match(line) and not line.startswith("=   "):
            out.append(line)
    return out


def stderr_tail(client: Any, row: InstanceResult, lines: int = 5) -> list[str]:
    """The last ``lines`` lines of the program in an instance's stderr.txt (:func:`program_lines`; [] if its node no
    longer has it)."""
    from azure.core.exceptions import ResourceNotFoundError

    if not (row.node and row.pool and row.task_root):
        return []
    try:
        data = b"".join(client.download_node_file(row.pool, row.node, node_file_path(row.task_root, "stderr.txt")))
    except ResourceNotFoundError:
        return []
    return program_lines(data.decode(errors="replace").splitlines())[-lines:]


def download_logs(client: Any, results: TaskResults, dest: Path, *, workers: int = 16) -> list[Path]:
    """Fetch every instance's stdout/stderr into ``dest/instance-<i>/`` in parallel; return the files written.

    A file the node no longer has (node gone, task root cleaned) is skipped; the rest are still fetched.
    """
    jobs = [(r, name) for r in results.instances for name in LOG_FILES if r.node and r.pool and r.task_root]

    def fetch(item: tuple[InstanceResult, str]) -> Path | None:
        from azure.core.exceptions import ResourceNotFoundError

        row, name = item
        try:
            chunks = client.download_node_file(row.pool, row.node, node_file_path(row.task_root or "", name))
            data = b"".join(chunks)
        except ResourceNotFoundError:
            return None
        target = dest / f"instance-{row.instance}" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return target

    return fetch_all(fetch, jobs, workers)


def fetch_all(fetch: Any, jobs: Sequence[Any], workers: int) -> list[Path]:
    """Run ``fetch`` over ``jobs`` with ``workers`` threads (1 = sequentially); keep the non-``None`` results."""
    if workers <= 1:
        done = [fetch(j) for j in jobs]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            done = list(pool.map(fetch, jobs))
    return [p for p in done if p is not None]
