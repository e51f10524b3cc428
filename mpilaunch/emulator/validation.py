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

from mpilaunch.emulator.wire_errors import WireError, bad_body, invalid_value, missing

SPEC = Path(__file__).with_name("batch_spec_2025-06-01.json")
MAX_BODY = 1024 * 1024
"""Batch rejects request bodies over 1 MB (``RequestBodyTooLarge``)."""
MAX_RESOURCE_FILES_BYTES = 64 * 1024
"""Our limit for a task's serialized resource-file lists (Batch documents a limit but not its value)."""
MAX_TASKS_PER_COLLECTION = 100
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_DURATION = re.compile(r"-?P(?!$)(\d+(\.\d+)?Y)?(\d+(\.\d+)?M)?(\d+(\.\d+)?W)?(\d+(\.\d+)?D)?"
                       r"(T(?=\d)(\d+(\.\d+)?H)?(\d+(\.\d+)?M)?(\d+(\.\d+)?S)?)?")
_INT32 = (-(2**31), 2**31 - 1)


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


def check(value: Any, definition: str, path: str = "") -> dict[str, Any]:
    """Validate a request body (or the part at ``path``) against a spec definition; returns it or raises a 400."""
    if not isinstance(value, dict):
        if path:
            raise invalid_value(path, value, "must be an object")
        raise bad_body(f"The body must be a JSON object ({definition}).")
    _walk(value, {"$ref": f"#/definitions/{definition}"}, path)
    return value


def _resolve(schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = definitions()[schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def _walk(value: Any, schema: dict[str, Any], path: str) -> None:  # noqa: PLR0912 - one branch per JSON type
    schema = _resolve(schema)
    if value is None or schema.get("readOnly"):
        return
    kind = schema.get("type", "object")
    name = path or "body"
    if kind == "string":
        if not isinstance(value, str):
            raise invalid_value(name, value, "must be a string")
        if "enum" in schema and value.lower() not in {e.lower() for e in schema["enum"]}:
            raise invalid_value(name, value, f"must be one of {', '.join(schema['enum'])}")
        if schema.get("format") == "duration" and not _DURATION.fullmatch(value):
            raise invalid_value(name, value, "must be an ISO-8601 duration such as PT1H30M")
    elif kind == "integer":
        if isinstance(value, bool) or not isinstance(value, int):
            raise invalid_value(name, value, "must be an integer")
        if schema.get("format") == "int32" and not _INT32[0] <= value <= _INT32[1]:
            raise invalid_value(name, value, "must fit in 32 bits")
    elif kind == "number":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise invalid_value(name, value, "must be a number")
    elif kind == "boolean":
        if not isinstance(value, bool):
            raise invalid_value(name, value, "must be true or false")
    elif kind == "array":
        if not isinstance(value, list):
            raise invalid_value(name, value, "must be an array")
        for i, item in enumerate(value):
            _walk(item, schema.get("items", {}), f"{path}[{i}]")
    elif kind == "object":
        if not isinstance(value, dict):
            raise invalid_value(name, value, "must be an object")
        for req in schema.get("required", ()):
            if value.get(req) is None:
                raise missing(f"{path}.{req}" if path else req)
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if key in props:
                _walk(item, props[key], f"{path}.{key}" if path else key)
            elif isinstance(extra, dict):
                _walk(item, extra, f"{path}.{key}" if path else key)


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
        if mi.get("numberOfInstances") is not None and mi["numberOfInstances"] < 1:
            raise invalid_value("multiInstanceSettings.numberOfInstances", mi["numberOfInstances"],
                                "must be at least 1")
    if body.get("requiredSlots") is not None and body["requiredSlots"] < 1:
        raise invalid_value("requiredSlots", body["requiredSlots"], "must be at least 1")
    _check_constraints(body.get("constraints"))
    for path, files in lists.items():
        _check_resource_files(files, path)
    if len(json.dumps(list(lists.values()))) > MAX_RESOURCE_FILES_BYTES:
        raise WireError(413, "RequestEntityTooLarge", "The resource file list of the task exceeds the maximum "
                        "size.", MaxBytes=str(MAX_RESOURCE_FILES_BYTES))
    return body


def _check_constraints(constraints: dict[str, Any] | None) -> None:
    retries = (constraints or {}).get("maxTaskRetryCount")
    if retries is not None and retries < -1:
        raise WireError(400, "InvalidConstraintValue", "A value in a job or task constraint is out of range.",
                        PropertyName="constraints.maxTaskRetryCount", PropertyValue=str(retries),
                        Reason="must be -1 (no limit) or more")


def pool(raw: Any) -> dict[str, Any]:
    body = check(raw, "BatchPoolCreateOptions")
    check_id(body["id"])
    check_display_name(body)
    for name in ("targetDedicatedNodes", "targetLowPriorityNodes"):
        if (body.get(name) or 0) < 0:
            raise invalid_value(name, body[name], "must be 0 or more")
    if body.get("taskSlotsPerNode") is not None and body["taskSlotsPerNode"] < 1:
        raise invalid_value("taskSlotsPerNode", body["taskSlotsPerNode"], "must be at least 1")
    if body.get("enableAutoScale"):
        raise invalid_value("enableAutoScale", True, "autoscale is not supported by the emulator")
    return body


def job(raw: Any) -> dict[str, Any]:
    body = check(raw, "BatchJobCreateOptions")
    check_id(body["id"])
    check_display_name(body)
    check_priority(body.get("priority"))
    _check_constraints(body.get("constraints"))
    if body["poolInfo"].get("autoPoolSpecification") is not None:
        raise invalid_value("poolInfo.autoPoolSpecification", "{...}", "auto pools are not supported by the "
                            "emulator: create a pool and set poolInfo.poolId")
    if not body["poolInfo"].get("poolId"):
        raise missing("poolInfo.poolId")
    return body
