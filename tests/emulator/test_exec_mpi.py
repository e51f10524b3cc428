"""The real thing through the emulator: node-runtime coordinate (sshd) on 3 nodes, then launch mpirun + mpi4py."""

from __future__ import annotations

import base64
import secrets
import shlex
import sys
from pathlib import Path

import pytest
from azure.batch import models as m

from tests.support.azurite import free_port
from tests.support.exec_engine import leftovers, require_mpi
from tests.support.exec_sdk import Batch, probe_ranks, uid

pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.timeout(240)]
PROBE = Path(__file__).resolve().parents[1] / "programs" / "mpi_probe.py"


def test_mpi4py_program_across_three_emulated_nodes(batch: Batch) -> None:
    require_mpi()
    client = batch.client
    pool_id = batch.pool(3)
    job_id = batch.job(pool_id)
    task_id = uid("mpi")
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    env = {"AZ_BATCH_NODE_COUNT": "3", "MPILAUNCH_TASK_SECRET": secret, "MPILAUNCH_SSH_PORT": str(free_port())}
    client.create_task(job_id, m.BatchTaskCreateOptions(
        id=task_id,
        command_line=shlex.join(["node-runtime", "launch", "--ppn", "1", "--", sys.executable, str(PROBE)]),
        multi_instance_settings=m.MultiInstanceSettings(number_of_instances=3,
                                                        coordination_command_line="node-runtime coordinate"),
        environment_settings=[m.EnvironmentSetting(name=k, value=v) for k, v in env.items()]))
    stdout, ranks = probe_ranks(client, job_id, task_id)
    assert sorted(r["rank"] for r in ranks) == [0, 1, 2]
    assert all(r["allreduce"] == 6 and r["bcast"] == "token-from-0" for r in ranks)
    assert len({r["hostname"] for r in ranks}) == 3, "each rank on its own node"
    assert len({r["cwd"] for r in ranks}) == 1, "the same task paths on every node, as in Azure"
    subtasks = list(client.list_subtasks(job_id, task_id))
    assert sorted((s.id, s.exit_code) for s in subtasks) == [(1, 0), (2, 0)]
    nodes = [n.id for n in client.list_nodes(pool_id)]
    assert not leftovers(nodes), "sshd and every rank must be gone once the task has completed"
    assert secret not in stdout
