"""Node operations: reboot, reimage, disable/enable scheduling, the emulator's own fault injection (preempt, kill),
and remote login (node users, remote login settings).

Actions: the handlers check and record the request (the node enters its new state at once, so the SDK's pollers
see it); the engine carries it out (:func:`mpilaunch.emulator.pools.request_action`). Node users and the node's sshd
are the node provider's (:mod:`mpilaunch.emulator.nodes.login`): the handlers validate as Batch does and hand the
provider the change.
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

from mpilaunch.emulator import multiinstance as mi
from mpilaunch.emulator import validation
from mpilaunch.emulator.api_pools import get_pool
from mpilaunch.emulator.context import EngineContext
from mpilaunch.emulator.nodes.base import AccountTaken, Node, NodeError, NodeProvider
from mpilaunch.emulator.nodes.login import KEY_TYPES, LoginUser, hash_password
from mpilaunch.emulator.pools import DOWNTIME, request_action
from mpilaunch.emulator.store import Doc, transition
from mpilaunch.emulator.wire import HandlerContext, Request, Response, accepted, body_object, entity_headers, mutate
from mpilaunch.emulator.wire_errors import WireError, invalid_value, not_found

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


def _update(ctx: HandlerContext, req: Request, ids: list[str], fn: Callable[[Doc], None]) -> Doc:
    """Apply ``fn`` to node ``ids[1]`` of pool ``ids[0]`` (404 PoolNotFound / NodeNotFound)."""
    get_pool(ctx, ids[0])
    return mutate(ctx, req, "node", (ids[0],), ids[1], fn=fn)


_OPTIONS = {"reboot": ("BatchNodeRebootOptions", "nodeRebootOption"),
            "reimage": ("BatchNodeReimageOptions", "nodeReimageOption")}


def _act(ctx: HandlerContext, req: Request, ids: list[str], kind: str) -> Response:
    definition, field = _OPTIONS[kind]
    option = str(options(req, definition).get(field) or "requeue").lower()

    def apply(doc: Doc) -> None:
        require_ready(doc, kind)
        request_action(doc, kind, option)
    return accepted(_update(ctx, req, ids, apply))


def reboot(ctx: HandlerContext, req: Request, ids: list[str]) -> Response:
    return _act(ctx, req, ids, "reboot")


def reimage(ctx: HandlerContext, req: Request, ids: list[str]) -> Response:
    return _act(ctx, req, ids, "reimage")


def _scheduling(doc: Doc, wanted: str) -> None:
    if doc.get("schedulingState", "enabled") == wanted:
        raise WireError(409, "NodeAlreadyInTargetSchedulingState", "The specified node is already in the target "
                        "scheduling state.", Reason=f"scheduling is already {wanted}")
    doc["schedulingState"] = wanted


def disable_scheduling(ctx: HandlerContext, req: Request, ids: list[str]) -> Response:
    option = str(options(req, "BatchNodeDisableSchedulingOptions").get("nodeDisableSchedulingOption")
                 or "requeue").lower()

    def apply(doc: Doc) -> None:
        _scheduling(doc, "disabled")
        if not doc.get("_action"):
            request_action(doc, "disable", option)
    return accepted(_update(ctx, req, ids, apply), status=200)


def enable_scheduling(ctx: HandlerContext, req: Request, ids: list[str]) -> Response:
    def apply(doc: Doc) -> None:
        _scheduling(doc, "enabled")
        if doc.get("_action", {}).get("kind") == "disable":
            del doc["_action"]
        if doc.get("state") == "offline":
            transition(doc, "idle")
    return accepted(_update(ctx, req, ids, apply), status=200)


def fault(ctx: HandlerContext, req: Request, ids: list[str]) -> Response:
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


# -- remote login ------------------------------------------------------------------------------------------------------
USER_NAME = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.-]*\$?")
"""A user name useradd takes (shadow's portable rule; not all digits, not ``.``/``..``)."""
MAX_USER_NAME = 20
"""Batch's documented limit for user account names (``UserAccount.name``)."""
DEFAULT_EXPIRY = timedelta(days=1)
"""``expiryTime`` when omitted: one day from now (Batch's default)."""
MAX_PASSWORD = 256


def _provider(ctx: HandlerContext) -> NodeProvider:
    from mpilaunch.emulator.engine import Engine

    if not isinstance(ctx.engine, Engine):  # --no-execute: there are no nodes to log in to
        raise WireError(409, "OperationNotValidOnNode", "The specified operation is not valid on the node.",
                        Reason="this emulator runs without execution (--no-execute): its nodes do not run")
    return ctx.engine.ctx.provider


def _login_node(ctx: HandlerContext, ids: list[str], what: str) -> tuple[Doc, Node, NodeProvider]:
    """The node doc, its provider node and the provider; 404 for a missing pool or node, 409 unless the node is idle
    or running (Batch's precondition for every node user operation)."""
    get_pool(ctx, ids[0])
    doc = ctx.store.get("node", (ids[0],), ids[1])
    if doc is None or doc.get("_deleting"):
        raise not_found("Node", ids[1])
    provider = _provider(ctx)
    state = str(doc.get("state"))
    node = EngineContext.node_of(doc)
    if state not in ("idle", "running") or node is None:
        code, message = _BUSY.get(state, ("OperationInvalidForCurrentState", "The specified operation is not valid "
                                          "for the current state of the resource."))
        raise WireError(409, code, message, Reason=f"the node is {state}; {what} needs an idle or running node")
    return doc, node, provider


def _unsupported(exc: NodeError) -> WireError:
    return WireError(409, "OperationNotValidOnNode", "The specified operation is not valid on the node.",
                     Reason=str(exc))


def _edit(ctx: HandlerContext, ids: list[str], what: str, edit: Callable[[dict[str, LoginUser]], None]) -> None:
    """Apply ``edit`` to the node's live users (expired ones are gone, as Batch removes them)."""
    _doc, node, provider = _login_node(ctx, ids, what)
    now = datetime.now(timezone.utc)

    def apply(users: dict[str, LoginUser]) -> None:
        for name in [n for n, u in users.items() if u.expired(now)]:
            del users[name]
        edit(users)
    try:
        provider.edit_users(node, apply)
    except AccountTaken as exc:
        raise _user_exists(str(exc)) from exc
    except NodeError as exc:
        raise _unsupported(exc) from exc


def _user_exists(reason: str) -> WireError:
    return WireError(409, "NodeUserExists", "The specified node user already exists.", Reason=reason)


def _user_not_found(name: str) -> WireError:
    return WireError(404, "NodeUserNotFound", f"The specified node user does not exist. ({name})")


def check_user_name(name: Any) -> str:
    """400 unless ``name`` is a user name a Linux node takes (see :data:`USER_NAME`) of at most 20 characters."""
    if not isinstance(name, str) or not name:
        raise invalid_value("name", name, "must be a non-empty string")
    if len(name) > MAX_USER_NAME:
        raise invalid_value("name", name, f"must be at most {MAX_USER_NAME} characters")
    if not USER_NAME.fullmatch(name) or name.isdigit() or name in (".", ".."):
        raise invalid_value("name", name, "must be a valid Linux user name: letters, digits, '_', '.' and '-', "
                            "not starting with '-', not all digits")
    return name


def check_expiry(value: Any, now: datetime) -> datetime:
    """The account's expiry: ``expiryTime`` (ISO 8601, in the future), else one day from now."""
    if value is None:
        return now + DEFAULT_EXPIRY
    try:
        when = datetime.fromisoformat(str(value).replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError as exc:
        raise invalid_value("expiryTime", value, "must be an ISO 8601 date-time such as 2025-06-01T12:00:00Z") from exc
    when = when if when.tzinfo else when.replace(tzinfo=timezone.utc)
    if when <= now:
        raise invalid_value("expiryTime", value, "must be in the future")
    return when.astimezone(timezone.utc)


def check_public_key(value: Any) -> str:
    """An OpenSSH public key line (``type base64 [comment]``), normalized to ``type base64``: its type one of
    :data:`~mpilaunch.emulator.nodes.login.KEY_TYPES`, its base64 the same type's key blob."""
    fields = value.split() if isinstance(value, str) and "\n" not in value and "\r" not in value else []
    if len(fields) < 2 or fields[0] not in KEY_TYPES:
        raise invalid_value("sshPublicKey", value, "must be an OpenSSH public key line such as 'ssh-ed25519 "
                            f"AAAA... comment' (types: {', '.join(KEY_TYPES)})")
    try:
        blob = base64.b64decode(fields[1], validate=True)
        (length,) = struct.unpack(">I", blob[:4])
        embedded = blob[4:4 + length].decode("ascii")
    except (binascii.Error, struct.error, UnicodeDecodeError) as exc:
        raise invalid_value("sshPublicKey", value, "its key is not valid base64 OpenSSH encoding") from exc
    if embedded != fields[0]:
        raise invalid_value("sshPublicKey", value, f"its key is a {embedded or 'malformed'} key, not {fields[0]}")
    return f"{fields[0]} {fields[1]}"


def _password(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > MAX_PASSWORD or any(c in value for c in "\n\r\0"):
        raise invalid_value("password", "(hidden)", f"must be at most {MAX_PASSWORD} characters without line breaks")
    try:
        return hash_password(value)
    except NodeError as exc:
        raise _unsupported(exc) from exc


def _login_user(name: str, body: dict[str, Any], is_admin: bool, now: datetime) -> LoginUser:
    """The account ``body`` describes; a Linux node needs an ``sshPublicKey`` or a ``password``."""
    key = None if body.get("sshPublicKey") in (None, "") else check_public_key(body["sshPublicKey"])
    expiry = check_expiry(body.get("expiryTime"), now)
    password = _password(body.get("password"))
    if key is None and password is None:
        raise WireError(400, "MissingRequiredProperty", "A required property was not specified in the request body.",
                        PropertyName="sshPublicKey",
                        Reason="a user of a Linux node needs an sshPublicKey or a password to log in with")
    return LoginUser(name, is_admin, expiry, key, password)


def add_user(ctx: HandlerContext, req: Request, ids: list[str]) -> Response:
    """``POST /pools/{pool}/nodes/{node}/users``: 201, or 409 ``NodeUserExists``."""
    body = validation.check(body_object(req), "BatchNodeUserCreateOptions")
    name = check_user_name(body.get("name"))
    user = _login_user(name, body, bool(body.get("isAdmin", False)), datetime.now(timezone.utc))

    def add(users: dict[str, LoginUser]) -> None:
        if name in users:
            raise _user_exists(f"node {ids[1]} has a user {name!r} already")
        users[name] = user
    _edit(ctx, ids, "adding a user", add)
    location = f"{req.base_url}/pools/{ids[0]}/nodes/{ids[1]}/users/{name}"
    return Response(201, None, {"DataServiceId": location, "Location": location})


def replace_user(ctx: HandlerContext, req: Request, ids: list[str]) -> Response:
    """``PUT /pools/{pool}/nodes/{node}/users/{name}``: every updatable property is replaced (an omitted one is
    reset: no key, no password, expiry one day from now); 404 ``NodeUserNotFound``."""
    body = validation.check(body_object(req), "BatchNodeUserUpdateOptions")
    name, now = ids[2], datetime.now(timezone.utc)
    user = _login_user(name, body, False, now)

    def update(users: dict[str, LoginUser]) -> None:
        if name not in users:
            raise _user_not_found(name)
        users[name] = LoginUser(name, users[name].is_admin, user.expiry, user.ssh_public_key, user.password_hash,
                                users[name].uid)
    _edit(ctx, ids, "updating a user", update)
    return Response(200, None, {"DataServiceId": f"{req.base_url}/pools/{ids[0]}/nodes/{ids[1]}/users/{name}"})


def delete_user(ctx: HandlerContext, req: Request, ids: list[str]) -> Response:
    """``DELETE /pools/{pool}/nodes/{node}/users/{name}``: 200, or 404 ``NodeUserNotFound``."""
    name = ids[2]

    def delete(users: dict[str, LoginUser]) -> None:
        if users.pop(name, None) is None:
            raise _user_not_found(name)
    _edit(ctx, ids, "deleting a user", delete)
    return Response(200)


LOGIN_NAME_PROPERTY = "mpilaunchLoginName"
"""The emulator's addition to remote login settings (never sent by Azure): on nodes without accounts of their own,
the OS account every node user logs in as (the emulator's; see :mod:`mpilaunch.emulator.nodes.login`)."""


def remote_login_settings(ctx: HandlerContext, req: Request, ids: list[str]) -> Response:
    """``GET /pools/{pool}/nodes/{node}/remoteloginsettings``: the node's sshd (started on first use)."""
    doc, node, provider = _login_node(ctx, ids, "remote login")
    env = mi.node_env(pool_id=ids[0], node_id=node.id, node_root=node.node_root,
                      dedicated=bool(doc.get("isDedicated", True)))
    try:
        login = provider.remote_login(node, env)
    except NodeError as exc:
        raise _unsupported(exc) from exc
    body: dict[str, Any] = {"odata.metadata": f"{req.base_url}/$metadata#Microsoft.Azure.Batch.Protocol.Entities."
                            "ComputeNodeGetRemoteLoginSettingsResult",
                            "remoteLoginIPAddress": login.address, "remoteLoginPort": login.port}
    if login.login_name:
        body[LOGIN_NAME_PROPERTY] = login.login_name
    return Response(200, body, entity_headers(doc))
