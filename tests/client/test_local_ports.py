"""``mpilaunch local up`` ports: a service binds its port itself and reports it; a preferred port that is taken (before
the check, or between the check and the service's bind) never makes ``up`` fail or talk to the port's other owner."""

from __future__ import annotations

import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from mpilaunch.client import local


@pytest.fixture
def started() -> Iterator[list[int]]:
    """Pids of services a test started (their process groups are stopped after it)."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        local._stop(pid, "emulator")


def listener() -> socket.socket:
    """A socket listening on a free port: "another process" holding it."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def emulator_argv(data: Path) -> list[str]:
    return [sys.executable, "-u", "-c", "from mpilaunch.cli import main; main()", "emulator", "serve",
            "--host", "127.0.0.1", "--data", str(data), "--no-execute", "--port"]


def answers_as_emulator(port: int) -> bool:
    """Whether an HTTP request to ``port`` gets an HTTP answer (our listeners never answer)."""
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/jobs?api-version=2025-06-01", timeout=5).close()
    except urllib.error.HTTPError:
        return True  # e.g. 401 without SharedKey: still the emulator speaking
    except OSError:
        return False
    return True


def test_a_port_taken_before_the_check_is_not_used(tmp_path: Path, started: list[int]) -> None:
    with listener() as taken:
        preferred = taken.getsockname()[1]
        pid, port = local._start(lambda p: [*emulator_argv(tmp_path / "data"), str(p)], "emulator", preferred,
                                 tmp_path)
        started.append(pid)
        assert port != preferred and answers_as_emulator(port)


def test_a_port_taken_between_the_check_and_the_bind_is_given_up(tmp_path: Path, started: list[int]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        preferred = probe.getsockname()[1]
    holders: list[socket.socket] = []
    tried: list[int] = []

    def argv(port: int) -> list[str]:
        tried.append(port)
        if port == preferred:  # the race: someone binds it just before the service does
            holder = socket.socket()
            holder.bind(("127.0.0.1", port))
            holder.listen()
            holders.append(holder)
        return [*emulator_argv(tmp_path / "data"), str(port)]

    try:
        pid, port = local._start(argv, "emulator", preferred, tmp_path)
        started.append(pid)
    finally:
        for holder in holders:
            holder.close()
    assert tried == [preferred, 0], tried
    assert port not in (0, preferred) and answers_as_emulator(port)
    assert "cannot listen on" in (tmp_path / "emulator.log").read_text()  # the first attempt's error is kept


def test_the_preferred_port_is_used_when_free(tmp_path: Path, started: list[int]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        preferred = probe.getsockname()[1]
    pid, port = local._start(lambda p: [*emulator_argv(tmp_path / "data"), str(p)], "emulator", preferred, tmp_path)
    started.append(pid)
    assert port == preferred and answers_as_emulator(port)


def test_restarts_keep_a_healthy_azurite_and_the_ports_storage_urls_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pools' StartTasks and queued tasks hold Azurite URLs: after the emulator dies, `up` keeps Azurite; after
    `down`, both come back on their last ports."""
    import os
    import signal

    import psutil

    monkeypatch.setenv("MPILAUNCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MPILAUNCH_CONFIG", str(tmp_path / "none.toml"))
    try:
        first = local.up(1, default_ports=False)
        os.killpg(first.emulator_pid, signal.SIGKILL)
        psutil.Process(first.emulator_pid).wait(10)  # its socket is closed
        again = local.up(1, default_ports=False)
        assert again.azurite_pid == first.azurite_pid and again.blob_endpoint == first.blob_endpoint
        assert again.emulator_pid != first.emulator_pid and again.batch_endpoint == first.batch_endpoint
        local.down()
        third = local.up(1, default_ports=False)
        assert third.azurite_pid != first.azurite_pid
        assert (third.blob_endpoint, third.batch_endpoint) == (first.blob_endpoint, first.batch_endpoint)
    finally:
        local.down()
