"""``node-runtime launch`` on a real 3-node cluster (network namespaces, sshd, Open MPI, mpi4py)."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from node_runtime.launch import WAIT_NOTICE
from tests.cluster.helpers import (
    PROBE,
    coordinate,
    environ_shows,
    files_with_keys,
    mpich_first,
    needs_mpich,
    ranks,
    report,
    service_of,
    sshd_running,
)
from tests.support.netns import VENV_BIN, NetnsCluster
from tests.support.procs import reaped

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
Cluster = Callable[..., NetnsCluster]


def test_ranks_run_on_distinct_nodes_and_collectives_agree(netns_cluster: Cluster) -> None:
    cluster = netns_cluster(3)
    coordinate(cluster)
    done = cluster.node_runtime(0, "launch", "--", *PROBE, "--env", timeout=120)
    assert done.returncode == 0, done.stderr
    records = ranks(done.stdout)
    assert [r["rank"] for r in records] == [0, 1, 2]
    assert [r["hostname"] for r in records] == ["node0", "node1", "node2"]
    assert [r["addresses"] for r in records] == [[a] for a in cluster.addresses]
    for r in records:
        assert (r["size"], r["allreduce"], r["bcast"]) == (3, 6, "token-from-0")
        assert r["ring_from_left"] == (r["rank"] - 1) % 3
        assert r["cwd"] == str(cluster.nodes[0].working_dir)
    assert len({r["tmpdir"] for r in records}) == 3  # node-local session dirs
    # The secret reaches no rank, no report, no output, no log; everything else of ours does reach the ranks.
    secret = cluster.secret
    for r in records:
        assert "MPILAUNCH_TASK_SECRET" not in r["env"]
        assert all(secret not in value for value in r["env"].values())
        assert r["env"]["MPILAUNCH_SSH_PORT"] == "2222"
    data = report(cluster)
    text = (cluster.nodes[0].working_dir / "launch-report.json").read_text()
    assert secret not in text + done.stdout + done.stderr
    for node in cluster.nodes:
        for log in (node.task_dir / ".mpilaunch").glob("*.log"):
            assert secret not in log.read_text()
    assert data["hosts"] == cluster.addresses and data["exit_code"] == 0 and data["flavor"] == "openmpi"
    # every rank behind the tap; a Python program through rankmain (an uncaught exception ends the job)
    assert data["rank_command"] == [PROBE[0], "-m", "node_runtime.rankmain", *PROBE[1:], "--env"]
    assert data["argv"][0].endswith("mpirun") and data["argv"][-len(data["rank_command"]):] == data["rank_command"]
    assert data["abort_on_exception"] is True and data["first_failure"] is None and data["ranks_log"] == "ranks.log"
    assert set(data["timings"]) >= {"wait_services_s", "mpirun_s", "stop_services_s", "total_s"}
    # The launch stopped every node's service.
    assert data["services_stopped"] == dict.fromkeys(cluster.addresses, True)
    assert not any(sshd_running(cluster, i) for i in range(3))
    # One login per remote node besides coordinate's own check: launch's master, which mpirun's session went through.
    assert [logins(cluster, i) for i in (1, 2)] == [2, 2]
    # Every node's detection arrived as its service's banner on that login, and only the masters show banners.
    assert sorted(data["nodes"]) == sorted(cluster.addresses) and all(data["nodes"].values())
    assert '"physical_cores"' not in done.stdout + done.stderr


@needs_mpich
def test_an_mpich_job_runs_through_launch(netns_cluster: Cluster, tmp_path: Path) -> None:
    nodes, launch_env = mpich_first(tmp_path)
    cluster = netns_cluster(3, extra_env=nodes)
    coordinate(cluster)
    done = cluster.node_runtime(0, "launch", "--mpi", "mpich", "--", *PROBE, timeout=120, env=launch_env)
    assert done.returncode == 0, done.stderr
    records = ranks(done.stdout)
    assert [r["hostname"] for r in records] == ["node0", "node1", "node2"]
    assert all((r["size"], r["allreduce"], r["bcast"]) == (3, 6, "token-from-0") for r in records), records
    data = report(cluster)
    assert data["flavor"] == "mpich" and "-launcher-exec" in data["argv"]
    assert all(node["mpi"] == "mpich" and node["ucx"] for node in data["nodes"].values())  # ch4:ucx
    assert data["services_stopped"] == dict.fromkeys(cluster.addresses, True)
    assert [logins(cluster, i) for i in (1, 2)] == [2, 2]  # Hydra's ssh went through launch's masters too


def test_no_process_of_the_job_shows_the_secret_and_no_key_outlives_it(netns_cluster: Cluster) -> None:
    cluster = netns_cluster(2)
    coordinate(cluster)
    node = cluster.nodes[0]
    argv = cluster.argv_on(0, [str(VENV_BIN / "node-runtime"), "launch", "--", *PROBE, "--sleep", "2"])
    with reaped(subprocess.Popen(argv, env=node.env, cwd=node.working_dir, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)) as child:
        assert child.stdout is not None
        assert "sleeping" in child.stdout.readline()  # the whole job runs now
        running = {pid: Path(f"/proc/{pid}/comm").read_text().strip() for i in (0, 1) for pid in cluster.pids(i)}
        # launch itself (exec'd by the netns wrapper), mpirun, the masters, both sshds, orted, the ranks
        assert child.pid in running and {"mpirun", "ssh", "sshd", "orted"} <= set(running.values()), running
        shown = {pid: comm for pid, comm in running.items() if environ_shows(pid, cluster.secret)}
        assert not shown, f"processes whose /proc/PID/environ holds the task secret: {shown}"
        _, stderr = child.communicate(timeout=60)
    assert child.returncode == 0, stderr
    assert report(cluster)["services_stopped"] == dict.fromkeys(cluster.addresses, True)
    for i, each in enumerate(cluster.nodes):
        assert not files_with_keys(each.root)
        private = service_of(cluster, i).files.private
        deadline = time.monotonic() + 10  # a remote node's stop session removes it in the background
        while private.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not private.exists(), f"node {i} kept its keys after the job"


def logins(cluster: NetnsCluster, i: int) -> int:
    """The logins node ``i``'s service accepted (its log starts afresh with each start of the service)."""
    return (cluster.nodes[i].task_dir / ".mpilaunch" / "sshd.log").read_text().count("Accepted publickey")


