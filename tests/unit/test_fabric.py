"""Fabric detection from a fake sysfs/proc root, the choice across nodes, the layout and the MPI settings."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from node_runtime import fabric
from node_runtime.contract import MpiFlavor
from node_runtime.errors import InvalidInput
from node_runtime.fabric import FabricChoice, NodeFabric, RdmaPort


def fake_root(tmp_path: Path, *, ports: dict[str, tuple[str, str]], shm_option: str | None,
              cpus: dict[int, tuple[int, int]]) -> Path:
    """A root with /sys/class/infiniband/DEV/ports/1/{link_layer,state}, /proc/self/mounts and CPU topology."""
    for device, (link, state) in ports.items():
        port = tmp_path / "sys/class/infiniband" / device / "ports" / "1"
        port.mkdir(parents=True)
        (port / "link_layer").write_text(link + "\n")
        (port / "state").write_text(state + "\n")
    mounts = tmp_path / "proc/self/mounts"
    mounts.parent.mkdir(parents=True)
    options = "rw,nosuid,nodev" + (f",{shm_option}" if shm_option else "")
    mounts.write_text(f"proc /proc proc rw 0 0\nshm /dev/shm tmpfs {options} 0 0\n")
    for cpu, (package, core) in cpus.items():
        topology = tmp_path / f"sys/devices/system/cpu/cpu{cpu}/topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text(f"{package}\n")
        (topology / "core_id").write_text(f"{core}\n")
    return tmp_path


def test_an_azure_hb_like_node_is_read_from_sysfs(tmp_path: Path) -> None:
    # HB images name the InfiniBand port mlx5_ib0; accelerated networking adds an Ethernet mlx5 device
    root = fake_root(tmp_path, ports={"mlx5_ib0": ("InfiniBand", "4: ACTIVE"), "mlx5_an0": ("Ethernet", "4: ACTIVE")},
                     shm_option="size=230g", cpus={0: (0, 0), 1: (0, 1), 2: (0, 0), 3: (0, 1)})  # 2 cores x 2 threads
    ports = fabric.rdma_ports(root)
    assert [str(p) for p in ports] == ["mlx5_an0:1", "mlx5_ib0:1"]
    assert [p.active_infiniband for p in ports] == [False, True]
    assert fabric.shm_size(root) == 230 * 2**30
    assert fabric.physical_cores([0, 1, 2, 3], root) == 2
    assert fabric.physical_cores([0, 2], root) == 1  # an affinity mask of one core's two threads


def test_a_docker_container_without_infiniband(tmp_path: Path) -> None:
    root = fake_root(tmp_path, ports={}, shm_option="size=65536k", cpus={})
    assert fabric.rdma_ports(root) == ()
    assert fabric.shm_size(root) == 64 * 2**20
    assert fabric.physical_cores([0, 1, 2], root) == 3  # no topology: each CPU counts


def test_a_down_infiniband_port_is_not_used(tmp_path: Path) -> None:
    root = fake_root(tmp_path, ports={"mlx5_ib0": ("InfiniBand", "1: DOWN")}, shm_option=None, cpus={})
    node = NodeFabric(fabric.rdma_ports(root), "openmpi", True, 2**30, 4, "eth0")
    choice = fabric.choose("auto", node)
    assert choice.fabric == "tcp" and "mlx5_ib0:1 InfiniBand 1: DOWN" in choice.reason


def node(ib: bool = True, ucx: bool = True, **changes: object) -> NodeFabric:
    rdma = (RdmaPort("mlx5_ib0", 1, "InfiniBand", "4: ACTIVE"),) if ib else ()
    data = {**NodeFabric(rdma, "openmpi", ucx, 2**30, 120, "eth0").to_dict(), **changes}
    return NodeFabric.from_dict(json.loads(json.dumps(data)))  # as it travels from a node


def test_auto_takes_ucx_over_infiniband_only_when_the_mpi_can_use_it() -> None:
    assert fabric.choose("auto", node()) == FabricChoice(
        "ucx", "every node has an active InfiniBand port (mlx5_ib0:1) and its MPI (openmpi) can use UCX",
        ("mlx5_ib0:1",), "eth0", True)
    assert fabric.choose("auto", node(ucx=False)).fabric == "tcp"
    assert "cannot use UCX" in fabric.choose("auto", node(ucx=False)).reason
    no_ib = fabric.choose("auto", node(ib=False))
    assert no_ib.fabric == "tcp"
    assert no_ib.reason == "the nodes have no active InfiniBand port (no /sys/class/infiniband)"
    assert fabric.choose("ucx", node(ib=False)).describe().startswith("fabric ucx: UCX over TCP and shared memory")
    with pytest.raises(InvalidInput, match="cannot use UCX"):
        fabric.choose("ucx", node(ucx=False))
    assert fabric.choose("tcp", node()).fabric == "tcp"


def test_the_odd_node_is_named() -> None:
    nodes = {"10.0.0.4": node(), "10.0.0.5": node(), "10.0.0.6": node(ib=False), "10.0.0.7": None}
    problems = fabric.disagreements(nodes)
    assert problems == ["10.0.0.7: reported no fabric detection (did 'node-runtime coordinate' run there?)",
                        "10.0.0.6: infiniband [] (others: ['mlx5_ib0:1'])"]
    assert fabric.disagreements({"a": node(), "b": node(shm_bytes=1)}) == []  # /dev/shm is checked per node


def test_a_small_dev_shm_is_found_for_several_ranks_only() -> None:
    docker = {"10.0.0.4": node(shm_bytes=64 * 2**20)}
    assert fabric.shm_problems(docker, 1) == []
    assert fabric.shm_problems(docker, 4) == ["10.0.0.4: /dev/shm is 64 MiB, 4 ranks need 256 MiB"]
    assert "--container-run-options=--shm-size=256m" in fabric.shm_fix(4)


def test_layout_defaults_to_the_physical_cores() -> None:
    assert fabric.layout(120, None, None) == fabric.Layout(120, None, 120, True)
    assert fabric.layout(120, None, 4) == fabric.Layout(30, 4, 120, True)
    assert fabric.layout(2, 4, None) == fabric.Layout(4, None, 2, False)  # more ranks than cores: not bound
    shared = fabric.layout(1, None, None, shared=True)  # nodes of one machine would all be bound to its first core
    assert shared == fabric.Layout(1, None, 1, False, True)
    assert "not bound (the nodes share one machine's cores)" in shared.describe(3)


def test_open_mpi_settings_per_fabric() -> None:
    ib, cidr = fabric.choose("auto", node()), "10.0.0.0/24"
    assert fabric.mpi_settings(MpiFlavor.OPENMPI, ib, cidr) == fabric.MpiSettings(
        (("pml", "ucx"), ("osc", "ucx"), ("btl", "^vader,tcp,openib")), (("UCX_NET_DEVICES", "mlx5_ib0:1"),))
    tcp = fabric.mpi_settings(MpiFlavor.OPENMPI, fabric.choose("tcp", node()), cidr)
    assert ("osc", "ucx") in tcp.mca and ("pml", "ob1") in tcp.mca and ("UCX_TLS", "tcp,sm,self") in tcp.env
    plain = fabric.mpi_settings(MpiFlavor.OPENMPI, fabric.choose("tcp", node(ucx=False)), cidr)
    assert ("osc", "ucx") not in plain.mca and plain.env == ()  # no UCX: windows across nodes cannot work
    intel = fabric.mpi_settings(MpiFlavor.INTELMPI, ib, cidr)
    assert ("FI_PROVIDER", "mlx") in intel.env and ("I_MPI_FABRICS", "shm:ofi") in intel.env


def test_the_mpi_answer_is_cached_per_binary(tmp_path: Path) -> None:
    tool = tmp_path / "ompi_info"
    tool.write_text("#!/bin/sh\necho mca:pml:ucx:version:x\necho mca:osc:ucx:version:x\n")
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    asked: list[int] = []

    def ask() -> bool:
        asked.append(1)
        return True

    assert fabric._cached(tool, tmp_path, ask) and fabric._cached(tool, tmp_path, ask)
    assert len(asked) == 1
    tool.write_text(tool.read_text() + "# changed\n")  # another binary: asked again
    assert fabric._cached(tool, tmp_path, ask) and len(asked) == 2


def test_the_node_file_round_trips(tmp_path: Path) -> None:
    fabric.write_node_file(tmp_path, node())
    text = (tmp_path / fabric.NODE_FILE).read_text()
    assert text.count("\n") == 1 and fabric.read_node(text) == node()
    assert fabric.read_node("") is None and fabric.read_node('{"rdma": []}') is None
