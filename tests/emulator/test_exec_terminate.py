"""A terminated multi-instance task: its instances are never a success. Batch terminates the primary at once and
the subtasks asynchronously (REST spec, ``Tasks_TerminateTask``); a terminated subtask is ``completed``
(``BatchSubtaskState``) with ``result = failure`` and the reason in ``failureInfo`` (``BatchSubtask.result``); its
exit code may be an operating-system one (``BatchSubtask.exitCode``). The client says ``terminated``."""

from __future__ import annotations

import time

from azure.batch import models as m

from mpilaunch.client.results import build_results
from tests.support.exec_engine import py, wait_for
from tests.support.exec_sdk import Batch, add_mi_task, completed, uid


def test_terminating_a_running_multi_instance_task_fails_every_instance(batch: Batch) -> None:
    client = batch.client
    pool_id = batch.pool(3)
    job_id = batch.job(pool_id)
    task_id = add_mi_task(client, job_id, py("import time; time.sleep(120)"), py("pass"), instances=3)
    wait_for(lambda: client.get_task(job_id, task_id).state == m.BatchTaskState.RUNNING
             and all(s.state == m.BatchSubtaskState.RUNNING for s in client.list_subtasks(job_id, task_id)), 60,
             "the task and its subtasks running")
    started = time.monotonic()
    client.terminate_task(job_id, task_id)
    task = completed(client, job_id, task_id, 30)
    assert time.monotonic() - started < 20
    assert (task.execution_info.result, task.execution_info.failure_info.code) == (
        m.BatchTaskExecutionResult.FAILURE, "TaskEnded")
    subtasks = list(client.list_subtasks(job_id, task_id))
    assert sorted(s.id for s in subtasks) == [1, 2]
    for sub in subtasks:
        assert sub.state == m.BatchSubtaskState.COMPLETED
        assert sub.result == m.BatchTaskExecutionResult.FAILURE, "a terminated instance is not a success"
        assert sub.failure_info.code == "TaskEnded" and "terminated by user request" in sub.failure_info.message
    res = build_results(job_id, task, subtasks)
    assert res.outcome == "terminated" and [res.instance_outcome(r) for r in res.instances] == ["terminated"] * 3
    assert res.summary().endswith("terminated (TaskEnded: The task was terminated by user request)")


def test_a_timed_out_task_says_so_on_every_instance(batch: Batch) -> None:
    client = batch.client
    pool_id = batch.pool(2)
    job_id = batch.job(pool_id)
    task_id = uid("timeout")
    client.create_task(job_id, m.BatchTaskCreateOptions(
        id=task_id, command_line=py("import time; time.sleep(120)"),
        multi_instance_settings=m.MultiInstanceSettings(number_of_instances=2, coordination_command_line=py("pass")),
        constraints=m.BatchTaskConstraints(max_wall_clock_time="PT3S", max_task_retry_count=0)))
    task = completed(client, job_id, task_id, 60)
    [sub] = client.list_subtasks(job_id, task_id)
    assert sub.result == m.BatchTaskExecutionResult.FAILURE and "maxWallClockTime" in sub.failure_info.message
    res = build_results(job_id, task, [sub])
    assert res.outcome == "timed out" and {res.instance_outcome(r) for r in res.instances} == {"timed out"}
