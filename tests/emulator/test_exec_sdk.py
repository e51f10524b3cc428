"""Multi-instance execution end to end: the unmodified azure-batch 15.1 SDK over HTTP against a real emulator."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from azure.batch import models as m

from tests.support.emulator import start_emulator
from tests.support.exec_engine import hang_first_attempt, leftovers, py, wait_for
from tests.support.exec_sdk import Batch, add_mi_task, completed, make_job, make_pool, text

pytestmark = pytest.mark.timeout(180)

DUMP = ("import os, socket; print(os.environ['AZ_BATCH_NODE_ID'], os.environ['AZ_BATCH_IS_CURRENT_NODE_MASTER'], "
        "os.environ['AZ_BATCH_HOST_LIST'], socket.gethostname())")


def test_three_node_task_subtasks_and_files_through_the_sdk(batch: Batch) -> None:
    client = batch.client
    pool_id = batch.pool(3)
    job_id = batch.job(pool_id)
    task_id = add_mi_task(client, job_id, py(DUMP + "; print('primary done')"), py(DUMP))
    task = completed(client, job_id, task_id)
    info = task.execution_info
    assert (info.result, info.exit_code, info.retry_count, info.requeue_count) == (
        m.BatchTaskExecutionResult.SUCCESS, 0, 0, 0)
    assert task.node_info.pool_id == pool_id

    subtasks = list(client.list_subtasks(job_id, task_id))
    assert sorted(s.id for s in subtasks) == [1, 2]
    nodes = {n.id: n for n in client.list_nodes(pool_id)}
    used = {task.node_info.node_id} | {s.node_info.node_id for s in subtasks}
    assert used == set(nodes)
    host_list = ",".join(nodes[n].ip_address for n in
                         [task.node_info.node_id] + [s.node_info.node_id for s in sorted(subtasks, key=lambda s: s.id)])
    for sub in subtasks:
        assert (sub.state, sub.exit_code, sub.result) == (m.BatchSubtaskState.COMPLETED, 0,
                                                          m.BatchTaskExecutionResult.SUCCESS)
        assert sub.previous_state == m.BatchSubtaskState.RUNNING and sub.start_time <= sub.end_time
        assert sub.node_info.pool_id == pool_id and sub.node_info.node_url.endswith(sub.node_info.node_id)
        out = text(client.download_node_file(pool_id, sub.node_info.node_id,
                                             f"{sub.node_info.task_root_directory}/stdout.txt"))
        node_id, master, hosts, _hostname = out.split()
        assert (node_id, master, hosts) == (sub.node_info.node_id, "false", host_list)

    primary = text(client.download_task_file(job_id, task_id, "stdout.txt")).splitlines()
    assert primary[-1] == "primary done"
    assert primary[0].split()[:3] == [task.node_info.node_id, "true", host_list]
    assert text(client.download_task_file(job_id, task_id, "stderr.txt")) == ""
    wait_for(lambda: all(n.state == m.BatchNodeState.IDLE for n in client.list_nodes(pool_id)), 10, "idle")
    assert not leftovers(list(nodes))


def test_coordination_failure_on_one_node_retries_the_whole_task(batch: Batch, tmp_path: Path) -> None:
    client = batch.client
    pool_id = batch.pool(3)
    job_id = batch.job(pool_id)
    flag = tmp_path / "failed"
    victim = [n.id for n in client.list_nodes(pool_id)][1]
    coordination = py(f"import os, sys\nif os.environ['AZ_BATCH_NODE_ID'] == os.environ['VICTIM'] and not "
                      f"os.path.exists({str(flag)!r}):\n    open({str(flag)!r}, 'w')\n    sys.exit(3)\n")
    ok = add_mi_task(client, job_id, py("print('second attempt')"), coordination, retries=1, env={"VICTIM": victim})
    task = completed(client, job_id, ok)
    info = task.execution_info
    assert (info.result, info.retry_count, info.exit_code) == (m.BatchTaskExecutionResult.SUCCESS, 1, 0)
    assert text(client.download_task_file(job_id, ok, "stdout.txt")) == "second attempt\n"

    always = py("import os, sys; sys.exit(3 if os.environ['AZ_BATCH_NODE_ID'] == os.environ['VICTIM'] else 0)")
    bad = add_mi_task(client, job_id, py("print('never')"), always, retries=1, env={"VICTIM": victim})
    task = completed(client, job_id, bad)
    info = task.execution_info
    assert (info.result, info.retry_count, info.exit_code) == (m.BatchTaskExecutionResult.FAILURE, 1, 3)
    assert info.failure_info.code == "FailureExitCode"
    assert info.failure_info.category == m.BatchErrorSourceCategory.USER_ERROR
    by_node = {s.node_info.node_id: s for s in client.list_subtasks(job_id, bad)}
    if victim in by_node:  # the victim may have been the primary: then it is the task's own record
        assert (by_node[victim].exit_code, by_node[victim].result) == (3, m.BatchTaskExecutionResult.FAILURE)
    else:
        assert task.node_info.node_id == victim
    assert "never" not in text(client.download_task_file(job_id, bad, "stdout.txt"))


def test_task_without_enough_nodes_stays_active(batch: Batch) -> None:
    client = batch.client
    pool_id = batch.pool(2)
    job_id = batch.job(pool_id)
    task_id = add_mi_task(client, job_id, py("pass"), py("pass"), instances=3)
    time.sleep(1.5)
    assert client.get_task(job_id, task_id).state == m.BatchTaskState.ACTIVE
    client.terminate_task(job_id, task_id)
    task = completed(client, job_id, task_id, 30)
    assert task.execution_info.failure_info.code == "TaskEnded"


def test_restart_mid_run_requeues_and_keeps_state(tmp_path: Path) -> None:
    marker = tmp_path / "attempts"
    command = hang_first_attempt(marker)
    with start_emulator(tmp_path / "data") as emu:
        client = emu.client()
        pool_id = make_pool(client, 2)
        job_id = make_job(client, pool_id)
        node_ids = [n.id for n in client.list_nodes(pool_id)]
        task_id = add_mi_task(client, job_id, command, py("pass"), instances=2, retries=0)
        wait_for(marker.exists, 60, "first attempt running")
        assert client.get_task(job_id, task_id).state == m.BatchTaskState.RUNNING
        assert emu.proc is not None
        os.kill(emu.proc.pid, signal.SIGKILL)  # a crash: the task's processes outlive the emulator
        emu.proc.wait(10)
        assert leftovers(node_ids), "the crashed emulator's task processes should still be running"
        emu.restart()
        client = emu.client()
        task = completed(client, job_id, task_id, 60)
        info = task.execution_info
        assert (info.result, info.retry_count, info.requeue_count) == (m.BatchTaskExecutionResult.SUCCESS, 0, 1)
        assert info.last_requeue_time is not None
        assert marker.read_text() == "xx"
        assert text(client.download_task_file(job_id, task_id, "stdout.txt")) == "finished\n"
        assert sorted(n.id for n in client.list_nodes(pool_id)) == sorted(node_ids)
        assert [s.id for s in client.list_subtasks(job_id, task_id)] == [1]
        emu.stop()
    assert not leftovers(node_ids)
