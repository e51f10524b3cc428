"""Pieces of launch that need no cluster: waiting for services under a deadline, the report's secret scrubbing."""

from __future__ import annotations

import json
import secrets
import shutil
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node_runtime.coordinate import prepare
from node_runtime.env import NodeEnvironment
from node_runtime.launch import REPORT_NAME, Report, _mpirun_command, wait_for_services
from node_runtime.mpirun import MpiFlavor


def serve(banner: bytes) -> Iterator[int]:
    """A TCP server on 127.0.0.1 that greets every connection with ``banner``; yields its port."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.05)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.sendall(banner)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        server.close()


@pytest.fixture
def ssh_like() -> Iterator[int]:
    yield from serve(b"SSH-2.0-OpenSSH_9.2\r\n")


@pytest.fixture
def not_ssh() -> Iterator[int]:
    yield from serve(b"HTTP/1.1 400 Bad Request\r\n\r\n")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_answering_services_are_found_at_once(ssh_like: int) -> None:
    started = time.monotonic()
    assert wait_for_services(["127.0.0.1"], ssh_like, timeout=5) == []
    assert time.monotonic() - started < 1


def test_silent_or_foreign_services_are_reported_at_the_deadline(not_ssh: int) -> None:
    port = closed_port()
    started = time.monotonic()
    assert wait_for_services(["127.0.0.1"], port, timeout=0.5) == ["127.0.0.1"]
    assert wait_for_services(["127.0.0.1"], not_ssh, timeout=0.5) == ["127.0.0.1"]
    assert 1.0 <= time.monotonic() - started < 3


def test_a_service_that_comes_up_late_is_waited_for() -> None:
    port = closed_port()
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

    def late() -> None:
        time.sleep(0.3)
        server.bind(("127.0.0.1", port))
        server.listen()
        conn, _ = server.accept()
        conn.sendall(b"SSH-2.0-late\r\n")
        conn.close()

    thread = threading.Thread(target=late, daemon=True)
    thread.start()
    try:
        assert wait_for_services(["127.0.0.1"], port, timeout=5) == []
    finally:
        thread.join(5)
        server.close()


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
def test_hydra_flavours_get_an_ssh_wrapper_and_a_hostfile(tmp_path: Path, flavor: MpiFlavor) -> None:
    env, environ = hydra_node(tmp_path)
    svc = prepare(env)
    try:
        argv, mpirun_env = _mpirun_command(env, environ, svc, flavor=flavor, ppn=2, command=["python3", "app.py"],
                                           mpirun="/usr/bin/mpiexec")
    finally:
        shutil.rmtree(svc.tmp_dir, ignore_errors=True)
    wrapper, hostfile = svc.files.directory / "ssh-wrapper", svc.files.directory / "hostfile"
    assert stat.S_IMODE(wrapper.stat().st_mode) == 0o700
    assert f"ssh -F {svc.client_config}" in wrapper.read_text()
    assert hostfile.read_text() == "10.0.0.4:2\n10.0.0.5:2\n"  # the primary first: rank 0 runs there
    assert str(wrapper) in argv and str(hostfile) in argv
    assert argv[-2:] == [shutil.which("python3", path="/usr/bin:/bin"), "app.py"]  # resolved on PATH
    assert "MPILAUNCH_TASK_SECRET" not in mpirun_env and mpirun_env["TMPDIR"] == str(svc.tmp_dir)
