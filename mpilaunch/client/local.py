"""``mpilaunch local up|down|status``: the emulator and Azurite as background processes for offline work.

State lives in ``$MPILAUNCH_HOME/local`` (default ``~/.mpilaunch/local``): ``state.json`` (endpoints, pids),
the emulator's data dir, Azurite's data dir and both logs. ``up`` is idempotent; ``down`` stops only the processes
it recorded (and checks they are still ours before signalling them). The emulator runs ``--nodes auto``: container
pools (``pool create --local --container-image IMG``) get docker nodes when the docker engine answers; they carry
the label ``org.mpilaunch.emulator=<docker_scope()>`` and are stopped (not removed) by ``down``, like deallocated
VMs, so the next ``up`` starts them again.

Size: pool ``local`` is refused a node count this machine cannot hold (:func:`node_limit`, formula there; the error
names the limit and the override ``MPILAUNCH_LOCAL_MAX_NODES``). ``down`` leaves no node process behind at any size:
after the emulator stops (SIGTERM, then SIGKILL after :data:`STOP_TIMEOUT`), one sweep kills every process any
command started on one of its nodes, with their descendants (also what a killed emulator left running).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil

from mpilaunch.client.config import BatchConfig, Settings, StorageConfig, home
from node_runtime import proc
from node_runtime.errors import InvalidInput, ServiceError

LOCAL_POOL = "local"
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0  # Azurite waits for idle keep-alive connections to close; then SIGKILL
_LISTENING = {  # what each service prints once it listens, with the port it bound
    "azurite": re.compile(r"successfully listens on https?://\S+:(\d+)"),
    "emulator": re.compile(r"Batch emulator listening on https?://\S+:(\d+)"),
}


MAX_NODES_VARIABLE = "MPILAUNCH_LOCAL_MAX_NODES"
NODES_PER_CORE = 64
"""Process nodes per core: a task on every node runs N coordination commands and N ranks on these cores. Measured on
2 cores (docs/benchmarks.md, "Emulator at scale"): 100 nodes coordinate in ~17 s and run a small mpi4py job in
~53 s, the load average reaching ~80; 64 per core (128 there) keeps a full pool's coordination inside launch's wait
(30 s + 0.3 s per node) with room for a loaded machine, where 1,000 nodes (load 43) could not even be stopped."""
NODE_MEMORY = 100 * 2**20
"""Memory per node running an MPI task: ~80 MB RSS measured (keeper, sshd, coordinate, orted, an mpi4py rank), with
a margin."""
MEMORY_SHARE = 0.8
"""The share of the machine's memory (or of its cgroup's limit) the local pool may plan to use."""
NODE_PROCESSES = 12
"""Processes per node running an MPI task: 9 measured, with a margin."""
PROCESS_SHARE = 0.5
"""The share of the free process slots (pid limit minus the processes running) the local pool may plan to use."""


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def node_limit() -> tuple[int, str]:
    """The most process nodes this machine can hold, and how that was derived (for the error message).

    ``min(64 x cores, 0.8 x memory / 100 MiB, 0.5 x (pid limit - processes running) / 12)``: cores from
    ``os.cpu_count()``, memory the total or the cgroup's ``memory.max`` if lower, the pid limit the least of
    ``kernel.pid_max``, the cgroup's ``pids.max`` and (not for root) ``RLIMIT_NPROC`` (see
    :data:`NODES_PER_CORE`, :data:`NODE_MEMORY`, :data:`NODE_PROCESSES`). On this project's 2-core, 24 GiB
    machines: 128 (cores)."""
    import resource

    cores = os.cpu_count() or 1
    memory = psutil.virtual_memory().total
    cgroup_memory = _read_int("/sys/fs/cgroup/memory.max")
    if cgroup_memory is not None:
        memory = min(memory, cgroup_memory)
    pid_limits = [v for v in (_read_int("/proc/sys/kernel/pid_max"), _read_int("/sys/fs/cgroup/pids.max"))
                  if v is not None]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[0]
    if nproc != resource.RLIM_INFINITY and os.geteuid() != 0:  # root is not held to RLIMIT_NPROC
        pid_limits.append(nproc)
    pids = min(pid_limits) if pid_limits else 32768
    running = len(psutil.pids())
    bounds = {
        "cores": (NODES_PER_CORE * cores, f"{NODES_PER_CORE} per core x {cores} cores"),
        "memory": (int(MEMORY_SHARE * memory // NODE_MEMORY),
                   f"{MEMORY_SHARE:g} x {memory / 2**30:.1f} GiB / {NODE_MEMORY // 2**20} MiB per node"),
        "processes": (int(PROCESS_SHARE * max(pids - running, 0) // NODE_PROCESSES),
                      f"{PROCESS_SHARE:g} x ({pids} pids - {running} running) / {NODE_PROCESSES} per node"),
    }
    limit = max(min(value for value, _ in bounds.values()), 1)
    why = "; ".join(f"{name}: {text} = {value}" for name, (value, text) in bounds.items())
    return limit, why


def check_size(nodes: int) -> None:
    """Refuse a local pool of ``nodes`` process nodes beyond :func:`node_limit` (or ``MPILAUNCH_LOCAL_MAX_NODES``)."""
    override = os.environ.get(MAX_NODES_VARIABLE, "").strip()
    if override:
        if not override.isdigit() or int(override) < 1:
            raise InvalidInput(f"{MAX_NODES_VARIABLE}={override!r}: must be a positive whole number of nodes")
        if nodes > int(override):
            raise InvalidInput(f"pool {LOCAL_POOL!r} cannot have {nodes} nodes: {MAX_NODES_VARIABLE} is {override}")
        return
    limit, why = node_limit()
    if nodes > limit:
        raise InvalidInput(
            f"pool {LOCAL_POOL!r} cannot have {nodes} nodes on this machine: its limit is {limit} process nodes "
            f"(the least of {why})",
            details=[f"fix: use at most {limit} nodes, or set {MAX_NODES_VARIABLE}={nodes} to go beyond this "
                     "machine's limit at your own risk (each node runs its own sshd, coordinate and MPI rank)"])


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


def settings(pool: str | None = None) -> Settings:
    """Client settings for the emulator and Azurite that :func:`up` started."""
    state = read_state()
    return Settings(BatchConfig(state.batch_endpoint, state.batch_account, state.batch_key),
                    StorageConfig(connection_string=state.storage_connection_string),
                    pool or LOCAL_POOL, local=True)


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
    """``preferred`` if it is free now (stable endpoints for users), else 0: the server binds any free port itself
    and reports it, so no port picked in advance can be taken by another process first."""
    if preferred:
        with socket.socket() as s:
            # as the servers bind: connections of a stopped one lingering in TIME_WAIT do not make the port taken
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", preferred))
            except OSError:
                return 0
    return preferred


def _wait_listening(child: subprocess.Popen[bytes], name: str, log: Path, offset: int) -> int | None:
    """The port ``child`` reports in ``log`` (after ``offset``) once it listens -- its own word, not a TCP probe
    that another process on that port could answer -- or None if it exited first."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        with log.open("rb") as f:
            f.seek(offset)
            found = _LISTENING[name].search(f.read().decode(errors="replace"))
        if found:
            return int(found[1])
        if child.poll() is not None:
            return None
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            raise ServiceError(f"{name} did not report listening within {START_TIMEOUT:.0f}s; see {log}")
        time.sleep(0.05)


