"""Bad requests get Batch's 4xx error bodies naming the field; never a 500 (fuzzed with hypothesis)."""

from __future__ import annotations

import json
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def job(wire_emulator):
    job_id = f"val-{uuid.uuid4().hex[:8]}"
    resp = wire_emulator.raw("POST", "/jobs", json_body={"id": job_id, "poolInfo": {"poolId": "p"}})
    assert resp.status_code == 201
    return job_id


def error(resp, status: int, code: str) -> dict[str, str]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["code"] == code, body
    assert set(body["message"]) == {"lang", "value"}
    return {v["key"]: v["value"] for v in body.get("values", [])}


def add(emu, job, body):
    return emu.raw("POST", f"/jobs/{job}/tasks", json_body=body)


def test_malformed_json(wire_emulator, job):
    resp = wire_emulator.raw("POST", f"/jobs/{job}/tasks", data=b'{"id": "x", ',
                             headers={"Content-Type": "application/json; odata=minimalmetadata"})
    assert "not valid JSON" in error(resp, 400, "InvalidRequestBody")["Reason"]
    assert error(add(wire_emulator, job, ["not", "an", "object"]), 400, "InvalidRequestBody")


@pytest.mark.parametrize(("body", "code", "field"), [
    ({"id": "x"}, "MissingRequiredProperty", "commandLine"),
    ({"commandLine": "true"}, "MissingRequiredProperty", "id"),
    ({"id": "a" * 65, "commandLine": "true"}, "InvalidPropertyValue", "id"),
    ({"id": "has space", "commandLine": "true"}, "InvalidPropertyValue", "id"),
    ({"id": "dot.ted", "commandLine": "true"}, "InvalidPropertyValue", "id"),
    ({"id": "x", "commandLine": "true", "displayName": "d" * 1025}, "InvalidPropertyValue", "displayName"),
    ({"id": "x", "commandLine": "true", "requiredSlots": 2,
      "multiInstanceSettings": {"numberOfInstances": 2, "coordinationCommandLine": "true"}},
     "InvalidPropertyValue", "requiredSlots"),
    ({"id": "x", "commandLine": "true", "multiInstanceSettings": {"numberOfInstances": 2}},
     "MissingRequiredProperty", "multiInstanceSettings.coordinationCommandLine"),
    ({"id": "x", "commandLine": "true", "multiInstanceSettings": {"numberOfInstances": 0,
                                                                  "coordinationCommandLine": "c"}},
     "InvalidPropertyValue", "multiInstanceSettings.numberOfInstances"),
    ({"id": "x", "commandLine": "true", "requiredSlots": "one"}, "InvalidPropertyValue", "requiredSlots"),
    ({"id": "x", "commandLine": 5}, "InvalidPropertyValue", "commandLine"),
    ({"id": "x", "commandLine": "true", "constraints": {"maxWallClockTime": "1 hour"}},
     "InvalidPropertyValue", "constraints.maxWallClockTime"),
    ({"id": "x", "commandLine": "true", "constraints": {"maxTaskRetryCount": -2}},
     "InvalidConstraintValue", "constraints.maxTaskRetryCount"),
    ({"id": "x", "commandLine": "true", "environmentSettings": [{"value": "v"}]},
     "MissingRequiredProperty", "environmentSettings[0].name"),
    ({"id": "x", "commandLine": "true", "resourceFiles": [{"httpUrl": "http://a/b", "storageContainerUrl": "c"}]},
     "InvalidPropertyValue", "resourceFiles[0]"),
    ({"id": "x", "commandLine": "true", "resourceFiles": [{"httpUrl": "http://a/b", "filePath": "../up"}]},
     "InvalidPropertyValue", "resourceFiles[0].filePath"),
])
def test_bad_task_bodies_name_the_field(wire_emulator, job, body, code, field):
    assert error(add(wire_emulator, job, body), 400, code)["PropertyName"] == field
    assert wire_emulator.raw("GET", f"/jobs/{job}/tasks/x").status_code == 404


