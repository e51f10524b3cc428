"""The whole Azure path, offline: `pool create --local --install-runtime` gives VM-like nodes (bare Debian containers)
on which mpilaunch's own StartTask installs Open MPI, sshd and the client's runtime wheel (staged through Azurite);
`run --local --pool P` then runs MPI on them as the non-root task user, with the runtime's Python.

Also: nodes that restart re-run the StartTask harmlessly (the runtime is kept) and the next task succeeds; a pool
whose StartTask fails is `starttaskfailed`, and `run` refuses it naming the node and its StartTask's stderr tail.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import mpilaunch as package
from mpilaunch.cli import cli
from mpilaunch.cli.clickutil import run_cli
from mpilaunch.client import local
from mpilaunch.client.api import Launcher
from mpilaunch.emulator.nodes.vm import TASK_USER

pytestmark = [pytest.mark.slow, pytest.mark.azurite, pytest.mark.timeout(1200)]

HELLO = Path(__file__).resolve().parents[2] / "examples" / "hello_mpi.py"
INSTALL_TIMEOUT = 600.0  # apt + pip on 3 nodes at once, on 2 cores
WHO = ("import getpass, socket, sys; from mpi4py import MPI; "
       "print('rank', MPI.COMM_WORLD.rank, 'user', getpass.getuser(), 'python', sys.prefix, socket.gethostname())")

Cli = Callable[..., tuple[int, str]]


@pytest.fixture
def mpilaunch(capsys: pytest.CaptureFixture[str]) -> Cli:
    def run(*args: str) -> tuple[int, str]:
        code = run_cli(cli, "mpilaunch", list(args))
        out = capsys.readouterr()
        return code, out.out + out.err
    return run


def wait_nodes(batch: Any, pool_id: str, states: list[str], timeout: float = INSTALL_TIMEOUT,
               ready: Callable[[Any], bool] = lambda node: True) -> list[Any]:
    """The pool's nodes once their states are ``states`` and each is ``ready``."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = list(batch.list_nodes(pool_id))
        if [getattr(n.state, "value", n.state) for n in nodes] == states and all(map(ready, nodes)):
            return nodes
        assert time.monotonic() < deadline, [(n.id, n.state, n.start_task_info, n.errors) for n in nodes]
        time.sleep(1)


def start_task_output(batch: Any, pool_id: str, node_id: str) -> str:
    return b"".join(batch.download_node_file(pool_id, node_id, "startup/stdout.txt")).decode()


def test_install_runtime_pool_runs_mpi_as_the_task_user_and_survives_a_restart(
        local_home: Path, vm_image: str, mpilaunch: Cli) -> None:
    pool_id = f"lvm-{uuid.uuid4().hex[:6]}"
    code, out = mpilaunch("pool", "create", pool_id, "--local", "-n", "3", "--install-runtime")
    assert code == 0, out
    batch = Launcher.local().batch
    nodes = wait_nodes(batch, pool_id, ["idle"] * 3)
    for node in nodes:
        assert node.start_task_info.exit_code == 0
        assert f"installed mpilaunch-{package.__version__}-py3-none-any.whl" in start_task_output(
            batch, pool_id, node.id)

    logs = local_home / "logs"
    code, out = mpilaunch("run", "--local", "--pool", pool_id, "-n", "3", "-i", str(HELLO), "--timeout", "300",
                          "--logs", str(logs), "--", "python3", "hello_mpi.py")
    assert code == 0, out
    primary = (logs / "instance-0" / "stdout.txt").read_text()
    assert "3 distinct host(s)" in primary, primary

    # The nodes restart (`local down` deallocates the VMs, `local up` starts them): every StartTask runs again, keeps
    # the installed runtime, and the nodes serve again.
    local.down()
    local.up(1, default_ports=False)
    batch = Launcher.local().batch
    first = max(n.start_task_info.end_time for n in nodes)
    for node in wait_nodes(batch, pool_id, ["idle"] * 3, ready=lambda n: n.start_task_info.start_time > first):
        assert node.start_task_info.exit_code == 0
        assert "already installed" in start_task_output(batch, pool_id, node.id)
    code, out = mpilaunch("run", "--local", "--pool", pool_id, "-n", "3", "--ppn", "1", "--timeout", "300",
                          "--logs", str(logs / "who"), "--", "python3", "-c", WHO)
    assert code == 0, out
    ranks = [line.split() for line in (logs / "who" / "instance-0" / "stdout.txt").read_text().splitlines()
             if line.startswith("rank ")]
    assert sorted(int(r[1]) for r in ranks) == [0, 1, 2], ranks
    assert {r[3] for r in ranks} == {TASK_USER}, ranks  # the non-admin auto-user, not root
    prefixes = {r[5] for r in ranks}  # the runtime's venv (where mpi4py is), the same on every node
    assert len(prefixes) == 1 and prefixes.pop().startswith("/opt/mpilaunch/"), ranks
    assert len({r[6] for r in ranks}) == 3, ranks


def test_a_pool_whose_start_task_fails_is_refused_with_its_stderr(
        local_home: Path, vm_image: str, mpilaunch: Cli, tmp_path: Path) -> None:
    broken = tmp_path / f"mpilaunch-{package.__version__}-py3-none-any.whl"
    broken.write_bytes(b"not a zip archive")
    pool_id = f"lbad-{uuid.uuid4().hex[:6]}"
    code, out = mpilaunch("pool", "create", pool_id, "--local", "-n", "1", "--install-runtime", "--runtime-wheel",
                          str(broken))
    assert code == 0, out
    wait_nodes(Launcher.local().batch, pool_id, ["starttaskfailed"])
    code, out = mpilaunch("run", "--local", "--pool", pool_id, "-n", "1", "--", "true")
    assert code == 2, out
    assert "(1 starttaskfailed)" in out and "the StartTask failed (exit code 1" in out, out
    assert 'install-runtime: error: step "install the runtime" failed' in out, out
