"""``mpilaunch local up|down|status``: the emulator and Azurite as background processes for offline work.

State lives in ``$MPILAUNCH_HOME/local`` (default ``~/.mpilaunch/local``): ``state.json`` (endpoints, pids),
the emulator's data dir, Azurite's data dir and both logs. ``up`` is idempotent; ``down`` stops only the processes
it recorded (and checks they are still ours before signalling them). The emulator runs ``--nodes auto``: container
pools (``pool create --local --container-image IMG``) get docker nodes when the docker engine answers; they carry
the label ``org.mpilaunch.emulator=<docker_scope()>`` and are stopped (not removed) by ``down``, like deallocated
VMs, so the next ``up`` starts them again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from mpilaunch import proc
from mpilaunch.client.config import home
from mpilaunch.errors import InvalidInput, ServiceError

LOCAL_POOL = "local"
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0  # Azurite waits for idle keep-alive connections to close; then SIGKILL


@dataclass(frozen=True)
class LocalState:
    """Where the local services listen, and their pids."""

    batch_endpoint: str
    batch_account: str
    batch_key: str = field(repr=False)
    blob_endpoint: str
    emulator_pid: int
    azurite_pid: int

    @property
    def storage_connection_string(self) -> str:
        return (f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
                f"BlobEndpoint={self.blob_endpoint};")


def local_dir() -> Path:
    return home() / "local"


def docker_scope() -> str:
    """The docker label value of this local emulator's node containers and networks (one per local directory)."""
    return "local-" + hashlib.sha256(str(local_dir().resolve()).encode()).hexdigest()[:12]


def _alive(pid: int, marker: str) -> bool:
    """Whether ``pid`` runs and its command line mentions ``marker`` (so we never signal a recycled pid)."""
    try:
        return marker in " ".join(psutil.Process(pid).cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _load() -> LocalState | None:
    path = local_dir() / "state.json"
    if not path.exists():
        return None
    return LocalState(**json.loads(path.read_text()))


def _running(state: LocalState) -> bool:
    return _alive(state.emulator_pid, "emulator") and _alive(state.azurite_pid, "azurite")


def read_state() -> LocalState:
    """The running local services, or :class:`InvalidInput` saying how to start them."""
    state = _load()
    if state is None or not _running(state):
        raise InvalidInput("the local emulator and Azurite are not running: start them with `mpilaunch local up`")
    return state


def azurite_command() -> list[str]:
    """How to start Azurite's blob service: the project's .tools copy, else ``azurite-blob``/``azurite`` on PATH."""
    bundled = REPO / ".tools" / "azurite" / "node_modules" / ".bin" / "azurite-blob"
    if bundled.exists():
        return [str(bundled)]
    for name in ("azurite-blob", "azurite"):
        found = shutil.which(name)
        if found:
            return [found]
    raise InvalidInput("Azurite not found: run scripts/setup, or `npm install -g azurite`")


def _port(preferred: int) -> int:
    """``preferred`` if free (stable endpoints for users), else any free port; 0 means any free port."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:
            s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, child: object, name: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if getattr(child, "poll")() is not None:  # noqa: B009 - Popen
            raise ServiceError(f"{name} exited while starting; see {log}",
                               details=log.read_text(errors="replace").splitlines()[-10:])
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise ServiceError(f"{name} did not accept connections on port {port} within {START_TIMEOUT:.0f}s; see {log}")


def _start(argv: list[str], name: str, port: int, directory: Path) -> int:
    log = directory / f"{name}.log"
    with log.open("ab") as out:
        child = proc.spawn(argv, stdout=out.fileno(), stderr=out.fileno(), new_session=True)
    _wait_port(port, child, name, log)
    return child.pid


def up(nodes: int = 3, *, default_ports: bool = True) -> LocalState:
    """Start the emulator and Azurite unless they run, make sure pool ``local`` has ``nodes`` nodes; return state.

    With ``default_ports`` they listen on 10000 (Azurite) and 10100 (emulator) when those are free.
    """
    from mpilaunch.emulator import defaults

    state = _load()
    if state is None or not _running(state):
        if state is not None:
            down()
        directory = local_dir()
        directory.mkdir(parents=True, exist_ok=True)
        blob_port = _port(10000 if default_ports else 0)
        azurite_pid = _start([*azurite_command(), "--blobHost", "127.0.0.1", "--blobPort", str(blob_port),
                              "--location", str(directory / "azurite"), "--silent", "--skipApiVersionCheck",
                              "--loose"], "azurite", blob_port, directory)
        batch_port = _port(defaults.PORT if default_ports else 0)
        try:
            emulator_pid = _start([sys.executable, "-c", "from mpilaunch.cli import main; main()", "emulator",
                                   "serve", "--host", "127.0.0.1", "--port", str(batch_port),
                                   "--data", str(directory / "emulator"), "--nodes", "auto",
                                   "--docker-scope", docker_scope()], "emulator", batch_port, directory)
        except BaseException:
            _stop(azurite_pid, "azurite")
            raise
        state = LocalState(defaults.endpoint("127.0.0.1", batch_port), defaults.ACCOUNT, defaults.KEY,
                           f"http://127.0.0.1:{blob_port}/{AZURITE_ACCOUNT}", emulator_pid, azurite_pid)
        path = directory / "state.json"
        path.write_text(json.dumps(asdict(state), indent=1))
        path.chmod(0o600)
    ensure_local_pool(state, nodes)
    return state


def ensure_local_pool(state: LocalState, nodes: int) -> None:
    """Create pool ``local`` (or resize it) so it has at least ``nodes`` dedicated nodes."""
    from mpilaunch.client import pools
    from mpilaunch.client.config import BatchConfig

    client = BatchConfig(state.batch_endpoint, state.batch_account, state.batch_key).client()
    pools.ensure_pool(client, pools.PoolSpec(LOCAL_POOL, nodes=nodes, vm_size="standard_d2s_v3"))


def _stop(pid: int, name: str) -> bool:
    """Stop the process group ``pid`` leads if it is still our ``name`` service; whether it was running."""
    if not _alive(pid, name):
        return False
    process = psutil.Process(pid)
    os.killpg(pid, signal.SIGTERM)
    try:
        process.wait(STOP_TIMEOUT)
    except psutil.TimeoutExpired:
        os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(psutil.Error):
            process.wait(STOP_TIMEOUT)
    except psutil.NoSuchProcess:
        pass
    return True


def down() -> list[str]:
    """Stop the recorded local services; return what was stopped."""
    state = _load()
    stopped = []
    if state is not None:
        for name, pid in (("emulator", state.emulator_pid), ("azurite", state.azurite_pid)):
            if _stop(pid, name):
                stopped.append(f"{name} (pid {pid})")
        (local_dir() / "state.json").unlink(missing_ok=True)
    return stopped


def status() -> dict[str, object]:
    """A JSON-able description of the local services (no keys)."""
    state = _load()
    if state is None:
        return {"running": False, "directory": str(local_dir())}
    return {"running": _running(state), "directory": str(local_dir()), "batch_endpoint": state.batch_endpoint,
            "batch_account": state.batch_account, "blob_endpoint": state.blob_endpoint, "pool": LOCAL_POOL,
            "emulator_pid": state.emulator_pid, "azurite_pid": state.azurite_pid,
            "emulator": _alive(state.emulator_pid, "emulator"), "azurite": _alive(state.azurite_pid, "azurite")}
