"""Fixtures: a real Batch emulator over HTTP, started as ``mpilaunch emulator serve`` on a free port.

* ``emulator`` (session): executes tasks (process node provider). ``wire_emulator`` (session): ``--no-execute``,
  for API-only tests. Both yield a :class:`RunningEmulator` with ``endpoint``/``account``/``key``/``data_dir`` and
  ``client()`` (an azure-batch 15.1 ``BatchClient`` with ``AzureNamedKeyCredential``).
* :func:`start_emulator` starts one more (own data dir, e.g. to test restarts); use it as a context manager.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from mpilaunch.emulator import defaults

REPO = Path(__file__).resolve().parents[2]
_READY = re.compile(r"listening on (http://\S+)")


class RunningEmulator:
    """One ``mpilaunch emulator serve`` process; ``restart()`` keeps its data dir (and, by default, its port)."""

    def __init__(self, data_dir: Path, *, execute: bool = True, args: Sequence[str] = (),
                 account: str = defaults.ACCOUNT, key: str = defaults.KEY) -> None:
        self.data_dir = Path(data_dir)
        self.execute = execute
        self.args = list(args)
        self.account = account
        self.key = key
        self.endpoint = ""
        self.proc: subprocess.Popen[str] | None = None
        self._log = self.data_dir.parent / f"{self.data_dir.name}.serve.log"

    def start(self, port: int = 0, timeout: float = 30.0) -> RunningEmulator:
        argv = [sys.executable, "-c", "from mpilaunch.cli import main; main()", "emulator", "serve",
                "--host", "127.0.0.1", "--port", str(port), "--data", str(self.data_dir),
                "--account", self.account, "--key", self.key, *self.args]
        if not self.execute:
            argv.append("--no-execute")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self._log.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO,
                                         start_new_session=True)
        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not sel.select(max(deadline - time.monotonic(), 0.01)):
                continue
            line = self.proc.stdout.readline()
            if not line:
                break
            m = _READY.search(line)
            if m:
                self.endpoint = m.group(1)
                sel.close()
                return self
        sel.close()
        self.stop()
        raise RuntimeError(f"emulator did not start; log: {self._log.read_text(errors='replace')[-3000:]}")

    @property
    def port(self) -> int:
        return int(self.endpoint.rsplit(":", 1)[1])

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait, then SIGKILL the whole process group; returns the exit code."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
        return proc.returncode

    def restart(self, *, same_port: bool = True) -> RunningEmulator:
        port = self.port if same_port and self.endpoint else 0
        self.stop()
        return self.start(port)

    def client(self, **kwargs: Any) -> Any:
        """An azure-batch 15.1 ``BatchClient`` for this emulator."""
        from azure.batch import BatchClient
        from azure.core.credentials import AzureNamedKeyCredential

        return BatchClient(self.endpoint, AzureNamedKeyCredential(self.account, self.key), **kwargs)

    def raw(self, method: str, path: str, *, json_body: Any = None, data: bytes | None = None,
            params: dict[str, str] | None = None, headers: dict[str, str] | None = None, sign: bool = True,
            key: str | None = None) -> Any:
        """Send one HTTP request, signed by the azure-batch SDK's own SharedKey policy; returns a requests.Response.

        ``path`` is the raw (already percent-encoded) path; ``headers`` may set ``ocp-date`` to sign a chosen time.
        """
        import json
        from urllib.parse import quote, urlencode

        import requests
        from azure.batch._patch import BatchSharedKeyAuthPolicy
        from azure.core.credentials import AzureNamedKeyCredential
        from azure.core.pipeline import PipelineContext, PipelineRequest
        from azure.core.rest import HttpRequest

        query = {"api-version": defaults.API_VERSION, **(params or {})}
        url = f"{self.endpoint}{path}?{urlencode(query, quote_via=quote)}"
        hdrs = dict(headers or {})
        if json_body is not None:
            data = json.dumps(json_body).encode()
            hdrs.setdefault("Content-Type", "application/json; odata=minimalmetadata")
        if data is not None:
            hdrs["Content-Length"] = str(len(data))
        request = HttpRequest(method, url, headers=hdrs, content=data)
        if sign:
            policy = BatchSharedKeyAuthPolicy(AzureNamedKeyCredential(self.account, key or self.key))
            policy.on_request(PipelineRequest(request, PipelineContext(None)))
        return requests.request(method, url, headers=dict(request.headers), data=data, timeout=30)

    def log_text(self) -> str:
        return self._log.read_text(errors="replace") if self._log.exists() else ""

    def __enter__(self) -> RunningEmulator:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def start_emulator(data_dir: Path, *, execute: bool = True, args: Sequence[str] = ()) -> RunningEmulator:
    """Start an emulator on a free port with state in ``data_dir``."""
    return RunningEmulator(data_dir, execute=execute, args=args).start()


@pytest.fixture(scope="session")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningEmulator]:
    """An executing emulator (process nodes) for the whole session."""
    with start_emulator(tmp_path_factory.mktemp("emulator") / "data") as emu:
        yield emu


@pytest.fixture(scope="session")
def wire_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningEmulator]:
    """An API-only emulator (``--no-execute``) for the whole session."""
    with start_emulator(tmp_path_factory.mktemp("wire-emulator") / "data", execute=False) as emu:
        yield emu
