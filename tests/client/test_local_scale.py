"""The local pool's size limit, and ``mpilaunch local down`` leaving no node process behind."""

from __future__ import annotations

import os
import shlex
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from mpilaunch.client import local
from node_runtime.errors import InvalidInput
from tests.client.conftest import private_home
from tests.support.exec_engine import leftovers, wait_for

DAEMON = ("import os, sys\n"
          "if os.fork(): sys.exit(0)\n"
          "os.setsid()\n"
          "if os.fork(): os._exit(0)\n"
          "open('daemon.pid', 'w').write(str(os.getpid()))\n"
          "os.execve('/bin/sleep', ['sleep', '300'], {})\n")


def _running(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def test_the_local_pool_refuses_more_nodes_than_this_machine_holds(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPILAUNCH_HOME", str(tmp_path))
    monkeypatch.delenv(local.MAX_NODES_VARIABLE, raising=False)
    limit, why = local.node_limit()
    assert 1 <= limit <= local.NODES_PER_CORE * (os.cpu_count() or 1)
    assert "cores" in why and "memory" in why and "processes" in why
    local.check_size(limit)
    with pytest.raises(InvalidInput) as refused:
        local.up(limit + 1)  # before anything starts
    text = str(refused.value)
    assert f"its limit is {limit} process nodes" in text
    assert f"{local.MAX_NODES_VARIABLE}={limit + 1}" in text
    assert not (tmp_path / "local" / "state.json").exists(), "nothing was started"
    monkeypatch.setenv(local.MAX_NODES_VARIABLE, str(limit + 5))
    local.check_size(limit + 5)  # the override is the limit now
    with pytest.raises(InvalidInput, match=f"{local.MAX_NODES_VARIABLE} is {limit + 5}"):
        local.check_size(limit + 6)
    monkeypatch.setenv(local.MAX_NODES_VARIABLE, "many")
    with pytest.raises(InvalidInput, match="positive whole number"):
        local.check_size(3)


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    with private_home(tmp_path / "home") as path:
        yield path


@pytest.mark.slow
@pytest.mark.azurite
@pytest.mark.timeout(240)
def test_down_leaves_no_node_process_even_after_the_emulator_was_killed(home: Path) -> None:
    """A running 4-instance task whose instances left daemons (detached, new session, empty environment) and whose
    primary runs on; the emulator is then SIGKILLed (nothing of it can end them), and ``local down`` must still
    leave no process of any node."""
    from azure.batch import models as m

    nodes = 4
    state = local.up(nodes, default_ports=False)
    client = local.batch_client()
    client.create_job(m.BatchJobCreateOptions(id="downjob", pool_info=m.BatchPoolInfo(pool_id=local.LOCAL_POOL)))
    client.create_task("downjob", m.BatchTaskCreateOptions(
        id="t", command_line=shlex.join([sys.executable, "-c", "import time; time.sleep(300)"]),
        multi_instance_settings=m.MultiInstanceSettings(
            number_of_instances=nodes, coordination_command_line=shlex.join([sys.executable, "-c", DAEMON]))))
    data = home / "local" / "emulator"
    pid_files = wait_for(lambda: (found := sorted(data.glob("nodes/*/*/workitems/downjob/job-1/t/wd/daemon.pid")))
                         and len(found) == nodes and found, 90, "a daemon on every node")
    wait_for(lambda: client.get_task("downjob", "t").state == "running", 60, "the task running")
    daemons = [int(p.read_text()) for p in pid_files]
    node_ids = local.node_ids()
    assert len(node_ids) == nodes
    assert all(psutil.pid_exists(pid) for pid in daemons)
    assert leftovers(node_ids), "the primary's command runs"
    os.kill(state.emulator_pid, signal.SIGKILL)  # it cannot end anything now
    time.sleep(0.5)
    assert all(psutil.pid_exists(pid) for pid in daemons), "the daemons outlived the emulator"
    stopped = local.down()
    assert any("node process(es) left behind" in s for s in stopped), stopped
    alive = [pid for pid in daemons if _running(pid)]
    assert not alive, f"daemons left: {alive}"
    assert not leftovers(node_ids)