def test_oversized_resource_files_and_bodies(wire_emulator, job):
    files = [{"httpUrl": f"http://storage.example/c/{'f' * 200}{i}", "filePath": f"in/{i}"} for i in range(300)]
    resp = add(wire_emulator, job, {"id": "big", "commandLine": "true", "resourceFiles": files})
    assert error(resp, 413, "RequestEntityTooLarge")
    huge = {"id": "huge", "commandLine": "x" * (1024 * 1024 + 10)}
    assert error(add(wire_emulator, job, huge), 413, "RequestBodyTooLarge")
    many = {"value": [{"id": f"m{i}", "commandLine": "true"} for i in range(101)]}
    resp = wire_emulator.raw("POST", f"/jobs/{job}/addtaskcollection", json_body=many)
    assert error(resp, 400, "InvalidPropertyValue")["PropertyName"] == "value"
    assert wire_emulator.raw("GET", f"/jobs/{job}/tasks/m0").status_code == 404


def test_bad_queries_and_uris(wire_emulator, job):
    assert error(wire_emulator.raw("GET", f"/jobs/{job}/tasks", params={"maxresults": "0"}), 400,
                 "OutOfRangeQueryParameterValue")["QueryParameterName"] == "maxresults"
    assert error(wire_emulator.raw("GET", f"/jobs/{job}/tasks", params={"maxresults": "many"}), 400,
                 "InvalidQueryParameterValue")["QueryParameterName"] == "maxresults"
    assert error(wire_emulator.raw("GET", f"/jobs/{job}/tasks", params={"$filter": "state eq"}), 400,
                 "InvalidQueryParameterValue")["QueryParameterName"] == "$filter"
    assert error(wire_emulator.raw("GET", f"/jobs/{job}/tasks", params={"$skiptoken": "zz"}), 400,
                 "InvalidQueryParameterValue")
    assert error(wire_emulator.raw("GET", "/nonsense"), 400, "InvalidUri")["UriPath"] == "/nonsense"
    error(wire_emulator.raw("PUT", "/jobs"), 405, "UnsupportedHttpVerb")
    assert error(wire_emulator.raw("GET", "/jobs", params={"api-version": "latest"}), 400,
                 "UnsupportedRequestVersion")["QueryParameterValue"] == "latest"
    assert wire_emulator.raw("GET", "/jobs", params={"api-version": "2024-07-01.20.0"}).status_code == 200


def test_pool_and_job_validation(wire_emulator):
    assert error(wire_emulator.raw("POST", "/pools", json_body={"id": "p"}), 400,
                 "MissingRequiredProperty")["PropertyName"] == "vmSize"
    assert error(wire_emulator.raw("POST", "/pools", json_body={"id": "p", "vmSize": "s",
                                                                "targetDedicatedNodes": -1}), 400,
                 "InvalidPropertyValue")["PropertyName"] == "targetDedicatedNodes"
    assert error(wire_emulator.raw("POST", "/jobs", json_body={"id": "j"}), 400,
                 "MissingRequiredProperty")["PropertyName"] == "poolInfo"
    assert error(wire_emulator.raw("POST", "/jobs", json_body={"id": "j", "poolInfo": {"poolId": "p"},
                                                               "priority": 1001}), 400,
                 "OutOfRangePriority")["PropertyName"] == "priority"
    error(wire_emulator.raw("POST", "/pools/nope/resize", json_body={"targetDedicatedNodes": 1}), 404,
          "PoolNotFound")


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12)
_task_like = st.fixed_dictionaries({}, optional={
    "id": st.text(max_size=70) | _json, "commandLine": st.text(max_size=10) | _json, "displayName": _json,
    "requiredSlots": _json, "multiInstanceSettings": _json, "resourceFiles": _json, "constraints": _json,
    "environmentSettings": _json, "outputFiles": _json, "containerSettings": _json})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=_task_like | _json)
def test_fuzzed_task_bodies_never_500(wire_emulator, job, body):
    resp = add(wire_emulator, job, body)
    assert resp.status_code in (201, 400, 409, 413), resp.text
    if resp.status_code != 201:
        assert resp.json()["code"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200), path=st.text(max_size=30))
