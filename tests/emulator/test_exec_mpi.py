"""The real thing through the emulator: node-runtime coordinate (sshd) on 3 nodes, then launch mpirun + mpi4py."""

from __future__ import annotations

import base64
import os
import secrets
import shlex
import shutil
import sys
from pathlib import Path

import pytest
from azure.batch import models as m

from mpilaunch.emulator.nodes.process import isolation_available
from tests.support.azurite import free_port
from tests.support.exec_engine import leftovers
from tests.support.exec_sdk import Batch, probe_ranks, uid

pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.timeout(240)]
PROBE = Path(__file__).resolve().parents[1] / "programs" / "mpi_probe.py"


def _require_tools() -> None:
    missing = [t for t in ("mpirun", "ssh") if shutil.which(t) is None]
    if not (shutil.which("sshd") or Path("/usr/sbin/sshd").exists()):
        missing.append("sshd")
    if missing or not isolation_available():
        why = f"missing {missing}" if missing else "per-node host names need root and unshare"
        if os.environ.get("CI"):
            pytest.fail(f"cannot run MPI through the emulator: {why}")
        pytest.skip(why)


def test_mpi4py_program_across_three_emulated_nodes(batch: Batch) -> None:
    _require_tools()
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
