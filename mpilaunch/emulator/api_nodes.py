"""Node operations: reboot, reimage, disable/enable scheduling, and the emulator's own fault injection (preempt,
kill). The handlers check and record the request (the node enters its new state at once, so the SDK's pollers see
it); the engine carries it out (:func:`mpilaunch.emulator.pools.request_action`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mpilaunch.emulator import validation
from mpilaunch.emulator.api_pools import get_pool
from mpilaunch.emulator.pools import DOWNTIME, request_action
from mpilaunch.emulator.store import Doc, transition
from mpilaunch.emulator.wire import Context, Request, Response, accepted, body_object, mutate
from mpilaunch.emulator.wire_errors import WireError, invalid_value

_BUSY = {"rebooting": ("NodeBeingRebooted", "The specified node is being rebooted."),
         "reimaging": ("NodeBeingReimaged", "The specified node is being reimaged."),
         "creating": ("NodeBeingCreated", "The specified node is being created."),
         "starting": ("NodeBeingStarted", "The specified node is being started."),
         "waitingforstarttask": ("NodeBeingStarted", "The specified node is being started."),
         "unusable": ("NodeStateUnusable", "The state of the specified node is unusable.")}
FAULTS = ("preempt", "kill")
MAX_DOWN = 3600


def options(req: Request, definition: str) -> dict[str, Any]:
    """The optional JSON body of a node operation, checked against ``definition`` (empty: defaults)."""
    return validation.check(body_object(req), definition) if req.body else {}


def require_ready(doc: Doc, what: str) -> None:
    """409 unless the node is idle or running (and has no action pending): Batch's precondition for ``what``."""
    state = str(doc.get("state"))
    if state not in ("idle", "running") or doc.get("_action"):
        code, message = _BUSY.get(state, ("OperationInvalidForCurrentState", "The specified operation is not valid "
                                          "for the current state of the resource."))
        raise WireError(409, code, message, Reason=f"the node is {state}; {what} needs an idle or running node")


def _update(ctx: Context, req: Request, ids: list[str], fn: Callable[[Doc], None]) -> Doc:
    """Apply ``fn`` to node ``ids[1]`` of pool ``ids[0]`` (404 PoolNotFound / NodeNotFound)."""
    get_pool(ctx, ids[0])
    return mutate(ctx, req, "node", (ids[0],), ids[1], fn=fn)


_OPTIONS = {"reboot": ("BatchNodeRebootOptions", "nodeRebootOption"),
            "reimage": ("BatchNodeReimageOptions", "nodeReimageOption")}


def _act(ctx: Context, req: Request, ids: list[str], kind: str) -> Response:
    definition, field = _OPTIONS[kind]
    option = str(options(req, definition).get(field) or "requeue").lower()

    def apply(doc: Doc) -> None:
        require_ready(doc, kind)
        request_action(doc, kind, option)
    return accepted(_update(ctx, req, ids, apply))


def reboot(ctx: Context, req: Request, ids: list[str]) -> Response:
    return _act(ctx, req, ids, "reboot")


def reimage(ctx: Context, req: Request, ids: list[str]) -> Response:
    return _act(ctx, req, ids, "reimage")


def _scheduling(doc: Doc, wanted: str) -> None:
    if doc.get("schedulingState", "enabled") == wanted:
        raise WireError(409, "NodeAlreadyInTargetSchedulingState", "The specified node is already in the target "
                        "scheduling state.", Reason=f"scheduling is already {wanted}")
    doc["schedulingState"] = wanted


def disable_scheduling(ctx: Context, req: Request, ids: list[str]) -> Response:
    option = str(options(req, "BatchNodeDisableSchedulingOptions").get("nodeDisableSchedulingOption")
                 or "requeue").lower()

    def apply(doc: Doc) -> None:
        _scheduling(doc, "disabled")
        if not doc.get("_action"):
            request_action(doc, "disable", option)
    return accepted(_update(ctx, req, ids, apply), status=200)


def enable_scheduling(ctx: Context, req: Request, ids: list[str]) -> Response:
    def apply(doc: Doc) -> None:
        _scheduling(doc, "enabled")
        if doc.get("_action", {}).get("kind") == "disable":
            del doc["_action"]
        if doc.get("state") == "offline":
            transition(doc, "idle")
    return accepted(_update(ctx, req, ids, apply), status=200)


def fault(ctx: Context, req: Request, ids: list[str]) -> Response:
    """The emulator's fault injection (not a Batch operation): ``{"fault": "preempt" | "kill", "downSeconds": s}``.

    ``preempt`` (Spot/low-priority nodes only): the node is ``preempted``, its tasks requeued and its files lost; it
    comes back with the same id after ``downSeconds``. ``kill``: the node fails (everything on it ends), its tasks
    are requeued, it is ``unusable`` (``NodeLost``) and restarts after ``downSeconds``.
    """
    body = body_object(req)
    if not isinstance(body, dict):
        raise invalid_value("body", body, 'must be a JSON object such as {"fault": "preempt"}')
    kind = body.get("fault")
    if kind not in FAULTS:
        raise invalid_value("fault", kind, f"must be one of {', '.join(FAULTS)}")
    down = body.get("downSeconds", DOWNTIME)
    if isinstance(down, bool) or not isinstance(down, int | float) or not 0 <= down <= MAX_DOWN:
        raise invalid_value("downSeconds", down, f"must be a number of seconds from 0 to {MAX_DOWN}")

    def apply(doc: Doc) -> None:
        if kind == "preempt" and doc.get("isDedicated", True):
            raise WireError(409, "OperationNotValidOnNode", "The specified operation is not valid on the node.",
                            Reason="only Spot/low-priority nodes (isDedicated false) can be preempted")
        if doc.get("state") in ("creating", "leavingpool", "preempted") or doc.get("_action"):
            raise WireError(409, "OperationInvalidForCurrentState", "The specified operation is not valid for the "
                            "current state of the resource.", Reason=f"the node is {doc.get('state')}")
        request_action(doc, str(kind), "requeue", float(down))
    return accepted(_update(ctx, req, ids, apply))
