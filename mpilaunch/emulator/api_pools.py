"""Pools and compute nodes: add, get, exists, list, patch, delete, resize, remove nodes; nodes list/get."""

from __future__ import annotations

import uuid

from mpilaunch.emulator import validation
from mpilaunch.emulator.nodes.base import NodeError
from mpilaunch.emulator.pools import request_action
from mpilaunch.emulator.store import Doc, now_iso, transition
from mpilaunch.emulator.wire import (
    HandlerContext,
    Request,
    Response,
    accepted,
    body_object,
    entity,
    entity_headers,
    fetch,
    insert_new,
    listing,
    mutate,
    remove,
)
from mpilaunch.emulator.wire_errors import WireError, invalid_value, missing, not_found

_PATCHABLE = ("startTask", "metadata", "applicationPackageReferences", "targetNodeCommunicationMode",
              "displayName", "vmSize", "taskSlotsPerNode", "taskSchedulingPolicy", "enableInterNodeCommunication",
              "virtualMachineConfiguration", "networkConfiguration", "resourceTags", "userAccounts",
              "mountConfiguration", "upgradePolicy")


def get_pool(ctx: HandlerContext, pool_id: str) -> Doc:
    return fetch(ctx, "pool", (), pool_id)


def add(ctx: HandlerContext, req: Request, _ids: list[str]) -> Response:
    return insert_new(ctx, req, "pool", (), new_pool(ctx, req.base_url, validation.pool(body_object(req))))


def auto_pool(ctx: HandlerContext, base_url: str, spec: Doc) -> Doc:
    """The pool doc of a job's ``autoPoolSpecification``: its ``pool`` under an id Batch makes unique, after the
    prefix (the emulator's form: ``PREFIX_<uuid4>``); raises :class:`WireError` if the pool could not be created."""
    prefix = spec.get("autoPoolIdPrefix")
    pool_id = f"{prefix}_{uuid.uuid4()}" if prefix else str(uuid.uuid4())
    return new_pool(ctx, base_url, validation.pool({**spec["pool"], "id": pool_id}))


def new_pool(ctx: HandlerContext, base_url: str, body: Doc) -> Doc:
    """The stored doc of a new pool from its validated ``body`` (the engine checks that it can provide its nodes)."""
    if ctx.engine is not None:
        try:
            ctx.engine.check_pool(body)
        except NodeError as exc:  # the pool's containerConfiguration or, without one, its metadata asks for it
            config = (body.get("virtualMachineConfiguration") or {}).get("containerConfiguration")
            if config is None:
                raise invalid_value("metadata", body.get("metadata"), str(exc)) from exc
            raise invalid_value("virtualMachineConfiguration.containerConfiguration", config, str(exc)) from exc
    now = now_iso()
    target = body.get("targetDedicatedNodes") or 0
    return {
        **body, "url": f"{base_url}/pools/{body['id']}", "state": "active",
        "allocationState": "resizing" if target else "steady", "allocationStateTransitionTime": now,
        "resizeTimeout": body.get("resizeTimeout", "PT15M"),
        "currentDedicatedNodes": 0, "currentLowPriorityNodes": 0,
        "targetDedicatedNodes": target, "targetLowPriorityNodes": body.get("targetLowPriorityNodes") or 0,
        "enableAutoScale": False, "enableInterNodeCommunication": bool(body.get("enableInterNodeCommunication")),
        "taskSlotsPerNode": body.get("taskSlotsPerNode") or 1,
        "taskSchedulingPolicy": body.get("taskSchedulingPolicy") or {"nodeFillType": "spread"},
    }


def get(ctx: HandlerContext, req: Request, ids: list[str]) -> Response:
    return entity(req, get_pool(ctx, ids[0]), "pools")


def exists_(ctx: HandlerContext, req: Request, ids: list[str]) -> Response:
    doc = ctx.store.get("pool", (), ids[0])
    return Response(404, None, {}) if doc is None else Response(200, None, entity_headers(doc))


def list_(ctx: HandlerContext, req: Request, _ids: list[str]) -> Response:
    return listing(req, ctx.store, "pool", (), "pools", cache=ctx.lists)


def patch(ctx: HandlerContext, req: Request, ids: list[str]) -> Response:
    body = validation.check(body_object(req), "BatchPoolUpdateOptions", update=True)

    def apply(doc: Doc) -> None:
        for key in _PATCHABLE:
            if key in body:
                doc[key] = body[key]

    doc = mutate(ctx, req, "pool", (), ids[0], fn=apply)
    return accepted(doc, status=200)