def test_a_service_that_comes_up_late_is_waited_for(netns_cluster: Cluster) -> None:
    cluster = netns_cluster(3)
    coordinate(cluster, 0, 1)
    node = cluster.nodes[0]
    argv = cluster.argv_on(0, [str(VENV_BIN / "node-runtime"), "launch", "--timeout", "60", "--", *PROBE])
    with reaped(subprocess.Popen(argv, env=node.env, cwd=node.working_dir, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)) as child:
        time.sleep(WAIT_NOTICE + 1)
        coordinate(cluster, 2)
        stdout, stderr = child.communicate(timeout=120)
    assert child.returncode == 0, stderr
    assert [r["hostname"] for r in ranks(stdout)] == ["node0", "node1", "node2"]
    assert report(cluster)["timings"]["wait_services_s"] >= WAIT_NOTICE + 1
    # meanwhile it said whom it waited for, and why (once)
    late = cluster.addresses[2]
    assert stderr.count("still waiting") == 1, stderr
    assert f"for the coordination service on {late} ({late}: ssh: connect to host {late} port 2222: Connection " \
           "refused)" in stderr


def test_a_node_with_another_host_key_is_named_with_sshs_reason(netns_cluster: Cluster) -> None:
    cluster = netns_cluster(2)
    coordinate(cluster, 0)
    other = cluster.node_runtime(1, "coordinate", env={"MPILAUNCH_TASK_SECRET": secrets.token_urlsafe(32)})
    assert other.returncode == 0, other.stderr  # a service with another task's keys
    done = cluster.node_runtime(0, "launch", "--timeout", "2", "--", *PROBE, timeout=60)
    assert done.returncode == 3, done.stderr
    assert f"{cluster.addresses[1]}: Host key verification failed." in done.stderr
    assert report(cluster)["unreachable"] == [cluster.addresses[1]]


def test_a_tmpdir_too_long_for_control_sockets_runs_without_multiplexing(netns_cluster: Cluster,
                                                                        tmp_path: Path) -> None:
    long_tmp = tmp_path / ("t" * max(1, 60 - len(str(tmp_path))))  # 60+ bytes: no room for cm-<host> below it
    long_tmp.mkdir()
    cluster = netns_cluster(2, extra_env={"TMPDIR": str(long_tmp)})
    coordinate(cluster)
    done = cluster.node_runtime(0, "launch", "--", *PROBE, timeout=120)
    assert done.returncode == 0, done.stderr
    assert [r["hostname"] for r in ranks(done.stdout)] == ["node0", "node1"]
    assert report(cluster)["services_stopped"] == dict.fromkeys(cluster.addresses, True)
    assert logins(cluster, 1) == 3  # coordinate's check, the master, and mpirun's own login
    assert '"physical_cores"' not in done.stderr  # mpirun's ssh does not print the banner (the node's detection)


