"""End to end: `mpilaunch doctor --local -n 3` through the CLI against the emulator (real sshd on every node, the
agents over the coordination service's ssh), passing, failing on purpose with the fix in the output, and failing
without a report when a node's service cannot start."""

from __future__ import annotations

import json
import socket
import time

import pytest

from mpilaunch.cli import cli
from mpilaunch.cli.clickutil import run_cli
from mpilaunch.client.api import Launcher
from mpilaunch.client.local import LocalState
from node_runtime.doctor import CHECKS, SCHEMA_ID
from tests.client.conftest import new_task_id

pytestmark = [pytest.mark.slow, pytest.mark.azurite, pytest.mark.timeout(240)]


def doctor(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str, float]:
    started = time.monotonic()
    code = run_cli(cli, "mpilaunch", ["doctor", "--local", "-n", "3", *args])
    out = capsys.readouterr()
    return code, out.out, out.err, time.monotonic() - started


def test_doctor_passes_on_three_local_nodes(local_services: LocalState, capsys: pytest.CaptureFixture[str]) -> None:
    task = new_task_id("doctor")
    code, out, err, seconds = doctor(capsys, "--task-id", task)
    assert code == 0, out + err
    assert f"doctor mpilaunch/{task}: every check passed" in out
    assert out.count("(primary)") == 1 and "✗" not in out
    assert f"doctor: every check passed on 3 node(s) (task mpilaunch/{task})" in err
    assert seconds < 15, f"the doctor took {seconds:.1f} s"

    code, out, err, _ = doctor(capsys, "--output", "json")
    assert code == 0, err
    report = json.loads(out)
    assert report["schema"] == SCHEMA_ID and report["ok"] and report["problems"] == 0
    assert report["task"].endswith("success on 3 instance(s)")
    nodes = report["nodes"]
    assert [n["primary"] for n in nodes] == [True, False, False] and len({n["host"] for n in nodes}) == 3
    for node in nodes:
        assert [c["check"] for c in node["checks"]] == list(CHECKS)
        assert {c["status"] for c in node["checks"]} == {"ok"}, node["checks"]
        # every other node reached on its MPI listener and on the task port
        assert sorted((r["host"], r["kind"]) for r in node["reach"]) == sorted(
            (other["host"], kind) for other in nodes if other is not node for kind in ("mpi", "task"))
        assert node["facts"]["mpi4py"] and node["facts"]["mpirun"].startswith("mpirun (Open MPI)")
    assert all(abs(n["clock"]["offset"]) < 0.5 for n in nodes[1:])  # one machine's clock


def test_doctor_fails_a_check_and_says_the_fix(local_services: LocalState, capsys: pytest.CaptureFixture[str]) -> None:
    """100000 ranks per node need 6 TiB of /dev/shm, and no task directory has 1 PiB free: both fail everywhere."""
    code, out, err, _ = doctor(capsys, "--ppn", "100000", "--min-free-disk", "1P")
    assert code == 1, out + err
    assert "6 problem(s)" in out and "doctor: 6 problem(s) on 3 node(s)" in err
    assert out.count("✗") == 6 and "problems and their fixes" in out
    # the nodes share one problem's row (same /dev/shm, same disk): each problem with its fix
    assert out.count("100000 ranks need") == 1 and "give the nodes a larger /dev/shm" in out
    assert "less than 1.0 PiB" in out and "free space on that disk" in out

    code, out, err, _ = doctor(capsys, "--ppn", "100000", "--output", "json")
    assert code == 1, err
    report = json.loads(out)
    assert not report["ok"] and report["problems"] == 3
    for node in report["nodes"]:
        failed = [c for c in node["checks"] if c["status"] == "fail"]
        assert [c["check"] for c in failed] == ["shm"] and "--shm-size=" in failed[0]["fix"]


def test_a_node_whose_service_cannot_start_fails_the_task_and_says_why(
        local_services: LocalState, capsys: pytest.CaptureFixture[str]) -> None:
    """A port taken on one node's address: its coordination command fails, so Batch never starts the primary's
    doctor; the client says there is no report, names the instance and shows its stderr."""
    victim = list(Launcher.local().batch.list_nodes("local"))[-1]
    with socket.socket() as blocker:
        blocker.bind((victim.ip_address, 0))
        blocker.listen()
        code, out, err, _ = doctor(capsys, "--ssh-port", str(blocker.getsockname()[1]))
    assert code == 1, out + err
    assert "the doctor wrote no report" in err and f"on {victim.id}: exit code" in err
    assert "stderr (last lines):" in err and "already in use" in err
