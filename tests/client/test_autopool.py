"""``run --auto-pool``: the task's job gets a pool of its own, which Batch (here the emulator) deletes when the task
ends, success or failure."""

from __future__ import annotations

import time
from typing import Any

import pytest
from azure.batch import models as bm
from azure.batch.models._models import BatchJobTerminateOptions

from mpilaunch.cli import cli
from mpilaunch.cli.clickutil import run_cli
from mpilaunch.client.api import Launcher
from mpilaunch.client.local import LocalState
from tests.client.conftest import new_task_id

pytestmark = [pytest.mark.slow, pytest.mark.azurite, pytest.mark.timeout(240)]


def mpl(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = run_cli(cli, "mpilaunch", list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def pool_gone(batch: Any, pool_id: str, within: float = 60) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if all(p.id != pool_id for p in batch.list_pools()):
            return True
        time.sleep(0.5)
    return False


@pytest.mark.parametrize(("argv", "code"), [(["hostname"], 0), (["python3", "-c", "raise SystemExit(3)"], 1)])
def test_the_auto_pool_goes_when_the_task_ends(argv: list[str], code: int, local_services: LocalState,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    task = new_task_id("auto")
    got, _, err = mpl(capsys, "run", "--local", "--auto-pool", "-n", "2", "--task-id", task, "--timeout", "150",
                      "--", *argv)
    assert got == code, err
    batch = Launcher.local().batch
    job = batch.get_job(task)  # the job is the task's own
    assert job.pool_info.auto_pool_specification.pool_lifetime_option == "job"
    assert job.pool_info.auto_pool_specification.pool.enable_inter_node_communication
    pool_id = job.execution_info.pool_id
    assert pool_id.startswith("mpilaunch_")
    deadline = time.monotonic() + 30
    while batch.get_job(task).state != "completed" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert batch.get_job(task).state == "completed"
    assert batch.get_job(task).execution_info.termination_reason == "AllTasksComplete"
    assert pool_gone(batch, pool_id)
    assert any(p.id == "local" for p in batch.list_pools())  # only the task's pool went


def test_auto_pool_options_are_checked_before_anything_is_sent(local_services: LocalState,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = mpl(capsys, "run", "--local", "--auto-pool", "--pool", "local", "-n", "2", "--", "hostname")
    assert code == 2 and "leave out --pool" in err
    code, _, err = mpl(capsys, "run", "--local", "--auto-pool", "--spot", "3", "-n", "2", "--", "hostname")
    assert code == 2 and "--spot 3" in err
    code, _, err = mpl(capsys, "run", "--local", "--vm-size", "x", "-n", "2", "--", "hostname")
    assert code == 2 and "need --auto-pool" in err


def test_the_emulator_checks_auto_pool_specifications(local_services: LocalState) -> None:
    from azure.core.exceptions import HttpResponseError

    batch = Launcher.local().batch
    vmc = bm.VirtualMachineConfiguration(image_reference=bm.BatchVmImageReference(
        publisher="canonical", offer="ubuntu-24_04-lts", sku="server"), node_agent_sku_id="batch.node.ubuntu 24.04")

    def job(job_id: str, **auto: Any) -> bm.BatchJobCreateOptions:
        spec = {"pool_lifetime_option": "job", "pool": bm.BatchPoolSpecification(
            vm_size="standard_d2s_v3", virtual_machine_configuration=vmc, target_dedicated_nodes=1), **auto}
        return bm.BatchJobCreateOptions(id=job_id, pool_info=bm.BatchPoolInfo(
            auto_pool_specification=bm.BatchAutoPoolSpecification(**spec)))

    for bad, field in ((job("bad-prefix", auto_pool_id_prefix="x" * 21), "autoPoolIdPrefix"),
                       (job("bad-lifetime", pool_lifetime_option="jobschedule"), "poolLifetimeOption")):
        with pytest.raises(HttpResponseError) as caught:
            batch.create_job(bad)
        assert caught.value.status_code == 400 and field in str(caught.value)
    # a pool Batch cannot create: the job is created completed, with the reason as its scheduling error
    batch.create_job(job("too-big", pool=bm.BatchPoolSpecification(
        vm_size="standard_d2s_v3", virtual_machine_configuration=vmc, target_dedicated_nodes=100_000)))
    made = batch.get_job("too-big")
    assert made.state == "completed" and made.execution_info.scheduling_error.category == "usererror"
    assert "auto pool could not be created" in made.execution_info.scheduling_error.message
    kept = job("kept", auto_pool_id_prefix="keep", keep_alive=True)
    batch.create_job(kept)
    pool_id = batch.get_job("kept").execution_info.pool_id
    assert pool_id.startswith("keep_") and batch.get_pool(pool_id).enable_inter_node_communication is False
    batch.begin_terminate_job("kept", BatchJobTerminateOptions(termination_reason="done"), polling_interval=1).result()
    time.sleep(2)
    assert batch.get_pool(pool_id).state == "active"  # keepAlive: the user deletes it
    batch.begin_delete_pool(pool_id)
