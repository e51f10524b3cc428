"""Session fixture: a real Azurite blob server (installed by scripts/setup), on a free port of a chosen address."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
AZURITE_BIN = REPO / ".tools" / "azurite" / "node_modules" / ".bin" / "azurite-blob"
# Azurite's documented well-known development account.
ACCOUNT = "devstoreaccount1"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


@dataclass(frozen=True)
class Azurite:
    host: str
    port: int
    account: str = ACCOUNT
    key: str = KEY

    @property
    def blob_endpoint(self) -> str:
        return f"http://{self.host}:{self.port}/{self.account}"

    @property
    def connection_string(self) -> str:
        return (f"DefaultEndpointsProtocol=http;AccountName={self.account};AccountKey={self.key};"
                f"BlobEndpoint={self.blob_endpoint};")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def start_azurite(
    location: Path,
    host: str = "127.0.0.1",
    *,
    port: int | None = None,
    extra_args: Sequence[str] = (),
    prefix: Sequence[str] = (),
    ready: Callable[[], bool] | None = None,
) -> tuple[Azurite, subprocess.Popen[bytes]]:
    """Start Azurite and wait until it accepts connections.

    ``prefix`` runs it under another command (e.g. ``ip netns exec NS``); ``ready`` then replaces the local TCP probe,
    which cannot reach into another namespace. ``extra_args`` go to azurite-blob (e.g. ``--oauth basic --cert ...``).
    """
    if not AZURITE_BIN.exists():
        if os.environ.get("CI"):
            pytest.fail(f"Azurite is not installed at {AZURITE_BIN}: scripts/setup should have installed it")
        pytest.skip("Azurite is not installed (run scripts/setup)")
    port = port or free_port(host)
    proc = subprocess.Popen(
        [*prefix, str(AZURITE_BIN), "--blobHost", host, "--blobPort", str(port), "--location", str(location),
         "--silent", "--skipApiVersionCheck", "--loose", *extra_args],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"azurite exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        if ready() if ready else _accepts(host, port):
            return Azurite(host, port), proc
        time.sleep(0.05)
    stop_azurite(proc)
    raise RuntimeError("azurite did not start within 30 s")


def _accepts(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=0.2).close()
    except OSError:
        return False
    return True


def stop_azurite(proc: subprocess.Popen[bytes]) -> None:
    """Stop Azurite: it often takes ~10 s to exit on SIGTERM, and test data need no graceful shutdown."""
    proc.terminate()
    try:
        proc.wait(2)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@contextlib.contextmanager
def running_azurite(location: Path, host: str = "127.0.0.1", **options: Any) -> Iterator[Azurite]:
    """:func:`start_azurite` as a context manager that always stops it."""
    server, proc = start_azurite(location, host, **options)
    try:
        yield server
    finally:
        stop_azurite(proc)


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    """A running Azurite on 127.0.0.1 for the whole session."""
    with running_azurite(tmp_path_factory.mktemp("azurite")) as server:
        yield server
