"""``sshd.verify``: OpenSSH's ``ssh`` logs in to our coordination sshd (on a loopback address) with the task's keys."""

from __future__ import annotations

import secrets
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node_runtime import keys, sshd
from node_runtime.errors import ServiceError


def free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


@pytest.fixture
def service(tmp_path: Path) -> Iterator[sshd.Service]:
    """Our coordination sshd on 127.0.0.1 and a free port, with freshly derived task keys; stopped afterwards."""
    binary = shutil.which("sshd", path="/usr/sbin:/usr/local/sbin:/sbin")
    if binary is None:
        pytest.skip("sshd missing: run scripts/setup")
    address = "127.0.0.1"
    svc = sshd.service_for(tmp_path / "task", address, free_port(address))
    keys.write_key_files(svc.files, keys.derive_keys(secrets.token_urlsafe(32)), [address], svc.port)
    sshd.write_sshd_config(svc)
    sshd.write_client_config(svc)
    sshd.start(svc, Path(binary))
    try:
        yield svc
    finally:
        sshd.stop(svc)


def test_a_login_with_the_task_keys_succeeds_and_runs_no_remote_command(service: sshd.Service,
                                                                         tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text(f"echo noise; touch {home}/sourced\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("SHELL", "/bin/bash")
    monkeypatch.setenv("BASH_ENV", str(home / ".bashrc"))
    started = time.monotonic()
    sshd.verify(service)  # what coordinate runs
    assert time.monotonic() - started < 5
    assert "Accepted publickey for " + service.user in service.log.read_text()
    assert not (home / "sourced").exists()  # neither side ran a shell start-up file


def test_a_wrong_host_key_fails(service: sshd.Service) -> None:
    other = keys.derive_keys(secrets.token_urlsafe(32))  # known_hosts pins another task's host key
    service.files.known_hosts.write_text(keys.known_hosts_text(other, [service.address], service.port))
    with pytest.raises(ServiceError, match=f"{service.listen} failed its check: its host key is not the task's"):
        sshd.verify(service)
    assert "Accepted publickey" not in service.log.read_text()


def test_verify_fails_when_authorized_keys_do_not_hold_the_task_key(service: sshd.Service) -> None:
    service.files.authorized_keys.write_text(keys.derive_keys(secrets.token_urlsafe(32)).user_public + "\n")
    with pytest.raises(ServiceError, match=f"{service.listen} failed its check: it does not accept the task's "
                                           f"user key for {service.user}"):
        sshd.verify(service)


def serve_once(answer: bytes | None) -> tuple[int, threading.Thread]:
    """A TCP server on 127.0.0.1 that accepts one connection, sends ``answer`` (None: nothing) and holds it 3 s."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = int(listener.getsockname()[1])

    def run() -> None:
        with listener, listener.accept()[0] as conn:
            if answer is not None:
                conn.sendall(answer)
            time.sleep(3)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return port, thread


def a_service_at(tmp_path: Path, port: int) -> sshd.Service:
    svc = sshd.service_for(tmp_path / "task", "127.0.0.1", port)
    keys.write_key_files(svc.files, keys.derive_keys(secrets.token_urlsafe(32)), ["127.0.0.1"], port)
    sshd.write_client_config(svc)
    return svc


@pytest.mark.parametrize("answer", [b"HTTP/1.1 400 Bad Request\r\n\r\n" * 20, b"SSH-1.5-old\r\n"])
def test_a_peer_that_is_not_an_ssh_server_fails(answer: bytes, tmp_path: Path) -> None:
    port, _ = serve_once(answer)
    with pytest.raises(ServiceError, match="failed its check"):
        sshd.verify(a_service_at(tmp_path, port), timeout=5)


def test_a_silent_peer_times_out(tmp_path: Path) -> None:
    port, _ = serve_once(None)
    started = time.monotonic()
    with pytest.raises(ServiceError, match="no login within 1s"):
        sshd.verify(a_service_at(tmp_path, port), timeout=1)
    assert time.monotonic() - started < 3


def test_nothing_listening_fails(tmp_path: Path) -> None:
    with pytest.raises(ServiceError, match="Connection refused"):
        sshd.verify(a_service_at(tmp_path, free_port("127.0.0.1")), timeout=2)
