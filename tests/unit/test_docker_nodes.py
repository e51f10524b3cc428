"""Pure parts of the docker node provider (no docker needed): names, bind mounts, pool detection."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mpilaunch.emulator.nodes.base import Node, NodeError
from mpilaunch.emulator.nodes.docker import NODE_ROOT, bind_mounts, container_configuration, docker_name


def node(root: Path) -> Node:
    return Node(id="tvm-1", pool_id="p", address="10.200.0.2", hostname="tvm-1", root=root, node_root=NODE_ROOT,
                data={"provider": "docker", "container": "mpl-p-tvm-1-0123456789"})


def test_names_are_docker_safe_readable_and_unique_per_key() -> None:
    a = docker_name("My Pool!", "tvmps_ab/cd", key=Path("/data/nodes/p/n1"))
    assert re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*", a) and a.startswith("mpl-My-Pool-tvmps_ab-cd-")
    assert a == docker_name("My Pool!", "tvmps_ab/cd", key=Path("/data/nodes/p/n1"))  # stable across restarts
    assert a != docker_name("My Pool!", "tvmps_ab/cd", key=Path("/other/nodes/p/n1"))
    assert len(docker_name("x" * 200, key="k")) < 64


def test_container_configuration_marks_container_pools() -> None:
    config = {"type": "dockerCompatible", "containerImageNames": ["img"]}
    assert container_configuration({"virtualMachineConfiguration": {"containerConfiguration": config}}) == config
    assert container_configuration({"virtualMachineConfiguration": {"imageReference": {}}}) is None
    assert container_configuration({"id": "p"}) is None


def test_bind_mounts_follow_container_host_batch_bind_mounts(tmp_path: Path) -> None:
    n = node(tmp_path)
    assert bind_mounts(n, None) == ["-v", f"{tmp_path}:{NODE_ROOT}"]  # absent: the whole node root
    assert bind_mounts(n, []) == []  # empty: nothing
    opts = bind_mounts(n, [{"source": "Shared", "isReadOnly": True}, {"source": "Task"},
                           {"source": "JobPrep", "isReadOnly": True}, {"source": "VfsMounts"}])
    assert opts == ["-v", f"{tmp_path / 'shared'}:{NODE_ROOT}/shared:ro",
                    "-v", f"{tmp_path / 'workitems'}:{NODE_ROOT}/workitems",  # read-write wins for a shared path
                    "-v", f"{tmp_path / 'fsmounts'}:{NODE_ROOT}/fsmounts"]
    assert (tmp_path / "shared").is_dir() and (tmp_path / "fsmounts").is_dir()
    with pytest.raises(NodeError, match=r"'Scratch' is not one of \['Applications'"):
        bind_mounts(n, [{"source": "Scratch"}])
