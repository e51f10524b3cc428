"""Tasks: add, add collection, get, list, update (replace), delete, terminate, reactivate, list subtasks."""

from __future__ import annotations

from typing import Any

from mpilaunch.emulator import validation
from mpilaunch.emulator.api_jobs import FOREVER, get_job, require_active
from mpilaunch.emulator.store import Conflict, Doc, transition
from mpilaunch.emulator.wire import (
    HandlerContext,
    Request,
    Response,
    accepted,
    body_object,
    entity,
    insert_new,
    listing,
    mutate,
    public,
    remove,
)
from mpilaunch.emulator.wire_errors import WireError, exists, invalid_value, missing, not_found


def get_task(ctx: HandlerContext, job_id: str, task_id: str) -> Doc:
    """The task, or 404 JobNotFound/TaskNotFound (tasks being deleted are gone for the API)."""
    doc = ctx.store.get("task", (job_id,), task_id)
    if doc is None or doc.get("_deleting"):
        get_job(ctx, job_id)
        raise not_found("Task", task_id)
    return doc


def default_constraints(job: Doc) -> dict[str, Any]:
    """A task's constraints when none are given (task add, and a task update without them): "the maxTaskRetryCount
    is the maxTaskRetryCount specified for the Job, the maxWallClockTime is infinite, and the retentionTime is 7
    days" (BatchTaskCreateOptions.constraints)."""
    job_retries = (job.get("constraints") or {}).get("maxTaskRetryCount", 0)
    return {"maxWallClockTime": FOREVER, "retentionTime": "P7D", "maxTaskRetryCount": job_retries}


def _new_task(req: Request, job: Doc, body: dict[str, Any]) -> Doc:
    url = f"{req.base_url}/jobs/{job['id']}/tasks/{body['id']}"
    doc: dict[str, Any] = {
        **body, "url": url, "state": "active",
        "constraints": {**default_constraints(job), **(body.get("constraints") or {})},
        "requiredSlots": body.get("requiredSlots") or 1,
        "userIdentity": body.get("userIdentity") or {"autoUser": {"scope": "pool", "elevationLevel": "nonadmin"}},
        "executionInfo": {"retryCount": 0, "requeueCount": 0},
    }
    mi = body.get("multiInstanceSettings")
    if mi is not None:
        doc["multiInstanceSettings"] = {"numberOfInstances": 1, **mi}
    return doc


def add(ctx: HandlerContext, req: Request, ids: list[str]) -> Response:
    body = validation.task(body_object(req))
    with ctx.store.transaction():
        job = get_job(ctx, ids[0])
        require_active(job)
        return insert_new(ctx, req, "task", (job["id"],), _new_task(req, job, body))


def add_collection(ctx: HandlerContext, req: Request, ids: list[str]) -> Response:
    group = body_object(req)
    if not isinstance(group, dict):
        raise invalid_value("body", group, "must be a JSON object with a value array")
    tasks = group.get("value")
    if tasks is None:
        raise missing("value")
    if not isinstance(tasks, list):
        raise invalid_value("value", tasks, "must be an array of tasks")
    if len(tasks) > validation.MAX_TASKS_PER_COLLECTION:
        raise invalid_value("value", f"{len(tasks)} tasks",
                            f"at most {validation.MAX_TASKS_PER_COLLECTION} tasks may be added at once")
    for i, task in enumerate(tasks):
        if not isinstance(task, dict) or not isinstance(task.get("id"), str):
            raise missing(f"value[{i}].id")
    results = []
    with ctx.store.transaction():
        job = get_job(ctx, ids[0])
        require_active(job)
        for task in tasks:
            results.append(_add_one(ctx, req, job, task))
    ctx.wake()
    return Response(200, {"odata.metadata": f"{req.base_url}/$metadata#taskaddresult", "value": results})


def _add_one(ctx: HandlerContext, req: Request, job: Doc, task: dict[str, Any]) -> dict[str, Any]:
    try:
        body = validation.task(task)
        doc = ctx.store.insert("task", (job["id"],), _new_task(req, job, body))
    except Conflict:
        return _client_error(task["id"], exists("Task"), req)
    except WireError as exc:
        return _client_error(task["id"], exc, req)
    return {"status": "success", "taskId": doc["id"], "eTag": doc["eTag"], "lastModified": doc["lastModified"],
            "location": doc["url"]}


def _client_error(task_id: str, exc: WireError, req: Request) -> dict[str, Any]:
    body = exc.body(req.request_id)
    body.pop("odata.metadata", None)
    return {"status": "clienterror", "taskId": task_id, "error": body}