def test_fuzzed_raw_bytes_and_paths_never_500(wire_emulator, job, raw, path):
    from urllib.parse import quote

    resp = wire_emulator.raw("POST", f"/jobs/{job}/addtaskcollection", data=raw,
                             headers={"Content-Type": "application/json"})
    assert resp.status_code in (200, 400, 413), resp.text
    resp = wire_emulator.raw("GET", f"/jobs/{job}/tasks/{quote(path, safe='')}/files/{quote(path, safe='')}")
    assert resp.status_code in (400, 404), resp.text
    json.dumps(resp.json())


_pool_like = st.fixed_dictionaries({}, optional={
    "id": st.text(max_size=70) | _json, "vmSize": _json, "targetDedicatedNodes": _json, "taskSlotsPerNode": _json,
    "enableInterNodeCommunication": _json, "startTask": _json, "virtualMachineConfiguration": _json})
_job_like = st.fixed_dictionaries({}, optional={
    "id": st.text(max_size=70) | _json, "poolInfo": _json | st.fixed_dictionaries({"poolId": _json}),
    "constraints": _json, "priority": _json, "onAllTasksComplete": _json, "commonEnvironmentSettings": _json})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pool=_pool_like | _json, job_body=_job_like | _json, group=_json | st.fixed_dictionaries({"value": _json}))
def test_fuzzed_pool_job_collection_bodies_never_500(wire_emulator, job, pool, job_body, group):
    # no "--no-execute" pool ever runs, so whatever is accepted is harmless
    assert wire_emulator.raw("POST", "/pools", json_body=pool).status_code in (201, 400, 409, 413)
    assert wire_emulator.raw("POST", "/jobs", json_body=job_body).status_code in (201, 400, 409, 413)
    resp = wire_emulator.raw("POST", f"/jobs/{job}/addtaskcollection", json_body=group)
    assert resp.status_code in (200, 400, 413), resp.text
    for path in ("/pools/x/resize", "/jobs/nojob/terminate", "/pools/x"):
        method = "PATCH" if path == "/pools/x" else "POST"
        assert wire_emulator.raw(method, path, json_body=pool).status_code in (202, 200, 400, 404, 409), path


def test_chunked_body_and_bad_content_length(wire_emulator, job):
    import socket
    from urllib.parse import urlsplit

    import requests
    from azure.batch._patch import BatchSharedKeyAuthPolicy
    from azure.core.credentials import AzureNamedKeyCredential
    from azure.core.pipeline import PipelineContext, PipelineRequest
    from azure.core.rest import HttpRequest

    url = f"{wire_emulator.endpoint}/jobs/{job}/tasks?api-version=2025-06-01"
    req = HttpRequest("POST", url, headers={"Content-Type": "application/json; odata=minimalmetadata"})
    BatchSharedKeyAuthPolicy(AzureNamedKeyCredential(wire_emulator.account, wire_emulator.key)).on_request(
        PipelineRequest(req, PipelineContext(None)))
    chunks = iter([b'{"id": "chunked", ', b'"commandLine": "true"}'])
    resp = requests.post(url, headers=dict(req.headers), data=chunks, timeout=30)
    assert resp.status_code == 201, resp.text
    assert resp.request.headers.get("Transfer-Encoding") == "chunked"
    host, port = urlsplit(wire_emulator.endpoint).netloc.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):  # the server closes the connection after this error
            answer += chunk
        answer = answer.decode()
    assert answer.startswith("HTTP/1.1 400") and "InvalidHeaderValue" in answer


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(params=st.dictionaries(st.sampled_from(["maxresults", "$filter", "$select", "$skiptoken", "recursive",
                                               "timeOut", "$expand"]), st.text(max_size=30), max_size=4),
       rng=st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=20),
       date=st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=40).map(str.strip)
       .filter(bool))
def test_fuzzed_queries_and_headers_never_500(wire_emulator, job, params, rng, date):
    for path in (f"/jobs/{job}/tasks", "/jobs", "/pools", f"/jobs/{job}/tasks/nope/files"):
        resp = wire_emulator.raw("GET", path, params=params)
        assert resp.status_code in (200, 400, 404), (path, params, resp.text)
    resp = wire_emulator.raw("GET", f"/jobs/{job}", headers={"ocp-range": rng, "If-Modified-Since": date})
    assert resp.status_code in (200, 304, 400, 412), resp.text
    resp = wire_emulator.raw("GET", "/jobs", headers={"ocp-date": date}, sign=False)
    assert resp.status_code == 403
