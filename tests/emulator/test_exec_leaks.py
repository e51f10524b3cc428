"""No process of a multi-instance task survives it, the coordination sshd included, and the next task on the same
nodes gets the task port: after a terminate, and after a coordination failure on one node.

sshd overwrites its argv/environ with its process title (so the emulator's tag is gone from /proc/PID/environ) and
runs in its own session after ``node-runtime coordinate`` exits: these tests check by the pids the node runtime
recorded (``.mpilaunch/sshd.pid`` on each node), their descendants (orted, ranks), and the port's listeners — never
by the tag. Through the engine with and without per-node namespaces, and over HTTP with the real emulator (also
across its crash, recovery and shutdown).
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import pytest
from azure.batch import models as m

from mpilaunch.emulator.nodes.process import ProcessProvider, isolation_available
from tests.support.azurite import free_port
from tests.support.emulator import start_emulator
from tests.support.exec_engine import Rig, py, rig, wait_for
from tests.support.exec_sdk import Batch, add_mi_task, completed, make_job, make_pool, text

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]
COORDINATE = "node-runtime coordinate"
FAIL_OFF_PRIMARY = shlex.join(["/bin/sh", "-c", f'{COORDINATE} && test "$AZ_BATCH_IS_CURRENT_NODE_MASTER" = true'])
"""Coordination that starts sshd everywhere, then fails on every node but the primary."""
SLEEP = py("import time; open('running', 'w').close(); time.sleep(300)")
"""A command line that marks its start in the working dir, then sleeps."""


@pytest.fixture(autouse=True)
def _needs_sshd() -> None:
    if shutil.which("ssh") is None or not (shutil.which("sshd") or Path("/usr/sbin/sshd").exists()):
        pytest.skip("ssh/sshd missing: run scripts/setup")


def task_env(nodes: int, port: int) -> dict[str, str]:
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    return {"AZ_BATCH_NODE_COUNT": str(nodes), "MPILAUNCH_TASK_SECRET": secret, "MPILAUNCH_SSH_PORT": str(port)}


def recorded_sshds(roots: list[Path], job_id: str, task_id: str) -> list[int]:
    """The sshd pids the node runtime recorded on each node for the task."""
    pids = []
    for root in roots:
        pid_file = root / "workitems" / job_id / "job-1" / task_id / ".mpilaunch" / "sshd.pid"
        if pid_file.exists():
            pids.append(int(pid_file.read_text().split()[0]))
    return pids


def with_descendants(pids: list[int]) -> list[psutil.Process]:
    found = []
    for pid in pids:
        try:
            root = psutil.Process(pid)
            found += [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    return found


def _names(processes: list[psutil.Process]) -> set[str]:
    names = set()
    for p in processes:
        try:
            names.add(p.name())
        except psutil.NoSuchProcess:
            continue  # an ssh session that ended meanwhile
    return names


def listeners(addresses: list[str], port: int) -> list[int | None]:
    return [c.pid for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.laddr.ip in addresses]


def _dead(p: psutil.Process) -> bool:
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def assert_nothing_survives(processes: list[psutil.Process], addresses: list[str], port: int | None) -> None:
    """``processes`` die within 5 s, and nothing listens on ``port`` (unless None) on the nodes' addresses."""
    assert processes, "the task started no sshd to check"
    deadline = time.monotonic() + 5
    while (alive := [p for p in processes if not _dead(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    for p in alive:
        p.kill()
    assert not alive, f"processes of the task survived it: {[p.pid for p in alive]} {_names(alive)}"
    assert port is None or not listeners(addresses, port), f"port {port} is still listened on"


# -- through the engine, with and without per-node namespaces ------------------------------------------------------

@pytest.fixture(params=["isolated", "plain"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Rig]:
    if request.param == "isolated" and not isolation_available():
        pytest.skip("per-node namespaces need root and unshare")
    with rig(tmp_path, ProcessProvider(isolate=request.param == "isolated")) as r:
        r.pool(nodes=2)
        r.job()
        r.idle(2)
        yield r


def _nodes(r: Rig) -> tuple[list[Path], list[str]]:
    docs = r.store.list("node", ("pool",))
    return [Path(d["_root"]) for d in docs], [d["ipAddress"] for d in docs]


def _env(env: dict[str, str]) -> list[dict[str, str]]:
    return [{"name": k, "value": v} for k, v in env.items()]


def _next_task_succeeds(r: Rig, port: int) -> None:
    r.task("next", py("print('next')"), instances=2, coordination=COORDINATE,
           environmentSettings=_env(task_env(2, port)))
    info = r.completed("next", 60)["executionInfo"]
    stderr = (Path(r.get("next")["_taskDir"]) / "stderr.txt").read_text()
    assert info["result"] == "success", stderr


def test_terminated_task_leaves_no_sshd_and_the_next_task_gets_the_port(engine: Rig) -> None:
    r, port = engine, free_port()
    roots, addresses = _nodes(r)
    r.task("t1", SLEEP, instances=2, coordination=COORDINATE, environmentSettings=_env(task_env(2, port)))
    pids = wait_for(lambda: len(p := recorded_sshds(roots, "job", "t1")) == 2 and p, 60, "sshd on both nodes")
    wait_for(lambda: any((root / "workitems/job/job-1/t1/wd/running").exists() for root in roots), 60,
             "the command line running (coordination done)")
    processes = with_descendants(pids)
    tmp_dirs = [_service_tmp_dir(root / "workitems/job/job-1/t1") for root in roots]
    assert all(d.is_dir() for d in tmp_dirs), f"no TMPDIR for the task's services: {tmp_dirs}"
    r.store.update("task", ("job",), "t1", lambda d: d.update(_terminating=True))
    r.engine.wake()
    assert r.completed("t1", 30)["executionInfo"]["failureInfo"]["code"] == "TaskEnded"
    assert_nothing_survives(processes, addresses, port)
    _next_task_succeeds(r, port)
    assert not [d for d in tmp_dirs if d.exists()], "the next task's coordinate left the killed task's TMPDIRs"


def _service_tmp_dir(task_dir: Path) -> Path:
    """The node-local TMPDIR the task's sshd gives its sessions (as the host sees it: /tmp is not per node)."""
    config = (task_dir / ".mpilaunch" / "sshd_config").read_text()
    found = re.search(r"^SetEnv TMPDIR=(\S+) ", config, re.MULTILINE)
    assert found, config
    return Path(found[1])


def test_coordination_failure_on_one_node_leaves_no_sshd(engine: Rig) -> None:
    r, port = engine, free_port()
    roots, addresses = _nodes(r)
    r.task("t1", SLEEP, instances=2, coordination=FAIL_OFF_PRIMARY, environmentSettings=_env(task_env(2, port)))
    info = r.completed("t1", 60)["executionInfo"]
    assert info["result"] == "failure" and info["failureInfo"]["code"] == "FailureExitCode", info
    pids = recorded_sshds(roots, "job", "t1")
    assert pids, "no node recorded its sshd"
    _check_recorded(pids, addresses, port)
    _next_task_succeeds(r, port)


def _check_recorded(pids: list[int], addresses: list[str], port: int) -> None:
    """The recorded sshds are gone (checked after the fact: they may already be)."""
    alive = [pid for pid in pids if psutil.pid_exists(pid) and not _dead(psutil.Process(pid))]
    assert not alive, f"sshd of the failed task survived: {alive}"
    assert not listeners(addresses, port), f"port {port} is still listened on"


# -- over HTTP: the real emulator, the real node runtime (coordinate + launch of mpirun) ------------------------------

def _pool_nodes(client: Any, emulator: Any, pool_id: str) -> tuple[list[Path], list[str]]:
    nodes = list(client.list_nodes(pool_id))
    return [emulator.data_dir / "nodes" / pool_id / n.id for n in nodes], [n.ip_address for n in nodes]


def test_terminated_launch_over_http_leaves_nothing_and_the_next_task_succeeds(batch: Batch, emulator: Any) -> None:
    if not isolation_available() or shutil.which("mpirun") is None:
        pytest.skip("mpirun across emulated nodes needs root, unshare and Open MPI")
    client, port = batch.client, free_port()
    pool_id = batch.pool(2)
    job_id = batch.job(pool_id)
    roots, addresses = _pool_nodes(client, emulator, pool_id)
    launch = shlex.join(["node-runtime", "launch", "--ppn", "1", "--", "sleep", "300"])
    task_id = add_mi_task(client, job_id, launch, COORDINATE, instances=2, env=task_env(2, port))
    pids = wait_for(lambda: len(p := recorded_sshds(roots, job_id, task_id)) == 2 and p, 60, "sshd on both nodes")
    processes = wait_for(lambda: "sleep" in _names(ps := with_descendants(pids)) and ps, 60,
                         "the ranks running under sshd")
    client.terminate_task(job_id, task_id)
    assert completed(client, job_id, task_id, 30).execution_info.failure_info.code == "TaskEnded"
    assert_nothing_survives(processes, addresses, port)

    again = add_mi_task(client, job_id, shlex.join(["node-runtime", "launch", "--ppn", "1", "--", "hostname"]),
                        COORDINATE, instances=2, env=task_env(2, port))
    task = completed(client, job_id, again, 120)
    assert task.execution_info.result == m.BatchTaskExecutionResult.SUCCESS, text(
        client.download_task_file(job_id, again, "stderr.txt"))


def test_coordination_failure_over_http_leaves_nothing_and_the_next_task_succeeds(batch: Batch,
                                                                                   emulator: Any) -> None:
    client, port = batch.client, free_port()
    pool_id = batch.pool(2)
    job_id = batch.job(pool_id)
    roots, addresses = _pool_nodes(client, emulator, pool_id)
    task_id = add_mi_task(client, job_id, SLEEP, FAIL_OFF_PRIMARY, instances=2, env=task_env(2, port))
    task = completed(client, job_id, task_id, 60)
    assert task.execution_info.failure_info.code == "FailureExitCode"
    _check_recorded(recorded_sshds(roots, job_id, task_id), addresses, port)
    again = add_mi_task(client, job_id, py("print('next')"), COORDINATE, instances=2, env=task_env(2, port))
    assert completed(client, job_id, again, 60).execution_info.result == m.BatchTaskExecutionResult.SUCCESS, text(
        client.download_task_file(job_id, again, "stderr.txt"))


def _coordinate_report(stdout: Path) -> str:
    text = stdout.read_text()
    return text if "coordinate: " in text else ""


def test_sshd_dies_with_the_emulator_crash_recovery_and_its_shutdown(tmp_path: Path) -> None:
    """A crashed emulator's task keeps its sshd (the keeper holds it); the restarted emulator kills it while
    recovering; a graceful shutdown kills the requeued attempt's sshd."""
    port = free_port()
    with start_emulator(tmp_path / "data") as emu:
        client = emu.client()
        pool_id = make_pool(client, 2)
        job_id = make_job(client, pool_id)
        roots, addresses = _pool_nodes(client, emu, pool_id)
        task_id = add_mi_task(client, job_id, SLEEP, COORDINATE, instances=2, env=task_env(2, port))
        first = wait_for(lambda: len(p := recorded_sshds(roots, job_id, task_id)) == 2 and p, 60, "sshd on both nodes")
        wait_for(lambda: any((r / "workitems" / job_id / "job-1" / task_id / "wd" / "running").exists()
                             for r in roots), 60, "the command line running")
        assert emu.proc is not None
        os.kill(emu.proc.pid, signal.SIGKILL)  # a crash: the task's processes outlive the emulator
        emu.proc.wait(10)
        processes = with_descendants(first)
        assert all(not _dead(p) for p in processes), "sshd should outlive a crashed emulator until its restart"
        emu.restart()
        assert_nothing_survives(processes, addresses, None)  # the requeued attempt may already have the port
        second = wait_for(lambda: len(p := recorded_sshds(roots, job_id, task_id)) == 2 and set(p) != set(first)
                          and p, 60, "the requeued attempt's sshd on both nodes")
        for root in roots:  # recovery killed the old sshd: the new attempt found the port free
            stdout = root / "workitems" / job_id / "job-1" / task_id / "stdout.txt"
            out = wait_for(partial(_coordinate_report, stdout), 30, "coordinate's report")
            assert " started (pid " in out and " replaced " not in out, out
        processes = with_descendants(second)
        emu.stop()
        assert_nothing_survives(processes, addresses, port)


def test_isolated_daemon_without_tag_or_keeper_is_found_by_its_namespace(tmp_path: Path) -> None:
    """On isolated nodes the mount namespace names the attempt: a detached daemon with an empty environment whose
    keeper was SIGKILLed (so it is re-parented to init) still dies with the task."""
    if not isolation_available():
        pytest.skip("per-node namespaces need root and unshare")
    escape = ("import os, signal, subprocess, sys\n"
              f"d = subprocess.Popen([{sys.executable!r}, '-c', 'import time; time.sleep(300)'], env={{}},\n"
              "                     start_new_session=True)\n"
              "open('daemon.pid', 'w').write(str(d.pid))\n"
              "os.kill(os.getppid(), signal.SIGKILL)  # the keeper\n")
    with rig(tmp_path, ProcessProvider(isolate=True)) as r:
        r.pool(nodes=1)
        r.job()
        r.task("t", py(escape))
        task = r.completed("t", 60)
        assert task["executionInfo"]["result"] == "failure"
        pid = int((Path(task["_taskDir"]) / "wd" / "daemon.pid").read_text())
        assert not psutil.pid_exists(pid) or _dead(psutil.Process(pid)), "the daemon survived the task"


@pytest.mark.parametrize("isolate", [True, False], ids=["isolated", "plain"])
def test_provider_reports_the_command_exit_while_its_keeper_holds_the_daemon(tmp_path: Path, isolate: bool) -> None:
    """The provider contract under the keeper: exit codes are the command's (128 + signal if killed; 127 if it
    cannot be executed), the command's end is seen at once though its daemon lives on, and kill_tag ends both."""
    if isolate and not isolation_available():
        pytest.skip("per-node namespaces need root and unshare")
    provider = ProcessProvider(isolate=isolate)
    node = provider.create_node({"id": "pool"}, "tvm-leaks", tmp_path / "node", [])
    (tmp_path / "node" / "wd").mkdir()
    cwd = node.node_path(tmp_path / "node" / "wd")

    def run(code: str | None, argv: list[str] | None = None) -> Any:
        return provider.run(node, argv or [sys.executable, "-c", code or ""], env={}, cwd=cwd,
                            stdout=tmp_path / "out.txt", stderr=tmp_path / "err.txt", tag="t")

    assert run("import sys; sys.exit(3)").wait(30) == 3
    assert run("import os, signal; os.kill(os.getpid(), signal.SIGTERM)").wait(30) == 128 + signal.SIGTERM
    assert run(None, ["/nonexistent/program"]).wait(30) == 127
    spawner = ("import subprocess, sys\n"
               f"d = subprocess.Popen([{sys.executable!r}, '-c', 'import time; time.sleep(300)'], "
               "start_new_session=True)\n"
               "open('daemon.pid', 'w').write(str(d.pid))\n")
    started = time.monotonic()
    execution = run(spawner)
    assert execution.wait(30) == 0 and time.monotonic() - started < 10  # not held up by the daemon
    daemon = psutil.Process(int((tmp_path / "node" / "wd" / "daemon.pid").read_text()))
    assert not _dead(daemon) and daemon.ppid() == execution.pid, "the daemon should be re-parented to its keeper"
    provider.kill_tag(node, "t")
    assert not daemon.is_running(), "killed and reaped (no zombie left)"
    assert execution.wait(5) == 0
