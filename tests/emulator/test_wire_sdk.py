"""The unmodified azure-batch 15.1 SDK drives the emulator over HTTP: every implemented operation, paging, errors."""

from __future__ import annotations

import time
import uuid

import pytest
from azure.batch import models as m
from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceNotFoundError

pytestmark = pytest.mark.timeout(120)


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def pool_options(pool_id: str, nodes: int = 0) -> m.BatchPoolCreateOptions:
    return m.BatchPoolCreateOptions(
        id=pool_id, vm_size="standard_d2s_v3", target_dedicated_nodes=nodes, enable_inter_node_communication=True,
        task_slots_per_node=1,
        virtual_machine_configuration=m.VirtualMachineConfiguration(
            image_reference=m.BatchVmImageReference(publisher="canonical", offer="ubuntu", sku="22_04-lts"),
            node_agent_sku_id="batch.node.ubuntu 22.04"))


@pytest.fixture(params=["api-only", "executing"])
def emu(request):
    """Each test runs against both: deletes/terminations are immediate without an engine, asynchronous with one."""
    return request.getfixturevalue("wire_emulator" if request.param == "api-only" else "emulator")


@pytest.fixture
def client(emu):
    return emu.client()


def eventually(check, timeout: float = 60.0):
    """Poll ``check`` until it returns a truthy value (the engine finishes deletes/terminations asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except (HttpResponseError, AssertionError):
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.1)


def gone(call) -> bool:
    try:
        call()
    except ResourceNotFoundError:
        return True
    return False


@pytest.fixture
def job(client):
    job_id = uid("job")
    client.create_job(m.BatchJobCreateOptions(id=job_id, pool_info=m.BatchPoolInfo(pool_id="nopool")))
    return job_id


def test_pool_lifecycle(emu, client):
    pool_id = uid("pool")
    client.create_pool(pool_options(pool_id))
    pool = client.get_pool(pool_id)
    assert (pool.id, pool.state, pool.allocation_state) == (pool_id, m.BatchPoolState.ACTIVE,
                                                             m.AllocationState.STEADY)
    assert pool.enable_inter_node_communication is True and pool.task_slots_per_node == 1
    assert pool.url.endswith(f"/pools/{pool_id}") and pool.etag.startswith("0x")
    assert pool_id in {p.id for p in client.list_pools()}
    assert client.pool_exists(pool_id) is True
    client.begin_resize_pool(pool_id, m.BatchPoolResizeOptions(target_dedicated_nodes=2), polling_interval=0)
    resized = client.get_pool(pool_id)
    assert resized.target_dedicated_nodes == 2 and resized.etag != pool.etag
    try:  # refused while resizing (always so without an engine; the engine may have finished already)
        client.begin_resize_pool(pool_id, m.BatchPoolResizeOptions(target_dedicated_nodes=1), polling_interval=0)
        assert resized.allocation_state == m.AllocationState.STEADY or emu.execute
    except HttpResponseError as err:
        assert err.error.code == "PoolBeingResized"
    with pytest.raises(ResourceExistsError) as exists:
        client.create_pool(pool_options(pool_id.upper()))
    assert exists.value.error.code == "PoolExists"
    client.begin_delete_pool(pool_id, polling_interval=0)
    eventually(lambda: gone(lambda: client.get_pool(pool_id)))
    with pytest.raises(ResourceNotFoundError) as missing:
        client.get_pool(pool_id)
    assert missing.value.error.code == "PoolNotFound"


def test_job_lifecycle(client):
    job_id = uid("job")
    client.create_job(m.BatchJobCreateOptions(id=job_id, pool_info=m.BatchPoolInfo(pool_id="p"), priority=7))
    job = client.get_job(job_id)
    assert (job.state, job.priority, job.pool_info.pool_id) == (m.BatchJobState.ACTIVE, 7, "p")
    assert job.constraints.max_task_retry_count == 0
    client.update_job(job_id, m.BatchJobUpdateOptions(all_tasks_complete_mode="terminatejob"))
    assert client.get_job(job_id).all_tasks_complete_mode == m.BatchAllTasksCompleteMode.TERMINATE_JOB
    with pytest.raises(ResourceExistsError) as dup:
        client.create_job(m.BatchJobCreateOptions(id=job_id.upper(), pool_info=m.BatchPoolInfo(pool_id="p")))
    assert dup.value.error.code == "JobExists"
    from azure.batch.models._models import BatchJobTerminateOptions

    client.begin_terminate_job(job_id, BatchJobTerminateOptions(termination_reason="enough"),
                               polling_interval=0).result()
    done = eventually(lambda: (j := client.get_job(job_id)).state == m.BatchJobState.COMPLETED and j)
    assert done.execution_info.termination_reason == "enough"
    with pytest.raises(HttpResponseError) as again:
        client.create_task(job_id, m.BatchTaskCreateOptions(id="late", command_line="true"))
    assert again.value.error.code == "JobCompleted"
    client.begin_delete_job(job_id, polling_interval=0).result()
    assert job_id not in {j.id for j in client.list_jobs()}
    with pytest.raises(ResourceNotFoundError) as missing:
        client.get_job(job_id)
    assert missing.value.error.code == "JobNotFound"


def test_task_add_get_update_terminate_delete(client, job):
    client.create_task(job, m.BatchTaskCreateOptions(
        id="mi", command_line="python app.py", display_name="an MPI task",
        environment_settings=[m.EnvironmentSetting(name="AZ_BATCH_NODE_COUNT", value="3")],
        multi_instance_settings=m.MultiInstanceSettings(number_of_instances=3, coordination_command_line="true")))
    task = client.get_task(job, "MI")  # ids are case-insensitive
    assert (task.id, task.state, task.required_slots) == ("mi", m.BatchTaskState.ACTIVE, 1)
    assert task.multi_instance_settings.number_of_instances == 3
    assert task.environment_settings[0].value == "3"
    assert task.execution_info.retry_count == 0 and task.constraints.max_task_retry_count == 0
    client.replace_task(job, "mi", m.BatchTask(constraints=m.BatchTaskConstraints(max_task_retry_count=2)))
    assert client.get_task(job, "mi").constraints.max_task_retry_count == 2
    assert list(client.list_subtasks(job, "mi")) == []
    client.terminate_task(job, "mi")
    ended = eventually(lambda: (t := client.get_task(job, "mi")).state == m.BatchTaskState.COMPLETED and t)
    assert ended.execution_info.failure_info.code == "TaskEnded"
    counts = client.get_job_task_counts(job).task_counts
    assert (counts.completed, counts.failed, counts.active) == (1, 1, 0)
    client.delete_task(job, "mi")
    with pytest.raises(ResourceNotFoundError) as missing:
        client.get_task(job, "mi")
    assert missing.value.error.code == "TaskNotFound"
    assert "mi" not in {t.id for t in client.list_tasks(job)}
    # once the engine has removed it, the id can be used again
    eventually(lambda: client.create_task(job, m.BatchTaskCreateOptions(id="mi", command_line="true")) or True)


def test_duplicate_task_ids_differing_by_case(client, job):
    client.create_task(job, m.BatchTaskCreateOptions(id="Task_1", command_line="true"))
    with pytest.raises(ResourceExistsError) as dup:
        client.create_task(job, m.BatchTaskCreateOptions(id="task_1", command_line="true"))
    assert dup.value.error.code == "TaskExists"
    result = client.create_task_collection(job, m.BatchTaskGroup(task_values=[
        m.BatchTaskCreateOptions(id="TASK_1", command_line="true"),
        m.BatchTaskCreateOptions(id="fresh", command_line="true")]))
    by_id = {r.task_id: r for r in result.result_values}
    assert by_id["TASK_1"].status == m.BatchTaskAddStatus.CLIENT_ERROR
    assert by_id["TASK_1"].error.code == "TaskExists"
    assert by_id["fresh"].status == m.BatchTaskAddStatus.SUCCESS and by_id["fresh"].location.endswith("/fresh")


def test_collection_paging_filter_select(client, job):
    ids = [f"t{i:03d}" for i in range(230)]
    result = client.create_tasks(job, [m.BatchTaskCreateOptions(id=i, command_line="true") for i in ids])
    assert len(result.result_values) == 230
    paged = [t.id for t in client.list_tasks(job, max_results=17)]
    assert sorted(paged) == ids  # every task exactly once across 14 pages
    assert sorted(t.id for t in client.list_tasks(job, filter="startswith(id, 't01')")) == ids[10:20]
    assert len(list(client.list_tasks(job, filter="state eq 'active'", max_results=50))) == 230
    assert list(client.list_tasks(job, filter="state eq 'completed'")) == []
    selected = next(iter(client.list_tasks(job, select=["id", "state"], max_results=1)))
    assert selected.id in ids and selected.state == m.BatchTaskState.ACTIVE and selected.command_line is None


def test_unknown_ids(client, job):
    cases = [(lambda: client.get_pool("nope"), "PoolNotFound"), (lambda: client.get_job("nope"), "JobNotFound"),
             (lambda: client.get_task("nope", "t"), "JobNotFound"),
             (lambda: client.get_task(job, "nope"), "TaskNotFound"),
             (lambda: list(client.list_tasks("nope")), "JobNotFound"),
             (lambda: list(client.list_nodes("nope")), "PoolNotFound"),
             (lambda: client.delete_task(job, "nope"), "TaskNotFound"),
             (lambda: client.terminate_task(job, "nope"), "TaskNotFound")]
    for call, code in cases:
        with pytest.raises(ResourceNotFoundError) as err:
            call()
        assert err.value.error.code == code
        assert err.value.error.message.startswith("The specified")


def test_response_headers(emu, job):
    resp = emu.raw("GET", f"/jobs/{job}", headers={"client-request-id": "abc-123",
                                                             "return-client-request-id": "true"})
    assert resp.status_code == 200
    assert resp.headers["client-request-id"] == "abc-123"
    assert uuid.UUID(resp.headers["request-id"])
    assert resp.headers["ETag"] == resp.json()["eTag"]
    assert resp.headers["Last-Modified"].endswith("GMT")
    assert resp.headers["Content-Type"].startswith("application/json")
    created = emu.raw("POST", f"/jobs/{job}/tasks", json_body={"id": "h", "commandLine": "true"})
    assert created.status_code == 201 and created.content == b""
    assert created.headers["DataServiceId"].endswith(f"/jobs/{job}/tasks/h") and created.headers["ETag"]


def test_conditional_requests(emu, client, job):
    from azure.core import MatchConditions
    from azure.core.exceptions import ResourceModifiedError

    client.create_task(job, m.BatchTaskCreateOptions(id="cond", command_line="true"))
    etag = client.get_task(job, "cond").etag
    client.replace_task(job, "cond", m.BatchTask(constraints=m.BatchTaskConstraints(max_task_retry_count=1)),
                        etag=etag, match_condition=MatchConditions.IfNotModified)
    with pytest.raises(ResourceModifiedError) as stale:  # etag changed by the update above
        client.replace_task(job, "cond", m.BatchTask(constraints=m.BatchTaskConstraints(max_task_retry_count=2)),
                            etag=etag, match_condition=MatchConditions.IfNotModified)
    assert stale.value.error.code == "ConditionNotMet" and stale.value.status_code == 412
    assert client.get_task(job, "cond").constraints.max_task_retry_count == 1
    current = client.get_task(job, "cond").etag
    assert emu.raw("GET", f"/jobs/{job}/tasks/cond", headers={"If-None-Match": current}).status_code == 304
    assert emu.raw("GET", f"/jobs/{job}/tasks/cond", headers={"If-None-Match": etag}).status_code == 200
    assert emu.raw("DELETE", f"/jobs/{job}/tasks/cond", headers={"If-Match": etag}).status_code == 412
    assert emu.raw("DELETE", f"/jobs/{job}/tasks/cond", headers={"If-Match": current}).status_code == 200