def _start(argv: Callable[[int], list[str]], name: str, preferred: int, directory: Path) -> tuple[int, int]:
    """Start service ``name`` (``argv(port)``, output appended to its log) on ``preferred`` if free, else on a port
    it binds itself; return its pid and port. If it exits at start on ``preferred`` (taken between the check and
    its bind), it starts once more on a port of its own."""
    log = directory / f"{name}.log"
    port = _port(preferred)
    while True:
        with log.open("ab") as out:
            offset = out.tell()
            child = proc.spawn(argv(port), stdout=out.fileno(), stderr=out.fileno(), new_session=True)
        bound = _wait_listening(child, name, log, offset)
        if bound is not None:
            return child.pid, bound
        if port == 0:
            raise ServiceError(f"{name} exited while starting (code {child.returncode}); see {log}",
                               details=log.read_text(errors="replace").splitlines()[-10:])
        port = 0


def up(nodes: int = 3, *, default_ports: bool = True) -> LocalState:
    """Start whichever of the emulator and Azurite is not running, make sure pool ``local`` has ``nodes`` nodes;
    return the state.

    A service that still runs is kept (a healthy Azurite keeps serving the URLs that pools' StartTasks and queued
    tasks were given). A service started again prefers the port it had last (kept in ``ports.json``, which ``down``
    leaves), so those URLs stay valid across ``down``/``up``; the first time, with ``default_ports``, 10000 (Azurite)
    and 10100 (emulator). A preferred port that is taken is given up: the service binds a free one itself and
    reports it in its log.
    """
    from mpilaunch.emulator import defaults

    check_size(nodes)
    state = _load()
    if state is not None and _running(state):
        ensure_local_pool(state, nodes)
        return state
    directory = local_dir()
    directory.mkdir(parents=True, exist_ok=True)
    last = _last_ports(directory)
    if state is not None and _alive(state.azurite_pid, "azurite"):
        azurite_pid, blob_port = state.azurite_pid, int(urlsplit(state.blob_endpoint).port or 0)
    else:
        if state is not None:
            down()
        azurite_pid, blob_port = _start(
            lambda port: [*azurite_command(), "--blobHost", "127.0.0.1", "--blobPort", str(port),
                          "--location", str(directory / "azurite"), "--silent", "--skipApiVersionCheck", "--loose"],
            "azurite", last.get("azurite", 10000 if default_ports else 0), directory)
    try:
        emulator_pid, batch_port = _start(
            lambda port: [sys.executable, "-u", "-c", "from mpilaunch.cli import main; main()", "emulator",
                          "serve", "--host", "127.0.0.1", "--port", str(port),
                          "--data", str(directory / "emulator"), "--nodes", "auto",
                          "--docker-scope", docker_scope()],
            "emulator", last.get("emulator", defaults.PORT if default_ports else 0), directory)
    except BaseException:
        _stop(azurite_pid, "azurite")
        raise
    state = LocalState(defaults.endpoint("127.0.0.1", batch_port), defaults.ACCOUNT, defaults.KEY,
                       f"http://127.0.0.1:{blob_port}/{AZURITE_ACCOUNT}", emulator_pid, azurite_pid)
    path = directory / "state.json"
    path.write_text(json.dumps(asdict(state), indent=1))
    path.chmod(0o600)
    (directory / "ports.json").write_text(json.dumps({"azurite": blob_port, "emulator": batch_port}))
    ensure_local_pool(state, nodes)
    return state


