"""``node-runtime coordinate`` on real network-namespace nodes: start + verify, idempotence, stop, clear failures."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.cluster.helpers import environ_shows, files_with_keys, service_of, sshd_pids, sshd_running
from tests.support.netns import VENV_BIN, NetnsCluster

pytestmark = pytest.mark.cluster
Cluster = Callable[..., NetnsCluster]


def pid_of(output: str) -> int:
    match = re.search(r"\(pid (\d+)\)", output)
    assert match, output
    return int(match.group(1))


def test_coordinate_is_idempotent_and_replaces_a_stale_service(netns_cluster: Cluster) -> None:
    cluster = netns_cluster(1)
    first = cluster.node_runtime(0, "coordinate")
    assert first.returncode == 0 and " started " in first.stdout, first.stderr
    again = cluster.node_runtime(0, "coordinate")
    assert again.returncode == 0 and " running " in again.stdout, again.stderr
    assert pid_of(again.stdout) == pid_of(first.stdout)
    assert cluster.kill_sshd(0) == 1  # a stale pid file: the service is started again
    revived = cluster.node_runtime(0, "coordinate")
    assert revived.returncode == 0 and " started " in revived.stdout, revived.stderr
    moved = cluster.node_runtime(0, "coordinate", env={"MPILAUNCH_SSH_PORT": "2300"})  # new config: replaced
    assert moved.returncode == 0 and " replaced " in moved.stdout and ":2300 " in moved.stdout, moved.stderr
    assert pid_of(moved.stdout) != pid_of(revived.stdout)
    assert sshd_pids(cluster, 0) == [pid_of(moved.stdout)]  # only the new listener is left


def test_stop_ends_the_service_and_is_idempotent(netns_cluster: Cluster) -> None:
    cluster = netns_cluster(1)
    assert cluster.node_runtime(0, "coordinate").returncode == 0
    stopped = cluster.node_runtime(0, "coordinate", "--stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert not sshd_running(cluster, 0)
    again = cluster.node_runtime(0, "coordinate", "--stop")
    assert again.returncode == 0 and "was not running" in again.stdout


def test_keys_live_outside_the_node_root_and_go_with_the_service(netns_cluster: Cluster) -> None:
    cluster = netns_cluster(1)
    started = cluster.node_runtime(0, "coordinate")
    assert started.returncode == 0, started.stderr
    node, svc = cluster.nodes[0], service_of(cluster, 0)
    assert not files_with_keys(node.root), "a private key below the node root: Batch's file APIs would serve it"
    config = svc.config.read_text().splitlines()
    assert f"HostKey {svc.files.host_key}" in config and f"  IdentityFile {svc.files.user_key}" in \
        svc.client_config.read_text().splitlines()
    private = svc.files.private
    assert not private.is_relative_to(node.root) and private.parent == Path("/dev/shm").resolve()
    info = private.stat()
    assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()
    assert sorted(p.name for p in private.iterdir() if not p.name.startswith(".")) == [
        "authorized_keys", "id_ed25519", "id_ed25519.pub", "known_hosts", "ssh_host_ed25519_key",
        "ssh_host_ed25519_key.pub"]
    assert not environ_shows(pid_of(started.stdout), cluster.secret)  # sshd never had it
    stopped = cluster.node_runtime(0, "coordinate", "--stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert not private.exists() and not svc.tmp_dir.exists()


def test_a_key_dir_someone_else_made_is_refused(netns_cluster: Cluster) -> None:
    cluster = netns_cluster(1)
    private = service_of(cluster, 0).files.private
    private.mkdir(mode=0o700)  # made first by another user, who could read or swap the keys
    try:
        os.chown(private, 65534, 65534)
        done = cluster.node_runtime(0, "coordinate")
        assert done.returncode == 3, done.stdout
        assert f"{private} is not a directory owned by uid {os.getuid()}; refusing to keep keys there" in done.stderr
        assert not any(private.iterdir())
    finally:
        shutil.rmtree(private)


def test_port_taken_is_a_clear_error(netns_cluster: Cluster) -> None:
    cluster = netns_cluster(1)
    address = cluster.addresses[0]
    squatter = ("import socket, subprocess, sys\n"
                f"s = socket.socket(); s.bind(({address!r}, 2222)); s.listen()\n"
                "sys.exit(subprocess.run(sys.argv[1:]).returncode)\n")
    done = cluster.run_on(0, [str(VENV_BIN / "python"), "-c", squatter, str(VENV_BIN / "node-runtime"), "coordinate"])
    assert done.returncode == 3
    assert f"port 2222 on {address} is already in use" in done.stderr
    assert not service_of(cluster, 0).files.private.exists()  # no service, no keys


def test_missing_secret_is_a_clear_error(netns_cluster: Cluster) -> None:
    cluster = netns_cluster(1)
    done = cluster.node_runtime(0, "coordinate", drop=["MPILAUNCH_TASK_SECRET"])
    assert done.returncode == 2
    assert "MPILAUNCH_TASK_SECRET is not set" in done.stderr and "Traceback" not in done.stderr


def test_missing_sshd_is_a_clear_error(netns_cluster: Cluster) -> None:
    cluster = netns_cluster(1)
    sshd = shutil.which("sshd", path="/usr/sbin:/usr/local/sbin:/sbin")
    assert sshd is not None
    # A private mount namespace where the sshd binary is an empty, non-executable file.
    hide = ["unshare", "--mount", "--", "sh", "-c", f'mount --bind /dev/null {sshd} && exec "$@"', "sh",
            str(VENV_BIN / "node-runtime"), "coordinate"]
    done = cluster.run_on(0, hide)
    assert done.returncode == 3
    assert "sshd not found" in done.stderr and "openssh-server" in done.stderr
    assert not service_of(cluster, 0).files.private.exists()
    explicit = cluster.node_runtime(0, "coordinate", "--sshd", "/nonexistent/sshd")
    assert explicit.returncode == 3 and "/nonexistent/sshd" in explicit.stderr


def test_invalid_environment_is_reported_not_raised(netns_cluster: Cluster) -> None:
    cluster = netns_cluster(2)
    done = cluster.node_runtime(1, "coordinate", env={"AZ_BATCH_NODE_COUNT": "5"})
    assert done.returncode == 2 and "AZ_BATCH_NODE_COUNT" in done.stderr and "Traceback" not in done.stderr


@pytest.fixture
def task_user() -> Iterator[tuple[str, int]]:
    """A throwaway unprivileged account (name, uid), deleted afterwards."""
    name = f"mpl{os.getpid()}u"
    subprocess.run(["useradd", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/bin/sh", name],
                   check=True, timeout=30, capture_output=True)
    try:
        yield name, int(subprocess.run(["id", "-u", name], check=True, capture_output=True, text=True).stdout)
    finally:
        subprocess.run(["userdel", name], check=False, timeout=30, capture_output=True)


def test_an_unprivileged_user_can_run_the_service(netns_cluster: Cluster, task_user: tuple[str, int]) -> None:
    cluster = netns_cluster(1)
    name, uid = task_user
    os.chmod(cluster.base, 0o755)
    subprocess.run(["chown", "-R", f"{uid}:{uid}", str(cluster.nodes[0].root)], check=True, timeout=30)
    as_user = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--",
               str(VENV_BIN / "node-runtime"), "coordinate"]
    env = {"HOME": "/nonexistent", "USER": name}
    started = cluster.run_on(0, as_user, env=env)
    assert started.returncode == 0 and " started " in started.stdout, started.stderr
    owner = cluster.run_on(0, ["ps", "-o", "user=", "-p", str(pid_of(started.stdout))]).stdout.strip()
    assert owner == name
    again = cluster.run_on(0, as_user, env=env)
    assert again.returncode == 0 and " running " in again.stdout, again.stderr
    key_dirs = list(Path("/dev/shm").glob(f"mpl-{uid}-*-keys"))
    assert len(key_dirs) == 1 and key_dirs[0].stat().st_uid == uid
    stopped = cluster.run_on(0, [*as_user, "--stop"], env=env)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert not sshd_running(cluster, 0) and not key_dirs[0].exists()


def test_an_address_that_is_not_this_nodes_is_a_clear_error(netns_cluster: Cluster) -> None:
    cluster = netns_cluster(3)
    other = cluster.addresses[2]
    done = cluster.node_runtime(1, "coordinate", env={"MPILAUNCH_NODE_ADDRESS": other})
    assert done.returncode == 3
    assert f"{other} is not an address of this node" in done.stderr