def test_an_mpirun_that_fails_while_the_services_are_awaited_ends_the_launch_with_its_code(
        netns_cluster: Cluster, tmp_path: Path) -> None:
    fake = tmp_path / "bin" / "mpirun"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\n[ "$1" = --version ] && echo "mpirun (Open MPI) 4.1.4" && exit 0\n'
                    'echo "mpirun: cannot do it" >&2\nexit 7\n')
    fake.chmod(0o755)
    cluster = netns_cluster(2)
    coordinate(cluster, 0)  # node 1 never answers
    path = f"{fake.parent}:{cluster.nodes[0].env['PATH']}"
    started = time.monotonic()
    done = cluster.node_runtime(0, "launch", "--timeout", "30", "--", *PROBE, env={"PATH": path}, timeout=60)
    assert done.returncode == 7, done.stderr
    assert time.monotonic() - started < 15  # not the 30 s wait for node 1
    assert "mpirun: cannot do it" in done.stderr
    data = report(cluster)
    assert data["exit_code"] == 7 and data["unreachable"] == [cluster.addresses[1]]


def test_processes_per_node_and_exit_code_propagate(netns_cluster: Cluster) -> None:
    cluster = netns_cluster(2)
    coordinate(cluster)
    # no "--": everything from the program on is the command, its options included
    done = cluster.node_runtime(0, "launch", "--ppn", "2", *PROBE, "--exit", "3", timeout=120)
    assert done.returncode == 3, done.stderr
    records = ranks(done.stdout)
    assert [r["hostname"] for r in records] == ["node0", "node0", "node1", "node1"]
    assert {r["allreduce"] for r in records} == {10}
    assert report(cluster)["exit_code"] == 3


def test_a_node_that_never_coordinated_fails_the_launch_in_time(netns_cluster: Cluster) -> None:
    cluster = netns_cluster(3)
    coordinate(cluster, 0, 1)
    started = time.monotonic()
    done = cluster.node_runtime(0, "launch", "--timeout", "2", "--", *PROBE, timeout=60)
    elapsed = time.monotonic() - started
    assert done.returncode == 3, done.stderr
    missing = cluster.addresses[2]
    assert f"1 host(s): {missing} " in done.stderr
    assert 2 <= elapsed < 10
    data = report(cluster)
    assert data["unreachable"] == [missing] and data["exit_code"] == 3
    assert "mpirun was stopped before it reached any node" in done.stderr
    assert f"{missing}: " in done.stderr and "Connection refused" in done.stderr  # ssh's own words, per host
    assert not sshd_running(cluster, 0) and not sshd_running(cluster, 1)  # the others were still stopped
    # mpirun started meanwhile, but its ssh commands waited at the gate: it and they are gone, and no daemon ran
    assert not cluster.pids(0) and not cluster.pids(1), done.stderr


def test_a_node_whose_link_is_down_fails_the_launch_in_time(netns_cluster: Cluster) -> None:
    cluster = netns_cluster(3)
    coordinate(cluster)
    cluster.link_down(1)
    started = time.monotonic()
    done = cluster.node_runtime(0, "launch", "--timeout", "2", "--", *PROBE, timeout=60)
    elapsed = time.monotonic() - started
    assert done.returncode == 3, done.stderr
    assert f"1 host(s): {cluster.addresses[1]} " in done.stderr
    assert 2 <= elapsed < 15
    assert report(cluster)["unreachable"] == [cluster.addresses[1]]


def test_launch_refuses_to_run_on_a_secondary_node(netns_cluster: Cluster) -> None:
    cluster = netns_cluster(2)
    done = cluster.node_runtime(1, "launch", "--", *PROBE, timeout=60)
    assert done.returncode == 2
    assert "primary node only" in done.stderr and cluster.addresses[0] in done.stderr


