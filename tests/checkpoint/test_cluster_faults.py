"""Fault injection on a real multi-node cluster (network namespaces, sshd, ``node-runtime launch``, Open MPI).

A whole node is killed mid-run (every process in its namespace: rank, orted, sshd), then the task is run again as
Batch would: on a *new* cluster (fresh node roots: node-local state is gone) with the same checkpoint location —
a directory shared by all nodes (as an NFS or Azure Files mount would be), or a blob container with a create-only SAS
on an Azurite that runs on the cluster's network and outlives the nodes. The location reaches the ranks only through
``MPILAUNCH_CHECKPOINT_URL``. The final results must equal a clean run's: nothing lost, nothing duplicated.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.checkpoint.mpirun import PROGRAMS, mpirun
from tests.checkpoint.programs.faulty_sweep import value
from tests.cluster.helpers import coordinate
from tests.support.azurite import ACCOUNT, KEY, running_azurite
from tests.support.netns import SUBNET, VENV_BIN, NetnsCluster

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
Cluster = Callable[..., NetnsCluster]
N, BATCH, NODES = 500, 16, 3


def launch(cluster: NetnsCluster, program: list[str]) -> subprocess.Popen[str]:
    node = cluster.nodes[0]
    argv = cluster.argv_on(0, [str(VENV_BIN / "node-runtime"), "launch", "--", *program])
    return subprocess.Popen(argv, env=node.env, cwd=node.working_dir, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(child: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str, str]:
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        _, err = child.communicate()
        raise AssertionError(f"launch hung for {timeout} s:\n{err[-3000:]}") from None
    return child.returncode, out, err


def computed(log: Path) -> list[str]:
    return [line for f in log.glob("*.log") for line in f.read_text().split()]


@contextlib.contextmanager
def azurite_on_bridge(cluster: NetnsCluster, location: Path) -> Iterator[str]:
    """Azurite inside the cluster's bridge namespace (reachable from every node), storing in ``location``."""
    host = f"{SUBNET}.254"
    probe = [sys.executable, "-c", f"import socket; socket.create_connection(({host!r}, 10000), 0.5)"]
    with running_azurite(location, host, port=10000, prefix=["ip", "netns", "exec", cluster.bridge_netns],
                         ready=lambda: cluster.run_on(0, probe, timeout=10).returncode == 0) as server:
        yield server.blob_endpoint


def blob_checkpoint(cluster: NetnsCluster, endpoint: str) -> str:
    """Create a container (from node 0) and return its URL with a create-only SAS."""
    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    create = ("from azure.storage.blob import BlobServiceClient as S; S.from_connection_string("
              f"'DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};BlobEndpoint={endpoint};')"
              ".create_container('ckpt')")
    done = cluster.run_on(0, [sys.executable, "-c", create], timeout=60)
    assert done.returncode == 0, done.stderr
    sas = generate_container_sas(ACCOUNT, "ckpt", account_key=KEY, permission=ContainerSasPermissions(
        read=True, create=True, delete=True, list=True), expiry=datetime.datetime.now(datetime.UTC)
        + datetime.timedelta(hours=1))
    return f"{endpoint}/ckpt/sweep?{sas}"


