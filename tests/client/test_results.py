"""Results from Batch task/subtask models (pure): rows, summary, table, JSON schema, requeues and node events in
words, the live progress lines."""

from __future__ import annotations

import io
import json
from typing import Any

import jsonschema
import pytest
from azure.batch import models as bm
from rich.console import Console

from mpilaunch.cli.progress import Progress
from mpilaunch.cli.tabulate import render_table
from mpilaunch.client.results import SCHEMA_PATH, build_results, node_file_path

T0 = "2030-01-01T10:00:00Z"
T1 = "2030-01-01T10:00:05.5Z"


def node(i: int) -> dict[str, Any]:
    return {"nodeId": f"node-{i}", "poolId": "p", "taskRootDirectory": f"\\workitems\\j\\job-1\\t\\{i}"}


def task(result: str = "failure", exit_code: int = 1) -> bm.BatchTask:
    return bm.BatchTask({
        "id": "t", "state": "completed", "nodeInfo": node(0),
        "executionInfo": {"startTime": T0, "endTime": T1, "exitCode": exit_code, "result": result,
                          "retryCount": 0, "requeueCount": 0}})


def requeued(state: str = "active", requeues: int = 1, retries: int = 0, max_retries: int = 0) -> bm.BatchTask:
    """A task Batch requeued ``requeues`` times; its node info still names the attempt's primary (node-0)."""
    return bm.BatchTask({
        "id": "t", "state": state, "nodeInfo": node(0), "constraints": {"maxTaskRetryCount": max_retries},
        "executionInfo": {"retryCount": retries, "requeueCount": requeues, "lastRequeueTime": T1}})


def pool_nodes(**states: str) -> list[bm.BatchNode]:
    """List Nodes: node-0..node-3 idle unless ``states`` says otherwise (``node_1="preempted"``); a state of
    ``gone`` leaves the node out."""
    nodes = []
    for i in range(4):
        state = states.get(f"node_{i}", "idle")
        if state != "gone":
            d: dict[str, Any] = {"id": f"node-{i}", "state": state, "isDedicated": i == 0}
            if state == "unusable":
                d["errors"] = [{"code": "NodeLost", "message": "The node went down"}]
            nodes.append(bm.BatchNode(d))
    return nodes


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


def test_a_requeue_names_the_node_it_lost_and_counts_attempts_and_retries() -> None:
    res = build_results("j", requeued(), subtasks(None), pool_nodes(node_1="preempted", node_3="unusable"))
    assert res.attempt == 2
    assert res.notes() == [
        "node node-1 was preempted; the task was requeued (attempt 2, last at 10:00:05); retries used: 0 of 0",
        "pool nodes that cannot run tasks now: node-3 (unusable)"]
    lost = build_results("j", requeued(requeues=2, retries=1, max_retries=-1), [], pool_nodes(node_0="unusable"))
    assert lost.notes() == ["node node-0 went down (NodeLost: The node went down); the task was requeued 2 times "
                            "(attempt 4, last at 10:00:05); retries used: 1 of unlimited"]
    removed = build_results("j", requeued(state="running"), subtasks(None), pool_nodes(node_2="gone"))
    assert removed.notes()[0].startswith("node node-2 was removed from the pool; the task was requeued")
    healed = build_results("j", requeued(state="completed", max_retries=3), [], pool_nodes())
    assert healed.notes() == ["Batch took a node of the task away (lost, preempted, rebooted or removed); the task "
                              "was requeued (attempt 2, last at 10:00:05); retries used: 0 of 3"]


def test_a_node_event_of_a_failed_task_is_said_without_a_requeue() -> None:
    res = build_results("j", task(), subtasks(), pool_nodes(node_2="rebooting"))
    assert res.notes() == ["node node-2 is rebooting"]
    assert build_results("j", task(), subtasks()).notes() == []  # nodes not listed: nothing to say


def test_requeues_and_node_events_in_the_json() -> None:
    schema = json.loads(SCHEMA_PATH.read_text())
    doc = build_results("j", requeued(), subtasks(None), pool_nodes(node_1="preempted", node_3="unusable")).to_json()
    jsonschema.validate(doc, schema)
    assert (doc["requeue_count"], doc["attempt"], doc["max_task_retry_count"], doc["retry_count"]) == (1, 2, 0, 0)
    assert doc["last_requeue_time"] == "2030-01-01T10:00:05.500000+00:00"
    assert doc["node_events"][0] == {"node": "node-1", "state": "preempted", "dedicated": False, "instance": 1,
                                     "errors": [], "description": "node node-1 was preempted"}
    assert doc["node_events"][1]["instance"] is None
    assert doc["node_events"][1]["errors"] == [{"category": None, "code": "NodeLost", "message": "The node went down"}]
    assert doc["notes"][0].startswith("node node-1 was preempted; the task was requeued (attempt 2")
    older = {k: v for k, v in doc.items() if k not in ("max_task_retry_count", "requeue_count", "last_requeue_time",
                                                       "attempt", "node_events", "notes")}
    jsonschema.validate(older, schema)  # documents of earlier clients (schema 1 before requeues) stay valid


def test_progress_says_which_node_a_requeue_took(capsys: pytest.CaptureFixture[str]) -> None:
    running = build_results("j", bm.BatchTask({"id": "t", "state": "running", "nodeInfo": node(0)}),
                            [bm.BatchSubtask({"id": 1, "state": "running", "nodeInfo": node(1)})])
    moved = build_results("j", bm.BatchTask({  # already placed again, on node-0 and node-2
        "id": "t", "state": "running", "nodeInfo": node(0), "constraints": {"maxTaskRetryCount": 0},
        "executionInfo": {"retryCount": 0, "requeueCount": 1}}),
        [bm.BatchSubtask({"id": 1, "state": "running", "nodeInfo": node(2)})], pool_nodes(node_1="preempted"))
    with Progress(enabled=False) as progress:
        for res in (running, moved, moved):
            progress.update(res)
    err = capsys.readouterr().err
    assert err.count("node node-1 was preempted; the task was requeued (attempt 2); retries used: 0 of 0") == 1
    assert "| requeued 1 |" in err


def test_table_title_counts_attempts() -> None:
    out = io.StringIO()
    Console(file=out, width=200).print(render_table(build_results("j", requeued(), [], pool_nodes())))
    assert "attempt=2 (requeued 1, retries used: 0 of 0)" in out.getvalue()
