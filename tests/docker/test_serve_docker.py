"""`mpilaunch emulator serve --nodes docker` (the real CLI in a subprocess) runs container pools on docker nodes.

A container pool of the task image gets three node containers; a 3-node mpi4py task's ``containerSettings``
(``containerRunOptions``: a tmpfs mount and a ``/dev/shm`` size) reach the task containers every rank runs in.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from azure.batch import models as m

from tests.docker.test_emulator_docker import add_mpi_task, completed, container_pool, text
from tests.support.docker import DockerScope, docker
from tests.support.emulator import RunningEmulator, start_emulator

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@dataclass
class ServedEmulator:
    running: RunningEmulator
    image: str

    def client(self) -> Any:
        return self.running.client()


@pytest.fixture
def served(docker_image: str, docker_scope: DockerScope, tmp_path: Path) -> Iterator[ServedEmulator]:
    """``mpilaunch emulator serve --nodes docker`` whose docker resources carry the test's unique scope."""
    with start_emulator(tmp_path / "emulator", args=["--nodes", "docker", "--docker-scope", docker_scope.prefix]
                        ) as running:
        yield ServedEmulator(running, docker_image)


def test_serve_runs_a_container_task_with_its_run_options_on_docker_nodes(
        served: ServedEmulator, docker_scope: DockerScope) -> None:
    client = served.client()
    job_id = container_pool(served, 3)
    probe = f"mpl-probe-{secrets.token_hex(4)}"
    task_id = add_mpi_task(served, job_id, run_options=f"--shm-size 320m --tmpfs /{probe}")
    task = completed(served, job_id, task_id)
    stdout = text(client.download_task_file(job_id, task_id, "stdout.txt"))
    stderr = text(client.download_task_file(job_id, task_id, "stderr.txt"))
    assert (task.execution_info.result, task.execution_info.exit_code) == (
        m.BatchTaskExecutionResult.SUCCESS, 0), stdout + stderr

    nodes = list(client.list_nodes(task.node_info.pool_id))
    ranks = [json.loads(line) for line in stdout.splitlines() if line.startswith('{"rank"')]
    assert [r["rank"] for r in ranks] == [0, 1, 2]
    # Three containers of the scope's pool network: each rank on its own node address.
    assert sorted(a for r in ranks for a in r["addresses"]) == sorted(n.ip_address for n in nodes)
    for rank in ranks:  # the task's containerRunOptions reached every task container
        assert (rank["shm_mb"], rank["probes"]) == (320, [probe]), rank
    node_containers = docker("ps", "-q", "--filter", f"label=org.mpilaunch.emulator={docker_scope.prefix}",
                             "--filter", f"label=org.mpilaunch.pool={task.node_info.pool_id}").stdout.split()
    assert len(node_containers) == 3