def _last_ports(directory: Path) -> dict[str, int]:
    """The ports the services had the last time they started here (none if unknown or unreadable)."""
    try:
        ports = json.loads((directory / "ports.json").read_text())
        return {name: int(ports[name]) for name in ("azurite", "emulator") if name in ports}
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


def ensure_local_pool(state: LocalState, nodes: int) -> None:
    """Create pool ``local`` (or resize it) so it has at least ``nodes`` dedicated nodes."""
    from mpilaunch.client import pools

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
    """Stop the recorded local services, then every process left on the emulator's nodes; return what was
    stopped."""
    state = _load()
    stopped = []
    if state is not None:
        for name, pid in (("emulator", state.emulator_pid), ("azurite", state.azurite_pid)):
            if _stop(pid, name):
                stopped.append(f"{name} (pid {pid})")
        (local_dir() / "state.json").unlink(missing_ok=True)
    left = sweep_nodes()
    if left:
        stopped.append(f"{left} node process(es) left behind")
    return stopped


def node_ids(data_dir: Path | None = None) -> list[str]:
    """The ids of every node the local emulator has (its node directories: ``DATA/nodes/POOL/NODE``)."""
    nodes = (data_dir or local_dir() / "emulator") / "nodes"
    return sorted(n.name for pool in nodes.glob("*") if pool.is_dir() for n in pool.iterdir() if n.is_dir())


