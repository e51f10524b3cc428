"""What Azure does to nodes, through the unmodified azure-batch 15.1 SDK over HTTP: node loss and preemption requeue
the whole multi-instance task outside maxTaskRetryCount; reboot/reimage/remove nodes/resize down/disable scheduling
with their options; reactivate; pre-processing failures are not retried."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from azure.batch import models as m
from azure.batch.models._models import BatchNodeRebootOptions, BatchNodeReimageOptions  # the SDK takes, unexported
from azure.core.exceptions import HttpResponseError

from tests.support.emulator import RunningEmulator
from tests.support.exec_engine import hang_first_attempt, py, wait_for
from tests.support.exec_sdk import Batch, add_mi_task, completed, uid

pytestmark = pytest.mark.timeout(120)

COUNT_BOOTS = py("import os; d = os.environ['AZ_BATCH_NODE_SHARED_DIR']; "
                 "open(os.path.join(d, 'boots'), 'a').write('x')")
"""A StartTask that appends to ``shared/boots`` on its node: the number of times it ran there."""


def fault(emulator: RunningEmulator, pool_id: str, node_id: str, kind: str, down: float = 0.3) -> Any:
    return emulator.raw("POST", f"/pools/{pool_id}/nodes/{node_id}/mpilaunch-fault",
                        json_body={"fault": kind, "downSeconds": down})


def hanging_task(client: Any, job_id: str, marker: Path, *, instances: int = 2,
                 retries: int = 0) -> tuple[str, list[str]]:
    """A multi-instance task whose first attempt hangs (appending to ``marker``); once its command runs, its id and
    node ids, primary first."""
    task_id = add_mi_task(client, job_id, hang_first_attempt(marker), py("pass"), instances=instances, retries=retries)
    wait_for(marker.exists, 30, "the task's command started")
    task = client.get_task(job_id, task_id)
    subtasks = sorted(client.list_subtasks(job_id, task_id), key=lambda s: s.id)
    return task_id, [task.node_info.node_id, *(s.node_info.node_id for s in subtasks)]


def boots(emulator: RunningEmulator, pool_id: str, node_id: str) -> int:
    root = emulator.data_dir / "nodes" / pool_id / node_id
    return len((root / "shared" / "boots").read_text()) if (root / "shared" / "boots").exists() else 0


def counts(task: Any) -> tuple[Any, int, int]:
    info = task.execution_info
    return info.result, info.retry_count, info.requeue_count


def test_a_killed_node_requeues_the_task_without_using_a_retry(batch: Batch, emulator: RunningEmulator,
                                                               tmp_path: Path) -> None:
    client = batch.client
    pool_id = batch.pool(2)
    job_id = batch.job(pool_id)
    marker = tmp_path / "attempts"
    task_id, nodes = hanging_task(client, job_id, marker)
    victim = nodes[1]

    assert fault(emulator, pool_id, victim, "kill").status_code == 202
    assert client.get_node(pool_id, victim).state == m.BatchNodeState.UNUSABLE  # at once
    task = completed(client, job_id, task_id)
    assert counts(task) == (m.BatchTaskExecutionResult.SUCCESS, 0, 1)
    assert marker.read_text() == "xx"
    node = wait_for(lambda: (n := client.get_node(pool_id, victim)).state == m.BatchNodeState.IDLE and n, 30,
                    "the killed node back")
    assert not node.errors


def test_a_preempted_spot_node_loses_its_data_and_comes_back_with_its_id(batch: Batch, emulator: RunningEmulator,
                                                                         tmp_path: Path) -> None:
    client = batch.client
    pool_id = batch.pool(1, spot=1, start_task=COUNT_BOOTS)
    job_id = batch.job(pool_id)
    spot = next(n.id for n in client.list_nodes(pool_id) if not n.is_dedicated)
    dedicated = next(n.id for n in client.list_nodes(pool_id) if n.is_dedicated)
    marker = tmp_path / "attempts"
    task_id, _nodes = hanging_task(client, job_id, marker)

    refused = fault(emulator, pool_id, dedicated, "preempt")
    assert (refused.status_code, refused.json()["code"]) == (409, "OperationNotValidOnNode")
    assert fault(emulator, pool_id, spot, "preempt", down=1.0).status_code == 202
    assert client.get_node(pool_id, spot).state == m.BatchNodeState.PREEMPTED
    wait_for(lambda: boots(emulator, pool_id, spot) == 0, 10, "the preempted node's files gone")
    task = completed(client, job_id, task_id)
    assert counts(task) == (m.BatchTaskExecutionResult.SUCCESS, 0, 1)
    node = client.get_node(pool_id, spot)
    assert node.state == m.BatchNodeState.IDLE and not node.is_dedicated
    assert boots(emulator, pool_id, spot) == 1  # a fresh disk, one StartTask since


def test_fault_requests_are_checked(batch: Batch, emulator: RunningEmulator) -> None:
    pool_id = batch.pool(1)
    node_id = next(n.id for n in batch.client.list_nodes(pool_id))
    bad = emulator.raw("POST", f"/pools/{pool_id}/nodes/{node_id}/mpilaunch-fault", json_body={"fault": "melt"})
    assert (bad.status_code, bad.json()["code"]) == (400, "InvalidPropertyValue")
    assert "melt" in bad.text and "preempt" in bad.text
    bad = emulator.raw("POST", f"/pools/{pool_id}/nodes/{node_id}/mpilaunch-fault",
                       json_body={"fault": "kill", "downSeconds": -1})
    assert bad.status_code == 400 and "downSeconds" in bad.text
    missing = fault(emulator, pool_id, "tvmps_nope_d", "kill")
    assert (missing.status_code, missing.json()["code"]) == (404, "NodeNotFound")


@pytest.mark.parametrize("option", ["requeue", "terminate"])
def test_reboot_ends_the_task_per_option_and_reruns_the_start_task(batch: Batch, emulator: RunningEmulator,
                                                                   tmp_path: Path, option: str) -> None:
    client = batch.client
    pool_id = batch.pool(2, start_task=COUNT_BOOTS)
    job_id = batch.job(pool_id)
    marker = tmp_path / "attempts"
    task_id, nodes = hanging_task(client, job_id, marker, retries=2)
    node_id = nodes[0]
    booted = client.get_node(pool_id, node_id).last_boot_time

    poller = client.begin_reboot_node(pool_id, node_id, BatchNodeRebootOptions(node_reboot_kind=option),
                                      polling_interval=0)
    assert client.get_node(pool_id, node_id).state == m.BatchNodeState.REBOOTING  # the poller waits on this
    poller.result()
    assert client.get_node(pool_id, node_id).state != m.BatchNodeState.REBOOTING
    task = completed(client, job_id, task_id)
    if option == "requeue":
        assert counts(task) == (m.BatchTaskExecutionResult.SUCCESS, 0, 1)
    else:  # terminated, not retried although 2 retries were allowed
        assert counts(task) == (m.BatchTaskExecutionResult.FAILURE, 0, 0)
        assert task.execution_info.failure_info.code == "TaskEnded"
        assert marker.read_text() == "x"
    node = wait_for(lambda: (n := client.get_node(pool_id, node_id)).state == m.BatchNodeState.IDLE and n, 30,
                    "the rebooted node idle")
    assert node.last_boot_time > booted
    assert boots(emulator, pool_id, node_id) == 2


def test_reboot_with_taskcompletion_lets_the_task_finish(batch: Batch, emulator: RunningEmulator) -> None:
    client = batch.client
    pool_id = batch.pool(1)
    job_id = batch.job(pool_id)
    task_id = uid("task")
    client.create_task(job_id, m.BatchTaskCreateOptions(id=task_id, command_line=py("import time; time.sleep(1.5)")))
    wait_for(lambda: client.get_task(job_id, task_id).state == m.BatchTaskState.RUNNING, 30, "running")
    node_id = client.get_task(job_id, task_id).node_info.node_id
    poller = client.begin_reboot_node(pool_id, node_id, BatchNodeRebootOptions(
        node_reboot_kind="taskcompletion"), polling_interval=0)
    with pytest.raises(HttpResponseError) as busy:  # only an idle or running node can be rebooted
        client.begin_reboot_node(pool_id, node_id, BatchNodeRebootOptions(node_reboot_kind="requeue"),
                                 polling_interval=0)
    assert (busy.value.status_code, busy.value.error.code) == (409, "NodeBeingRebooted")
    poller.result()
    task = client.get_task(job_id, task_id)
    assert task.state == m.BatchTaskState.COMPLETED and counts(task) == (m.BatchTaskExecutionResult.SUCCESS, 0, 0)


def test_reimage_loses_the_node_files_and_reruns_the_start_task(batch: Batch, emulator: RunningEmulator) -> None:
    client = batch.client
    pool_id = batch.pool(1, start_task=COUNT_BOOTS)
    node_id = next(n.id for n in client.list_nodes(pool_id))
    (emulator.data_dir / "nodes" / pool_id / node_id / "shared" / "left").write_text("data")
    client.begin_reimage_node(pool_id, node_id, BatchNodeReimageOptions(node_reimage_option="requeue"),
                              polling_interval=0).result()
    wait_for(lambda: client.get_node(pool_id, node_id).state == m.BatchNodeState.IDLE, 30, "reimaged node idle")
    assert boots(emulator, pool_id, node_id) == 1
    assert not (emulator.data_dir / "nodes" / pool_id / node_id / "shared" / "left").exists()


def test_remove_nodes_requeues_the_task_by_default(batch: Batch, tmp_path: Path) -> None:
    client = batch.client
    pool_id = batch.pool(3)
    job_id = batch.job(pool_id)
    marker = tmp_path / "attempts"
    task_id, nodes = hanging_task(client, job_id, marker)
    victim = nodes[1]

    client.begin_remove_nodes(pool_id, m.BatchNodeRemoveOptions(node_ids=[victim]), polling_interval=0).result()
    pool = client.get_pool(pool_id)
    assert (pool.allocation_state, pool.target_dedicated_nodes, pool.current_dedicated_nodes) == (
        m.AllocationState.STEADY, 2, 2)
    assert victim not in {n.id for n in client.list_nodes(pool_id)}
    task = completed(client, job_id, task_id)
    assert counts(task) == (m.BatchTaskExecutionResult.SUCCESS, 0, 1)


def test_resize_down_with_terminate_ends_the_task(batch: Batch) -> None:
    client = batch.client
    pool_id = batch.pool(2)
    job_id = batch.job(pool_id)
    task_id = add_mi_task(client, job_id, py("import time; time.sleep(300)"), py("pass"), instances=2, retries=3)
    wait_for(lambda: client.get_task(job_id, task_id).state == m.BatchTaskState.RUNNING, 30, "running")
    client.begin_resize_pool(pool_id, m.BatchPoolResizeOptions(
        target_dedicated_nodes=1, node_deallocation_option=m.BatchNodeDeallocationOption.TERMINATE),
        polling_interval=0).result()
    task = completed(client, job_id, task_id)
    assert counts(task) == (m.BatchTaskExecutionResult.FAILURE, 0, 0)
    assert task.execution_info.failure_info.code == "TaskEnded"
    assert len(list(client.list_nodes(pool_id))) == 1


def test_disable_scheduling_requeues_and_enable_resumes(batch: Batch, emulator: RunningEmulator,
                                                        tmp_path: Path) -> None:
    client = batch.client
    pool_id = batch.pool(1)
    job_id = batch.job(pool_id)
    marker = tmp_path / "attempts"
    task_id, nodes = hanging_task(client, job_id, marker, instances=1)
    node_id = nodes[0]

    # no body: the default option, requeue (the SDK 15.1 cannot send that: it needs an explicit option)
    assert emulator.raw("POST", f"/pools/{pool_id}/nodes/{node_id}/disablescheduling").status_code == 200
    wait_for(lambda: client.get_node(pool_id, node_id).state == m.BatchNodeState.OFFLINE, 30, "offline")
    task = client.get_task(job_id, task_id)
    assert task.state == m.BatchTaskState.ACTIVE and counts(task)[1:] == (0, 1)
    with pytest.raises(HttpResponseError) as again:
        client.disable_node_scheduling(pool_id, node_id, m.BatchNodeDisableSchedulingOptions(
            node_disable_scheduling_option=m.BatchNodeDisableSchedulingOption.TERMINATE))
    assert again.value.error.code == "NodeAlreadyInTargetSchedulingState"
    client.enable_node_scheduling(pool_id, node_id)
    assert counts(completed(client, job_id, task_id)) == (m.BatchTaskExecutionResult.SUCCESS, 0, 1)


def test_reactivate_reruns_a_failed_task_with_its_retries_reset(batch: Batch, tmp_path: Path) -> None:
    client = batch.client
    pool_id = batch.pool(1)
    job_id = batch.job(pool_id)
    marker = tmp_path / "attempts"
    fail_first = py(f"import sys; open({str(marker)!r}, 'a').write('x'); "
                    f"sys.exit(3 if len(open({str(marker)!r}).read()) < 3 else 0)")
    task_id = add_mi_task(client, job_id, fail_first, py("pass"), instances=1, retries=1)
    task = completed(client, job_id, task_id)
    assert counts(task) == (m.BatchTaskExecutionResult.FAILURE, 1, 0) and task.execution_info.exit_code == 3

    client.reactivate_task(job_id, task_id)
    task = completed(client, job_id, task_id)
    assert counts(task) == (m.BatchTaskExecutionResult.SUCCESS, 0, 0) and marker.read_text() == "xxx"
    with pytest.raises(HttpResponseError) as succeeded:
        client.reactivate_task(job_id, task_id)
    assert succeeded.value.error.code == "TaskSucceeded"


def test_pre_processing_failures_are_not_retried(batch: Batch) -> None:
    client = batch.client
    pool_id = batch.pool(1)
    job_id = batch.job(pool_id)
    task_id = uid("task")
    client.create_task(job_id, m.BatchTaskCreateOptions(
        id=task_id, command_line=py("pass"), constraints=m.BatchTaskConstraints(max_task_retry_count=3),
        resource_files=[m.ResourceFile(http_url="http://127.0.0.1:9/missing.txt", file_path="missing.txt")]))
    task = completed(client, job_id, task_id)
    assert counts(task) == (m.BatchTaskExecutionResult.FAILURE, 0, 0)
    assert task.execution_info.failure_info is not None

    start_pool = uid("mpipool")
    batch.pools.append(start_pool)
    client.create_pool(m.BatchPoolCreateOptions(
        id=start_pool, vm_size="standard_d2s_v3", target_dedicated_nodes=1,
        start_task=m.BatchStartTask(command_line=py("pass"), max_task_retry_count=3, resource_files=[
            m.ResourceFile(http_url="http://127.0.0.1:9/missing.txt", file_path="missing.txt")]),
        virtual_machine_configuration=m.VirtualMachineConfiguration(
            image_reference=m.BatchVmImageReference(publisher="canonical", offer="ubuntu", sku="22_04-lts"),
            node_agent_sku_id="batch.node.ubuntu 22.04")))
    node = wait_for(lambda: [n for n in client.list_nodes(start_pool)
                             if n.state == m.BatchNodeState.START_TASK_FAILED], 30, "starttaskfailed")[0]
    assert node.start_task_info.retry_count == 0


def test_the_fault_helper_waits_for_a_running_task_and_checks_its_target(batch: Batch, tmp_path: Path) -> None:
    from mpilaunch.client import local
    from node_runtime.errors import InvalidInput

    client = batch.client
    pool_id = batch.pool(2)
    with pytest.raises(InvalidInput, match="low-priority"):
        local.fault(client, "preempt", None, pool_id=pool_id)
    with pytest.raises(InvalidInput, match="tvmps_nope_d"):
        local.fault(client, "kill", "tvmps_nope_d", pool_id=pool_id)
    job_id = batch.job(pool_id)
    marker = tmp_path / "attempts"
    task_id, _nodes = hanging_task(client, job_id, marker)  # a kill before its command ran would hang the rerun
    hit = local.fault(client, "kill", None, pool_id=pool_id, when_running=True, down=0.3, poll=0.05)
    assert hit in {n.id for n in client.list_nodes(pool_id)}
    assert counts(completed(client, job_id, task_id)) == (m.BatchTaskExecutionResult.SUCCESS, 0, 1)
