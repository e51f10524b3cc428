"""``node-runtime coordinate`` removes the node-local TMPDIRs (``/tmp/mpl-<uid>-*``) and key dirs
(``/dev/shm/mpl-<uid>-*-keys``) of services that were killed rather than stopped, and only those: a live service's
dirs, another user's dir and a fresh dir without an owner record are kept."""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from node_runtime import tmpdirs
from tests.cluster.helpers import service_of
from tests.cluster.test_coordinate import pid_of
from tests.cluster.test_coordinate_leftover import gone, other_task
from tests.support.netns import NetnsCluster

pytestmark = pytest.mark.cluster
Cluster = Callable[..., NetnsCluster]
OTHER_UID = 65534  # nobody


def tmp_dir_of(cluster: NetnsCluster, i: int, env: dict[str, str] | None = None) -> Path:
    return service_of(cluster, i, env).tmp_dir


@pytest.fixture
def planted() -> Iterator[Callable[[], Path]]:
    """Factory of fake service dirs named like ours (removed after the test whatever happened)."""
    made: list[Path] = []

    def make() -> Path:
        path = tmpdirs.base() / f"{tmpdirs.prefix()}test{secrets.token_hex(4)}"
        path.mkdir(mode=0o700)
        (path / "ompi.node.0").mkdir()  # like a stale Open MPI session dir
        made.append(path)
        return path

    yield make
    for path in made:
        subprocess.run(["rm", "-rf", str(path)], check=False)


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_killed_services_dirs_are_removed_by_the_next_coordinate(netns_cluster: Cluster) -> None:
    cluster = netns_cluster(1)
    first = cluster.node_runtime(0, "coordinate")
    assert first.returncode == 0, first.stderr
    killed = service_of(cluster, 0)
    assert tmpdirs.owner_alive(killed.tmp_dir) is True and tmpdirs.owner_alive(killed.files.private) is True
    (killed.tmp_dir / "ompi.node.0").mkdir()
    os.kill(pid_of(first.stdout), 9)  # as Batch or a lost node would: nothing runs its stop
    assert gone(pid_of(first.stdout))
    env = other_task(cluster, 0, "task-2")
    second = cluster.node_runtime(0, "coordinate", env=env)
    assert second.returncode == 0, second.stderr
    assert not killed.tmp_dir.exists(), "the killed service's TMPDIR was left"
    assert not killed.files.private.exists(), "the killed service's keys were left"
    new = service_of(cluster, 0, env)
    assert all(tmpdirs.owner_alive(d) is True for d in (new.tmp_dir, new.files.private))  # its own, recorded
    assert cluster.node_runtime(0, "coordinate", "--stop", env=env).returncode == 0
    assert not new.tmp_dir.exists() and not new.files.private.exists()


def test_a_retried_task_gets_its_killed_attempts_key_dir_back_unswept(netns_cluster: Cluster) -> None:
    cluster = netns_cluster(1)
    first = cluster.node_runtime(0, "coordinate")
    assert first.returncode == 0, first.stderr
    private = service_of(cluster, 0).files.private
    os.kill(pid_of(first.stdout), 9)
    assert gone(pid_of(first.stdout)) and tmpdirs.owner_alive(private) is False
    tmpdirs.claim(private)  # what the retry's coordinate does before it writes the keys again
    assert tmpdirs.owner_alive(private) is None and time.time() - private.stat().st_mtime < 60
    assert private not in tmpdirs.sweep(tmpdirs.base() / "unrelated", private.parent / "unrelated")
    retried = cluster.node_runtime(0, "coordinate")
    assert retried.returncode == 0 and " started " in retried.stdout, retried.stderr
    assert tmpdirs.owner_alive(private) is True


def test_live_foreign_and_fresh_unrecorded_dirs_are_kept(netns_cluster: Cluster,
                                                        planted: Callable[[], Path]) -> None:
    cluster = netns_cluster(2)
    live = cluster.node_runtime(1, "coordinate")  # node 1's service runs on, on the same machine
    assert live.returncode == 0, live.stderr
    live_dir = tmp_dir_of(cluster, 1)
    dead = planted()
    tmpdirs.write_owner(dead, dead_pid(), Path("/nonexistent/.mpilaunch/sshd_config"))
    recycled = planted()  # the recorded pid runs, but is not that sshd (a recycled pid)
    tmpdirs.write_owner(recycled, os.getpid(), Path("/nonexistent/.mpilaunch/sshd_config"))
    foreign = planted()
    tmpdirs.write_owner(foreign, dead_pid(), Path("/nonexistent/.mpilaunch/sshd_config"))
    os.chown(foreign, OTHER_UID, OTHER_UID)
    fresh, old = planted(), planted()  # no owner record: kept while young (a start not yet recorded)
    an_hour_ago = time.time() - tmpdirs.ORPHAN_AGE - 60
    os.utime(old, (an_hour_ago, an_hour_ago))
    result = cluster.node_runtime(0, "coordinate")
    assert result.returncode == 0, result.stderr
    assert not dead.exists() and not recycled.exists() and not old.exists()
    assert live_dir.is_dir() and tmpdirs.owner_alive(live_dir) is True
    assert foreign.is_dir() and (foreign / "ompi.node.0").is_dir() and fresh.is_dir()
    assert tmp_dir_of(cluster, 0).is_dir()
