"""Spec-driven fuzzing of every served operation (hypothesis, bounded: a few hundred requests, well under a minute).

Each example is one signed request: an operation of the emulator's routing table, its ids either those of live
resources or junk, a body generated from the operation's body schema in the vendored 2025-06-01 spec and then
corrupted (wrong types, nulls, huge or string numbers, unknown properties, junk bytes), random query parameters and
conditional/range headers. Every answer must be Batch's: never a 5xx, every error a JSON body with ``code`` and
``message`` {lang, value}, and an answer at all (a socket timeout fails the test).
"""

from __future__ import annotations

import base64
import http.client
import json
import re
from email.utils import formatdate
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpilaunch.emulator import defaults
from mpilaunch.emulator.auth import sign, string_to_sign
from mpilaunch.emulator.server import ROUTES
from mpilaunch.emulator.validation import SPEC

pytestmark = [pytest.mark.timeout(240)]

SPEC_DOC = json.loads(SPEC.read_text())
DEFS: dict[str, Any] = SPEC_DOC["definitions"]
POOL, JOB, TASK, NODE = "fz-pool", "fz-job", "fz-task", "fz-node"


def _template(pattern: tuple[str, ...]) -> str:
    """The spec path of a route pattern (``("jobs", "*", "tasks")`` -> ``/jobs/{jobId}/tasks``)."""
    names = {"pools": "{poolId}", "jobs": "{jobId}", "tasks": "{taskId}", "nodes": "{nodeId}", "files": "{filePath}"}
    out, prev = [], ""
    for part in pattern:
        out.append(names.get(prev, "{x}") if part in ("*", "**") else part)
        prev = part
    return "/" + "/".join(out)


def _body_schema(method: str, pattern: tuple[str, ...]) -> dict[str, Any] | None:
    template = _template(pattern)
    for path, ops in SPEC_DOC["paths"].items():
        if re.sub(r"\{[^}]+\}", "{}", path) != re.sub(r"\{[^}]+\}", "{}", template):
            continue
        for param in ops.get(method.lower(), {}).get("parameters", []):
            if param.get("in") == "body":
                return param["schema"]
    return None


OPERATIONS = [(method, pattern, _body_schema(method, pattern)) for method, pattern, _handler in ROUTES]

_junk_scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2**65), 2**65), st.floats(allow_nan=False),
                         st.text(max_size=12), st.sampled_from(["", "0", "-1", "2", "2147483648", "true", "null",
                                                                "PT1H", "P1Y", "-PT1S", "P99999999999D"]))
_junk = st.recursive(_junk_scalar, lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)


_HINTS: dict[str, st.SearchStrategy[Any]] = {
    "id": st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True),
    "poolId": st.sampled_from([POOL, "no-such-pool"]),
    "commandLine": st.sampled_from(["true", "/bin/sh -c 'echo hi'", "", "'unbalanced"]),
    "vmSize": st.just("standard_d2s_v3"),
    "numberOfInstances": st.integers(-1, 4),
    "targetDedicatedNodes": st.integers(-1, 3),
    "targetLowPriorityNodes": st.integers(-1, 3),
}
"""Values that make a created resource likely enough that what follows a successful create gets exercised too."""


