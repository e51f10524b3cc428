"""`mpilaunch local up` + `pool create --local --container-image` + `run --local --image`: ranks in docker nodes.

`local up` runs the emulator with ``--nodes auto``; with docker answering, a container pool gets node containers of
the task image, and `run --image` runs the example's three ranks in them (inputs through Azurite).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from mpilaunch.cli import cli
from mpilaunch.cli.clickutil import run_cli
from mpilaunch.client import local
from mpilaunch.client.api import Launcher
from tests.support.docker import docker

pytestmark = [pytest.mark.slow, pytest.mark.azurite, pytest.mark.timeout(300)]

HELLO = Path(__file__).resolve().parents[2] / "examples" / "hello_mpi.py"


def test_local_container_pool_runs_the_example_on_docker_nodes(
        local_home: Path, docker_image: str, capsys: pytest.CaptureFixture[str]) -> None:
    def mpilaunch(*args: str) -> tuple[int, str]:
        code = run_cli(cli, "mpilaunch", list(args))
        out = capsys.readouterr()
        return code, out.out + out.err

    pool_id = f"lcont-{uuid.uuid4().hex[:6]}"
    code, out = mpilaunch("pool", "create", pool_id, "--local", "-n", "3", "--container-image", docker_image)
    assert code == 0, out
    batch = Launcher.local().batch
    deadline = time.monotonic() + 120
    while [n.state for n in batch.list_nodes(pool_id)] != ["idle"] * 3:
        assert time.monotonic() < deadline, [(n.state, n.errors) for n in batch.list_nodes(pool_id)]
        time.sleep(0.5)
    code, out = mpilaunch("run", "--local", "--pool", pool_id, "-n", "3", "--image", docker_image, "-i", str(HELLO),
                          "--timeout", "150", "--logs", str(local_home / "logs"), "--", "python3", "hello_mpi.py")
    assert code == 0, out
    primary = (local_home / "logs" / "instance-0" / "stdout.txt").read_text()
    names = docker("ps", "--filter", f"label=org.mpilaunch.emulator={local.docker_scope()}",
                   "--filter", f"label=org.mpilaunch.pool={pool_id}", "--format", "{{.ID}}").stdout.split()
    hostnames = sorted(docker("inspect", "-f", "{{.Config.Hostname}}", *names).stdout.split())
    assert len(hostnames) == 3
    assert f"3 distinct host(s): {', '.join(hostnames)}" in primary, primary
