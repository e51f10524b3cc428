"""Session fixture: a real Azurite blob server (installed by scripts/setup), on a free port of a chosen address."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
AZURITE_BIN = REPO / ".tools" / "azurite" / "node_modules" / ".bin" / "azurite-blob"
_LISTENING = re.compile(r"successfully listens on https?://\S+:(\d+)")  # its start-up line, with the bound port
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
) -> tuple[Azurite, subprocess.Popen[str]]:
    """Start Azurite and wait until it says it listens (and, if given, until ``ready()`` is true).

    Without ``port`` Azurite binds port 0 and reports the port the kernel gave it: no port is picked in advance, so
    no other process can take it first (or answer a readiness probe in Azurite's place). ``prefix`` runs it under
    another command (e.g. ``ip netns exec NS``); ``ready`` then checks it from where it will be used. ``extra_args``
    go to azurite-blob (e.g. ``--oauth basic --cert ...``).
    """
    if not AZURITE_BIN.exists():
        if os.environ.get("CI"):
            pytest.fail(f"Azurite is not installed at {AZURITE_BIN}: scripts/setup should have installed it")
        pytest.skip("Azurite is not installed (run scripts/setup)")
    proc = subprocess.Popen(
        [*prefix, str(AZURITE_BIN), "--blobHost", host, "--blobPort", str(port or 0), "--location", str(location),
         "--silent", "--skipApiVersionCheck", "--loose", *extra_args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    output: list[str] = []
    listening: queue.Queue[int] = queue.Queue()

    def drain() -> None:  # for Azurite's whole life: a full pipe would block it
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line)
            if found := _LISTENING.search(line):
                listening.put(int(found[1]))

    reader = threading.Thread(target=drain, name=f"azurite-{proc.pid}-output", daemon=True)
    reader.start()
    deadline = time.monotonic() + 60  # a liveness bound only: node takes seconds to start on a loaded machine
    bound: int | None = None
    while bound is None or not (ready is None or ready()):
        if proc.poll() is not None:
            reader.join(5)
            raise RuntimeError(f"azurite exited with code {proc.returncode}: {''.join(output)[-3000:]}")
        if time.monotonic() > deadline:
            stop_azurite(proc)
            raise RuntimeError(f"azurite did not get ready within 60 s: {''.join(output)[-3000:]}")
        if bound is None:
            with contextlib.suppress(queue.Empty):
                bound = listening.get(timeout=0.1)
        else:
            time.sleep(0.05)
    return Azurite(host, bound), proc


def stop_azurite(proc: subprocess.Popen[str]) -> None:
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
