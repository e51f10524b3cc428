"""launch --hang-timeout through the emulator, for real: 3 process nodes, sshd on each, mpirun + mpi4py ranks
started through node_runtime.rankmain (by launch, or as given). A job whose ranks block without output fails soon
after the timeout, with exit 124 and a hang-report.json that names where each rank is (and on which node); a job
that prints regularly is left alone."""

from __future__ import annotations

import base64
import json
import secrets
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from azure.batch import models as m

from node_runtime.errors import HANG_EXIT_CODE
from tests.support.azurite import free_port
from tests.support.exec_engine import leftovers, require_mpi, wait_for
from tests.support.exec_sdk import Batch, completed, text

pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.timeout(240)]
PROGRAM = Path(__file__).resolve().parents[1] / "programs" / "hang_probe.py"
HANG_TIMEOUT = 5


def _task(batch: Batch, nodes: int, ppn: int, *program_args: str, rankmain: bool = False) -> tuple[Any, str, str, str]:
    """The probe as a task on ``nodes`` new nodes; ``python3 PROGRAM`` (launch runs it through rankmain), or with
    ``rankmain`` ``python3 -m node_runtime.rankmain PROGRAM`` as given (launch leaves it as it is)."""
    client = batch.client
    pool_id = batch.pool(nodes)
    job_id = batch.job(pool_id)
    task_id = f"hang-{secrets.token_hex(4)}"
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    env = {"AZ_BATCH_NODE_COUNT": str(nodes), "MPILAUNCH_TASK_SECRET": secret, "MPILAUNCH_SSH_PORT": str(free_port())}
    command = ["node-runtime", "launch", "--ppn", str(ppn), "--hang-timeout", f"{HANG_TIMEOUT}s", "--",
               sys.executable, *(["-m", "node_runtime.rankmain"] if rankmain else []), str(PROGRAM), *program_args]
    client.create_task(job_id, m.BatchTaskCreateOptions(
        id=task_id, command_line=shlex.join(command),
        multi_instance_settings=m.MultiInstanceSettings(number_of_instances=nodes,
                                                        coordination_command_line="node-runtime coordinate"),
        environment_settings=[m.EnvironmentSetting(name=k, value=v) for k, v in env.items()]))
    return client, pool_id, job_id, task_id


def _started(client: Any, job_id: str, task_id: str) -> float:
    """The moment every rank is past its first barrier (the probe's start line is in stdout.txt): the hang begins."""
    def seen() -> bool:
        try:
            return "ranks started" in text(client.download_task_file(job_id, task_id, "stdout.txt"))
        except Exception:  # not there yet
            return False

    wait_for(seen, 120, "the probe's start line")
    return time.monotonic()


def _hung(batch: Batch, ppn: int, *program_args: str, rankmain: bool = False) -> tuple[dict[str, Any], str, list[str]]:
    """Run the probe stuck on 3 nodes; once the task failed: its hang-report.json, its stderr and the pool's nodes."""
    client, pool_id, job_id, task_id = _task(batch, 3, ppn, *program_args, rankmain=rankmain)
    hung = _started(client, job_id, task_id)
    task = completed(client, job_id, task_id, timeout=HANG_TIMEOUT + 60)
    elapsed = time.monotonic() - hung
    stderr = text(client.download_task_file(job_id, task_id, "stderr.txt"))
    print(f"\nhang watchdog ({' '.join(program_args)}, {3 * ppn} ranks on 3 nodes): from the hang to the failed task "
          f"{elapsed:.1f}s with --hang-timeout {HANG_TIMEOUT}s (task state polled every 50 ms)")
    assert task.execution_info.exit_code == HANG_EXIT_CODE, stderr
    assert task.execution_info.result == m.BatchTaskExecutionResult.FAILURE
    assert elapsed < HANG_TIMEOUT + 15, f"{elapsed:.1f}s from the hang to the failed task"
    report = json.loads(text(client.download_task_file(job_id, task_id, "wd/hang-report.json")))
    # the summary is in the task's stderr, and launch-report.json records the hang as launch's error
    assert f"hang: no output and no checkpoint for {HANG_TIMEOUT}s" in stderr and report["summary"] in stderr
    launch = json.loads(text(client.download_task_file(job_id, task_id, "wd/launch-report.json")))
    assert launch["exit_code"] == HANG_EXIT_CODE and report["summary"] in launch["error"]
    nodes = [n.id for n in client.list_nodes(pool_id)]
    assert not leftovers(nodes), "every rank and sshd must be gone once the task has completed"
    assert report["ranks_total"] == 3 * ppn and report["ranks_missing"] == []
    assert sorted(r["rank"] for r in report["ranks"]) == list(range(3 * ppn))
    assert all(not r["error"] for r in report["ranks"]), report["ranks"]
    assert len({r["node"] for r in report["ranks"]}) == 3, "the ranks of all 3 nodes"
    return report, stderr, nodes


