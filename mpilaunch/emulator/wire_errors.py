"""Batch error responses: ``{"code", "message": {"lang", "value"}, "values": [{"key", "value"}]}`` with real codes."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any


class WireError(Exception):
    """An error answer; ``values`` become the body's ``values`` list (key/value pairs), in order."""

    def __init__(self, status: int, code: str, message: str, **values: Any) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.values = {k: str(v) for k, v in values.items()}

    def body(self, request_id: str) -> dict[str, Any]:
        """The JSON body; Batch appends the request id and time to every message."""
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "0000Z"
        out: dict[str, Any] = {
            "odata.metadata": "$metadata#Microsoft.Azure.Batch.Protocol.Entities.Container.errors/@Element",
            "code": self.code,
            "message": {"lang": "en-US", "value": f"{self.message}\nRequestId:{request_id}\nTime:{stamp}"},
        }
        if self.values:
            out["values"] = [{"key": k, "value": v} for k, v in self.values.items()]
        return out


def new_request_id() -> str:
    return str(uuid.uuid4())


def not_found(kind: str, what: str = "") -> WireError:
    """``PoolNotFound``/``JobNotFound``/``TaskNotFound``/``NodeNotFound``/``FileNotFound`` (404)."""
    names = {"Pool": "pool", "Job": "job", "Task": "task", "Node": "node", "File": "file"}
    text = f"The specified {names.get(kind, kind.lower())} does not exist."
    return WireError(404, f"{kind}NotFound", text + (f" ({what})" if what else ""))


def exists(kind: str) -> WireError:
    """``PoolExists``/``JobExists``/``TaskExists`` (409)."""
    return WireError(409, f"{kind}Exists", f"The specified {kind.lower()} already exists.")


def invalid_value(name: str, value: Any, reason: str) -> WireError:
    return WireError(400, "InvalidPropertyValue", "The value provided for one of the properties in the request "
                     "body is invalid.", PropertyName=name, PropertyValue=_short(value), Reason=reason)


def missing(name: str) -> WireError:
    return WireError(400, "MissingRequiredProperty", "A required property was not specified in the request body.",
                     PropertyName=name)


def bad_body(reason: str) -> WireError:
    return WireError(400, "InvalidRequestBody", "The specified Request Body is not syntactically valid.",
                     Reason=reason)


def bad_query(name: str, value: str, reason: str, *, code: str = "InvalidQueryParameterValue") -> WireError:
    """``InvalidQueryParameterValue`` (or ``OutOfRangeQueryParameterValue``) naming the parameter."""
    return WireError(400, code, "Value for one of the query parameters specified in the request URI is invalid.",
                     QueryParameterName=name, QueryParameterValue=_short(value), Reason=reason)


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= 200 else text[:200] + "..."
