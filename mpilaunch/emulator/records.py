"""The engine's writes to the store when an attempt starts (claim) and ends (finish), as Batch records them.

Task: ``active → running → completed`` (or back to ``active`` for a retry / requeue), ``executionInfo``
(startTime, endTime, exitCode, result, failureInfo, retryCount/lastRetryTime, requeueCount/lastRequeueTime) and
``nodeInfo`` of the primary. Subtasks: one doc per non-primary instance (ids ``1..N-1``; the primary is the task
itself, as ``list_subtasks`` shows in Azure). Nodes: ``idle ↔ running`` with their task counters.

Subtasks are ``preparing`` from the claim (their node downloads the common resource files), ``running`` from the
moment their own coordination command starts, ``completed`` when the attempt ends (the primary's exit ends them) or
their coordination command failed; their ``startTime``/``endTime`` are their own instance's (Batch's
``BatchSubtask.startTime``: "The time at which the subtask started running"; the List Subtasks example of the REST
spec shows a different startTime per subtask).

Internal fields: task ``_taskDir`` (host path of the primary's task dir), ``_attempt`` (``{"tag", "nodes":
[[pool, node], ...]}`` of the running attempt, so a restarted emulator can kill what it left behind); subtask
``_taskDir``.

"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mpilaunch.emulator import multiinstance as mi
from mpilaunch.emulator.context import EngineContext
from mpilaunch.emulator.nodes.base import Node
from mpilaunch.emulator.store import Doc, now_iso, transition
from mpilaunch.emulator.taskrun import Outcome

RECENT_TASKS = 10
ENDED = {
    "timeout": ("TaskEnded", "The task exceeded its maxWallClockTime and was terminated"),
    "terminated": ("TaskEnded", "The task was terminated by user request"),
    "evicted": ("TaskEnded", "The task was terminated because a node it ran on was rebooted, reimaged, removed or "
                "had its scheduling disabled with the terminate option"),
}


def _info(ctx: EngineContext, node: Node, rel: str) -> Doc:
    return mi.node_info(account_url=ctx.account_url, pool_id=node.pool_id, node_id=node.id, task_rel=rel)


def claim(ctx: EngineContext, job_id: str, task_id: str, nodes: Sequence[Node], tag: str) -> Doc | None:
    """Mark the task running on ``nodes`` (primary first); returns the task doc, ``None`` if it vanished."""
    rel = mi.task_rel_dir(job_id, task_id)
    now = now_iso()
    with ctx.store.transaction():
        for old in ctx.store.list("subtask", (job_id, task_id)):
            ctx.store.delete("subtask", (job_id, task_id), str(old["id"]))

        def running(doc: Doc) -> None:
            transition(doc, "running", now)
            info = doc.setdefault("executionInfo", {})
            for key in ("endTime", "exitCode", "result", "failureInfo"):
                info.pop(key, None)
            info.update(startTime=now, retryCount=info.get("retryCount", 0),
                        requeueCount=info.get("requeueCount", 0))
            doc["nodeInfo"] = _info(ctx, nodes[0], rel)
            doc["_taskDir"] = str(nodes[0].root / rel)
            doc["_attempt"] = {"tag": tag, "nodes": [[n.pool_id, n.id] for n in nodes]}
        task = ctx.store.update("task", (job_id,), task_id, running)
        if task is None:
            return None
        if "multiInstanceSettings" in task:
            for index, node in enumerate(nodes[1:], start=1):
                ctx.store.put("subtask", (job_id, task_id), {
                    "id": index, "nodeInfo": _info(ctx, node, rel), "state": "preparing",
                    "stateTransitionTime": now, "_taskDir": str(node.root / rel)})
        for node in nodes:
            ctx.update_node(node.pool_id, node.id, _occupy)
    return task


def instances_started(ctx: EngineContext, job_id: str, task_id: str, starts: dict[int, str]) -> None:
    """The subtasks whose coordination command started (``{index: time}``, index >= 1) are ``running`` since then."""
    def running(doc: Doc, at: str) -> None:
        if doc.get("state") == "preparing":
            doc["startTime"] = at
            transition(doc, "running", at)
    with ctx.store.transaction():
        for index, at in sorted(starts.items()):
            if index:
                ctx.store.update("subtask", (job_id, task_id), str(index),
                                 lambda d, at=at: running(d, at))  # type: ignore[misc]


def _occupy(doc: Doc) -> None:
    doc["runningTasksCount"] = doc.get("runningTasksCount", 0) + 1
    doc["runningTaskSlotsCount"] = doc.get("runningTaskSlotsCount", 0) + 1
    if doc.get("state") == "idle":
        transition(doc, "running")


def _release(ctx: EngineContext, node: Node, job_id: str, task_id: str, *, index: int | None, task: Doc | None,
             ok: bool, ran: bool) -> None:
    def fn(doc: Doc) -> None:
        doc["runningTasksCount"] = max(doc.get("runningTasksCount", 1) - 1, 0)
        doc["runningTaskSlotsCount"] = max(doc.get("runningTaskSlotsCount", 1) - 1, 0)
        doc["totalTasksRun"] = doc.get("totalTasksRun", 0) + (1 if ran else 0)
        doc["totalTasksSucceeded"] = doc.get("totalTasksSucceeded", 0) + (1 if ok else 0)
        if doc["runningTasksCount"] == 0 and doc.get("state") == "running":
            transition(doc, "idle")
        if task is not None:
            entry: Doc = {"taskUrl": ctx.task_url(job_id, task_id), "jobId": job_id, "taskId": task_id,
                          "taskState": task["state"], "executionInfo": _public(task.get("executionInfo", {}))}
            if index:
                entry["subtaskId"] = index
            doc["recentTasks"] = [*doc.get("recentTasks", []), entry][-RECENT_TASKS:]
    ctx.update_node(node.pool_id, node.id, fn)


def release_all(ctx: EngineContext, job_id: str, task_id: str, nodes: Sequence[Node]) -> None:
    """Give ``nodes`` back after an attempt whose task record could not be written (it is marked instead)."""
    for node in nodes:
        _release(ctx, node, job_id, task_id, index=None, task=None, ok=False, ran=False)


def _public(info: Doc) -> Doc:
    return {k: v for k, v in info.items() if not k.startswith("_")}


def finish(ctx: EngineContext, job_id: str, task_id: str, nodes: Sequence[Node], *, multi: bool, outcome: Outcome,
           max_retries: int) -> Doc | None:
    """Record the end of an attempt; returns the task doc (``None`` if deleted). ``shutdown`` writes nothing."""
    if outcome.kind == "shutdown":
        return None
    now = now_iso()
    task: Doc | None = None
    with ctx.store.transaction():
        if outcome.kind == "deleted":
            ctx.store.delete("task", (job_id,), task_id)
        else:
            task = ctx.store.update("task", (job_id,), task_id, lambda d: _finish_task(d, outcome, max_retries, now))
            if task is not None and multi:
                for index in range(1, len(nodes)):
                    ctx.store.update("subtask", (job_id, task_id), str(index),
                                     lambda d, i=index: _finish_subtask(  # type: ignore[misc]
                                         d, i, outcome, outcome.ends.get(i, now), outcome.starts.get(i)))
        for index, node in enumerate(nodes):
            _release(ctx, node, job_id, task_id, index=index if multi else None, task=task,
                     ok=outcome.kind == "success", ran=outcome.kind not in ("requeue", "deleted"))
    return task


def _finish_task(doc: Doc, outcome: Outcome, max_retries: int, now: str) -> None:
    info = doc.setdefault("executionInfo", {"retryCount": 0, "requeueCount": 0})
    doc.pop("_attempt", None)
    if outcome.kind == "requeue":
        info["requeueCount"] = info.get("requeueCount", 0) + 1
        info["lastRequeueTime"] = now
        transition(doc, "active", now)
        return
    info["endTime"] = now
    info["result"] = "success" if outcome.kind == "success" else "failure"
    if outcome.exit_code is not None:
        info["exitCode"] = outcome.exit_code
    else:
        info.pop("exitCode", None)
    if outcome.kind in ENDED:
        outcome.failure = mi.failure_info(*ENDED[outcome.kind])
    if outcome.failure is not None:
        info["failureInfo"] = outcome.failure
    else:
        info.pop("failureInfo", None)
    retries = int(info.get("retryCount", 0))
    if outcome.kind == "failure" and outcome.retry and (max_retries == -1 or retries < max_retries):
        info["retryCount"] = retries + 1
        info["lastRetryTime"] = now
        transition(doc, "active", now)
    else:
        transition(doc, "completed", now)


def _finish_subtask(doc: Doc, index: int, outcome: Outcome, now: str, started: str | None = None) -> None:
    """End subtask ``index`` at ``now`` (its own end); ``started``: its own start, if it got that far."""
    if started is not None and "startTime" not in doc:
        doc["startTime"] = started
        transition(doc, "running", started)
    code = outcome.codes.get(index)
    failure: dict[str, Any] | None = mi.subtask_failure(outcome.kind, code, outcome.failures.get(index))
    if code is not None:
        doc["exitCode"] = code
    doc["endTime"] = now
    doc["result"] = "failure" if failure is not None or (code not in (None, 0)) else "success"
    if failure is not None:
        doc["failureInfo"] = failure
    transition(doc, "completed", now)
