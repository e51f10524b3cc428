"""Live output end to end: the emulator over HTTP with the unmodified SDK, real sshd and Open MPI. A rank's line is
shown while the task still runs (the follower, `logs -f`, `run`), and `logs` names instances that do not exist."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from mpilaunch.cli import cli
from mpilaunch.cli.clickutil import run_cli
from mpilaunch.client.api import Launcher, TaskRef
from mpilaunch.client.local import LocalState
from mpilaunch.client.spec import TaskSpec
from tests.client.conftest import new_task_id

pytestmark = [pytest.mark.slow, pytest.mark.azurite, pytest.mark.timeout(300)]

SLEEPY = """
import sys, time
from mpi4py import MPI
rank = MPI.COMM_WORLD.Get_rank()
print(f"ready {rank}", flush=True)
print(f"warning {rank}", file=sys.stderr, flush=True)
time.sleep(float(sys.argv[1]))
MPI.COMM_WORLD.Barrier()
print(f"done {rank}", flush=True)
"""

FAILS = """
import sys
from mpi4py import MPI
print(f"bye {MPI.COMM_WORLD.Get_rank()}", flush=True)
MPI.COMM_WORLD.Barrier()
sys.exit(3)
"""


def submit(launcher: Launcher, name: str, sleep: float) -> TaskRef:
    spec = TaskSpec("mpilaunch", new_task_id(name), 2, ("python3", "-c", SLEEPY, str(sleep)), upload_logs=False)
    return launcher.submit(spec)


def state(launcher: Launcher, ref: TaskRef) -> str:
    value = launcher.batch.get_task(ref.job_id, ref.task_id).state
    return str(getattr(value, "value", value))


def test_follower_shows_a_line_while_the_task_runs(local_services: LocalState) -> None:
    launcher = Launcher.local()
    ref = submit(launcher, "live", 15)
    seen: dict[str, str] = {}

    def emit(line: str, is_err: bool) -> None:
        seen.setdefault(line, state(launcher, ref))
        assert not is_err or not line.startswith("["), line  # rank lines come tagged from ranks.log

    res = launcher.follow(ref, emit, timeout=180, interval=0.5)
    assert res.succeeded, res.summary()
    for rank in (0, 1):
        assert seen[f"[{rank}] ready {rank}"] == "running", seen
        assert f"[{rank}:err] warning {rank}" in seen and f"[{rank}] done {rank}" in seen, seen
    assert not [line for line in seen if line in ("ready 0", "warning 0")], seen  # no untagged copies


def test_logs_follow_streams_until_the_task_completes(local_services: LocalState) -> None:
    launcher = Launcher.local()
    ref = submit(launcher, "logsf", 15)
    proc = subprocess.Popen([sys.executable, "-c", "from mpilaunch.cli import main; main()", "logs", "--local",
                             "-f", "--interval", "0.5", ref.task_id],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    assert proc.stdout is not None and proc.stderr is not None
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(proc.stderr or ()), daemon=True)
    reader.start()
    lines, when_ready = [], None
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if line.startswith("[0] ready 0"):
            when_ready = state(launcher, ref)
    assert proc.wait(60) == 0, (lines, err)
    reader.join(10)
    assert when_ready == "running", lines
    assert {"[0] done 0", "[1] done 1", "[1:err] warning 1"} <= set(lines), lines
    assert f"task mpilaunch/{ref.task_id}: completed, success on 2 instance(s)" in "".join(err)
    assert "deserialization error" not in "".join(err)  # the SDK's warning on ranks.log's 404s before mpirun: hidden


def test_run_shows_output_unless_told_not_to(local_services: LocalState, capsys: pytest.CaptureFixture[str]) -> None:
    for extra, shown in (((), True), (("--no-output",), False), (("--raw-output",), True)):
        task = new_task_id("runlive")
        code = run_cli(cli, "mpilaunch", ["run", "--local", "-n", "2", "--task-id", task, "--no-logs", "--interval",
                                          "0.5", *extra, "--", "python3", "-c", SLEEPY, "1"])
        out, err = capsys.readouterr()
        assert code == 0, err
        tagged = "[1] ready 1" in err.splitlines()
        raw = "ready 1" in err.splitlines()
        assert (tagged, raw) == ((shown and not extra), (shown and bool(extra))), (extra, err)
        assert "ready" not in out  # stdout keeps the results table only


def test_logs_names_instances_that_do_not_exist(local_services: LocalState,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    launcher = Launcher.local()
    ref = submit(launcher, "count", 0)
    assert launcher.wait(ref, timeout=120, interval=0.5).succeeded
    for args in (["--instance", "5"], ["--instance", "-1"], ["-f", "--instance", "2"]):
        code = run_cli(cli, "mpilaunch", ["logs", "--local", ref.task_id, *args])
        err = capsys.readouterr().err
        assert code == 2 and "no such instance" in err and "has 2 instance(s)" in err, (args, err)
    started = time.monotonic()
    code = run_cli(cli, "mpilaunch", ["logs", "--local", ref.task_id, "-f", "--instance", "1", "--stderr"])
    out, err = capsys.readouterr()
    assert code == 0 and out == "" and time.monotonic() - started < 30, err  # completed: one read, then done


def test_logs_follow_exit_status_is_the_task_result(local_services: LocalState,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    launcher = Launcher.local()
    spec = TaskSpec("mpilaunch", new_task_id("fails"), 2, ("python3", "-c", FAILS), upload_logs=False)
    ref = launcher.submit(spec)
    code = run_cli(cli, "mpilaunch", ["logs", "--local", "-f", "--interval", "0.5", ref.task_id])
    out, err = capsys.readouterr()
    assert code == 1 and "[1] bye 1" in out.splitlines() and "failure" in err, (out, err)
    code = run_cli(cli, "mpilaunch", ["logs", "--local", "-f", "--raw", ref.task_id])
    out, err = capsys.readouterr()
    assert code == 1 and "bye 1" in out.splitlines() and "[1] bye 1" not in out, (out, err)