def replace(ctx: HandlerContext, req: Request, ids: list[str]) -> Response:
    """Pool Replace (``POST .../updateproperties``): "fully replaces all the updatable properties of the Pool":
    ``startTask`` left out is removed; ``applicationPackageReferences`` and ``metadata`` are required (may be
    empty lists). 204."""
    body = validation.check(body_object(req), "BatchPoolReplaceOptions")

    def apply(doc: Doc) -> None:
        if doc.get("state") == "deleting":
            raise WireError(409, "PoolBeingDeleted", "The specified pool has been marked for deletion and is being "
                            "reclaimed.")
        doc.pop("startTask", None)
        for key in ("startTask", "applicationPackageReferences", "metadata"):
            if key in body:
                doc[key] = body[key]

    mutate(ctx, req, "pool", (), ids[0], fn=apply)
    return accepted(status=204)


def delete(ctx: HandlerContext, req: Request, ids: list[str]) -> Response:
    remove(ctx, req, "pool", (), get_pool(ctx, ids[0]), mark=lambda d: transition(d, "deleting"))
    return accepted()


def resize(ctx: HandlerContext, req: Request, ids: list[str]) -> Response:
    body = validation.check(body_object(req), "BatchPoolResizeOptions")
    validation.check_targets(body)

    def apply(doc: Doc) -> None:
        _resizable(doc)
        validation.check_targets({name: body.get(name, doc.get(name))
                                  for name in ("targetDedicatedNodes", "targetLowPriorityNodes")})
        for name in ("targetDedicatedNodes", "targetLowPriorityNodes", "resizeTimeout"):
            if name in body:
                doc[name] = body[name]
        doc["_deallocation"] = str(body.get("nodeDeallocationOption") or "requeue").lower()
        _resizing(doc)

    return accepted(mutate(ctx, req, "pool", (), ids[0], fn=apply))


def _resizable(doc: Doc) -> None:
    """409 unless the pool is steady (resize and remove nodes need that)."""
    if doc.get("state") == "deleting":
        raise WireError(409, "PoolBeingDeleted", "The specified pool has been marked for deletion and is being "
                        "reclaimed.")
    if doc.get("allocationState") != "steady":
        raise WireError(409, "PoolBeingResized", "The specified pool is being resized; it can only be resized "
                        "again when its allocation state is steady.")


def _resizing(doc: Doc) -> None:
    doc["allocationState"] = "resizing"
    doc["allocationStateTransitionTime"] = now_iso()


MAX_REMOVE = 100
"""Nodes one remove-nodes request may name (Pools_RemoveNodes)."""


def remove_nodes(ctx: HandlerContext, req: Request, ids: list[str]) -> Response:
    """Remove the listed nodes (their running tasks per ``nodeDeallocationOption``, default requeue); the pool's
    targets shrink accordingly and it is ``resizing`` until they are gone."""
    body = validation.check(body_object(req), "BatchNodeRemoveOptions")
    node_ids = body.get("nodeList")
    if not node_ids:
        raise missing("nodeList")
    if len(node_ids) > MAX_REMOVE:
        raise invalid_value("nodeList", f"{len(node_ids)} nodes", f"at most {MAX_REMOVE} nodes per request")
    option = str(body.get("nodeDeallocationOption") or "requeue").lower()
    with ctx.store.transaction():
        pool = get_pool(ctx, ids[0])
        nodes = []
        for node_id in dict.fromkeys(node_ids):
            node = ctx.store.get("node", (pool["id"],), node_id)
            if node is None:
                raise not_found("Node", node_id)
            nodes.append(node)

        def apply(doc: Doc) -> None:
            _resizable(doc)
            for node in nodes:
                if node.get("state") != "leavingpool":
                    key = "targetDedicatedNodes" if node.get("isDedicated", True) else "targetLowPriorityNodes"
                    doc[key] = max(int(doc.get(key) or 0) - 1, 0)
            _resizing(doc)
        pool = mutate(ctx, req, "pool", (), pool["id"], fn=apply)
        for node in nodes:
            if node.get("state") != "leavingpool":
                ctx.store.update("node", (pool["id"],), node["id"], lambda d: request_action(d, "remove", option))
    ctx.wake()
    return accepted(pool)


def list_nodes(ctx: HandlerContext, req: Request, ids: list[str]) -> Response:
    pool = get_pool(ctx, ids[0])
    return listing(req, ctx.store, "node", (pool["id"],), f"pools/{pool['id']}/nodes", cache=ctx.lists)


def get_node(ctx: HandlerContext, req: Request, ids: list[str]) -> Response:
    node = ctx.store.get("node", (ids[0],), ids[1])
    if node is None:
        get_pool(ctx, ids[0])
        raise not_found("Node", ids[1])
    return entity(req, node, f"pools/{ids[0]}/nodes")
