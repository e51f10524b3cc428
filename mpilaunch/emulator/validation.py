"""Request validation the Batch service performs, before anything is stored.

Two layers: a walk of the request body against the spec's definitions (types, required properties, enums,
ISO-8601 durations) and the documented service rules (id syntax and length, display name length, requiredSlots of
multi-instance tasks, resource-file exclusivity and list size, request size). Errors name the offending property by
its JSON path (``multiInstanceSettings.coordinationCommandLine``, ``resourceFiles[2].httpUrl``).
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

from mpilaunch.emulator.multiinstance import parse_duration
from mpilaunch.emulator.wire_errors import WireError, bad_body, invalid_value, missing

SPEC = Path(__file__).with_name("batch_spec_2025-06-01.json")
MAX_BODY = 1024 * 1024
"""Batch rejects request bodies over 1 MB (``RequestBodyTooLarge``)."""
MAX_RESOURCE_FILES_BYTES = 64 * 1024
"""Our limit for a task's serialized resource-file lists (Batch documents a limit but not its value)."""
MAX_TASKS_PER_COLLECTION = 100
MAX_POOL_NODES = 1000
"""Nodes one pool may ask for (dedicated + low-priority), and instances one task may need: the emulator account's
quota. Batch's default account quotas are at most 900 dedicated and 100 low-priority cores ("Batch service quotas
and limits"), so 1,000 single-core nodes is the most a default account can hold; far more than one machine runs."""
MAX_TASK_SLOTS = 256
"""``taskSlotsPerNode``: "The maximum value is the smaller of 4 times the number of cores of the vmSize of the pool
or 256" (the spec)."""
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)


@functools.cache
def definitions() -> dict[str, Any]:
    """The spec's ``definitions`` (loaded once)."""
    with SPEC.open(encoding="utf-8") as f:
        defs: dict[str, Any] = json.load(f)["definitions"]
    return defs


def parse_json(raw: bytes) -> Any:
    if len(raw) > MAX_BODY:
        raise WireError(413, "RequestBodyTooLarge", "The request body is too large and exceeds the maximum "
                        "permissible limit.", MaxLimit=str(MAX_BODY))
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_body(f"The body is not valid JSON: {exc}") from exc


def check(value: Any, definition: str, path: str = "", *, update: bool = False) -> dict[str, Any]:
    """Validate a request body (or the part at ``path``) against a spec definition; returns it or raises a 400.

    A property whose value is ``null`` counts as left out, and is removed (the spec's own examples send such
    nulls), except in an ``update`` (PATCH), where a top-level ``null`` would have to mean "clear it", which
    Batch defines nowhere: 400 naming it. A ``null`` item of a list is a 400 too."""
    if not isinstance(value, dict):
        if path:
            raise invalid_value(path, value, "must be an object")
        raise bad_body(f"The body must be a JSON object ({definition}).")
    if update:
        for key, item in value.items():
            if item is None:
                raise invalid_value(f"{path}.{key}" if path else key, None, "null is not a value in an update: "
                                    "leave the property out to keep it as it is")
    _walk(value, {"$ref": f"#/definitions/{definition}"}, path)
    return value


