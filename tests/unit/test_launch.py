"""Pieces of launch that need no cluster: the gate mpirun's ssh waits at, the report's secret scrubbing, the
MPICH/Intel MPI wrapper."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

from node_runtime import proc, ranktap
from node_runtime.contract import MpiFlavor
from node_runtime.coordinate import prepare
from node_runtime.env import NodeEnvironment
from node_runtime.errors import TaskFailed
from node_runtime.fabric import PLAIN_TCP, layout
from node_runtime.launch import REPORT_NAME, Report, _forwarding_signals, _Gate, _kill_gated, _mpirun_command
from node_runtime.masters import control_path
from node_runtime.mpirun import ssh_command
from node_runtime.sshd import render_client_config, service_for


def test_mpiruns_ssh_waits_at_the_gate_until_it_opens(tmp_path: Path) -> None:
    """The real ``flock`` of :func:`ssh_command` (with ``true`` standing in for ssh) waits while launch holds the
    gate, and goes on as soon as it opens."""
    gate = _Gate(tmp_path / "gate.lock")
    gate.hold()
    try:
        argv = [*ssh_command(gate.path)[:-1], "true"]
        waiting = subprocess.Popen(argv)
        with pytest.raises(subprocess.TimeoutExpired):
            waiting.wait(0.5)
        gate.open()
        assert waiting.wait(10) == 0
        assert subprocess.run(argv, timeout=10, check=False).returncode == 0  # open stays open
    finally:
        gate.release()
        if waiting.poll() is None:
            waiting.kill()


def dead(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE  # orphans need not be reaped at once
    except psutil.NoSuchProcess:
        return True


def test_killing_a_gated_mpirun_kills_what_waits_at_the_gate(tmp_path: Path) -> None:
    """An "mpirun" whose children wait at the gate: killed with them, none of them ever runs its command."""
    gate = _Gate(tmp_path / "gate.lock")
    gate.hold()
    ran = tmp_path / "ran"
    waiter = " ".join([*ssh_command(gate.path)[:-1], "touch", str(ran)])
    child = proc.spawn(["sh", "-c", f"{waiter} & {waiter} & wait"])
    try:
        time.sleep(0.5)
        family = psutil.Process(child.pid).children(recursive=True)
        assert len(family) == 2
        _kill_gated(child)
        assert child.returncode is not None
        deadline = time.monotonic() + 5
        while not all(map(dead, family)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(map(dead, family))
    finally:
        gate.release()
    time.sleep(0.3)
    assert not ran.exists()


def test_report_never_contains_the_secret(tmp_path: Path) -> None:
    secret = "s3cr3t-" + "x" * 40
    report = Report(hosts=["10.0.0.1"], command=["python", f"--token={secret}"])
    report.error = f"something mentioned {secret}"
    path = report.write(tmp_path / "wd", secret)
    assert path == tmp_path / "wd" / REPORT_NAME
    text = path.read_text()
    assert secret not in text and "<hidden>" in text
    assert json.loads(text)["hosts"] == ["10.0.0.1"]


def hydra_node(tmp_path: Path) -> tuple[NodeEnvironment, dict[str, str]]:
    task = tmp_path / "task"
    environ = {
        "AZ_BATCH_HOST_LIST": "10.0.0.5,10.0.0.4", "AZ_BATCH_MASTER_NODE": "10.0.0.4:6000",
        "AZ_BATCH_IS_CURRENT_NODE_MASTER": "true", "AZ_BATCH_TASK_ID": "t", "AZ_BATCH_JOB_ID": "j",
        "AZ_BATCH_NODE_ID": "n", "AZ_BATCH_TASK_DIR": str(task), "AZ_BATCH_TASK_SHARED_DIR": str(task),
        "AZ_BATCH_TASK_WORKING_DIR": str(task / "wd"), "AZ_BATCH_NODE_ROOT_DIR": str(tmp_path),
        "MPILAUNCH_TASK_SECRET": secrets.token_urlsafe(32), "PATH": "/usr/bin:/bin",
    }
    return NodeEnvironment.from_environ(environ, local_addresses=["10.0.0.4"]), environ


@pytest.mark.parametrize("flavor", [MpiFlavor.MPICH, MpiFlavor.INTELMPI])
def test_hydra_flavors_get_an_ssh_wrapper_and_a_hostfile(tmp_path: Path, flavor: MpiFlavor) -> None:
    env, environ = hydra_node(tmp_path)
    env.working_dir.mkdir(parents=True)
    svc = prepare(env)
    try:
        argv, mpirun_env = _mpirun_command(env, environ, svc, flavor=flavor, placement=layout(2, None, None),
                                           choice=PLAIN_TCP, command=["python3", "app.py"],
                                           mpirun="/usr/bin/mpiexec", gate=svc.files.directory / "gate.lock")
    finally:
        shutil.rmtree(svc.tmp_dir, ignore_errors=True)
        shutil.rmtree(svc.files.private, ignore_errors=True)
    wrapper, hostfile = svc.files.directory / "ssh-wrapper", svc.files.directory / "hostfile"
    assert stat.S_IMODE(wrapper.stat().st_mode) == 0o700
    assert f"flock -s -o {svc.files.directory / 'gate.lock'} ssh -F {svc.client_config}" in wrapper.read_text()
    assert hostfile.read_text() == "10.0.0.4:2\n10.0.0.5:2\n"  # the primary first: rank 0 runs there
    assert str(wrapper) in argv and str(hostfile) in argv
    tap = [sys.executable, "-I", "-S", str(Path(ranktap.__file__))]
    python3 = shutil.which("python3", path="/usr/bin:/bin")  # resolved on PATH
    # the tap in front of every rank; the system's python3 cannot import node_runtime: the program runs as given
    assert argv[-len(tap) - 2:] == [*tap, python3, "app.py"]
    assert "MPILAUNCH_TASK_SECRET" not in mpirun_env and mpirun_env["TMPDIR"] == str(svc.tmp_dir)


def test_a_signal_while_deferring_ends_the_launch_after_the_block() -> None:
    with _forwarding_signals() as signals:
        with pytest.raises(TaskFailed, match="SIGTERM") as caught, signals.deferring():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            reached = True  # the block was not cut short
        assert reached and caught.value.exit_code == 128 + signal.SIGTERM


def test_a_signal_while_deferring_goes_to_mpirun_once_it_is_a_target() -> None:
    child = proc.spawn(["sleep", "30"])
    try:
        with _forwarding_signals() as signals, signals.deferring():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            assert child.poll() is None  # kept, not yet delivered
            signals.targets.append(child)
        assert child.wait(10) == -signal.SIGTERM
    finally:
        child.kill()


def test_signals_during_the_clean_up_are_only_noted() -> None:
    with _forwarding_signals() as signals:
        signals.deferred = True
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert signals.pending == signal.SIGINT


@pytest.mark.parametrize(("tmp_dir", "multiplexed"), [("/tmp/mpl-0-0123456789ab", True), ("/" + "t" * 46, True),
                                                      ("/" + "t" * 47, False), ("/" + "x" * 200, False)])
def test_control_sockets_only_where_any_host_name_fits_a_unix_socket_path(tmp_dir: str, multiplexed: bool) -> None:
    """ssh dies on a ControlPath too long for a Unix socket, so then the config names none and masters make none."""
    svc = replace(service_for("/task", "10.0.0.4", 2222), tmp_dir=Path(tmp_dir))
    config = render_client_config(svc)
    path = control_path(svc, "fd00:1234:5678:9abc:def0:1234:5678:9abc")
    if multiplexed:
        assert path is not None and len(str(path)) + len(".0123456789abcdef") < 108
        assert f"ControlPath {tmp_dir}/cm-%h" in config and "ControlMaster no" in config
    else:
        assert path is None and "Control" not in config


def test_a_python_program_runs_through_rankmain_when_its_python_can_import_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from node_runtime.launch import _rank_command

    environ = {"PATH": os.environ["PATH"]}
    ours = [sys.executable, "-u", "app.py", "--steps", "3"]
    assert _rank_command(ours, environ, True, tmp_path) == [sys.executable, "-u", "-m", "node_runtime.rankmain",
                                                             "app.py", "--steps", "3"]
    assert _rank_command(ours, environ, False, tmp_path) == ours  # --no-abort-on-exception
    assert _rank_command(["/bin/sh", "run.sh"], environ, True, tmp_path) == ["/bin/sh", "run.sh"]
    # a Python that cannot import node_runtime (asked in the ranks' working directory): as given, and said so
    other = tmp_path / "bin" / "python3"
    other.parent.mkdir()
    other.write_text("#!/bin/sh\nexit 1\n")
    other.chmod(0o755)
    assert _rank_command([str(other), "app.py"], environ, True, tmp_path) == [str(other), "app.py"]
    assert "cannot import node_runtime" in capsys.readouterr().err
    # the interpreter our venv's python links to, elsewhere: the same binary, but without our packages
    base = tmp_path / "base" / "python3"
    base.parent.mkdir()
    base.symlink_to(os.path.realpath(sys.executable))
    if sys.prefix != sys.base_prefix:
        assert _rank_command([str(base), "app.py"], environ, True, tmp_path) == [str(base), "app.py"]


def test_the_report_names_a_hang_and_launchs_own_failure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from node_runtime.errors import HangDetected, ServiceError
    from node_runtime.launch import _finish_output

    hung = Report(hosts=["10.0.0.4"], command=["python3", "app.py"])
    hung.failed(HangDetected("hang: 2 of 3 ranks wait in Barrier at app.py:9"))
    assert hung.exit_code == 124 and hung.first_failure is not None
    assert (hung.first_failure["how"], hung.first_failure["summary"]) == (
        "hang", "hang: 2 of 3 ranks wait in Barrier at app.py:9")
    refused = Report(hosts=["10.0.0.4"], command=["python3", "app.py"])
    refused.failed(ServiceError("the coordination service did not answer"))
    _finish_output(refused, None)
    assert refused.first_failure is not None and refused.first_failure["how"] == "launch"
    assert "first failure" not in capsys.readouterr().err  # launch's own error is said once, as the error
    data = json.loads(refused.write(tmp_path, None).read_text())
    assert data["first_failure"]["summary"] == "the coordination service did not answer"
    fine = Report(hosts=["10.0.0.4"], command=["x"])
    fine.exit_code = 0
    _finish_output(fine, None)
    assert fine.first_failure is None