def _resolve(schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = DEFS[schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def from_schema(schema: dict[str, Any], depth: int = 0) -> st.SearchStrategy[Any]:
    """Values shaped like ``schema`` most of the time, anything else now and then."""
    schema = _resolve(schema)
    kind = schema.get("type", "object")
    if kind == "string":
        if "enum" in schema:
            good: st.SearchStrategy[Any] = st.sampled_from(schema["enum"])
        elif schema.get("format") == "duration":
            good = st.sampled_from(["PT1H", "PT0S", "P1D", "PT01H00M00S", "P10675199DT2H48M5.4775807S", "P1Y",
                                    "-PT5M", "PT", "P1DT", "1 hour"])
        else:
            good = st.text(max_size=20) | st.sampled_from([POOL, JOB, TASK, "x" * 70, "a b", "../up", "/abs"])
    elif kind == "integer":
        good = st.integers(-3, 5) | st.sampled_from([0, -1, 2**31 - 1, 2**31, -(2**31), 2**63, 1000, 1001]) \
            | st.integers(-3, 5).map(str)
    elif kind == "number":
        good = st.floats(allow_nan=False, allow_infinity=False) | st.integers(-5, 5)
    elif kind == "boolean":
        good = st.booleans() | st.sampled_from(["true", "false", "yes"])
    elif kind == "array":
        if depth > 3:
            return st.just([])
        good = st.lists(from_schema(schema.get("items", {}), depth + 1), max_size=3)
    else:
        props = schema.get("properties", {})
        if depth > 3 or not props:
            return st.just({})
        required = [k for k in schema.get("required", ()) if k in props]
        optional = {k: v for k, v in props.items() if k not in required and not v.get("readOnly")}
        def prop(name: str, sub: dict[str, Any]) -> st.SearchStrategy[Any]:
            hint = _HINTS.get(name)
            generated = st.deferred(lambda: from_schema(sub, depth + 1))
            return st.one_of(hint, hint, hint, generated) if hint is not None else generated

        good = st.fixed_dictionaries({k: prop(k, props[k]) for k in required},
                                     optional={k: prop(k, v) for k, v in list(optional.items())[:25]})
    return st.one_of(*[good] * 14, _junk) if depth else good


def _ids(pattern: tuple[str, ...]) -> st.SearchStrategy[list[str]]:
    live = {"pools": POOL, "jobs": JOB, "tasks": TASK, "nodes": NODE}
    parts = []
    prev = ""
    for part in pattern:
        if part == "*":
            known = live.get(prev, "x")
            parts.append(st.one_of(*[st.just(known)] * 6, st.just(known.upper()), st.text(min_size=1, max_size=20)))
        elif part == "**":
            parts.append(st.one_of(*[st.sampled_from(["stdout.txt", "wd/out.txt", "wd", "../etc/passwd", "%2e%2e",
                                                      "a\\b"])] * 3, st.text(min_size=1, max_size=30)))
        prev = part
    return st.tuples(*parts).map(list) if parts else st.just([])


def _path(pattern: tuple[str, ...], ids: list[str]) -> str:
    it = iter(ids)
    return "/" + "/".join(quote(next(it), safe="") if p in ("*", "**") else p for p in pattern)


_date = st.sampled_from(["Thu, 01 Jan 2026 00:00:00 GMT", "Fri, 01 Jan 2100 00:00:00 GMT", "yesterday", ""])
_conditional = st.sampled_from(["If-Match", "If-None-Match", "If-Modified-Since", "If-Unmodified-Since"])
_any_headers = st.fixed_dictionaries({}, optional={
    "If-Match": st.sampled_from(["*", "0x8D0", '"0x8D1"', ""]), "If-None-Match": st.sampled_from(["*", "0x8D0"]),
    "If-Modified-Since": _date, "If-Unmodified-Since": _date,
    "ocp-range": st.sampled_from(["bytes=0-10", "bytes=-5", "bytes=5-", "bytes=9-1", "bytes=x", "items=0-1"]),
    "client-request-id": st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=40),
    "return-client-request-id": st.sampled_from(["true", "false", "maybe"]),
    "Content-Type": st.sampled_from(["application/json", "text/plain", "application/json; odata=minimalmetadata"]),
})
_one_condition = st.tuples(_conditional, st.sampled_from(["*", "0x8D0", "Thu, 01 Jan 2026 00:00:00 GMT",
                                                          "Fri, 01 Jan 2100 00:00:00 GMT", "yesterday"])).map(
    lambda kv: {kv[0]: kv[1]})
_headers = st.one_of(*[st.just({})] * 6, _one_condition, _one_condition, _any_headers)
_query = st.fixed_dictionaries({"api-version": st.sampled_from(["2025-06-01"] * 20 + ["2024-02-01.19.0", "2099-01-01",
                                                                                       "", "latest"])},
                               optional={"maxresults": st.sampled_from(["1", "0", "1001", "x", "-1"]),
                                         "$filter": st.sampled_from(["state eq 'active'", "id eq", "(", "x gt 1",
                                                                     "startswith(id,'fz')", "not not"]),
                                         "$select": st.sampled_from(["id,state", "", ",,"]),
                                         "$skiptoken": st.sampled_from(["0", "5", "x", "-1"]),
                                         "recursive": st.sampled_from(["true", "false", "2"]),
                                         "timeOut": st.sampled_from(["30", "x"])})


@st.composite
def requests_(draw: st.DrawFn) -> tuple[str, str, dict[str, str], dict[str, str], bytes | None]:
    method, pattern, schema = draw(st.sampled_from(OPERATIONS))
    path = _path(pattern, draw(_ids(pattern)))
    body: bytes | None = None
    if method in ("POST", "PUT", "PATCH"):
        choice = draw(st.integers(0, 9))
        if schema is not None and choice < 7:
            body = json.dumps(draw(from_schema(schema))).encode()
        elif choice < 9:
            body = json.dumps(draw(_junk)).encode()
        else:
            body = draw(st.binary(max_size=60))
    return method, path, draw(_query), draw(_headers), body


def send(endpoint: str, method: str, path: str, query: dict[str, str], headers: dict[str, str],
         body: bytes | None) -> tuple[int, dict[str, str], bytes]:
    raw_query = urlencode(query, quote_via=quote)
    hdrs = {k.lower(): v for k, v in headers.items()}
    hdrs["ocp-date"] = formatdate(usegmt=True)
    if body is not None:
        hdrs["content-length"] = str(len(body))
    text = string_to_sign(method, path, raw_query, hdrs, defaults.ACCOUNT)
    hdrs["authorization"] = f"SharedKey {defaults.ACCOUNT}:{sign(base64.b64decode(defaults.KEY), text)}"
    host, port = urlsplit(endpoint).netloc.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=15)  # no answer in 15 s fails the example
    try:
        conn.request(method, f"{path}?{raw_query}", body=body, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def check_answer(method: str, status: int, headers: dict[str, str], body: bytes, what: str) -> None:
    assert status < 500, f"{status} for {what}: {body[:500]!r}"
    assert "request-id" in headers, what
    if status >= 400 and method != "HEAD":
        assert headers.get("content-type", "").startswith("application/json"), (what, headers)
        err = json.loads(body)
        assert isinstance(err.get("code"), str) and err["code"], (what, err)
        assert isinstance(err.get("message"), dict) and set(err["message"]) == {"lang", "value"}, (what, err)


def ensure_live(emu) -> None:
    """The resources the fuzzer's ids point at, as they were (an earlier example may have deleted, terminated or
    resized them)."""
    pool = emu.raw("GET", f"/pools/{POOL}")
    if pool.status_code != 200 or pool.json().get("allocationState") != "steady":
        emu.raw("DELETE", f"/pools/{POOL}")
        emu.raw("POST", "/pools", json_body={"id": POOL, "vmSize": "standard_d2s_v3"})
    job = emu.raw("GET", f"/jobs/{JOB}")
    if job.status_code != 200 or job.json().get("state") != "active":
        emu.raw("DELETE", f"/jobs/{JOB}")
        emu.raw("POST", "/jobs", json_body={"id": JOB, "poolInfo": {"poolId": POOL}})
    emu.raw("POST", f"/jobs/{JOB}/tasks", json_body={"id": TASK, "commandLine": "true"})


@settings(max_examples=600, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(req=requests_())
def test_every_operation_answers_like_batch(wire_emulator, req):
    method, path, query, headers, body = req
    ensure_live(wire_emulator)
    status, resp_headers, resp_body = send(wire_emulator.endpoint, method, path, query, headers, body)
    check_answer(method, status, resp_headers, resp_body, f"{method} {path} {query} {headers} {body!r:.300}")
