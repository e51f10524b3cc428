"""A rank's uncaught exception ends the job at once, and the results say which rank failed first, where and how:
node-runtime launch on 3 emulated nodes (real sshd and Open MPI), a Python program run as given (``python3 app.py``:
launch runs it through node_runtime.rankmain), rank 1 raising while ranks 0 and 2 wait in a barrier."""

from __future__ import annotations

import base64
import json
import secrets
import shlex
import sys
import time
from pathlib import Path

import pytest
from azure.batch import models as m

from mpilaunch.client.results import build_results, fetch_first_failure, node_file_path
from node_runtime.contract import RANKS_LOG_NAME, parse_rank_line
from tests.support.azurite import free_port
from tests.support.exec_engine import leftovers, require_mpi
from tests.support.exec_sdk import Batch, completed, text, uid

pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.timeout(240)]
PROGRAM = Path(__file__).resolve().parents[1] / "programs" / "mpi_fail.py"
FAILS_WITHIN = 45.0  # seconds from submission to the failed task: start-up plus seconds, never a timeout


def run_failing(batch: Batch, case: str, rank: int) -> tuple[m.BatchTask, float, str]:
    client = batch.client
    pool_id = batch.pool(3)
    job_id = batch.job(pool_id)
    task_id = uid(case)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    env = {"AZ_BATCH_NODE_COUNT": "3", "MPILAUNCH_TASK_SECRET": secret, "MPILAUNCH_SSH_PORT": str(free_port())}
    started = time.monotonic()
    client.create_task(job_id, m.BatchTaskCreateOptions(
        id=task_id,
        command_line=shlex.join(["node-runtime", "launch", "--ppn", "1", "--", sys.executable, str(PROGRAM), case,
                                 str(rank)]),
        multi_instance_settings=m.MultiInstanceSettings(number_of_instances=3,
                                                        coordination_command_line="node-runtime coordinate"),
        constraints=m.BatchTaskConstraints(max_task_retry_count=0, max_wall_clock_time="PT3M"),
        environment_settings=[m.EnvironmentSetting(name=k, value=v) for k, v in env.items()]))
    task = completed(client, job_id, task_id, timeout=180)
    return task, time.monotonic() - started, job_id


def addresses(batch: Batch, pool_id: str) -> dict[str, str]:
    return {n.id: n.ip_address for n in batch.client.list_nodes(pool_id)}


@pytest.mark.parametrize(("case", "rank", "how", "last_line"), [
    ("exception", 1, "exception", "ValueError: bad input on rank 1: 'x'"),
    ("module", 2, "module_missing", "ModuleNotFoundError: No module named 'mpilaunch_no_such_module'"),
])
def test_an_uncaught_exception_on_one_rank_ends_the_job_and_is_named(batch: Batch, case: str, rank: int, how: str,
                                                                     last_line: str) -> None:
    require_mpi()
    task, took, job_id = run_failing(batch, case, rank)
    client = batch.client
    print(f"{case}: submitted -> failed in {took:.1f}s")
    assert task.execution_info.result == m.BatchTaskExecutionResult.FAILURE
    assert task.execution_info.failure_info.code != "TaskEnded", "ended by the job's own failure, not a timeout"
    assert took < FAILS_WITHIN, f"the task failed after {took:.0f}s: the other ranks were not ended at once"

    # the client's view: the first failure from the primary's launch report
    first = fetch_first_failure(client, task)
    assert first is not None
    assert (first.rank, first.how, first.exception) == (rank, how, last_line)
    nodes = addresses(batch, task.node_info.pool_id)
    assert first.node in nodes.values() and first.node != nodes[task.node_info.node_id], "rank 1 is not on the primary"
    assert first.summary.startswith(f"rank {rank} on {first.node}: {last_line}")
    assert first.stderr_tail[-1] == last_line and not any("MPI_ABORT" in line for line in first.stderr_tail)
    results = build_results(job_id, task, list(client.list_subtasks(job_id, task.id)), first_failure=first)
    assert results.summary().endswith(f"failure: {first.summary}")
    assert results.to_json()["first_failure"]["rank"] == rank

    # stdout.txt keeps the raw output; ranks.log has every rank's lines tagged
    stdout = text(client.download_task_file(job_id, task.id, "stdout.txt"))
    assert "rank 0 of 3 up" in stdout and "[0]" not in stdout and "passed the barrier" not in stdout
    root = task.node_info.task_root_directory
    log = text(client.download_node_file(task.node_info.pool_id, task.node_info.node_id,
                                         node_file_path(root, f"wd/{RANKS_LOG_NAME}")))
    lines = [parse_rank_line(x) for x in log.split("\n") if x]
    assert {(x.rank, x.text) for x in lines if x.stream == "stdout"} >= {(r, f"rank {r} of 3 up") for r in range(3)}
    assert (rank, "stderr", last_line) in {(x.rank, x.stream, x.text) for x in lines}
    report = json.loads(text(client.download_node_file(task.node_info.pool_id, task.node_info.node_id,
                                                       node_file_path(root, "wd/launch-report.json"))))
    assert report["abort_on_exception"] is True and report["rank_command"][1:3] == ["-m", "node_runtime.rankmain"]
    assert not leftovers(list(nodes)), "every rank and sshd gone"
