"""``node-runtime coordinate`` when an earlier task's sshd still holds the task port on the node.

A node runs one task at a time, so an mpilaunch sshd on our address and port belongs to a task that ended without
stopping its service (killed, timed out, failed before its launch stopped the services): the next task replaces it.
Any other listener (a foreign sshd included) is a clear "port in use" error and is left alone.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from tests.cluster.helpers import service_of, sshd_pids
from tests.cluster.test_coordinate import pid_of
from tests.support.netns import NetnsCluster

pytestmark = pytest.mark.cluster
Cluster = Callable[..., NetnsCluster]


def other_task(cluster: NetnsCluster, i: int, task_id: str) -> dict[str, str]:
    """Environment overrides that make node ``i`` run another task (own task dir and secret, same port)."""
    task_dir = cluster.nodes[i].task_dir.parent / task_id
    (task_dir / "wd").mkdir(parents=True)
    return {"AZ_BATCH_TASK_ID": task_id, "AZ_BATCH_TASK_DIR": str(task_dir), "AZ_BATCH_TASK_SHARED_DIR": str(task_dir),
            "AZ_BATCH_TASK_WORKING_DIR": str(task_dir / "wd"), "MPILAUNCH_TASK_SECRET": secrets.token_urlsafe(32)}


def gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.02)
    return False


def test_a_leftover_sshd_of_an_earlier_task_is_replaced(netns_cluster: Cluster) -> None:
    cluster = netns_cluster(1)
    first = cluster.node_runtime(0, "coordinate")  # task 1 "ends" without stopping its service
    assert first.returncode == 0 and " started " in first.stdout, first.stderr
    leftover = pid_of(first.stdout)
    second = cluster.node_runtime(0, "coordinate", env=other_task(cluster, 0, "task-2"))
    assert second.returncode == 0 and " replaced " in second.stdout, second.stderr
    assert pid_of(second.stdout) != leftover
    assert gone(leftover), "the earlier task's sshd still runs"
    assert sshd_pids(cluster, 0) == [pid_of(second.stdout)]  # only the new task's listener is left
    third = cluster.node_runtime(0, "coordinate", env=other_task(cluster, 0, "task-3"))  # leftover lost its pid file
    assert third.returncode == 0 and " replaced " in third.stdout, third.stderr
    assert gone(pid_of(second.stdout))


@contextmanager
def foreign_sshd(cluster: NetnsCluster, template: Path, where: Path) -> Iterator[int]:
    """A real sshd on node 0's task port, but not one of ours (its config is not in a task's service dir): our
    ``template`` config with its pid file and host key (which the caller copied there) in ``where``."""
    config = where / "sshd_config"
    moved = {"PidFile": "sshd.pid", "HostKey": "ssh_host_ed25519_key"}
    lines = []
    for line in template.read_text().splitlines():
        keyword = line.split(" ", 1)[0]
        lines.append(f"{keyword} {where / moved[keyword]}" if keyword in moved else line)
    config.write_text("\n".join(lines) + "\n")
    sshd = shutil.which("sshd", path="/usr/sbin:/usr/local/sbin:/sbin")
    assert sshd is not None
    log = where / "sshd.log"
    child = subprocess.Popen(cluster.argv_on(0, [sshd, "-D", "-f", str(config), "-E", str(log)]))
    try:
        deadline = time.monotonic() + 10
        while not (log.exists() and "Server listening" in log.read_text()):
            assert child.poll() is None and time.monotonic() < deadline, "the foreign sshd did not start"
            time.sleep(0.02)
        yield child.pid
    finally:
        child.kill()
        child.wait(10)


def test_a_foreign_sshd_on_the_port_is_reported_and_left_alone(netns_cluster: Cluster, tmp_path: Path) -> None:
    cluster = netns_cluster(1)
    assert cluster.node_runtime(0, "coordinate").returncode == 0
    svc, where = service_of(cluster, 0), tmp_path / "foreign"
    where.mkdir()
    shutil.copy(svc.files.host_key, where)  # --stop removes the service's keys
    assert cluster.node_runtime(0, "coordinate", "--stop").returncode == 0
    with foreign_sshd(cluster, svc.config, where) as pid:
        done = cluster.node_runtime(0, "coordinate", env=other_task(cluster, 0, "task-2"))
        assert done.returncode == 3, done.stdout
        assert f"port 2222 on {cluster.addresses[0]} is already in use" in done.stderr
        assert psutil.Process(pid).is_running() and sshd_pids(cluster, 0), "the foreign sshd was killed"
