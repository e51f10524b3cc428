"""Batch's documented semantics on the wire: conditional headers (one at a time, two allowed pairs, every read of an
entity, HEAD included), replace operations (PUT task, PUT job, pool updateproperties) that reset what they leave out,
and the checks at the door (nulls, pool size, string integers as azure-cli sends them, durations)."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest

pytestmark = pytest.mark.timeout(120)


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def error(resp, status: int, code: str) -> dict[str, str]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["code"] == code, body
    return {v["key"]: v["value"] for v in body.get("values", [])}


def http_date(delta: timedelta) -> str:
    return format_datetime(datetime.now(timezone.utc) + delta, usegmt=True)


@pytest.fixture
def job(wire_emulator):
    job_id = uid("sem")
    resp = wire_emulator.raw("POST", "/jobs", json_body={"id": job_id, "poolInfo": {"poolId": "p"},
                                                         "constraints": {"maxTaskRetryCount": 2}})
    assert resp.status_code == 201, resp.text
    return job_id


@pytest.fixture
def pool(wire_emulator):
    pool_id = uid("sempool")
    resp = wire_emulator.raw("POST", "/pools", json_body={"id": pool_id, "vmSize": "s", "metadata": [
        {"name": "a", "value": "b"}], "startTask": {"commandLine": "true"}})
    assert resp.status_code == 201, resp.text
    return pool_id


# --- conditional headers ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [
    {"If-Match": "*", "If-None-Match": "x"},
    {"If-Match": "*", "If-Modified-Since": "Thu, 01 Jan 2026 00:00:00 GMT"},
    {"If-None-Match": "x", "If-Unmodified-Since": "Thu, 01 Jan 2026 00:00:00 GMT"},
    {"If-Modified-Since": "Thu, 01 Jan 2026 00:00:00 GMT", "If-Unmodified-Since": "Thu, 01 Jan 2026 00:00:00 GMT"},
])
def test_two_conditional_headers_are_400_unless_a_documented_pair(wire_emulator, job, headers):
    for method, path in (("GET", f"/jobs/{job}"), ("DELETE", f"/jobs/{job}"), ("GET", "/jobs")):
        error(wire_emulator.raw(method, path, headers=headers), 400, "MultipleConditionHeadersNotSupported")
    assert wire_emulator.raw("GET", f"/jobs/{job}").status_code == 200  # the DELETEs did nothing


def test_documented_pairs_are_decided_by_the_etag_header(wire_emulator, job):
    got = wire_emulator.raw("GET", f"/jobs/{job}")
    etag = got.headers["ETag"]
    past, future = http_date(timedelta(days=-1)), http_date(timedelta(days=1))
    # If-None-Match + If-Modified-Since: If-None-Match decides (the date alone would say 304)
    assert wire_emulator.raw("GET", f"/jobs/{job}", headers={"If-None-Match": "other",
                                                             "If-Modified-Since": future}).status_code == 200
    assert wire_emulator.raw("GET", f"/jobs/{job}", headers={"If-None-Match": etag,
                                                             "If-Modified-Since": past}).status_code == 304
    # If-Match + If-Unmodified-Since: If-Match decides (the date alone would say 412)
    assert wire_emulator.raw("GET", f"/jobs/{job}", headers={"If-Match": etag,
                                                             "If-Unmodified-Since": past}).status_code == 200
    error(wire_emulator.raw("GET", f"/jobs/{job}", headers={"If-Match": "other", "If-Unmodified-Since": future}),
          412, "ConditionNotMet")


def test_read_conditions_on_get_and_head_pool(wire_emulator, pool):
    got = wire_emulator.raw("GET", f"/pools/{pool}")
    etag, modified = got.headers["ETag"], got.headers["Last-Modified"]
    past, future = http_date(timedelta(days=-1)), http_date(timedelta(days=1))
    for method in ("GET", "HEAD"):
        path = f"/pools/{pool}"
        none_match = wire_emulator.raw(method, path, headers={"If-None-Match": etag})
        assert none_match.status_code == 304 and none_match.headers["ETag"] == etag, method
        assert wire_emulator.raw(method, path, headers={"If-None-Match": "0x8D0"}).status_code == 200
        assert wire_emulator.raw(method, path, headers={"If-Match": etag}).status_code == 200
        assert wire_emulator.raw(method, path, headers={"If-Match": "0x8D0"}).status_code == 412, method
        assert wire_emulator.raw(method, path, headers={"If-Modified-Since": modified}).status_code == 304
        assert wire_emulator.raw(method, path, headers={"If-Modified-Since": past}).status_code == 200
        assert wire_emulator.raw(method, path, headers={"If-Unmodified-Since": past}).status_code == 412
        assert wire_emulator.raw(method, path, headers={"If-Unmodified-Since": future}).status_code == 200
    error(wire_emulator.raw("GET", f"/pools/{pool}", headers={"If-Modified-Since": "yesterday"}), 400,
          "InvalidHeaderValue")


def test_task_file_reads_honour_conditions(emulator):
    from azure.batch import models as m

    from tests.support.exec_sdk import completed, make_job, make_pool

    client = emulator.client()
    pool_id = make_pool(client, 1)
    job_id = make_job(client, pool_id)
    try:
        client.create_task(job_id, m.BatchTaskCreateOptions(id="t", command_line="/bin/sh -c 'echo hi'"))
        completed(client, job_id, "t")
        path = f"/jobs/{job_id}/tasks/t/files/stdout.txt"
        got = emulator.raw("GET", path)
        assert got.status_code == 200 and got.content == b"hi\n"
        past, future = http_date(timedelta(days=-1)), http_date(timedelta(days=1))
        for method in ("GET", "HEAD"):
            error_or_head = emulator.raw(method, path, headers={"If-Unmodified-Since": past})
            assert error_or_head.status_code == 412, method
            assert emulator.raw(method, path, headers={"If-Unmodified-Since": future}).status_code == 200
            assert emulator.raw(method, path, headers={"If-Match": got.headers["ETag"]}).status_code == 200
            assert emulator.raw(method, path, headers={"If-Match": "0x8D0"}).status_code == 412
            assert emulator.raw(method, path, headers={"If-None-Match": got.headers["ETag"]}).status_code == 304
        error(emulator.raw("GET", path, headers={"If-Unmodified-Since": past}), 412, "ConditionNotMet")
    finally:
        client.begin_delete_pool(pool_id, polling_interval=0.1).result()


# --- replace operations -----------------------------------------------------------------------------------------

def test_put_task_replaces_constraints(wire_emulator, job):
    assert wire_emulator.raw("POST", f"/jobs/{job}/tasks", json_body={
        "id": "t", "commandLine": "true",
        "constraints": {"maxWallClockTime": "PT1H", "retentionTime": "P1D", "maxTaskRetryCount": 5}}).status_code == 201
    defaults = {"maxWallClockTime": "P10675199DT2H48M5.4775807S", "retentionTime": "P7D", "maxTaskRetryCount": 2}
    resp = wire_emulator.raw("PUT", f"/jobs/{job}/tasks/t", json_body={"constraints": {"maxTaskRetryCount": 1}})
    assert resp.status_code == 200, resp.text
    assert wire_emulator.raw("GET", f"/jobs/{job}/tasks/t").json()["constraints"] == {**defaults,
                                                                                      "maxTaskRetryCount": 1}
    wire_emulator.raw("PUT", f"/jobs/{job}/tasks/t", json_body={"constraints": {"retentionTime": "PT5M"}})
    assert wire_emulator.raw("GET", f"/jobs/{job}/tasks/t").json()["constraints"] == {**defaults,
                                                                                      "retentionTime": "PT5M"}
    assert wire_emulator.raw("PUT", f"/jobs/{job}/tasks/t", json_body={}).status_code == 200
    assert wire_emulator.raw("GET", f"/jobs/{job}/tasks/t").json()["constraints"] == defaults


@pytest.mark.parametrize(("body", "status", "code", "name"), [
    ({"constraints": {"maxTaskRetryCount": -5}}, 400, "InvalidConstraintValue", "constraints.maxTaskRetryCount"),
    ({"constraints": {"maxTaskRetryCount": "many"}}, 400, "InvalidPropertyValue", "constraints.maxTaskRetryCount"),
    ({"constraints": None}, 400, "InvalidPropertyValue", "constraints"),
    ({"constraints": {"maxWallClockTime": "P1Y"}}, 400, "InvalidPropertyValue", "constraints.maxWallClockTime"),
    ({"constraints": []}, 400, "InvalidPropertyValue", "constraints"),
])
def test_put_task_refuses_bad_constraints(wire_emulator, job, body, status, code, name):
    assert wire_emulator.raw("POST", f"/jobs/{job}/tasks", json_body={"id": "t", "commandLine": "true"}
                             ).status_code == 201
    before = wire_emulator.raw("GET", f"/jobs/{job}/tasks/t").json()
    assert error(wire_emulator.raw("PUT", f"/jobs/{job}/tasks/t", json_body=body), status, code)["PropertyName"] == name
    assert wire_emulator.raw("GET", f"/jobs/{job}/tasks/t").json()["eTag"] == before["eTag"]


def test_put_job_replaces_every_updatable_property(wire_emulator, job):
    assert wire_emulator.raw("PATCH", f"/jobs/{job}", json_body={
        "priority": 9, "metadata": [{"name": "k", "value": "v"}], "onAllTasksComplete": "terminatejob"}
    ).status_code == 200
    resp = wire_emulator.raw("PUT", f"/jobs/{job}", json_body={"poolInfo": {"poolId": "other"}, "maxParallelTasks": 3})
    assert resp.status_code == 200, resp.text
    got = wire_emulator.raw("GET", f"/jobs/{job}").json()
    assert got["priority"] == 0 and got["onAllTasksComplete"] == "noaction" and "metadata" not in got
    assert got["maxParallelTasks"] == 3 and got["poolInfo"] == {"poolId": "other"}
    assert got["constraints"] == {"maxWallClockTime": "P10675199DT2H48M5.4775807S", "maxTaskRetryCount": 0}
    assert error(wire_emulator.raw("PUT", f"/jobs/{job}", json_body={"priority": 1}), 400,
                 "MissingRequiredProperty")["PropertyName"] == "poolInfo"


def test_pool_updateproperties_replaces_start_task_and_metadata(wire_emulator, pool):
    resp = wire_emulator.raw("POST", f"/pools/{pool}/updateproperties",
                             json_body={"applicationPackageReferences": [], "metadata": [{"name": "c", "value": "d"}]})
    assert resp.status_code == 204, resp.text
    got = wire_emulator.raw("GET", f"/pools/{pool}").json()
    assert "startTask" not in got and got["metadata"] == [{"name": "c", "value": "d"}]
    assert error(wire_emulator.raw("POST", f"/pools/{pool}/updateproperties", json_body={"metadata": []}), 400,
                 "MissingRequiredProperty")["PropertyName"] == "applicationPackageReferences"


# --- the door ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("method", "path", "body", "code", "name"), [
    ("POST", "/jobs/{job}/tasks", {"id": "rf", "commandLine": "true", "resourceFiles": [None]},
     "InvalidPropertyValue", "resourceFiles[0]"),
    ("POST", "/jobs/{job}/tasks", {"id": "ev", "commandLine": "true", "environmentSettings": [None]},
     "InvalidPropertyValue", "environmentSettings[0]"),
    ("PATCH", "/jobs/{job}", {"constraints": None}, "InvalidPropertyValue", "constraints"),
    ("PATCH", "/jobs/{job}", {"poolInfo": None}, "InvalidPropertyValue", "poolInfo"),
    ("PATCH", "/jobs/{job}", {"constraints": {"maxTaskRetryCount": -7}}, "InvalidConstraintValue",
     "constraints.maxTaskRetryCount"),
    ("PATCH", "/jobs/{job}", {"poolInfo": {"autoPoolSpecification": {"poolLifetimeOption": "job"}}},
     "InvalidPropertyValue", "poolInfo.autoPoolSpecification"),
    ("POST", "/pools", {"id": "vmnull", "vmSize": "s", "virtualMachineConfiguration": None}, "InvalidPropertyValue",
     "virtualMachineConfiguration"),
    ("PATCH", "/pools/{pool}", {"virtualMachineConfiguration": None}, "InvalidPropertyValue",
     "virtualMachineConfiguration"),
    ("PATCH", "/pools/{pool}", {"startTask": None}, "InvalidPropertyValue", "startTask"),
    ("POST", "/pools", {"id": "huge", "vmSize": "s", "targetDedicatedNodes": 2**31 - 1}, "InvalidPropertyValue",
     "targetDedicatedNodes"),
    ("POST", "/pools", {"id": "huge2", "vmSize": "s", "targetDedicatedNodes": 600, "targetLowPriorityNodes": 600},
     "InvalidPropertyValue", "targetDedicatedNodes"),
    ("POST", "/pools", {"id": "huge3", "vmSize": "s", "targetDedicatedNodes": 2**40}, "InvalidPropertyValue",
     "targetDedicatedNodes"),
    ("POST", "/pools/{pool}/resize", {"targetLowPriorityNodes": 1001}, "InvalidPropertyValue",
     "targetLowPriorityNodes"),
    ("POST", "/pools", {"id": "slots", "vmSize": "s", "taskSlotsPerNode": 257}, "InvalidPropertyValue",
     "taskSlotsPerNode"),
    ("POST", "/jobs/{job}/tasks", {"id": "mi", "commandLine": "true", "multiInstanceSettings": {
        "numberOfInstances": 100000, "coordinationCommandLine": "true"}}, "InvalidPropertyValue",
     "multiInstanceSettings.numberOfInstances"),
    ("POST", "/jobs/{job}/tasks", {"id": "wall", "commandLine": "true", "constraints": {"maxWallClockTime": "-PT1H"}},
     "InvalidPropertyValue", "constraints.maxWallClockTime"),
])
def test_refused_at_the_door(wire_emulator, job, pool, method, path, body, code, name):
    resp = wire_emulator.raw(method, path.format(job=job, pool=pool), json_body=body)
    assert error(resp, 400, code)["PropertyName"] == name


def test_null_properties_count_as_left_out(wire_emulator, job):
    resp = wire_emulator.raw("POST", f"/jobs/{job}/tasks", json_body={
        "id": "nulls", "commandLine": "true", "displayName": None, "constraints": None, "resourceFiles": None})
    assert resp.status_code == 201, resp.text
    got = wire_emulator.raw("GET", f"/jobs/{job}/tasks/nulls").json()
    assert "displayName" not in got and "resourceFiles" not in got and got["constraints"]["maxTaskRetryCount"] == 2


def test_string_integers_and_booleans_as_azure_cli_sends_them(wire_emulator, job):
    pool_id = uid("clipool")
    resp = wire_emulator.raw("POST", "/pools", json_body={
        "id": pool_id, "vmSize": "s", "targetDedicatedNodes": "0", "taskSlotsPerNode": "2",
        "enableInterNodeCommunication": "true"})
    assert resp.status_code == 201, resp.text
    got = wire_emulator.raw("GET", f"/pools/{pool_id}").json()
    assert (got["targetDedicatedNodes"], got["taskSlotsPerNode"], got["enableInterNodeCommunication"]) == (0, 2, True)
    resp = wire_emulator.raw("POST", f"/jobs/{job}/tasks", json_body={
        "id": "cli", "commandLine": "true",
        "constraints": {"maxWallClockTime": "PT01H00M00S", "maxTaskRetryCount": "3"}})
    assert resp.status_code == 201, resp.text
    assert wire_emulator.raw("GET", f"/jobs/{job}/tasks/cli").json()["constraints"]["maxTaskRetryCount"] == 3
    assert wire_emulator.raw("POST", f"/pools/{pool_id}/resize", json_body={"targetDedicatedNodes": "3"}
                             ).status_code == 202
    for bad in ("2.5", "two", "", "1e3", "99999999999999999999"):
        resp = wire_emulator.raw("POST", "/pools", json_body={"id": uid("bad"), "vmSize": "s",
                                                              "targetDedicatedNodes": bad})
        assert error(resp, 400, "InvalidPropertyValue")["PropertyName"] == "targetDedicatedNodes", bad


def test_lists_show_every_change_at_once(wire_emulator, job):
    """Lists are served from a cache of serialized pages and docs: any committed change shows in the next list."""
    for i in range(3):
        assert wire_emulator.raw("POST", f"/jobs/{job}/tasks", json_body={"id": f"l{i}", "commandLine": "true"}
                                 ).status_code == 201
    for n in range(5):
        wire_emulator.raw("GET", f"/jobs/{job}/tasks")  # cached
        assert wire_emulator.raw("PUT", f"/jobs/{job}/tasks/l1", json_body={"constraints": {"maxTaskRetryCount": n}}
                                 ).status_code == 200
        listed = {t["id"]: t for t in wire_emulator.raw("GET", f"/jobs/{job}/tasks").json()["value"]}
        assert listed["l1"]["constraints"]["maxTaskRetryCount"] == n
        assert listed["l1"]["eTag"] == wire_emulator.raw("GET", f"/jobs/{job}/tasks/l1").json()["eTag"]
    assert wire_emulator.raw("DELETE", f"/jobs/{job}/tasks/l2").status_code == 200
    assert [t["id"] for t in wire_emulator.raw("GET", f"/jobs/{job}/tasks").json()["value"]] == ["l0", "l1"]
    paged = wire_emulator.raw("GET", f"/jobs/{job}/tasks", params={"maxresults": "1", "$select": "id"}).json()
    assert paged["value"] == [{"id": "l0"}] and "$skiptoken=" in paged["odata.nextLink"]
