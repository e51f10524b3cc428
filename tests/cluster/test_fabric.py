"""Fabric choice, one-sided MPI across nodes and each rank's own Batch environment, on a real 2-node cluster
(network namespaces, sshd, Debian's Open MPI 4.1 with UCX, mpi4py). There is no InfiniBand here: ``ucx`` runs UCX
over TCP and shared memory."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from node_runtime.fabric import NODE_FILE
from tests.cluster.helpers import coordinate, mpich_first, needs_mpich, report
from tests.support.netns import REPO, NetnsCluster

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
Cluster = Callable[..., NetnsCluster]
ONESIDED = [sys.executable, str(REPO / "tests" / "programs" / "mpi_onesided.py")]


def records(stdout: str) -> list[dict[str, Any]]:
    found = [json.loads(line) for line in stdout.splitlines() if line.startswith('{"')]
    return sorted(found, key=lambda r: r["rank"])


@pytest.mark.parametrize(("fabric", "mpi"), [("auto", "openmpi"), ("ucx", "openmpi"), ("tcp", "openmpi"),
                                             pytest.param("auto", "mpich", marks=needs_mpich)])
def test_one_sided_windows_across_nodes_and_each_ranks_own_batch_environment(netns_cluster: Cluster, fabric: str,
                                                                             mpi: str, tmp_path: Path) -> None:
    nodes, launch_env = mpich_first(tmp_path) if mpi == "mpich" else ({}, {})
    cluster = netns_cluster(2, extra_env=nodes)
    coordinate(cluster)
    done = cluster.node_runtime(0, "launch", "--fabric", fabric, "--ppn", "2", "--", *ONESIDED, timeout=180,
                                env=launch_env)
    assert done.returncode == 0, done.stderr
    ranks = records(done.stdout)
    assert [r["rank"] for r in ranks] == [0, 1, 2, 3]
    assert [r["hostname"] for r in ranks] == ["node0", "node0", "node1", "node1"]
    for r in ranks:  # Win.Allocate + Put (fence), Win.Create + Accumulate + Get, passive-target Lock/Put/Unlock
        assert "error" not in r, r
        assert r["put_from_left"] == (r["rank"] - 1) % 4 + 1
        assert r["accumulate_get"] == 1 + 2 + 3 + 4
    assert ranks[0]["passive_put"] == [100, 101, 102, 103]
    # every rank has its own node's Batch variables, never the secret
    for r in ranks:
        node = cluster.nodes[int(r["hostname"][-1])]
        batch = {k: v for k, v in node.env.items() if k.startswith("AZ_BATCH_")}
        assert {k: r["batch"].get(k) for k in batch} == batch
        assert not r["secret_in_env"] and cluster.secret not in json.dumps(r)
        assert r["omp_num_threads"] is None  # set only by --threads-per-rank
    said = [line for line in done.stderr.splitlines() if "fabric " in line]
    assert len(said) == 1, done.stderr
    expected = {"auto": "fabric tcp: TCP, because the nodes have no active InfiniBand port",
                "ucx": "fabric ucx: UCX over TCP and shared memory, because --fabric ucx was given",
                "tcp": "fabric tcp: TCP, because --fabric tcp was given"}[fabric]
    assert expected in said[0] and "layout: 2 node(s) x 2 rank(s) x 1 core, not bound" in said[0]
    data = report(cluster)
    assert data["flavor"] == mpi and data["fabric"]["fabric"] == ("ucx" if fabric == "ucx" else "tcp")
    assert data["layout"] == {"ppn": 2, "threads": None, "cores": 1, "bind": False, "shared": False}
    assert set(data["nodes"]) == set(cluster.addresses)
    assert all(n["ucx"] and n["physical_cores"] == 1 and n["rdma"] == [] for n in data["nodes"].values())


def test_default_layout_is_one_rank_per_physical_core_bound(netns_cluster: Cluster) -> None:
    cluster = netns_cluster(2, cores=2)
    coordinate(cluster)
    done = cluster.node_runtime(0, "launch", "--", *ONESIDED, timeout=120)
    assert done.returncode == 0, done.stderr
    assert [r["hostname"] for r in records(done.stdout)] == ["node0", "node0", "node1", "node1"]  # 2 cores each
    data = report(cluster)
    assert data["layout"] == {"ppn": 2, "threads": None, "cores": 2, "bind": True, "shared": False}
    assert "--bind-to" in data["argv"] and data["argv"][data["argv"].index("--bind-to") + 1] == "core"
    # hybrid: 2 threads per rank leave one rank per node, bound to both cores, OMP_NUM_THREADS=2
    coordinate(cluster)
    done = cluster.node_runtime(0, "launch", "--threads-per-rank", "2", "--", *ONESIDED, timeout=120)
    assert done.returncode == 0, done.stderr
    ranks = records(done.stdout)
    assert [r["hostname"] for r in ranks] == ["node0", "node1"] and {r["omp_num_threads"] for r in ranks} == {"2"}
    assert report(cluster)["layout"] == {"ppn": 1, "threads": 2, "cores": 2, "bind": True, "shared": False}
    assert "ppr:1:node:PE=2" in report(cluster)["argv"]


def edit_node_file(cluster: NetnsCluster, i: int, **changes: Any) -> None:
    path = cluster.nodes[i].task_dir / ".mpilaunch" / NODE_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}) + "\n")


def test_a_node_that_differs_is_named_and_nothing_runs(netns_cluster: Cluster) -> None:
    cluster = netns_cluster(2)
    coordinate(cluster)
    edit_node_file(cluster, 1, rdma=[{"device": "mlx5_ib0", "port": 1, "link_layer": "InfiniBand",
                                      "state": "4: ACTIVE"}])
    done = cluster.node_runtime(0, "launch", "--", *ONESIDED, timeout=120)
    assert done.returncode == 3 and not records(done.stdout)
    assert "the nodes differ in what they offer MPI" in done.stderr
    odd = cluster.addresses[1]
    assert f"{odd}: infiniband ['mlx5_ib0:1'] (others: [])" in done.stderr, done.stderr
    assert report(cluster)["exit_code"] == 3


def test_a_small_dev_shm_is_refused_with_the_fix_unless_allowed(netns_cluster: Cluster) -> None:
    cluster = netns_cluster(2)
    coordinate(cluster)
    for i in (0, 1):
        edit_node_file(cluster, i, shm_bytes=64 * 2**20)  # docker's default
    done = cluster.node_runtime(0, "launch", "--ppn", "2", "--", *ONESIDED, timeout=120)
    assert done.returncode == 3 and not records(done.stdout)
    assert "/dev/shm is 64 MiB, 2 ranks need 128 MiB" in done.stderr
    assert "--container-run-options=--shm-size=128m" in done.stderr
    coordinate(cluster)
    for i in (0, 1):
        edit_node_file(cluster, i, shm_bytes=64 * 2**20)
    done = cluster.node_runtime(0, "launch", "--ppn", "2", "--allow-small-shm", "--", *ONESIDED, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "warning" in done.stderr and len(records(done.stdout)) == 4
