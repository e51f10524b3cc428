"""Execution tests through the azure-batch 15.1 SDK: the ``batch`` fixture makes pools/jobs on the session emulator
and deletes them (through the API, waiting until they are gone) when the test ends."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest
from azure.batch import models as m
from azure.core.exceptions import ResourceNotFoundError

from tests.support.exec_engine import wait_for


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def make_pool(client: Any, nodes: int, *, spot: int = 0, start_task: str | None = None) -> str:
    """A pool fit for multi-instance tasks with ``nodes`` dedicated and ``spot`` low-priority idle nodes (and
    ``start_task`` as its StartTask command line)."""
    pool_id = uid("mpipool")
    client.create_pool(m.BatchPoolCreateOptions(
        id=pool_id, vm_size="standard_d2s_v3", target_dedicated_nodes=nodes, target_low_priority_nodes=spot,
        enable_inter_node_communication=True, task_slots_per_node=1,
        start_task=m.BatchStartTask(command_line=start_task) if start_task else None,
        virtual_machine_configuration=m.VirtualMachineConfiguration(
            image_reference=m.BatchVmImageReference(publisher="canonical", offer="ubuntu", sku="22_04-lts"),
            node_agent_sku_id="batch.node.ubuntu 22.04")))
    wait_for(lambda: [n.state for n in client.list_nodes(pool_id)] == [m.BatchNodeState.IDLE] * (nodes + spot), 60,
             f"{nodes + spot} idle nodes")
    return pool_id


def make_job(client: Any, pool_id: str) -> str:
    job_id = uid("job")
    client.create_job(m.BatchJobCreateOptions(id=job_id, pool_info=m.BatchPoolInfo(pool_id=pool_id)))
    return job_id


def add_mi_task(client: Any, job_id: str, command: str, coordination: str, *, instances: int = 3,
                retries: int = 0, env: dict[str, str] | None = None) -> str:
    task_id = uid("task")
    client.create_task(job_id, m.BatchTaskCreateOptions(
        id=task_id, command_line=command,
        multi_instance_settings=m.MultiInstanceSettings(number_of_instances=instances,
                                                        coordination_command_line=coordination),
        constraints=m.BatchTaskConstraints(max_task_retry_count=retries),
        environment_settings=[m.EnvironmentSetting(name=k, value=v) for k, v in (env or {}).items()]))
    return task_id


def completed(client: Any, job_id: str, task_id: str, timeout: float = 90) -> Any:
    return wait_for(lambda: (t := client.get_task(job_id, task_id)).state == m.BatchTaskState.COMPLETED and t,
                    timeout, f"task {task_id} completed")


def text(chunks: Any) -> str:
    return b"".join(chunks).decode()


def probe_ranks(client: Any, job_id: str, task_id: str, timeout: float = 180) -> tuple[str, list[dict[str, Any]]]:
    """Once the task completed successfully (else its stdout and stderr in the failure): its stdout, and the JSON
    records its ranks printed there (tests/programs/mpi_probe.py)."""
    task = completed(client, job_id, task_id, timeout)
    stdout = text(client.download_task_file(job_id, task_id, "stdout.txt"))
    assert task.execution_info.result == m.BatchTaskExecutionResult.SUCCESS, (
        stdout, text(client.download_task_file(job_id, task_id, "stderr.txt")))
    return stdout, [json.loads(line) for line in stdout.splitlines() if line.startswith('{"')]


class Batch:
    """An SDK client on an emulator that remembers what it created."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.pools: list[str] = []
        self.jobs: list[str] = []

    def pool(self, nodes: int, *, spot: int = 0, start_task: str | None = None) -> str:
        self.pools.append(make_pool(self.client, nodes, spot=spot, start_task=start_task))
        return self.pools[-1]

    def job(self, pool_id: str) -> str:
        self.jobs.append(make_job(self.client, pool_id))
        return self.jobs[-1]

    def _gone(self, get: Any, item_id: str) -> bool:
        try:
            get(item_id)
        except ResourceNotFoundError:
            return True
        return False

    def cleanup(self) -> None:
        for job_id in self.jobs:
            self.client.begin_delete_job(job_id, polling_interval=0)
        for pool_id in self.pools:
            self.client.begin_delete_pool(pool_id, polling_interval=0)
        for get, ids in ((self.client.get_job, self.jobs), (self.client.get_pool, self.pools)):
            for item_id in ids:
                wait_for(partial(self._gone, get, item_id), 30, f"{item_id} deleted")


@pytest.fixture
def batch(emulator: Any) -> Iterator[Batch]:
    """SDK access to the session emulator; the test's pools and jobs are deleted afterwards."""
    session = Batch(emulator.client())
    try:
        yield session
    finally:
        session.cleanup()