def _innermost(report: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {r["rank"]: next(t for t in r["threads"] if t["main"])["frames"][0] for r in report["ranks"]}


def test_a_hung_job_fails_soon_after_the_timeout_with_identical_stacks_grouped(batch: Batch) -> None:
    require_mpi()
    report, _, _ = _hung(batch, 2, "--stuck", "sleep")
    where = _innermost(report)
    assert where[1]["code"] == "time.sleep(3600)" and where[1]["file"].endswith("hang_probe.py")
    assert all(where[r]["code"] == "comm.Barrier()" for r in (0, 2, 3, 4, 5))
    first, second = report["groups"]
    assert (first["count"], first["ranks"], first["call"], first["mpi"]) == (5, [0, 2, 3, 4, 5], "Barrier", True)
    assert (second["ranks"], second["call"], second["mpi"]) == ([1], "time.sleep", False)
    node_of_1 = next(r["node"] for r in report["ranks"] if r["rank"] == 1)
    assert report["summary"] == (f"5 of 6 ranks wait in Barrier at {first['location']}; rank 1 is in time.sleep "
                                 f"at {second['location']} on node {node_of_1}")


def test_a_hung_job_names_each_rank_blocked_somewhere_else(batch: Batch) -> None:
    require_mpi()
    report, _, _ = _hung(batch, 1, "--stuck", "recv", "--mixed", rankmain=True)
    where = _innermost(report)
    assert where[0]["code"] == "comm.Barrier()" and where[2]["code"] == "comm.allreduce(comm.rank)"
    assert where[1]["code"] == "quiet.recv(1024)  # nobody ever writes: blocks forever"
    groups = {tuple(g["ranks"]): g for g in report["groups"]}
    assert {k: (g["call"], g["mpi"]) for k, g in groups.items()} == {
        (0,): ("Barrier", True), (1,): ("quiet.recv", False), (2,): ("allreduce", True)}
    nodes = {r["rank"]: r["node"] for r in report["ranks"]}
    assert report["summary"] == (f"rank 0 waits in Barrier at {groups[(0,)]['location']} on node {nodes[0]}; "
                                 f"rank 1 is in quiet.recv at {groups[(1,)]['location']} on node {nodes[1]}; "
                                 f"rank 2 waits in allreduce at {groups[(2,)]['location']} on node {nodes[2]}")
    assert all(g["location"].startswith("hang_probe.py:") for g in groups.values())


def test_a_job_that_prints_regularly_is_not_ended(batch: Batch) -> None:
    require_mpi()
    client, _pool_id, job_id, task_id = _task(batch, 3, 1, "--chatty", str(HANG_TIMEOUT * 2 + 2))
    task = completed(client, job_id, task_id, timeout=120)
    stdout = text(client.download_task_file(job_id, task_id, "stdout.txt"))
    stderr = text(client.download_task_file(job_id, task_id, "stderr.txt"))
    assert task.execution_info.exit_code == 0, stderr
    assert "chatty: done" in stdout and "hang" not in stderr
    files = [f.name for f in client.list_task_files(job_id, task_id, recursive=True)]
    assert not any(name.endswith("hang-report.json") for name in files)


def test_a_silent_job_that_checkpoints_regularly_is_not_ended(batch: Batch, tmp_path: Path) -> None:
    require_mpi()
    store = tmp_path / "checkpoints"
    store.mkdir(mode=0o777)
    store.chmod(0o777)  # the nodes' task user may not be us
    client, _pool_id, job_id, task_id = _task(batch, 3, 1, "--checkpointing", str(HANG_TIMEOUT * 2 + 2),
                                              "--store", str(store))
    task = completed(client, job_id, task_id, timeout=120)
    stdout = text(client.download_task_file(job_id, task_id, "stdout.txt"))
    stderr = text(client.download_task_file(job_id, task_id, "stderr.txt"))
    assert task.execution_info.exit_code == 0, stderr
    assert "checkpointing: done after" in stdout and "hang" not in stderr