def get(ctx: HandlerContext, req: Request, ids: list[str]) -> Response:
    return entity(req, get_task(ctx, ids[0], ids[1]), f"jobs/{ids[0]}/tasks")


def list_(ctx: HandlerContext, req: Request, ids: list[str]) -> Response:
    job = get_job(ctx, ids[0])
    return listing(req, ctx.store, "task", (job["id"],), f"jobs/{job['id']}/tasks",
                   keep=lambda d: not d.get("_deleting"), cache=ctx.lists)


def replace(ctx: HandlerContext, req: Request, ids: list[str]) -> Response:
    """Task Update (PUT, a replace): only ``constraints`` can change, and they are replaced whole: what the body
    leaves out gets its default, and a body without ``constraints`` gives the task the default constraints
    ("If omitted, the Task is given the default constraints", TaskUpdateParameter.constraints)."""
    body = body_object(req)
    if not isinstance(body, dict):
        raise invalid_value("body", body, "must be a JSON object (a task with its constraints)")
    constraints: dict[str, Any] = {}
    if "constraints" in body:
        if body["constraints"] is None:
            raise invalid_value("constraints", None, "null is not a value in an update: leave the property out "
                                "to give the task the default constraints")
        constraints = validation.check(body["constraints"], "BatchTaskConstraints", "constraints")
    validation.check_constraints(constraints)

    with ctx.store.transaction():
        defaults = default_constraints(get_job(ctx, ids[0]))

        def apply(doc: Doc) -> None:
            doc["constraints"] = {**defaults, **constraints}

        get_task(ctx, ids[0], ids[1])
        doc = mutate(ctx, req, "task", (ids[0],), ids[1], fn=apply)
    return accepted(doc, status=200)


def delete(ctx: HandlerContext, req: Request, ids: list[str]) -> Response:
    remove(ctx, req, "task", (ids[0],), get_task(ctx, ids[0], ids[1]), mark=lambda d: d.update(_deleting=True))
    return accepted(status=200)


def terminate(ctx: HandlerContext, req: Request, ids: list[str]) -> Response:
    def apply(doc: Doc) -> None:
        if doc.get("state") == "completed":
            raise WireError(409, "TaskCompleted", "The specified task is already completed.")
        if ctx.engine is None:
            transition(doc, "completed")
            info = doc.setdefault("executionInfo", {})
            info.update(endTime=doc["stateTransitionTime"], result="failure",
                        failureInfo={"category": "usererror", "code": "TaskEnded",
                                     "message": "Task Was Ended by User Request"})
        else:
            doc["_terminating"] = True

    get_task(ctx, ids[0], ids[1])
    return accepted(mutate(ctx, req, "task", (ids[0],), ids[1], fn=apply), status=204)


def reactivate(ctx: HandlerContext, req: Request, ids: list[str]) -> Response:
    """Make a failed completed task active again with ``retryCount`` 0 (Tasks_ReactivateTask)."""
    def apply(doc: Doc) -> None:
        info = doc.setdefault("executionInfo", {})
        if doc.get("state") != "completed":
            raise WireError(409, "TaskNotCompleted", "The specified task is not in a completed state, and the "
                            "requested operation can be performed only on completed tasks.")
        if info.get("result") == "success":
            raise WireError(409, "TaskSucceeded", "The specified task has already completed successfully, and the "
                            "requested operation cannot be performed on successful tasks.")
        for key in ("endTime", "exitCode", "result", "failureInfo", "lastRetryTime"):
            info.pop(key, None)
        info["retryCount"] = 0
        doc.pop("_terminating", None)
        transition(doc, "active")

    with ctx.store.transaction():
        require_active(get_job(ctx, ids[0]))
        get_task(ctx, ids[0], ids[1])
        doc = mutate(ctx, req, "task", (ids[0],), ids[1], fn=apply)
    return accepted(doc, status=204)


def list_subtasks(ctx: HandlerContext, req: Request, ids: list[str]) -> Response:
    task = get_task(ctx, ids[0], ids[1])
    subtasks = ctx.store.list("subtask", (ids[0], task["id"]))
    subtasks.sort(key=lambda d: int(d.get("id", 0)))
    value = [{k: v for k, v in public(d).items() if k not in ("eTag", "lastModified", "creationTime")}
             for d in subtasks]
    return Response(200, {"odata.metadata": f"{req.base_url}/$metadata#subtaskinfo", "value": value})