@pytest.mark.parametrize(("seed", "store"), [(0, "dir"), (1, "dir"), (2, "dir"), (3, "dir"), (4, "blob")])
def test_node_killed_mid_sweep_then_task_rerun_on_new_nodes_is_exact(netns_cluster: Cluster, tmp_path: Path,
                                                                      seed: int, store: str) -> None:
    rng = random.Random(4000 + seed)
    shared = tmp_path / "shared"
    program = [sys.executable, str(PROGRAMS / "faulty_sweep.py"), "--n", str(N), "--batch", str(BATCH),
               "--ms", "4", "--log", str(shared / "log"), "--out", str(shared / "out.json")]
    victim, progress = rng.randrange(NODES), rng.randrange(20, N - 100)

    first = netns_cluster(NODES)
    with contextlib.ExitStack() as stack:
        if store == "blob":  # the storage outlives the nodes: the re-run's Azurite serves the same data
            url = blob_checkpoint(first, stack.enter_context(azurite_on_bridge(first, tmp_path / "azurite")))
        else:
            url = f"file://{shared}/ckpt"
        run_sweep_and_kill(first, program, shared, victim, progress, url)
    first.destroy()  # Batch re-runs the task on other nodes: node-local state is gone

    second = netns_cluster(NODES)
    with contextlib.ExitStack() as stack:
        if store == "blob":
            stack.enter_context(azurite_on_bridge(second, tmp_path / "azurite"))
        for node in second.nodes:
            node.env["MPILAUNCH_CHECKPOINT_URL"] = url
        coordinate(second)
        code, _, err = finish(launch(second, program))
        assert code == 0, err
        assert "items already committed" in err
        check = [sys.executable, "-c", "import json, sys; from node_runtime.checkpoint import load_committed, "
                 "open_store; c = load_committed(open_store(sys.argv[1]), 'items'); "
                 "print(json.dumps([c.duplicates, len(c.corrupt), len(c.results)]))", url]
        inspected = second.run_on(0, check, timeout=60)
        assert inspected.returncode == 0, inspected.stderr
        assert json.loads(inspected.stdout) == [0, 0, N]  # every item committed exactly once

    assert json.loads((shared / "out.json").read_text()) == [[f"k{i:05d}", value(f"k{i:05d}", i)] for i in range(N)]
    done = computed(shared / "log")
    assert set(done) == {f"k{i:05d}" for i in range(N)}
    assert len(done) - N <= NODES * BATCH  # redone after the kill: at most one batch per rank


def run_sweep_and_kill(cluster: NetnsCluster, program: list[str], shared: Path, victim: int, progress: int,
                       url: str) -> None:
    for node in cluster.nodes:  # what the client's --checkpoint-url becomes on every node
        node.env["MPILAUNCH_CHECKPOINT_URL"] = url
    coordinate(cluster)
    child = launch(cluster, [*program, "--hold-at-end"])  # cannot finish before the polled kill point
    deadline = time.monotonic() + 90
    while len(computed(shared / "log")) < progress and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert child.poll() is None, f"the sweep ended before the kill point: {finish(child)[2][-2000:]}"
    assert cluster.kill_processes(victim) > 0  # the whole node dies: rank, orted, sshd
    code, _, _ = finish(child)
    assert code != 0 and not (shared / "out.json").exists()


@pytest.mark.parametrize("seed", range(2))
def test_node_killed_mid_solve_then_task_rerun_on_new_nodes_resumes_exactly(netns_cluster: Cluster, tmp_path: Path,
                                                                            seed: int) -> None:
    rng = random.Random(5000 + seed)
    shared = tmp_path / "shared"
    args = ["--cells", "240", "--steps", "1200", "--every", "50"]
    clean = mpirun(PROGRAMS / "faulty_solver.py", "--checkpoint", str(tmp_path / "clean"), *args, "--out",
                   str(tmp_path / "clean.json"))
    assert clean.returncode == 0, clean.stderr
    env = {"MPILAUNCH_CHECKPOINT_URL": str(shared / "ckpt")}  # a plain path works as well as file://
    program = [sys.executable, str(PROGRAMS / "faulty_solver.py"), *args, "--out", str(shared / "out.json")]
    victim, kill_step = rng.randrange(NODES), rng.choice([150, 450, 750])
    steps = shared / "ckpt" / "steps" / "heat-240"

    first = netns_cluster(NODES, extra_env=env)
    coordinate(first)
    child = launch(first, [*program, "--hold-at-end"])  # cannot finish before the polled kill point
    deadline = time.monotonic() + 90
    while child.poll() is None and time.monotonic() < deadline and not (
            steps.is_dir() and any(int(d.name.split(".")[0]) >= kill_step for d in steps.iterdir())):
        time.sleep(0.005)
    assert child.poll() is None, f"the solver ended before the kill point: {finish(child)[2][-2000:]}"
    assert first.kill_processes(victim) > 0
    code, _, _ = finish(child)
    assert code != 0 and not (shared / "out.json").exists()
    first.destroy()

    second = netns_cluster(NODES, extra_env=env)
    coordinate(second)
    code, out, err = finish(launch(second, program))
    assert code == 0, err
    assert "resuming from the checkpoint of step" in out
    assert json.loads((shared / "out.json").read_text()) == json.loads((tmp_path / "clean.json").read_text())
