"""Pre-flight checks on BatchPool models (pure); the emulator end-to-end refusal is in test_e2e."""

from __future__ import annotations

import pytest
from azure.batch import models as bm

from mpilaunch.client.pools import PoolSpec, build_pool, runtime_start_task_command
from mpilaunch.client.preflight import check_nodes, check_pool
from mpilaunch.client.spec import ContainerSpec, TaskSpec
from node_runtime.errors import InvalidInput, InvalidRequest, PreflightError


def pool(**kw: object) -> bm.BatchPool:
    base: dict[str, object] = {"id": "p1", "enableInterNodeCommunication": True, "taskSlotsPerNode": 1,
                               "targetDedicatedNodes": 3, "currentDedicatedNodes": 3, "state": "active",
                               "vmSize": "standard_d2s_v3"}
    base.update(kw)
    return bm.BatchPool(base)


SPEC = TaskSpec("job", "task", 3, ("python3", "a.py"))


def test_good_pool_passes() -> None:
    assert check_pool(pool(), SPEC) == []


@pytest.mark.parametrize(("kw", "reason", "fix"), [
    ({"enableInterNodeCommunication": False}, "does not enable inter-node communication", "pool create p1-mpi"),
    ({"taskSlotsPerNode": 4}, "taskSlotsPerNode=4", "taskSlotsPerNode=1"),
    ({"targetDedicatedNodes": 1, "targetLowPriorityNodes": 1}, "targets 2 node(s) (dedicated 1 + low-priority 1) "
     "but the task needs 3", "--nodes 2"),
    ({"state": "deleting"}, "being deleted", "another pool"),
])
def test_refusals_say_why_and_how_to_fix(kw: dict[str, object], reason: str, fix: str) -> None:
    with pytest.raises(PreflightError) as err:
        check_pool(pool(**kw), SPEC)
    assert reason in err.value.message and fix in err.value.fix and "p1" in err.value.message


def test_low_priority_autoscale_and_allocating_warn() -> None:
    warnings = check_pool(pool(targetDedicatedNodes=1, targetLowPriorityNodes=2, currentDedicatedNodes=1), SPEC)
    assert any("has 1 of its 3 node(s)" in w for w in warnings)
    assert any("low-priority" in w for w in warnings)
    assert "autoscales" in check_pool(pool(enableAutoScale=True, targetDedicatedNodes=0), SPEC)[0]


def test_container_consistency() -> None:
    in_container = TaskSpec("job", "task", 3, ("python3",), container=ContainerSpec("img:1"))
    with pytest.raises(PreflightError, match="no container configuration"):
        check_pool(pool(), in_container)
    containered = pool(virtualMachineConfiguration={
        "imageReference": {}, "nodeAgentSKUId": "x",
        "containerConfiguration": {"type": "dockerCompatible", "containerImageNames": ["img:1"]}})
    assert check_pool(containered, in_container) == []
    with pytest.raises(PreflightError) as err:
        check_pool(containered, SPEC)
    assert "img:1" in err.value.fix


def test_build_pool_is_mpi_ready() -> None:
    body = build_pool(PoolSpec("mpi", nodes=2, low_priority_nodes=1, container_images=("img:1",),
                               install_runtime=True)).as_dict()
    assert body["enableInterNodeCommunication"] is True and body["taskSlotsPerNode"] == 1
    assert body["targetDedicatedNodes"] == 2 and body["targetLowPriorityNodes"] == 1
    assert body["virtualMachineConfiguration"]["containerConfiguration"]["containerImageNames"] == ["img:1"]
    assert body["startTask"]["commandLine"] == runtime_start_task_command("mpilaunch")
    assert body["startTask"]["userIdentity"]["autoUser"]["elevationLevel"] == "admin"
    with pytest.raises(InvalidRequest, match="'bad id'"):
        build_pool(PoolSpec("bad id", nodes=1))
    with pytest.raises(InvalidInput, match="at least one node"):
        build_pool(PoolSpec("p", nodes=0))


def test_stuck_nodes_count_against_the_task() -> None:
    check_nodes(pool(), ["idle", "running", "starting"], SPEC)
    check_nodes(pool(targetDedicatedNodes=4), ["idle", "idle", "idle", "unusable"], SPEC)
    with pytest.raises(PreflightError) as err:
        check_nodes(pool(), ["idle", "starttaskfailed", "unusable"], SPEC)
    assert "only 1 usable node(s) for a task that needs 3 (1 unusable, 1 starttaskfailed)" in err.value.message
    assert "reimage" in err.value.fix
    check_nodes(pool(enableAutoScale=True), ["unusable"] * 3, SPEC)  # autoscale: only the size warning applies
