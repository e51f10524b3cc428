"""Pre-flight checks on BatchPool models (pure); the emulator end-to-end refusal is in test_e2e."""

from __future__ import annotations

import re
import shlex

import pytest
from azure.batch import models as bm

from mpilaunch.client.pools import DEFAULT_IMAGE, PoolSpec, build_pool
from mpilaunch.client.preflight import check_nodes, check_pool
from mpilaunch.client.spec import ContainerSpec, TaskSpec
from mpilaunch.client.storage import StagedFile
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
    spot = [w for w in warnings if "Spot" in w]
    assert spot == ["pool 'p1' has 2 Spot/low-priority node(s): if Azure preempts one, Batch requeues the whole "
                    "multi-instance task (without using a retry) and it starts over unless it checkpoints its work "
                    "(--checkpoint, see docs/checkpointing.md)"]
    checkpointed = TaskSpec("job", "task", 3, ("python3", "a.py"), checkpoint_url="/shared/ckpt")
    assert any(w.endswith("it resumes from its --checkpoint")
               for w in check_pool(pool(targetDedicatedNodes=1, targetLowPriorityNodes=2), checkpointed))
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


RUNTIME = [StagedFile("https://acct/c/inputs/1/install-runtime.sh?sig=r", "install-runtime.sh"),
           StagedFile("https://acct/c/inputs/2/mpilaunch-0.1.0-py3-none-any.whl?sig=r",
                      "mpilaunch-0.1.0-py3-none-any.whl")]


def test_ssh_from_opens_port_22_to_those_prefixes_only() -> None:
    assert "networkConfiguration" not in build_pool(PoolSpec("p", nodes=2)).as_dict()
    body = build_pool(PoolSpec("p", nodes=60, ssh_from=("203.0.113.0/24", "Internet"))).as_dict()
    [nat] = body["networkConfiguration"]["endpointConfiguration"]["inboundNATPools"]
    assert (nat["backendPort"], nat["protocol"], nat["frontendPortRangeStart"], nat["frontendPortRangeEnd"]) == (
        22, "tcp", 40000, 40059)
    assert [(r["priority"], r["access"], r["sourceAddressPrefix"]) for r in nat["networkSecurityGroupRules"]] == [
        (150, "allow", "203.0.113.0/24"), (151, "allow", "Internet"), (4095, "deny", "*")]
    assert build_pool(PoolSpec("p", nodes=2, ssh_from=("10.0.0.1",))).as_dict()["networkConfiguration"][
        "endpointConfiguration"]["inboundNATPools"][0]["frontendPortRangeEnd"] == 40039  # at least 40 ports
    with pytest.raises(InvalidInput, match=re.escape("'10.0.0.0/8; rm' is not an address prefix")):
        build_pool(PoolSpec("p", nodes=2, ssh_from=("10.0.0.0/8; rm",)))


def test_build_pool_is_mpi_ready() -> None:
    body = build_pool(PoolSpec("mpi", nodes=2, low_priority_nodes=1, container_images=("img:1",))).as_dict()
    assert body["enableInterNodeCommunication"] is True and body["taskSlotsPerNode"] == 1
    assert body["targetDedicatedNodes"] == 2 and body["targetLowPriorityNodes"] == 1
    vmc = body["virtualMachineConfiguration"]
    assert vmc["containerConfiguration"]["containerImageNames"] == ["img:1"]
    assert vmc["imageReference"]["publisher"] + ":" + vmc["imageReference"]["offer"] == "microsoft-dsvm:ubuntu-hpc"
    assert "startTask" not in body and "metadata" not in body
    with pytest.raises(InvalidRequest, match="'bad id'"):
        build_pool(PoolSpec("bad id", nodes=1))
    with pytest.raises(InvalidInput, match="at least one node"):
        build_pool(PoolSpec("p", nodes=0))


def test_runtime_start_task_installs_the_staged_wheel_as_admin() -> None:
    body = build_pool(PoolSpec("mpi", nodes=2, install_runtime=True, emulator_nodes="vm"), RUNTIME).as_dict()
    start = body["startTask"]
    assert shlex.split(start["commandLine"]) == ["/bin/bash", "install-runtime.sh", "mpilaunch-0.1.0-py3-none-any.whl"]
    assert [f["filePath"] for f in start["resourceFiles"]] == ["install-runtime.sh", "mpilaunch-0.1.0-py3-none-any.whl"]
    assert start["userIdentity"]["autoUser"] == {"scope": "pool", "elevationLevel": "admin"}
    assert start["waitForSuccess"] is True
    assert body["virtualMachineConfiguration"]["nodeAgentSKUId"] == "batch.node.ubuntu 24.04"
    assert body["metadata"] == [{"name": "mpilaunch-emulator-nodes", "value": "vm"}]
    with pytest.raises(InvalidInput, match="one wheel"):
        build_pool(PoolSpec("mpi", nodes=2, install_runtime=True), RUNTIME[:1])


@pytest.mark.parametrize(("spec", "message"), [
    (PoolSpec("p", 1, image="canonical:0001-com-ubuntu-server-focal:20_04-lts", install_runtime=True),
     "has Python 3.8, but the node runtime needs >= 3.10"),
    (PoolSpec("p", 1, image="canonical:ubuntu-24_04-lts:server", container_images=("i",)),
     "cannot run containers on Batch"),
    (PoolSpec("p", 1, container_images=("i",), install_runtime=True), "container tasks run the container image's"),
    (PoolSpec("p", 1, image="me:my-image:1"), "give --node-agent"),
    (PoolSpec("p", 1, image="ubuntu"), "expected PUBLISHER:OFFER:SKU"),
])
def test_pools_an_image_cannot_serve_are_refused_with_the_reason(spec: PoolSpec, message: str) -> None:
    with pytest.raises(InvalidInput, match=re.escape(message)):
        spec.validate()


def test_known_images_and_explicit_node_agents() -> None:
    assert PoolSpec("p", 1, image="canonical:0001-com-ubuntu-server-jammy:22_04-lts").node_agent_sku \
        == "batch.node.ubuntu 22.04"
    assert PoolSpec("p", 1, image="me:my-image:1", node_agent="batch.node.debian 12").validate().node_agent_sku \
        == "batch.node.debian 12"
    assert PoolSpec("p", 1, install_runtime=True).validate().image_reference == tuple(DEFAULT_IMAGE.name.split(":"))


def test_stuck_nodes_count_against_the_task() -> None:
    check_nodes(pool(), ["idle", "running", "starting"], SPEC)
    check_nodes(pool(targetDedicatedNodes=4), ["idle", "idle", "idle", "unusable"], SPEC)
    with pytest.raises(PreflightError) as err:
        check_nodes(pool(), ["idle", "starttaskfailed", "unusable"], SPEC)
    assert "only 1 usable node(s) for a task that needs 3 (1 unusable, 1 starttaskfailed)" in err.value.message
    assert "reimage" in err.value.fix
    check_nodes(pool(enableAutoScale=True), ["unusable"] * 3, SPEC)  # autoscale: only the size warning applies
