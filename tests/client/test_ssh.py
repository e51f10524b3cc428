"""End to end: ``mpilaunch ssh --local`` logs in to a task's node through Batch's remote login APIs on the emulator
(real OpenSSH), runs a command in the task's working directory, and leaves no node user and no key behind, also when
interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from mpilaunch.cli import cli
from mpilaunch.cli.clickutil import run_cli
from mpilaunch.client.api import Launcher, TaskRef
from mpilaunch.client.local import LOCAL_POOL, LocalState, local_dir
from mpilaunch.emulator.nodes.process import isolation_available
from tests.client.conftest import new_task_id

pytestmark = [pytest.mark.slow, pytest.mark.azurite, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]


def cli_run(capfd: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run the CLI in-process; ssh writes to the file descriptors, so capture those."""
    capfd.readouterr()
    code = run_cli(cli, "mpilaunch", list(args))
    out = capfd.readouterr()
    return code, out.out, out.err


def node_users() -> dict[str, list[str]]:
    """Every local node's users, from the emulator's login state (what Add/Delete User made)."""
    found = {}
    for state in (local_dir() / "emulator" / "nodes" / LOCAL_POOL).glob("*.login"):
        users = state / "users.json"
        found[state.name.removesuffix(".login")] = [u["name"] for u in json.loads(users.read_text())] \
            if users.exists() else []
    return found


def no_users() -> bool:
    return not any(node_users().values())


@pytest.fixture(scope="module")
def task(local_services: LocalState) -> str:
    """A completed 2-instance task on the local pool."""
    task_id = new_task_id("ssh")
    code = run_cli(cli, "mpilaunch", ["run", "--local", "-n", "2", "--task-id", task_id, "--timeout", "120", "--",
                                      "python3", "-c", "open('left-here.txt', 'w').write('x')"])
    assert code == 0
    return task_id


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where the session's temporary key directory goes (to check it is gone)."""
    directory = tmp_path / "tmp"
    directory.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    return directory


def test_a_command_runs_on_the_tasks_node_in_its_working_directory(task: str, private_tmp: Path,
                                                                    capfd: pytest.CaptureFixture[str]) -> None:
    primary = _node(task, 0)
    code, out, err = cli_run(capfd, "ssh", "--local", task, "--", "hostname;", "echo", "$AZ_BATCH_NODE_ID;",
                             "id", "-un;", "pwd;", "ls")
    assert code == 0, err
    hostname, node_id, user, cwd, *files = out.split()
    assert node_id == primary and user.startswith("mpl") and user != "root"
    if isolation_available():  # the node's own host name and Azure's paths
        assert hostname == primary.lower().replace("_", "-")
        assert cwd == f"/mnt/batch/tasks/workitems/mpilaunch/job-1/{task}/wd"
    assert "left-here.txt" in files
    assert no_users() and not list(private_tmp.iterdir())  # the user deleted, the key gone


def test_instance_exit_status_and_json(task: str, private_tmp: Path, capfd: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli_run(capfd, "ssh", "--local", task, "--instance", "1", "--output", "json", "--",
                             "echo $AZ_BATCH_NODE_ID; exit 7")
    assert code == 7
    report = json.loads(err.strip().splitlines()[-1])
    assert report["node"] == out.strip() == _node(task, 1) and report["instance"] == 1
    assert report["exit_code"] == 7 and report["user_deleted"] is True and report["admin"] is False
    assert report["user"] == report["login"] and report["port"] > 0
    assert no_users() and not list(private_tmp.iterdir())


def test_any_pool_node_and_errors(task: str, capfd: pytest.CaptureFixture[str]) -> None:
    node = _node(task, 1)
    code, out, err = cli_run(capfd, "ssh", "--local", "--pool", LOCAL_POOL, "--node", node, "--", "echo",
                             "$AZ_BATCH_NODE_ID", "$PWD")
    assert code == 0 and out.split()[0] == node, err
    code, _, err = cli_run(capfd, "ssh", "--local", task, "--instance", "9", "--", "true")
    assert code == 2 and "has no instance 9 (instances: [0, 1])" in err
    code, _, err = cli_run(capfd, "ssh", "--local", "--pool", LOCAL_POOL, "--node", "tvmps_nope_d", "--", "true")
    assert code == 4 and "NodeNotFound" in err
    code, _, err = cli_run(capfd, "ssh", "--local", "--pool", LOCAL_POOL, "--", "true")
    assert code == 2 and "--pool and --node go together" in err
    assert no_users()


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_an_interrupted_session_deletes_its_user(task: str, tmp_path: Path, how: str) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-c", "from mpilaunch.cli import main; main()", "ssh", "--local", task,
                             "--", "sleep", "60"], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while no_users() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert not no_users(), proc.communicate()[1] if proc.poll() is not None else "no user appeared"
        time.sleep(1)  # ssh is connected by now
        if how == "ctrl-c":  # the terminal signals the whole foreground process group: client and ssh
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err
    assert no_users() and not [p for p in tmp_path.iterdir() if p.name.startswith("mpilaunch-ssh-")]


def _node(task: str, instance: int) -> str:
    """The node instance ``instance`` of ``task`` ran on."""
    results = Launcher.local().results(TaskRef("mpilaunch", task))
    return next(str(r.node) for r in results.instances if r.instance == instance)
