"""Pure parts of the emulator's execution half: durations, command lines, the Batch environment, records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mpilaunch.emulator import multiinstance as mi
from mpilaunch.emulator import resourcefiles
from mpilaunch.emulator.nodes.base import Node
from mpilaunch.emulator.records import _finish_subtask, _finish_task
from mpilaunch.emulator.taskrun import Outcome


@pytest.mark.parametrize(("text", "seconds"), [
    ("PT1S", 1), ("PT0.5S", 0.5), ("PT1H30M", 5400), ("P1DT2H", 93600), ("P2D", 172800), ("PT10M5S", 605),
    (None, None), ("P10675199DT2H48M5.4775807S", None),
])
def test_parse_duration(text: str | None, seconds: float | None) -> None:
    assert mi.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "P", "PT", "1H", "PT1X", "P1DT", "-PT1S"])
def test_parse_duration_rejects_garbage_naming_it(text: str) -> None:
    with pytest.raises(ValueError, match="not an ISO-8601 duration"):
        mi.parse_duration(text)


def test_split_command_is_shlex_without_shell() -> None:
    assert mi.split_command("python -c 'print(\"a b\")' --x=$HOME") == ["python", "-c", 'print("a b")', "--x=$HOME"]
    with pytest.raises(ValueError, match="cannot split command line"):
        mi.split_command("echo 'open")
    with pytest.raises(ValueError, match="empty command line"):
        mi.split_command("   ")


def _env(index: int, **kw: object) -> dict[str, str]:
    instances = [mi.Instance(0, "n0", "10.0.0.4"), mi.Instance(1, "n1", "10.0.0.5"), mi.Instance(2, "n2", "10.0.0.6")]
    args: dict[str, object] = dict(
        account="acct", account_url="https://acct.batch", pool_id="p", job_id="j", task_id="t",
        node_root="/mnt/batch/tasks", instances=instances, index=index, primary_port=6000, multi_instance=True,
        job_settings=[{"name": "A", "value": "job"}, {"name": "B", "value": "job"}],
        task_settings=[{"name": "B", "value": "task"}, {"name": "AZ_BATCH_NODE_ID", "value": "spoof"},
                       {"name": "EMPTY"}])
    args.update(kw)
    return mi.instance_env(**args)  # type: ignore[arg-type]


def test_instance_env_of_primary_and_subtask() -> None:
    primary, sub = _env(0), _env(2)
    assert primary["AZ_BATCH_HOST_LIST"] == "10.0.0.4,10.0.0.5,10.0.0.6"
    assert primary["AZ_BATCH_NODE_LIST"] == "10.0.0.4;10.0.0.5;10.0.0.6"
    assert primary["AZ_BATCH_MASTER_NODE"] == sub["AZ_BATCH_MASTER_NODE"] == "10.0.0.4:6000"
    assert (primary["AZ_BATCH_IS_CURRENT_NODE_MASTER"], sub["AZ_BATCH_IS_CURRENT_NODE_MASTER"]) == ("true", "false")
    assert primary["CCP_NODES"] == "3 10.0.0.4 1 10.0.0.5 1 10.0.0.6 1"
    assert primary["AZ_BATCH_TASK_DIR"] == sub["AZ_BATCH_TASK_SHARED_DIR"] == "/mnt/batch/tasks/workitems/j/job-1/t"
    assert primary["AZ_BATCH_TASK_WORKING_DIR"] == "/mnt/batch/tasks/workitems/j/job-1/t/wd"
    assert (primary["AZ_BATCH_NODE_ID"], sub["AZ_BATCH_NODE_ID"]) == ("n0", "n2")  # Batch's value wins
    assert primary["AZ_BATCH_NODE_SHARED_DIR"] == "/mnt/batch/tasks/shared"
    assert primary["AZ_BATCH_NODE_STARTUP_DIR"] == "/mnt/batch/tasks/startup"
    assert primary["AZ_BATCH_NODE_ROOT_DIR"] == "/mnt/batch/tasks"
    assert (primary["A"], primary["B"], primary["EMPTY"]) == ("job", "task", "")
    assert "AZ_BATCH_NODE_COUNT" not in primary  # Azure does not set it; the client does


def test_single_instance_env_has_no_host_list() -> None:
    env = _env(0, multi_instance=False, instances=[mi.Instance(0, "n0", "10.0.0.4")])
    assert not {"AZ_BATCH_HOST_LIST", "AZ_BATCH_MASTER_NODE", "CCP_NODES", "AZ_BATCH_TASK_SHARED_DIR"} & set(env)


def test_multi_instance_blocker_names_the_reason() -> None:
    pool = {"id": "p", "enableInterNodeCommunication": True, "taskSlotsPerNode": 1, "targetDedicatedNodes": 3}
    task = {"id": "t", "multiInstanceSettings": {"numberOfInstances": 3}}
    assert mi.multi_instance_blocker(pool, task) is None
    assert "enableInterNodeCommunication" in str(mi.multi_instance_blocker(
        pool | {"enableInterNodeCommunication": False}, task))
    assert "taskSlotsPerNode=2" in str(mi.multi_instance_blocker(pool | {"taskSlotsPerNode": 2}, task))
    assert "requiredSlots=2" in str(mi.multi_instance_blocker(pool, task | {"requiredSlots": 2}))
    assert "needs 4 nodes" in str(mi.multi_instance_blocker(pool, {"id": "t", "multiInstanceSettings": {
        "numberOfInstances": 4}}))


def test_node_info_matches_the_spec_example_shape() -> None:
    info = mi.node_info(account_url="https://a.b/", pool_id="mpiPool", node_id="tvm-1", task_rel="workitems/j/job-1/t")
    assert info == {
        "affinityId": "TVM:tvm-1", "nodeUrl": "https://a.b/pools/mpiPool/nodes/tvm-1", "poolId": "mpiPool",
        "nodeId": "tvm-1", "taskRootDirectory": "workitems/j/job-1/t",
        "taskRootDirectoryUrl": "https://a.b/pools/mpiPool/nodes/tvm-1/files/workitems/j/job-1/t"}


def test_node_json_round_trip_and_path_mapping(tmp_path: Path) -> None:
    node = Node("n", "p", "127.0.3.4", "n", tmp_path, "/mnt/batch/tasks", {"isolated": "1"})
    assert Node.from_json(node.to_json()) == node
    assert node.node_path(tmp_path / "workitems" / "j") == "/mnt/batch/tasks/workitems/j"
    assert node.node_path(tmp_path) == "/mnt/batch/tasks"
    with pytest.raises(ValueError):
        node.node_path(Path("/elsewhere"))


def test_finish_task_retries_until_the_limit_then_completes() -> None:
    doc: dict[str, Any] = {"id": "t", "state": "running", "executionInfo": {"retryCount": 0, "requeueCount": 0}}
    failed = Outcome(kind="failure", exit_code=3, failure=mi.exit_failure(3, "x"))
    _finish_task(doc, failed, 1, "T1")
    assert (doc["state"], doc["executionInfo"]["retryCount"], doc["executionInfo"]["lastRetryTime"]) == (
        "active", 1, "T1")
    doc["state"] = "running"
    _finish_task(doc, failed, 1, "T2")
    assert (doc["state"], doc["executionInfo"]["retryCount"], doc["executionInfo"]["exitCode"]) == ("completed", 1, 3)
    assert doc["executionInfo"]["result"] == "failure"


def test_finish_task_requeue_and_unlimited_retries() -> None:
    doc: dict[str, Any] = {"id": "t", "state": "running", "executionInfo": {"retryCount": 7, "requeueCount": 0}}
    _finish_task(doc, Outcome(kind="requeue"), 0, "T")
    assert (doc["state"], doc["executionInfo"]["requeueCount"], doc["executionInfo"]["retryCount"]) == (
        "active", 1, 7)
    doc["state"] = "running"
    _finish_task(doc, Outcome(kind="failure", exit_code=1, failure={"category": "usererror"}), -1, "T")
    assert doc["state"] == "active" and doc["executionInfo"]["retryCount"] == 8


def test_finish_subtask_marks_killed_instances_as_ended() -> None:
    outcome = Outcome(kind="failure", codes={1: 0, 2: 9}, failures={2: mi.exit_failure(9, "c")})
    docs: list[dict[str, Any]] = [{"id": i, "state": "running"} for i in (1, 2, 3)]
    for doc in docs:
        _finish_subtask(doc, doc["id"], outcome, "T")
    ok, bad, killed = docs
    assert (ok["result"], ok["exitCode"], ok["state"], ok["previousState"]) == ("success", 0, "completed", "running")
    assert (bad["result"], bad["exitCode"], bad["failureInfo"]["code"]) == ("failure", 9, "FailureExitCode")
    assert (killed["result"], killed["failureInfo"]["code"], "exitCode" in killed) == ("failure", "TaskEnded", False)


def test_resource_file_paths_must_stay_inside(tmp_path: Path) -> None:
    for bad in ("../x", "/etc/passwd", "a/../../b"):
        with pytest.raises(resourcefiles.TransferError, match="must be relative"):
            resourcefiles.download([{"httpUrl": "http://127.0.0.1:1/x", "filePath": bad}], tmp_path)
    with pytest.raises(resourcefiles.TransferError, match="needs a filePath"):
        resourcefiles.download([{"httpUrl": "http://127.0.0.1:1/x?sig=SECRET"}], tmp_path)
    with pytest.raises(resourcefiles.TransferError, match="unsupported URL scheme") as err:
        resourcefiles.download([{"httpUrl": "file:///etc/passwd?sig=SECRET", "filePath": "x"}], tmp_path)
    assert "SECRET" not in str(err.value)
    with pytest.raises(resourcefiles.TransferError) as err:
        resourcefiles.download([{"autoStorageContainerName": "c"}], tmp_path)
    assert err.value.code == "UnsupportedResourceFile"