def sweep_nodes(data_dir: Path | None = None) -> int:
    """Kill (one sweep) every process any command started on a node of the local emulator, whatever left it
    running (an emulator killed before it could end its tasks), and stop its docker nodes; returns how many
    processes were found."""
    from mpilaunch.emulator.nodes.process import kill_nodes

    found = kill_nodes(node_ids(data_dir))
    if shutil.which("docker") is not None:
        from mpilaunch.emulator.nodes.docker import LABEL_SCOPE

        listed = proc.run(["docker", "ps", "-q", "--filter", f"label={LABEL_SCOPE}={docker_scope()}"], timeout=60,
                          check=False)
        ids = listed.stdout.decode().split() if listed.returncode == 0 else []
        if ids:
            proc.run(["docker", "stop", "-t", "0", *ids], timeout=120, check=False)
    return found


def status() -> dict[str, object]:
    """A JSON-able description of the local services (no keys)."""
    state = _load()
    if state is None:
        return {"running": False, "directory": str(local_dir())}
    return {"running": _running(state), "directory": str(local_dir()), "batch_endpoint": state.batch_endpoint,
            "batch_account": state.batch_account, "blob_endpoint": state.blob_endpoint, "pool": LOCAL_POOL,
            "emulator_pid": state.emulator_pid, "azurite_pid": state.azurite_pid,
            "emulator": _alive(state.emulator_pid, "emulator"), "azurite": _alive(state.azurite_pid, "azurite")}


FAULTS = ("preempt", "reboot", "kill")
FAULT_PATH = "/pools/{pool}/nodes/{node}/mpilaunch-fault"
"""The emulator's own fault-injection operation (see docs/emulator-execution.md, "Faults for rehearsal")."""


def batch_client() -> Any:
    """An azure-batch client of the running local emulator."""
    state = read_state()
    return BatchConfig(state.batch_endpoint, state.batch_account, state.batch_key).client()


def fault(client: Any, kind: str, node_id: str | None, *, pool_id: str = LOCAL_POOL, when_running: bool = False,
          down: float = 2.0, timeout: float = 600.0, poll: float = 0.5) -> str:
    """Inject a fault into a node of the emulator ``client`` talks to (``node_id``, or a random fit one if ``None``);
    returns its id.

    ``preempt`` (Spot nodes only) and ``kill`` use the emulator's fault operation (the node is down for ``down``
    seconds); ``reboot`` is Batch's own reboot with the default ``requeue`` option. With ``when_running``, wait (up to
    ``timeout`` s) until a task runs on the node first.
    """
    import random

    from azure.batch.models._models import BatchNodeRebootOptions
    from azure.core.rest import HttpRequest

    from mpilaunch.emulator import defaults

    if kind not in FAULTS:
        raise InvalidInput(f"fault {kind!r}: must be one of {', '.join(FAULTS)}")
    deadline = time.monotonic() + timeout
    while True:
        nodes = list(client.list_nodes(pool_id))
        if node_id is not None and node_id not in {n.id for n in nodes}:
            raise InvalidInput(f"node {node_id!r} is not in pool {pool_id!r} (its nodes: "
                               f"{', '.join(n.id for n in nodes) or 'none'})")
        fit = [n for n in nodes if (node_id is None or n.id == node_id) and (kind != "preempt" or not n.is_dedicated)
               and n.state in (("running",) if when_running else ("idle", "running"))]
        if fit:
            break
        if not when_running or time.monotonic() > deadline:
            what = f"node {node_id!r}" if node_id else f"no {'Spot ' if kind == 'preempt' else ''}node"
            why = f"no task ran on it within {timeout:.0f}s" if when_running else "it must be idle or running"
            raise InvalidInput(f"{what} of pool {pool_id!r} cannot be hit by {kind!r}: {why}"
                               + (" (and low-priority)" if kind == "preempt" else ""))
        time.sleep(poll)
    target = str(random.choice(fit).id)  # noqa: S311 - not crypto
    if kind == "reboot":
        client.begin_reboot_node(pool_id, target, BatchNodeRebootOptions(node_reboot_kind="requeue"))
        return target
    request = HttpRequest("POST", FAULT_PATH.format(pool=pool_id, node=target),
                          params={"api-version": defaults.API_VERSION}, json={"fault": kind, "downSeconds": down})
    response = client.send_request(request)
    if response.status_code != 202:
        raise ServiceError(f"the emulator refused to {kind} node {target!r}: {response.status_code} {response.text()}")
    return target