def _resolve(schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = definitions()[schema["$ref"].rsplit("/", 1)[-1]]
    return schema


_INTEGER_TEXT = re.compile(r"\s*-?[0-9]{1,19}\s*")
_NUMBER_TEXT = re.compile(r"\s*-?[0-9]{1,19}(\.[0-9]{1,19})?\s*")


def _walk(value: Any, schema: dict[str, Any], path: str) -> Any:  # noqa: PLR0912 - one branch per JSON type
    """Check ``value`` against ``schema``; returns it, with numbers and booleans written as strings made numbers
    and booleans (azure-cli sends ``"targetDedicatedNodes": "2"``; Batch's JSON reader takes such strings) and
    null properties of objects removed."""
    schema = _resolve(schema)
    if schema.get("readOnly"):
        return value
    kind = schema.get("type", "object")
    name = path or "body"
    if value is None:  # only items of lists get here: null properties were removed by their object
        raise invalid_value(name, value, "null is not an item: leave it out of the list")
    if kind == "string":
        if not isinstance(value, str):
            raise invalid_value(name, value, "must be a string")
        if "enum" in schema and value.lower() not in {e.lower() for e in schema["enum"]}:
            raise invalid_value(name, value, f"must be one of {', '.join(schema['enum'])}")
        if schema.get("format") == "duration":
            check_duration(value, name)
    elif kind == "integer":
        if isinstance(value, str) and _INTEGER_TEXT.fullmatch(value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise invalid_value(name, value, "must be an integer")
        low, high = _INT32 if schema.get("format") == "int32" else _INT64
        if not low <= value <= high:
            raise invalid_value(name, value, f"must fit in {'32' if high == _INT32[1] else '64'} bits")
    elif kind == "number":
        if isinstance(value, str) and _NUMBER_TEXT.fullmatch(value):
            value = float(value) if "." in value else int(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise invalid_value(name, value, "must be a number")
    elif kind == "boolean":
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            value = value.strip().lower() == "true"
        if not isinstance(value, bool):
            raise invalid_value(name, value, "must be true or false")
    elif kind == "array":
        if not isinstance(value, list):
            raise invalid_value(name, value, "must be an array")
        for i, item in enumerate(value):
            value[i] = _walk(item, schema.get("items", {}), f"{path}[{i}]")
    elif kind == "object":
        if not isinstance(value, dict):
            raise invalid_value(name, value, "must be an object")
        for req in schema.get("required", ()):
            if value.get(req) is None:
                raise missing(f"{path}.{req}" if path else req)
        for key in [k for k, item in value.items() if item is None]:
            del value[key]
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if key in props:
                value[key] = _walk(item, props[key], f"{path}.{key}" if path else key)
            elif isinstance(extra, dict):
                value[key] = _walk(item, extra, f"{path}.{key}" if path else key)
    return value


def check_duration(value: str, name: str) -> None:
    """An ISO-8601 duration of days, hours, minutes and seconds (``PT1H30M``, ``P2DT12H``), as Batch writes them;
    larger than Batch's "no limit" (.NET ``TimeSpan.MaxValue``, ``P10675199DT2H48M5.4775807S``) means no limit."""
    try:
        parse_duration(value)
    except (ValueError, OverflowError) as exc:
        raise invalid_value(name, value, "must be an ISO-8601 duration of days, hours, minutes and seconds such as "
                            "PT1H30M or P2DT12H") from exc


def check_id(value: Any, name: str = "id") -> str:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise invalid_value(name, value, "must be 1-64 characters of letters, digits, hyphens and underscores")
    return value


def check_priority(priority: int | None) -> None:
    if priority is not None and not -1000 <= priority <= 1000:
        raise WireError(400, "OutOfRangePriority", "The job priority is outside the permitted range of -1000 to 1000.",
                        PropertyName="priority", PropertyValue=str(priority))


def check_display_name(body: dict[str, Any]) -> None:
    name = body.get("displayName")
    if isinstance(name, str) and len(name) > 1024:
        raise invalid_value("displayName", name, "must be at most 1024 characters")


def _check_resource_files(files: list[Any], path: str) -> None:
    for i, rf in enumerate(files):
        sources = [k for k in ("autoStorageContainerName", "storageContainerUrl", "httpUrl") if rf.get(k)]
        if len(sources) != 1:
            raise invalid_value(f"{path}[{i}]", rf, "exactly one of autoStorageContainerName, storageContainerUrl"
                                " and httpUrl must be specified")
        if sources == ["httpUrl"] and not rf.get("filePath"):
            raise missing(f"{path}[{i}].filePath")
        if rf.get("blobPrefix") and sources == ["httpUrl"]:
            raise invalid_value(f"{path}[{i}].blobPrefix", rf["blobPrefix"], "is valid only with a container")
        file_path = str(rf.get("filePath") or "")
        if file_path.startswith("/") or ".." in Path(file_path).parts:
            raise invalid_value(f"{path}[{i}].filePath", file_path, "must stay inside the task directory")


def task(raw: Any) -> dict[str, Any]:
    """Validate a Task Add body (``BatchTaskCreateOptions``) per the Task Add doc."""
    body = check(raw, "BatchTaskCreateOptions")
    check_id(body["id"])
    check_display_name(body)
    lists = {"resourceFiles": body.get("resourceFiles") or []}
    mi = body.get("multiInstanceSettings")
    if mi is not None:
        lists["multiInstanceSettings.commonResourceFiles"] = mi.get("commonResourceFiles") or []
        if body.get("requiredSlots") not in (None, 1):
            raise invalid_value("requiredSlots", body["requiredSlots"], "must be 1 for a multi-instance task")
        instances = mi.get("numberOfInstances")
        if instances is not None and not 1 <= instances <= MAX_POOL_NODES:
            raise invalid_value("multiInstanceSettings.numberOfInstances", instances,
                                f"must be from 1 to {MAX_POOL_NODES} (the most nodes a pool of this account has)")
    if body.get("requiredSlots") is not None and body["requiredSlots"] < 1:
        raise invalid_value("requiredSlots", body["requiredSlots"], "must be at least 1")
    check_constraints(body.get("constraints"))
    for path, files in lists.items():
        _check_resource_files(files, path)
    if len(json.dumps(list(lists.values()))) > MAX_RESOURCE_FILES_BYTES:
        raise WireError(413, "RequestEntityTooLarge", "The resource file list of the task exceeds the maximum "
                        "size.", MaxBytes=str(MAX_RESOURCE_FILES_BYTES))
    return body


def check_constraints(constraints: dict[str, Any] | None) -> None:
    """``maxTaskRetryCount`` is -1 (no limit) or more: 400 ``InvalidConstraintValue`` otherwise."""
    retries = (constraints or {}).get("maxTaskRetryCount")
    if retries is not None and retries < -1:
        raise WireError(400, "InvalidConstraintValue", "A value in a job or task constraint is out of range.",
                        PropertyName="constraints.maxTaskRetryCount", PropertyValue=str(retries),
                        Reason="must be -1 (no limit) or more")


def check_targets(body: dict[str, Any]) -> None:
    """``targetDedicatedNodes``/``targetLowPriorityNodes`` (pool add, resize): 0 or more, together at most
    :data:`MAX_POOL_NODES` (refused at the door, before any node is made)."""
    for name in ("targetDedicatedNodes", "targetLowPriorityNodes"):
        if (body.get(name) or 0) < 0:
            raise invalid_value(name, body[name], "must be 0 or more")
    total = (body.get("targetDedicatedNodes") or 0) + (body.get("targetLowPriorityNodes") or 0)
    if total > MAX_POOL_NODES:
        name = "targetDedicatedNodes" if body.get("targetDedicatedNodes") else "targetLowPriorityNodes"
        raise invalid_value(name, body[name], f"{total} nodes exceed the emulator account's quota of "
                            f"{MAX_POOL_NODES} nodes per pool (dedicated + low-priority)")


def pool(raw: Any) -> dict[str, Any]:
    if isinstance(raw, dict) and "virtualMachineConfiguration" in raw and raw["virtualMachineConfiguration"] is None:
        raise invalid_value("virtualMachineConfiguration", None, "must be an object: the pool's virtual machine "
                            "configuration must be specified")
    body = check(raw, "BatchPoolCreateOptions")
    check_id(body["id"])
    check_display_name(body)
    check_targets(body)
    slots = body.get("taskSlotsPerNode")
    if slots is not None and not 1 <= slots <= MAX_TASK_SLOTS:
        raise invalid_value("taskSlotsPerNode", slots, f"must be from 1 to {MAX_TASK_SLOTS}")
    if body.get("enableAutoScale"):
        raise invalid_value("enableAutoScale", True, "autoscale is not supported by the emulator")
    return body


def job(raw: Any) -> dict[str, Any]:
    body = check(raw, "BatchJobCreateOptions")
    check_id(body["id"])
    check_display_name(body)
    check_priority(body.get("priority"))
    check_constraints(body.get("constraints"))
    check_pool_info(body["poolInfo"], creating=True)
    return body


MAX_AUTO_POOL_PREFIX = 20  # BatchAutoPoolSpecification.autoPoolIdPrefix: "up to 20 characters long"


def check_pool_info(info: dict[str, Any], *, creating: bool = False) -> None:
    """A job's ``poolInfo`` names a pool or, when the job is created, specifies an auto pool: "either the Pool ID
    or the auto Pool specification, but not both" (``BatchPoolInfo``)."""
    auto = info.get("autoPoolSpecification")
    if auto is not None and info.get("poolId"):
        raise invalid_value("poolInfo", "{poolId, autoPoolSpecification}", "give either poolId or "
                            "autoPoolSpecification, not both")
    if auto is None:
        if not info.get("poolId"):
            raise missing("poolInfo.poolId")
        return
    if not creating:
        raise invalid_value("poolInfo.autoPoolSpecification", "{...}", "the emulator changes no auto pool "
                            "specification of an existing job")
    if auto.get("poolLifetimeOption") != "job":
        raise invalid_value("poolInfo.autoPoolSpecification.poolLifetimeOption", auto.get("poolLifetimeOption"),
                            "a job's auto pool lives as long as the job (job); the emulator has no job schedules")
    prefix = auto.get("autoPoolIdPrefix") or ""
    if len(prefix) > MAX_AUTO_POOL_PREFIX or (prefix and not _ID.fullmatch(prefix)):
        raise invalid_value("poolInfo.autoPoolSpecification.autoPoolIdPrefix", prefix,
                            f"up to {MAX_AUTO_POOL_PREFIX} letters, digits, hyphens and underscores")
    if not isinstance(auto.get("pool"), dict):
        raise missing("poolInfo.autoPoolSpecification.pool")
