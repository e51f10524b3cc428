"""Jobs: add, get, list, patch, delete, terminate, task counts."""

from __future__ import annotations

from typing import Any

from mpilaunch.emulator import api_pools, validation
from mpilaunch.emulator.store import Doc, now_iso, transition
from mpilaunch.emulator.wire import (
    HandlerContext,
    Request,
    Response,
    accepted,
    body_object,
    entity,
    fetch,
    insert_new,
    listing,
    mutate,
    remove,
)
from mpilaunch.emulator.wire_errors import WireError, invalid_value, missing

FOREVER = "P10675199DT2H48M5.4775807S"
"""Batch's "no limit" maxWallClockTime."""
_PATCHABLE = ("priority", "allowTaskPreemption", "maxParallelTasks", "constraints", "poolInfo", "onAllTasksComplete",
              "metadata", "networkConfiguration")


def get_job(ctx: HandlerContext, job_id: str) -> Doc:
    return fetch(ctx, "job", (), job_id)


def add(ctx: HandlerContext, req: Request, _ids: list[str]) -> Response:
    """Add Job; with an ``autoPoolSpecification``, its pool is created with it ("If auto Pool creation fails, the
    Batch service moves the Job to a completed state, and the Pool creation error is set in the Job's scheduling
    error property", ``BatchPoolInfo``)."""
    body = validation.job(body_object(req))
    now = now_iso()
    doc: dict[str, Any] = {
        "priority": 0, "allowTaskPreemption": False, "maxParallelTasks": -1, "usesTaskDependencies": False,
        "onAllTasksComplete": "noaction", "onTaskFailure": "noaction",
        **body,
        "url": f"{req.base_url}/jobs/{body['id']}", "state": "active",
        "constraints": {"maxWallClockTime": FOREVER, "maxTaskRetryCount": 0, **(body.get("constraints") or {})},
        "executionInfo": {"startTime": now, "poolId": body["poolInfo"].get("poolId")},
    }
    auto = body["poolInfo"].get("autoPoolSpecification")
    pool = None
    if auto is not None:
        try:
            pool = api_pools.auto_pool(ctx, req.base_url, auto)
            doc["executionInfo"]["poolId"] = pool["id"]
        except WireError as exc:
            doc["state"], doc["executionInfo"]["endTime"] = "completed", now
            doc["executionInfo"]["schedulingError"] = {"category": "usererror", "code": exc.code,
                                                       "message": f"The auto pool could not be created: {exc.message}"}
    with ctx.store.transaction():
        response = insert_new(ctx, req, "job", (), doc)
        if pool is not None:
            ctx.store.insert("pool", (), pool)
    return response


def get(ctx: HandlerContext, req: Request, ids: list[str]) -> Response:
    return entity(req, get_job(ctx, ids[0]), "jobs")


def list_(ctx: HandlerContext, req: Request, _ids: list[str]) -> Response:
    return listing(req, ctx.store, "job", (), "jobs", cache=ctx.lists)


def patch(ctx: HandlerContext, req: Request, ids: list[str]) -> Response:
    body = validation.check(body_object(req), "BatchJobUpdateOptions", update=True)
    validation.check_priority(body.get("priority"))
    validation.check_constraints(body.get("constraints"))
    if "poolInfo" in body:
        validation.check_pool_info(body["poolInfo"])

    def apply(doc: Doc) -> None:
        require_active(doc)
        for key in _PATCHABLE:
            if key in body:
                doc[key] = {**doc.get(key, {}), **body[key]} if key == "constraints" else body[key]
        if "poolInfo" in body:
            doc["executionInfo"]["poolId"] = body["poolInfo"].get("poolId")

    doc = mutate(ctx, req, "job", (), ids[0], fn=apply)
    return accepted(doc, status=200)


_REPLACE_DEFAULTS: dict[str, Any] = {"priority": 0, "allowTaskPreemption": False, "maxParallelTasks": -1,
                                     "onAllTasksComplete": "noaction"}


def replace(ctx: HandlerContext, req: Request, ids: list[str]) -> Response:
    """Job Update (PUT): "fully replaces all the updatable properties of the Job": what the body leaves out gets
    its default (constraints: no limits; metadata: none); ``poolInfo`` is required."""
    raw = body_object(req)
    if not isinstance(raw, dict):
        raise invalid_value("body", raw, "must be a JSON object (a job)")
    body = {k: v for k, v in raw.items() if k in _PATCHABLE}
    if body.get("poolInfo") is None:
        raise missing("poolInfo")
    validation.check(body, "BatchJobUpdateOptions")
    validation.check_priority(body.get("priority"))
    validation.check_constraints(body.get("constraints"))
    validation.check_pool_info(body["poolInfo"])

    def apply(doc: Doc) -> None:
        require_active(doc)
        for key in _PATCHABLE:
            doc.pop(key, None)
        doc.update(_REPLACE_DEFAULTS)
        doc.update(body)
        doc["constraints"] = {"maxWallClockTime": FOREVER, "maxTaskRetryCount": 0, **(body.get("constraints") or {})}
        doc["executionInfo"]["poolId"] = body["poolInfo"]["poolId"]

    return accepted(mutate(ctx, req, "job", (), ids[0], fn=apply), status=200)


def delete(ctx: HandlerContext, req: Request, ids: list[str]) -> Response:
    remove(ctx, req, "job", (), get_job(ctx, ids[0]), mark=lambda d: transition(d, "deleting"))
    return accepted()


def terminate(ctx: HandlerContext, req: Request, ids: list[str]) -> Response:
    reason = "UserTerminate"
    if req.body.strip():
        body = validation.check(body_object(req), "BatchJobTerminateOptions")
        reason = body.get("terminateReason") or reason

    def apply(doc: Doc) -> None:
        require_active(doc)
        doc["executionInfo"]["terminateReason"] = reason
        if ctx.engine is None:
            transition(doc, "completed")
            doc["executionInfo"]["endTime"] = doc["stateTransitionTime"]
        else:
            transition(doc, "terminating")

    return accepted(mutate(ctx, req, "job", (), ids[0], fn=apply))


def task_counts(ctx: HandlerContext, req: Request, ids: list[str]) -> Response:
    job = get_job(ctx, ids[0])
    counts = dict.fromkeys(("active", "running", "completed", "succeeded", "failed"), 0)
    slots = dict(counts)
    for task in ctx.store.list("task", (job["id"],)):
        if task.get("_deleting"):
            continue
        state = "running" if task["state"] == "preparing" else task["state"]
        n = task.get("requiredSlots") or 1
        counts[state] += 1
        slots[state] += n
        if state == "completed":
            result = "failed" if (task.get("executionInfo") or {}).get("result") == "failure" else "succeeded"
            counts[result] += 1
            slots[result] += n
    return Response(200, {"odata.metadata": f"{req.base_url}/$metadata#taskcounts/@Element",
                          "taskCounts": counts, "taskSlotCounts": slots})


def _not_active(job: Doc) -> WireError:
    code = {"completed": "JobCompleted", "terminating": "JobBeingTerminated", "deleting": "JobBeingDeleted"}
    text = {"completed": "The specified job is already in a completed state.",
            "terminating": "The specified job is being terminated.",
            "deleting": "The specified job has been marked for deletion and is being garbage collected."}
    return WireError(409, code[job["state"]], text[job["state"]])


def require_active(job: Doc) -> None:
    """Tasks can be added to active (or disabled) jobs only."""
    if job.get("state") in ("completed", "terminating", "deleting"):
        raise _not_active(job)
