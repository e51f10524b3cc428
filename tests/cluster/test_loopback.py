"""Nodes that are loopback addresses of ONE machine (how the emulator's process provider runs them): no namespaces,
one shared hostname, MPILAUNCH_NODE_ADDRESS telling each node which host-list address is its own."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.helpers import PROBE, ranks
from tests.support.netns import VENV_BIN, batch_environment

pytestmark = pytest.mark.slow


@pytest.fixture
def loopback_nodes(tmp_path: Path) -> Iterator[list[dict[str, str]]]:
    """Three nodes' environments on 127.77.X.{1,2,3} sharing one free port; their services stopped afterwards."""
    if shutil.which("sshd", path="/usr/sbin:/usr/local/sbin:/sbin") is None or shutil.which("mpirun") is None:
        pytest.skip("sshd or mpirun missing: run scripts/setup")
    subnet = f"127.77.{os.getpid() % 250 + 1}"
    addresses = [f"{subnet}.{i}" for i in (1, 2, 3)]
    with socket.socket() as probe:
        probe.bind((addresses[0], 0))
        port = probe.getsockname()[1]
    secret = secrets.token_urlsafe(32)
    envs = []
    for i, address in enumerate(addresses):
        env = batch_environment(tmp_path / f"n{i}", addresses, i, cores=1, secret=secret, port=port)
        env["MPILAUNCH_NODE_ADDRESS"] = address
        Path(env["AZ_BATCH_TASK_WORKING_DIR"]).mkdir(parents=True)
        envs.append(env)
    try:
        yield envs
    finally:
        for env in envs:
            subprocess.run([str(VENV_BIN / "node-runtime"), "coordinate", "--stop"], env=env, capture_output=True,
                           timeout=30, check=False)


def node_runtime(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VENV_BIN / "node-runtime"), *args], env=env, cwd=env["AZ_BATCH_TASK_WORKING_DIR"],
                          capture_output=True, text=True, timeout=120, check=False)


def test_loopback_nodes_run_an_mpi_job_through_their_own_services(loopback_nodes: list[dict[str, str]]) -> None:
    for env in loopback_nodes:
        done = node_runtime(env, "coordinate")
        assert done.returncode == 0, done.stderr
    done = node_runtime(loopback_nodes[0], "launch", "--timeout", "10", "--", *PROBE)
    assert done.returncode == 0, done.stderr
    records = ranks(done.stdout)
    assert [(r["rank"], r["allreduce"]) for r in records] == [(0, 6), (1, 6), (2, 6)]
    # Ranks 1 and 2 were started through their own node's sshd (its node-local TMPDIR), not by mpirun locally.
    assert len({r["tmpdir"] for r in records}) == 3
