"""The in-process SSH probe against a real sshd (our coordination service on a loopback address)."""

from __future__ import annotations

import secrets
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from node_runtime import keys, sshd
from node_runtime.errors import ServiceError
from node_runtime.sshprobe import probe


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
    sshd.start(svc, Path(binary))
    try:
        yield svc
    finally:
        sshd.stop(svc)


def test_a_login_with_the_task_keys_succeeds(service: sshd.Service) -> None:
    host_key, user_key = keys.load_probe_keys(service.files, service.address, service.port)
    started = time.monotonic()
    probe(service.address, service.port, host_key=host_key, user_key=user_key, user=service.user, timeout=10)
    assert time.monotonic() - started < 5
    assert "Accepted publickey for " + service.user in service.log.read_text()
    sshd.verify(service)  # what coordinate runs


def test_a_wrong_host_key_fails(service: sshd.Service) -> None:
    _, user_key = keys.load_probe_keys(service.files, service.address, service.port)
    other = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(ServiceError, match="host key is not the task's host key"):
        probe(service.address, service.port, host_key=other, user_key=user_key, user=service.user)
    assert "Accepted publickey" not in service.log.read_text()


def test_an_unauthorized_user_key_fails(service: sshd.Service) -> None:
    host_key, _ = keys.load_probe_keys(service.files, service.address, service.port)
    with pytest.raises(ServiceError, match="does not accept the task's user key"):
        probe(service.address, service.port, host_key=host_key, user_key=Ed25519PrivateKey.generate(),
              user=service.user)


def test_an_authorized_key_for_another_user_fails(service: sshd.Service) -> None:
    host_key, user_key = keys.load_probe_keys(service.files, service.address, service.port)
    with pytest.raises(ServiceError, match="does not accept the task's user key for nobody"):
        probe(service.address, service.port, host_key=host_key, user_key=user_key, user="nobody")


def test_verify_fails_when_authorized_keys_do_not_hold_the_task_key(service: sshd.Service) -> None:
    service.files.authorized_keys.write_text(keys.derive_keys(secrets.token_urlsafe(32)).user_public + "\n")
    with pytest.raises(ServiceError, match=f"{service.listen} failed its check: .*does not accept"):
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


def some_keys() -> dict[str, object]:
    key = Ed25519PrivateKey.generate()
    return {"host_key": key.public_key(), "user_key": key, "user": "root"}


@pytest.mark.parametrize("answer", [b"HTTP/1.1 400 Bad Request\r\n\r\n" * 20, b"SSH-1.5-old\r\n",
                                    b"SSH-2.0-x\r\n" + b"\xff" * 64])
def test_a_peer_that_is_not_an_ssh_server_fails(answer: bytes) -> None:
    port, _ = serve_once(answer)
    with pytest.raises(ServiceError, match=r"not an SSH server|unsupported SSH version|closed the connection"):
        probe("127.0.0.1", port, timeout=5, **some_keys())  # type: ignore[arg-type]


def test_a_silent_peer_times_out() -> None:
    port, _ = serve_once(None)
    started = time.monotonic()
    with pytest.raises(ServiceError, match="timed out"):
        probe("127.0.0.1", port, timeout=0.5, **some_keys())  # type: ignore[arg-type]
    assert time.monotonic() - started < 2


def test_nothing_listening_fails() -> None:
    with pytest.raises(ServiceError, match="cannot connect"):
        probe("127.0.0.1", free_port("127.0.0.1"), timeout=2, **some_keys())  # type: ignore[arg-type]

