"""``emulator serve --nodes``: which provider runs container and VM pools, and clear refusals when docker is unusable.

These tests need no docker engine: they take it away (an empty ``PATH`` for the CLI, or the provider ``--nodes
auto`` falls back to when ``docker info`` fails).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from azure.batch import BatchClient
from azure.batch import models as m
from azure.core.credentials import AzureNamedKeyCredential
from azure.core.exceptions import HttpResponseError

from mpilaunch.emulator import defaults
from mpilaunch.emulator.defaults import KIND_METADATA, KIND_VM
from mpilaunch.emulator.nodes.base import Node, NodeError
from mpilaunch.emulator.nodes.choose import DockerlessProvider, make_provider
from mpilaunch.emulator.server import EmulatorServer
from node_runtime.errors import InvalidInput

pytestmark = pytest.mark.timeout(120)


def container_pool(pool_id: str) -> m.BatchPoolCreateOptions:
    return m.BatchPoolCreateOptions(
        id=pool_id, vm_size="standard_d2s_v3", target_dedicated_nodes=1,
        virtual_machine_configuration=m.VirtualMachineConfiguration(
            image_reference=m.BatchVmImageReference(publisher="p", offer="o", sku="s"),
            node_agent_sku_id="batch.node.ubuntu 22.04",
            container_configuration=m.BatchContainerConfiguration(
                type=m.ContainerType.DOCKER_COMPATIBLE, container_image_names=["mpilaunch:latest"])))


def test_auto_without_docker_refuses_a_container_pool_when_it_is_created(tmp_path: Path) -> None:
    server = EmulatorServer(tmp_path / "data", host="127.0.0.1", port=0,
                            provider=DockerlessProvider("the docker CLI is not installed"))
    server.start()
    try:
        client = BatchClient(server.endpoint, AzureNamedKeyCredential(defaults.ACCOUNT, defaults.KEY))
        with pytest.raises(HttpResponseError) as caught:
            client.create_pool(container_pool("cpool"))
        assert caught.value.status_code == 400
        assert caught.value.error is not None and caught.value.error.code == "InvalidPropertyValue"
        assert caught.value.response is not None
        reason = caught.value.response.text()
        assert "pool 'cpool' has a containerConfiguration" in reason
        assert "the docker CLI is not installed" in reason and "--nodes process" in reason
        assert not list(client.list_pools())  # nothing half-created
        client.create_pool(m.BatchPoolCreateOptions(id="plain", vm_size="standard_d2s_v3"))  # others still work
    finally:
        server.stop()


def vm_pool(pool_id: str) -> m.BatchPoolCreateOptions:
    return m.BatchPoolCreateOptions(id=pool_id, vm_size="standard_d2s_v3", target_dedicated_nodes=1,
                                    metadata=[m.BatchMetadataItem(name=KIND_METADATA, value=KIND_VM)])


@pytest.mark.parametrize(("provider", "why"), [
    (DockerlessProvider("the docker CLI is not installed"), "the docker CLI is not installed"),
    (make_provider("process"), "it serves --nodes process")])
def test_vm_pools_are_refused_without_docker_nodes(tmp_path: Path, provider: DockerlessProvider, why: str) -> None:
    server = EmulatorServer(tmp_path / "data", host="127.0.0.1", port=0, provider=provider)
    server.start()
    try:
        client = BatchClient(server.endpoint, AzureNamedKeyCredential(defaults.ACCOUNT, defaults.KEY))
        with pytest.raises(HttpResponseError) as caught:
            client.create_pool(vm_pool("vpool"))
        assert caught.value.status_code == 400 and caught.value.response is not None
        body = json.loads(caught.value.response.text())
        assert body["code"] == "InvalidPropertyValue"
        values = {v["key"]: v["value"] for v in body["values"]}
        assert values["PropertyName"] == "metadata"
        assert f"pool 'vpool' asks for VM-like nodes (metadata {KIND_METADATA}={KIND_VM})" in values["Reason"]
        assert why in values["Reason"] and "--nodes auto or docker" in values["Reason"]
        assert not list(client.list_pools())
    finally:
        server.stop()


def test_make_provider_kinds(monkeypatch: pytest.MonkeyPatch) -> None:
    process = make_provider("process")  # container pools as processes, VM pools refused
    assert isinstance(process, DockerlessProvider) and process.containers_as_processes
    process.check_pool({"id": "c", "virtualMachineConfiguration": {"containerConfiguration": {"type": "docker"}}})
    monkeypatch.setenv("PATH", "/nonexistent")
    auto = make_provider("auto")
    assert isinstance(auto, DockerlessProvider) and "docker CLI is not installed" in auto.why
    with pytest.raises(InvalidInput, match="--nodes docker: the docker CLI is not installed"):
        make_provider("docker")


def test_serve_nodes_docker_without_docker_exits_2(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "from mpilaunch.cli import main; main()", "emulator", "serve", "--port", "0",
            "--data", str(tmp_path / "d"), "--nodes", "docker"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "PATH": str(Path(sys.executable).parent)})
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--nodes docker: the docker CLI is not installed" in done.stderr
    assert "listening" not in done.stdout


def test_process_nodes_do_not_restore_a_docker_node(tmp_path: Path) -> None:
    """An emulator restarted without docker leaves its docker nodes unusable instead of faking them as processes."""
    node = Node(id="n1", pool_id="p", address="10.200.0.2", hostname="n1", root=tmp_path, node_root="/mnt/batch/tasks",
                data={"provider": "docker", "container": "c"})
    with pytest.raises(NodeError, match="'n1' is a docker node"):
        DockerlessProvider("no docker").restore_node(node)