@pytest.mark.parametrize("to_group", [False, True], ids=["SIGTERM-to-launch", "SIGINT-to-group"])
def test_signals_end_mpirun_and_services_stop(netns_cluster: Cluster, to_group: bool) -> None:
    cluster = netns_cluster(2)
    coordinate(cluster)
    node = cluster.nodes[0]
    argv = cluster.argv_on(0, [str(VENV_BIN / "node-runtime"), "launch", "--", *PROBE, "--sleep", "60"])
    child = subprocess.Popen(argv, env=node.env, cwd=node.working_dir, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert child.stdout is not None
        assert "sleeping" in child.stdout.readline()  # rank 0 is up: mpirun and its remote daemon run
        if to_group:  # like a terminal's Ctrl-C
            os.killpg(child.pid, signal.SIGINT)
        else:  # like `kill PID`
            child.send_signal(signal.SIGTERM)
        code = child.wait(30)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    assert code != 0
    data = report(cluster)
    assert data["exit_code"] == code and data["timings"]["mpirun_s"] < 30
    assert data["services_stopped"] == dict.fromkeys(cluster.addresses, True)
    deadline = time.monotonic() + 10  # no rank, no daemon is left behind on any node
    while any(p for i in range(2) for p in cluster.pids(i)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for i in range(2) for p in cluster.pids(i)]


def wait_for_handler(pid: int, sig: int, timeout: float = 30) -> None:
    """Wait until process ``pid`` catches ``sig`` (its /proc status lists a handler)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        caught = next(line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                      if line.startswith("SigCgt:"))
        if int(caught, 16) & (1 << (sig - 1)):
            return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} never installed a handler for signal {sig}")


def test_sigterm_while_waiting_for_services_ends_the_launch_cleanly(netns_cluster: Cluster) -> None:
    cluster = netns_cluster(2)
    coordinate(cluster, 0)  # node 1 never answers: launch waits
    node = cluster.nodes[0]
    argv = cluster.argv_on(0, [str(VENV_BIN / "node-runtime"), "launch", "--timeout", "60", "--", *PROBE])
    with reaped(subprocess.Popen(argv, env=node.env, cwd=node.working_dir, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)) as child:
        wait_for_handler(child.pid, signal.SIGTERM)  # launch is past its start-up, now waiting for node 1
        time.sleep(0.5)
        started = time.monotonic()
        child.send_signal(signal.SIGTERM)
        _, stderr = child.communicate(timeout=30)
    assert child.returncode == 128 + signal.SIGTERM, stderr
    assert time.monotonic() - started < 10
    assert "interrupted by SIGTERM while waiting for the coordination services" in stderr
    ours = [line for line in stderr.strip().splitlines() if not line.startswith("node-runtime: launch: fabric ")]
    assert len(ours) == 1, stderr  # ours only (beside the fabric choice): mpirun's ssh never got past the gate
    data = report(cluster)
    assert data["exit_code"] == 128 + signal.SIGTERM
    assert not sshd_running(cluster, 0)
    assert not cluster.pids(0)  # mpirun and its ssh commands waiting at the gate were killed


def test_remote_services_stop_even_if_launch_is_killed_outright(netns_cluster: Cluster) -> None:
    cluster = netns_cluster(2)
    coordinate(cluster)
    node = cluster.nodes[0]
    listener = int((cluster.nodes[1].task_dir / ".mpilaunch" / "sshd.pid").read_text())
    argv = cluster.argv_on(0, [str(VENV_BIN / "node-runtime"), "launch", "--", *PROBE, "--sleep", "60"])
    child = subprocess.Popen(argv, env=node.env, cwd=node.working_dir, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert child.stdout is not None
        assert "sleeping" in child.stdout.readline()
        time.sleep(1)  # the stop sessions are open (since before mpirun)
        child.kill()  # launch only: no cleanup code of ours runs
        child.wait(10)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{listener}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path(f"/proc/{listener}").exists(), "node 1's sshd outlived the killed launch"
        while service_of(cluster, 1).files.private.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not service_of(cluster, 1).files.private.exists(), "node 1's keys outlived the killed launch"
        # the old mpirun still runs (holding its gate): the launch of a next attempt is not held up by it
        old = [p for p in cluster.pids(0) if Path(f"/proc/{p}/comm").read_text().strip() == "mpirun"]
        assert old, "the killed launch's mpirun is gone: the scenario did not happen"
        coordinate(cluster)
        started = time.monotonic()
        again = cluster.node_runtime(0, "launch", "--timeout", "10", "--", *PROBE, timeout=60)
        assert again.returncode == 0, again.stderr
        assert time.monotonic() - started < 20 and all(Path(f"/proc/{p}").exists() for p in old)
    finally:
        os.killpg(child.pid, signal.SIGKILL)  # mpirun, left behind in the group
        child.wait()
