"""Results from Batch task/subtask models (pure): rows, summary, table, JSON schema."""

from __future__ import annotations

import io
import json
from typing import Any

import jsonschema
from azure.batch import models as bm
from rich.console import Console

from mpilaunch.client.results import SCHEMA_PATH, build_results, node_file_path, render_table

T0 = "2030-01-01T10:00:00Z"
T1 = "2030-01-01T10:00:05.5Z"


def node(i: int) -> dict[str, Any]:
    return {"nodeId": f"node-{i}", "poolId": "p", "taskRootDirectory": f"\\workitems\\j\\job-1\\t\\{i}"}


def task(result: str = "failure", exit_code: int = 1) -> bm.BatchTask:
    return bm.BatchTask({
        "id": "t", "state": "completed", "nodeInfo": node(0),
        "executionInfo": {"startTime": T0, "endTime": T1, "exitCode": exit_code, "result": result,
                          "retryCount": 0, "requeueCount": 0}})


def subtasks(bad: int | None = 2) -> list[bm.BatchSubtask]:
    subs = []
    for i in (2, 1):  # out of order on purpose
        failed = i == bad
        d: dict[str, Any] = {"id": i, "state": "completed", "nodeInfo": node(i), "startTime": T0, "endTime": T1,
                             "exitCode": 3 if failed else 0, "result": "failure" if failed else "success"}
        if failed:
            d["failureInfo"] = {"category": "usererror", "code": "FailureExitCode",
                                "message": "The task process exited with an unexpected exit code"}
        subs.append(bm.BatchSubtask(d))
    return subs


def test_rows_ordered_primary_first_with_failure() -> None:
    res = build_results("j", task(), subtasks())
    assert [r.instance for r in res.instances] == [0, 1, 2]
    assert res.instances[2].exit_code == 3 and res.instances[2].duration == 5.5
    assert not res.succeeded and [r.instance for r in res.failed_instances()] == [0, 2]
    assert "instance 2 on node-2: exit code 3 (FailureExitCode: The task process" in res.summary()


def test_success_and_primary_listed_as_subtask_zero() -> None:
    zero = bm.BatchSubtask({"id": 0, "state": "completed", "nodeInfo": node(0)})
    res = build_results("j", task("success", 0), [*subtasks(None), zero])
    assert res.succeeded and len(res.instances) == 3
    assert res.summary() == "task j/t: completed, success on 3 instance(s)"


def test_json_is_valid_against_the_documented_schema() -> None:
    schema = json.loads(SCHEMA_PATH.read_text())
    for res in (build_results("j", task(), subtasks()),
                build_results("j", bm.BatchTask({"id": "t", "state": "active"}), [])):
        doc = res.to_json()
        jsonschema.validate(doc, schema)
        assert doc["instances"][0]["primary"] is True
    doc = build_results("j", task(), subtasks()).to_json()
    assert doc["instances"][2]["failure"]["code"] == "FailureExitCode"
    assert doc["instances"][1]["start_time"] == "2030-01-01T10:00:00+00:00"


def test_table_shows_every_instance() -> None:
    out = io.StringIO()
    Console(file=out, width=200).print(render_table(build_results("j", task(), subtasks())))
    text = out.getvalue()
    assert "0 (primary)" in text and "node-2" in text and "FailureExitCode" in text and "5.5s" in text


def test_node_file_path() -> None:
    assert node_file_path("\\workitems\\j\\job-1\\t\\1", "stdout.txt") == "workitems/j/job-1/t/1/stdout.txt"
    assert node_file_path("/workitems/j/job-1/t", "stderr.txt") == "workitems/j/job-1/t/stderr.txt"
