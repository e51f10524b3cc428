"""``node-runtime doctor``: on the primary of a short diagnostic task, check what MPI needs of every node.

How the checks reach the nodes: the primary waits for every node's coordination service as launch does (one control
master per remote node, :class:`node_runtime.masters.Masters`), then starts ``node-runtime doctor --agent`` on every
node through those masters (on its own node as a child) and talks to each agent in JSON lines over the session's
stdin/stdout. Not under mpirun: the doctor must answer exactly when an MPI job would not start (nodes that differ, a
``/dev/shm`` too small: launch refuses those before mpirun reaches a node; an MPI or mpi4py that differs or does not
load; a blocked port), it needs no mpi4py to bring the answers back, and an ssh session returns each node's answers
as they are, with a clear failure per node when one cannot answer.

An agent opens a TCP listener on its node's host-list address (the interface MPI's TCP traffic uses) on an ephemeral
port, as MPI's TCP transports do, then says its facts in one line (:func:`gather_facts`: versions of the runtime,
Python, mpi4py and the MPI library mpi4py loads, mpirun; the fabric detection ``coordinate`` recorded; free disk in
the task directory). It then answers requests: ``time`` (the primary measures every node's clock against its own,
NTP-like: of a few round trips the fastest, its midpoint as the reference, half of it as the uncertainty) and
``reach`` (connect to every other node's listener and task port). End of input ends it.

The primary evaluates what it learned (:func:`evaluate`, pure: every problem comes with its fix), writes
:data:`REPORT_NAME` (JSON, :data:`SCHEMA_ID`) in its working directory, where the client fetches it with Batch's
node-file API, prints the problems with their fixes, stops every node's service and exits 0 only if every check
passed.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from node_runtime import __version__, fabric, proc
from node_runtime.contract import DEFAULT_SSH_PORT, NODE_ADDRESS_VARIABLE
from node_runtime.errors import InvalidInput, MpilaunchError

REPORT_NAME = "doctor.json"
SCHEMA_ID = "mpilaunch.doctor/1"
CHECKS = ("service", "versions", "fabric", "shm", "disk", "clock", "reach")
"""Every node's checks, in this order: each is ``ok``, ``fail`` (with the problem and its fix) or ``skip``."""
OK, FAIL, SKIP = "ok", "fail", "skip"
VERSION_FIELDS = (("runtime", "mpilaunch runtime"), ("python", "Python"), ("mpi4py", "mpi4py"),
                  ("mpi_library", "MPI library"), ("mpirun", "mpirun"))
"""Facts every node must have alike (the majority's value is the expected one; on a tie the primary's)."""
DEFAULT_MAX_CLOCK_SKEW = 1.0  # seconds
DEFAULT_MIN_FREE_DISK = 2**30  # bytes
DEFAULT_TIMEOUT = 30.0  # seconds for the services to answer, and again for the agents
AGENT_TIME_PER_NODE = 0.3
"""Seconds the agents' deadline grows by per node: they start at once, each a Python that loads mpi4py and asks
mpirun its version (~0.3 s of CPU), which on nodes sharing one machine (the emulator's) add up."""
CONNECT_TIMEOUT = 3.0
CLOCK_SAMPLES = 5
SERVICE_DIR_VARIABLE = "MPILAUNCH_SERVICE_DIR"  # the coordination service's sshd sets it for its sessions
MPI4PY_PROBE = (
    "import json, mpi4py\n"
    "mpi4py.rc.initialize = mpi4py.rc.finalize = False\n"
    "from mpi4py import MPI\n"
    "print(json.dumps({'mpi4py': mpi4py.__version__, 'library': MPI.Get_library_version()}))\n"
)
"""What an agent runs, with the ranks' python, to learn mpi4py's version and the MPI library it loads (without
initializing MPI)."""

SERVICE_FIX = ("see that node's stderr.txt (`mpilaunch logs TASK --instance I --stderr`): `node-runtime coordinate` "
               "must have succeeded there; a firewall or network security group that blocks the task port between "
               "the nodes looks the same (see the reach check of the other nodes)")
AGENT_FIX = ("the node must run the runtime at the primary's path, with a Python that works: install the same "
             "runtime on every node (`mpilaunch pool create --install-runtime`, or one task image for the pool)")
VERSIONS_FIX = ("give every node the same software: one image for the whole pool (containers: one --image), or "
                "recreate the pool with `mpilaunch pool create --install-runtime`, which installs the same runtime, "
                "Open MPI and mpi4py everywhere")
MPI4PY_FIX = ("install mpi4py into the runtime's Python, built against the node's MPI (`pip install "
              "'mpilaunch[checkpoint]'`, which `--install-runtime` and the task image do; a wheel built for another "
              "MPI fails to load its library)")
MPIRUN_FIX = "install an MPI on the node (Debian: apt-get install openmpi-bin libopenmpi-dev)"
FABRIC_FIX = ("use one VM size and one image for every node of the pool: launch refuses nodes that differ in what "
              "they offer MPI (InfiniBand, MPI, UCX, cores, interface)")
DISK_FIX = ("free space on that disk (finished tasks' directories: shorten the job's retention time, delete old "
            "tasks), choose a VM size with a larger temporary disk, or lower --min-free-disk")
CLOCK_FIX = ("synchronise the nodes' clocks: run chrony or systemd-timesyncd (Azure: chrony with the Hyper-V PTP "
             "clock /dev/ptp_hyperv as its reference, as Azure documents for Linux VMs)")
REACH_MPI_FIX = ("let the nodes reach each other by TCP on every port of their host-list network (MPI's TCP "
                 "transports and UCX pick ephemeral ports): the subnet's network security group and the nodes' "
                 "firewalls must allow traffic between the pool's nodes (pools need inter-node communication, which "
                 "`mpilaunch pool create` enables)")


def reach_task_fix(port: int) -> str:
    return (f"allow TCP port {port} (the task's coordination port) between the pool's nodes in the network security "
            "group and the nodes' firewalls, or choose another port (--ssh-port)")


# --- results and their evaluation (pure) ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Finding:
    """One check on one node: ``summary`` for a table cell, ``problem`` and ``fix`` when it failed."""

    check: str
    status: str  # OK, FAIL or SKIP
    summary: str
    problem: str = ""
    fix: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class Limits:
    """What the checks hold the nodes to."""

    ppn: int  # ranks per node /dev/shm must hold
    max_clock_skew: float = DEFAULT_MAX_CLOCK_SKEW  # seconds from the primary's clock
    min_free_disk: int = DEFAULT_MIN_FREE_DISK  # bytes free in the task directory
    ssh_port: int = DEFAULT_SSH_PORT  # the task port


@dataclass
class NodeState:
    """What the primary learned of one node: its agent's facts, its clock, what it could reach; or why not."""

    host: str
    primary: bool = False
    facts: dict[str, Any] | None = None
    clock: dict[str, float] | None = None  # offset from the primary's clock and its uncertainty, in seconds
    reach: list[dict[str, Any]] | None = None
    service: bool = True  # its coordination service answered the primary
    failure: str | None = None  # why there are no facts (or no clock, no reach)

    def to_dict(self) -> dict[str, Any]:
        return {"host": self.host, "primary": self.primary, "facts": self.facts, "clock": self.clock,
                "reach": self.reach, "service": self.service, "failure": self.failure}


def service_finding(node: NodeState) -> Finding:
    """Whether the node's service answered and its agent ran."""
    if not node.service:
        return Finding("service", FAIL, "no answer", "its coordination service did not answer the primary"
                       + (f": {node.failure}" if node.failure else ""), SERVICE_FIX)
    if node.facts is None:
        return Finding("service", FAIL, "check failed", "the doctor could not run there"
                       + (f": {node.failure}" if node.failure else ""), AGENT_FIX)
    return Finding("service", OK, "primary" if node.primary else "ok")


def _usual(values: Iterable[Any]) -> Any:
    """The most common of ``values`` (on a tie the first seen: the primary's), None if there are none."""
    counts = Counter(v for v in values if v)
    return counts.most_common(1)[0][0] if counts else None


def version_findings(nodes: Sequence[NodeState]) -> dict[str, Finding]:
    """Per node with facts: mpi4py loads, mpirun exists, and every version is the other nodes' (``nodes`` primary
    first)."""
    known = [n for n in nodes if n.facts is not None]
    usual = {name: _usual(n.facts.get(name) for n in known if n.facts) for name, _ in VERSION_FIELDS}
    out = {}
    for node in known:
        facts = node.facts or {}
        problems, fixes = [], []
        if not facts.get("mpi4py"):
            problems.append(f"mpi4py cannot be loaded ({facts.get('mpi4py_error') or 'not installed'})")
            fixes.append(MPI4PY_FIX)
        if not facts.get("mpirun"):
            problems.append("no mpirun on the ranks' PATH")
            fixes.append(MPIRUN_FIX)
        differs = [f"{label} {facts[name]!r} (others: {usual[name]!r})" for name, label in VERSION_FIELDS
                   if facts.get(name) and usual[name] and facts[name] != usual[name]]
        if differs:
            problems.append("differs from the other nodes: " + "; ".join(differs))
            fixes.append(VERSIONS_FIX)
        summary = ", ".join(filter(None, (f"py {facts.get('python') or '?'}", facts.get("mpi4py") and
                                          f"mpi4py {facts['mpi4py']}", short_mpi(facts.get("mpirun")))))
        out[node.host] = Finding("versions", FAIL if problems else OK, summary + (" (differs)" if differs else ""),
                                 "; ".join(problems), " ".join(f"{i}) {f}" for i, f in enumerate(fixes, 1))
                                 if len(fixes) > 1 else "".join(fixes))
    return out


def short_mpi(mpirun: str | None) -> str | None:
    """``Open MPI 4.1.4`` from ``mpirun (Open MPI) 4.1.4``; other flavors' lines as they are."""
    if not mpirun:
        return None
    match = re.match(r"mpirun \((.+?)\) (\S+)", mpirun)
    return f"{match[1]} {match[2]}" if match else mpirun


def mpirun_version(text: str) -> str | None:
    """One line naming mpirun's MPI and version from its ``--version`` output (Hydra's is on its Version: line)."""
    lines = [" ".join(line.split()) for line in text.splitlines() if line.strip()]
    if not lines:
        return None
    if lines[0].startswith("HYDRA"):
        version = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Version:")), "?")
        return f"mpirun (MPICH Hydra) {version}"
    return lines[0]


def library_version(text: str) -> str:
    """The MPI library's first line, spaces folded, up to its first comma (``Open MPI v4.1.4``)."""
    first = " ".join((text.strip().splitlines() or [""])[0].split())
    return first.split(",", 1)[0]


def _fabrics(nodes: Sequence[NodeState]) -> dict[str, fabric.NodeFabric | None]:
    out: dict[str, fabric.NodeFabric | None] = {}
    for node in nodes:
        if node.facts is not None:
            data = node.facts.get("fabric")
            out[node.host] = None if not data else fabric.NodeFabric.from_dict(data)
    return out


def _lines_for(host: str, lines: Iterable[str]) -> list[str]:
    """The lines (of :mod:`node_runtime.fabric`'s checks) that name ``host``, without the name."""
    return [line[len(host) + 2:] for line in lines if line.startswith(f"{host}: ")]


def fabric_findings(nodes: Sequence[NodeState]) -> dict[str, Finding]:
    """Per node with facts: it offers MPI what the others do (:func:`node_runtime.fabric.disagreements`)."""
    found = _fabrics(nodes)
    odd = fabric.disagreements(found)
    out = {}
    for host, node in found.items():
        summary = "-" if node is None else ", ".join(filter(None, (
            f"IB {','.join(node.infiniband)}" if node.infiniband else "no IB",
            f"{node.mpi or 'no MPI'}{'+UCX' if node.ucx else ''}", node.interface)))
        mine = _lines_for(host, odd)
        out[host] = Finding("fabric", FAIL, summary, "; ".join(mine), FABRIC_FIX) if mine else \
            Finding("fabric", OK, summary)
    return out


def shm_findings(nodes: Sequence[NodeState], ppn: int) -> dict[str, Finding]:
    """Per node with facts: /dev/shm holds ``ppn`` ranks (:func:`node_runtime.fabric.shm_problems`)."""
    found = _fabrics(nodes)
    small = fabric.shm_problems(found, ppn)
    out = {}
    for host, node in found.items():
        if node is None:
            out[host] = Finding("shm", SKIP, "-")
            continue
        summary = size_text(node.shm_bytes)
        mine = _lines_for(host, small)
        out[host] = Finding("shm", FAIL, summary, "; ".join(mine), fabric.shm_fix(ppn).removeprefix("fix: ")) \
            if mine else Finding("shm", OK, summary)
    return out


def disk_finding(facts: Mapping[str, Any], limits: Limits) -> Finding:
    """The task directory has ``limits.min_free_disk`` bytes free."""
    disk = facts.get("disk") or {}
    if "free" not in disk:
        return Finding("disk", FAIL, "unknown", f"free space of the task directory unknown: {disk.get('error')}",
                       DISK_FIX)
    summary = f"{size_text(disk['free'])} free"
    if disk["free"] < limits.min_free_disk:
        return Finding("disk", FAIL, summary, f"{size_text(disk['free'])} free in the task directory {disk['path']} "
                       f"(of {size_text(disk['total'])}), less than {size_text(limits.min_free_disk)}", DISK_FIX)
    return Finding("disk", OK, summary)


def clock_finding(node: NodeState, limits: Limits) -> Finding:
    """The node's clock is within ``limits.max_clock_skew`` seconds of the primary's (beyond the uncertainty)."""
    if node.primary:
        return Finding("clock", OK, "reference")
    if node.clock is None:
        return Finding("clock", SKIP, "-")
    offset, uncertainty = node.clock["offset"], node.clock["uncertainty"]
    shown = offset if round(offset, 3) else 0.0  # never "-0.000"
    summary = f"{shown:+.3f}±{uncertainty:.3f} s"
    if abs(offset) - uncertainty > limits.max_clock_skew:
        way = "ahead of" if offset > 0 else "behind"
        return Finding("clock", FAIL, summary, f"its clock is {abs(offset):.3f} s {way} the primary's "
                       f"(±{uncertainty:.3f} s), more than {limits.max_clock_skew:g} s", CLOCK_FIX)
    return Finding("clock", OK, summary)


def reach_finding(node: NodeState, limits: Limits) -> Finding:
    """From this node, every other node answered TCP on its MPI interface and on the task port."""
    if node.reach is None:
        return Finding("reach", SKIP, "-")
    failed = [r for r in node.reach if not r.get("ok")]
    summary = f"{len(node.reach) - len(failed)}/{len(node.reach)}"
    if not failed:
        return Finding("reach", OK, summary)
    what = "; ".join(f"{r['host']} port {r['port']} ({'MPI interface' if r['kind'] == 'mpi' else 'task port'}): "
                     f"{r.get('error') or 'failed'}" for r in failed)
    kinds = {r["kind"] for r in failed}
    fixes = [*([REACH_MPI_FIX] if "mpi" in kinds else []), *([reach_task_fix(limits.ssh_port)] if "task" in kinds
                                                             else [])]
    return Finding("reach", FAIL, summary, f"cannot connect to {what}", "; ".join(fixes))


def evaluate(nodes: Sequence[NodeState], limits: Limits) -> dict[str, Any]:
    """The report: every node (``nodes`` primary first) with each of :data:`CHECKS`, and ``ok`` only if no check
    failed anywhere."""
    versions, fabrics, shm = version_findings(nodes), fabric_findings(nodes), shm_findings(nodes, limits.ppn)
    rows = []
    for node in nodes:
        findings = [service_finding(node)]
        if node.facts is None:
            findings += [Finding(check, SKIP, "-") for check in CHECKS[1:]]
        else:
            findings += [versions[node.host], fabrics[node.host], shm[node.host], disk_finding(node.facts, limits),
                         clock_finding(node, limits), reach_finding(node, limits)]
        facts = node.facts or {}
        rows.append({"host": node.host, "node_id": facts.get("node_id"), "hostname": facts.get("hostname"),
                     "primary": node.primary, "ok": all(f.status != FAIL for f in findings),
                     "checks": [f.to_dict() for f in findings], **{k: v for k, v in node.to_dict().items()
                                                                  if k in ("facts", "clock", "reach")}})
    primary = next((_fabrics([n])[n.host] for n in nodes if n.primary and n.facts is not None), None)
    problems = sum(c["status"] == FAIL for row in rows for c in row["checks"])
    return {"schema": SCHEMA_ID, "ok": problems == 0, "problems": problems, "limits": asdict(limits),
            "fabric": fabric.choose("auto", primary).describe() if primary else None, "nodes": rows}


def problem_lines(report: Mapping[str, Any]) -> list[str]:
    """Every failed check of the report, as ``host: check: problem`` and ``fix: ...`` lines."""
    lines = []
    for row in report["nodes"]:
        for check in row["checks"]:
            if check["status"] == FAIL:
                lines += [f"{row['host']}{' (primary)' if row['primary'] else ''}: {check['check']}: "
                          f"{check['problem']}", f"  fix: {check['fix']}"]
    return lines


def render_text(report: Mapping[str, Any]) -> str:
    """The report as plain text: one line per node and check, then the problems with their fixes."""
    lines = []
    for row in report["nodes"]:
        cells = "  ".join(f"{c['check']}={'FAIL:' if c['status'] == FAIL else ''}{c['summary']}"
                          for c in row["checks"])
        lines.append(f"{row['host']}{' (primary)' if row['primary'] else ''} {row.get('node_id') or ''}: "
                     f"{'ok' if row['ok'] else 'PROBLEMS'}  {cells}")
    if report.get("fabric"):
        lines.append(report["fabric"])
    lines += problem_lines(report)
    lines.append("doctor: every check passed" if report["ok"] else f"doctor: {report['problems']} problem(s)")
    return "\n".join(lines)


def size_text(size: float) -> str:
    """``1.5 GiB``, ``64 MiB``, ``812 KiB``."""
    for unit, scale in (("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(size) >= scale:
            value = size / scale
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{size:.0f} B"


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from ``1073741824``, ``512M``, ``1G``, ``1.5GiB``, ``2TB`` (binary units)."""
    match = _SIZE.match(str(text))
    if not match:
        raise InvalidInput(f"invalid size {text!r}: expected e.g. 500M, 1G, 1.5GiB or a number of bytes")
    scale = 2 ** (10 * "_kmgtp".index(match[2].lower() or "_")) if match[2] else 1
    return int(float(match[1]) * scale)


# --- the agent (every node) ----------------------------------------------------------------------------------------

def _say(out: IO[str], message: Mapping[str, Any]) -> None:
    out.write(json.dumps(message) + "\n")
    out.flush()


def _listen(address: str) -> socket.socket:
    """A TCP listener on ``address``, ephemeral port; a thread accepts and closes every connection."""
    listener = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((address, 0))
    listener.listen(128)

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                connection, _ = listener.accept()
                connection.close()

    threading.Thread(target=accept, daemon=True).start()
    return listener


def gather_facts(address: str, environ: Mapping[str, str]) -> dict[str, Any]:
    """This node's facts: ids, versions, fabric (coordinate's detection, else detected now), free disk."""
    import platform

    python = sys.executable
    probe: subprocess.Popen[bytes] | None = None
    facts: dict[str, Any] = {"address": address, "node_id": environ.get("AZ_BATCH_NODE_ID"),
                             "hostname": socket.gethostname(), "runtime": __version__,
                             "python": platform.python_version(), "executable": python, "mpi4py": None,
                             "mpi_library": None, "mpi4py_error": None, "mpirun": None}
    try:
        probe = proc.spawn([python, "-c", MPI4PY_PROBE], env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except MpilaunchError as exc:
        facts["mpi4py_error"] = exc.message
    mpirun = shutil.which("mpirun", path=environ.get("PATH"))
    if mpirun is not None:
        with contextlib.suppress(MpilaunchError):
            done = proc.run([mpirun, "--version"], timeout=30, check=False, env=environ)
            facts["mpirun"] = mpirun_version((done.stdout + done.stderr).decode(errors="replace"))
    facts["fabric"] = _fabric(address, environ).to_dict()
    work = Path(environ.get("AZ_BATCH_TASK_WORKING_DIR") or Path.cwd())
    try:
        usage = shutil.disk_usage(work)
        facts["disk"] = {"path": str(work), "free": usage.free, "total": usage.total}
    except OSError as exc:
        facts["disk"] = {"path": str(work), "error": exc.strerror or str(exc)}
    if probe is not None:
        facts.update(_mpi4py(probe))
    return facts


def _fabric(address: str, environ: Mapping[str, str]) -> fabric.NodeFabric:
    """What coordinate recorded in the service directory (what launch goes by), else detected now."""
    directory = environ.get(SERVICE_DIR_VARIABLE)
    if directory:
        with contextlib.suppress(OSError):
            node = fabric.read_node((Path(directory) / fabric.NODE_FILE).read_text())
            if node is not None:
                return node
    cache = environ.get("AZ_BATCH_NODE_SHARED_DIR")
    return fabric.detect(address, environ, Path(cache) if cache else None)


def _mpi4py(probe: subprocess.Popen[bytes]) -> dict[str, Any]:
    try:
        out, err = probe.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        probe.kill()
        probe.communicate()
        return {"mpi4py_error": "importing mpi4py's MPI did not finish within 60 s"}
    try:
        said = json.loads(out.decode().strip().splitlines()[-1])
        return {"mpi4py": said["mpi4py"], "mpi_library": library_version(said["library"])}
    except (ValueError, KeyError, IndexError, TypeError):
        tail = err.decode(errors="replace").strip().splitlines()
        return {"mpi4py_error": tail[-1] if tail else f"exit code {probe.returncode}"}


def _why(exc: OSError) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {CONNECT_TIMEOUT:g} s (filtered?)"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    return exc.strerror or str(exc) or type(exc).__name__


def reach(targets: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Connect to every target (``address``, ``port``), in parallel; each target with ``ok``, ``ms`` or ``error``."""
    def one(target: Mapping[str, Any]) -> dict[str, Any]:
        started = time.monotonic()
        try:
            with socket.create_connection((target["address"], target["port"]), timeout=CONNECT_TIMEOUT):
                pass
        except OSError as exc:
            return {**target, "ok": False, "error": _why(exc)}
        return {**target, "ok": True, "ms": round((time.monotonic() - started) * 1000, 2)}

    if not targets:
        return []
    with ThreadPoolExecutor(max_workers=min(32, len(targets))) as pool:
        return list(pool.map(one, targets))


def agent(address: str, environ: Mapping[str, str], stdin: IO[str], stdout: IO[str]) -> int:
    """One node's side: listen, say the facts (with the listener's port), then answer ``time`` and ``reach``
    requests until end of input."""
    try:
        listener: socket.socket | None = _listen(address)
        listening: dict[str, Any] = {"probe_port": listener.getsockname()[1] if listener else None}
    except OSError as exc:
        listener, listening = None, {"probe_port": None, "probe_error": f"cannot listen on {address}: {exc}"}
    _say(stdout, {**gather_facts(address, environ), **listening})
    for line in stdin:
        request = json.loads(line)
        if request.get("op") == "time":
            _say(stdout, {"time": time.time()})
        elif request.get("op") == "reach":
            _say(stdout, {"reach": reach(request.get("targets") or [])})
        else:
            _say(stdout, {"error": f"unknown request {request.get('op')!r}"})
    if listener is not None:
        listener.close()
    return 0


# --- the primary ---------------------------------------------------------------------------------------------------

class AgentFailed(MpilaunchError):
    """An agent ended or said something else than an answer."""


class AgentSession:
    """One agent, on this node (a child) or another (an ssh session through its master), and its JSON lines."""

    def __init__(self, host: str, argv: Sequence[str], env: Mapping[str, str]) -> None:
        self.host = host
        self.process = proc.spawn(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, new_session=True)
        self._stderr = b""
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.process.stderr is not None
        descriptor = self.process.stderr.fileno()
        with contextlib.suppress(OSError):
            while chunk := os.read(descriptor, 4096):
                self._stderr = (self._stderr + chunk)[-65536:]

    def why(self) -> str:
        """The agent's last words on stderr (or its exit code)."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(1)
        self._reader.join(1)
        lines = bytes(self._stderr).decode(errors="replace").strip().splitlines()
        code = self.process.poll()
        return lines[-1] if lines else "it ended without a word" if code is not None else "no answer in time"

    def read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        try:
            said = json.loads(line)
        except ValueError:
            raise AgentFailed(self.why()) from None
        if not isinstance(said, dict) or "error" in said:
            raise AgentFailed(str(said.get("error") if isinstance(said, dict) else said))
        return said

    def ask(self, request: Mapping[str, Any]) -> dict[str, Any]:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write((json.dumps(request) + "\n").encode())
            self.process.stdin.flush()
        except OSError:
            raise AgentFailed(self.why()) from None
        return self.read()

    def close(self, timeout: float = 5.0) -> None:
        """End its input; kill it if it does not end within ``timeout``."""
        with contextlib.suppress(OSError):
            if self.process.stdin:
                self.process.stdin.close()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        self.process.wait()


def measure_clock(session: AgentSession, samples: int = CLOCK_SAMPLES) -> dict[str, float]:
    """The agent's clock minus ours: of ``samples`` round trips the fastest, its answer against the round trip's
    midpoint on our clock; half that round trip is the uncertainty."""
    best: tuple[float, float] | None = None
    for _ in range(samples):
        sent, start = time.time(), time.monotonic()
        theirs = float(session.ask({"op": "time"})["time"])
        trip = time.monotonic() - start
        if best is None or trip < best[1]:
            best = (theirs - (sent + trip / 2), trip)
    assert best is not None
    return {"offset": round(best[0], 6), "uncertainty": round(best[1] / 2, 6)}


def targets_for(node: NodeState, nodes: Sequence[NodeState], ssh_port: int) -> list[dict[str, Any]]:
    """What ``node`` must reach: every other node's listener (if it has one) and task port."""
    out = []
    for other in nodes:
        if other.host == node.host:
            continue
        port = (other.facts or {}).get("probe_port")
        if port:
            out.append({"host": other.host, "address": other.host, "port": port, "kind": "mpi"})
        out.append({"host": other.host, "address": other.host, "port": ssh_port, "kind": "task"})
    return out


def in_parallel(work: Callable[[str], None], hosts: Iterable[str], deadline: float,
                on_late: Callable[[str], None]) -> None:
    """``work(host)`` for every host, a thread each; a host still at work at ``deadline`` gets ``on_late(host)``
    (which must make its work end: kill its agent), then is awaited."""
    threads = {h: threading.Thread(target=work, args=(h,), daemon=True) for h in hosts}
    for thread in threads.values():
        thread.start()
    for host, thread in threads.items():
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            on_late(host)
            thread.join()


@dataclass
class Doctor:
    """The primary's run: the services (masters), one agent per node, and what each said."""

    hosts: Sequence[str]  # primary first
    own: str
    timeout: float = DEFAULT_TIMEOUT
    nodes: dict[str, NodeState] = field(default_factory=dict)
    sessions: dict[str, AgentSession] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.nodes = {h: NodeState(h, primary=h == self.own) for h in self.hosts}

    @property
    def deadline_s(self) -> float:
        """Seconds each step may take on every agent: ``timeout``, grown with the number of nodes."""
        return self.timeout + AGENT_TIME_PER_NODE * len(self.hosts)

    def _guard(self, host: str, step: Callable[[NodeState, AgentSession], None]) -> None:
        node, session = self.nodes[host], self.sessions[host]
        try:
            step(node, session)
        except AgentFailed as exc:
            node.failure = node.failure or exc.message
            session.kill()
        except (KeyError, TypeError, ValueError) as exc:  # an answer without what was asked
            node.failure = node.failure or f"unexpected answer ({type(exc).__name__}: {exc})"
            session.kill()

    def converse(self, ssh_port: int) -> None:
        """Facts and clocks from every agent, then what each reaches; every agent is closed at the end."""
        def greet(node: NodeState, session: AgentSession) -> None:
            node.facts = session.read()
            if not node.primary:
                node.clock = measure_clock(session)

        def probe(node: NodeState, session: AgentSession) -> None:
            node.reach = session.ask({"op": "reach", "targets": targets_for(node, list(self.nodes.values()),
                                                                           ssh_port)})["reach"]

        def late(host: str) -> None:
            self.nodes[host].failure = self.nodes[host].failure or f"no answer within {self.deadline_s:g} s"
            self.sessions[host].kill()

        try:
            for step in (greet, probe):
                live = [h for h in self.sessions if self.nodes[h].failure is None]
                in_parallel(functools.partial(self._guard, step=step), live, time.monotonic() + self.deadline_s,
                            late)
        finally:
            for session in self.sessions.values():
                session.close()

    def report(self, limits: Limits) -> dict[str, Any]:
        return evaluate([self.nodes[h] for h in self.hosts], limits)


def agent_argv(address: str) -> list[str]:
    """The agent's command: this runtime's python (on every node the same path, as the ranks' python3)."""
    return [sys.executable, "-m", "node_runtime", "doctor", "--agent", "--address", address]


def remote_command(address: str, environ: Mapping[str, str]) -> str:
    """The agent's command line on another node: with the variables the ranks get from launch (PATH, the venv)."""
    from node_runtime.mpirun import RANK_VARIABLES

    settings = [f"{name}={environ[name]}" for name in RANK_VARIABLES if name in environ]
    return shlex.join(["env", *settings, *agent_argv(address)])


def ranks_per_node(node: fabric.NodeFabric | None, hosts: int, ppn: int | None, threads: int | None,
                   shared_machine: bool) -> int:
    """The ranks per node launch would start (:func:`node_runtime.fabric.layout`): ``ppn``, else the physical cores
    (of one machine shared by ``hosts`` nodes: its share) / threads per rank."""
    if ppn is not None:
        return ppn
    cores = node.physical_cores if node is not None else os.cpu_count() or 1
    cores = max(1, cores // hosts) if shared_machine else cores
    return fabric.layout(cores, None, threads, shared=shared_machine).ppn


def run_doctor(environ: Mapping[str, str], *, ppn: int | None = None, threads: int | None = None,
               max_clock_skew: float = DEFAULT_MAX_CLOCK_SKEW, min_free_disk: int = DEFAULT_MIN_FREE_DISK,
               timeout: float = DEFAULT_TIMEOUT, report_name: str = REPORT_NAME) -> int:
    """The primary's ``node-runtime doctor``: check every node, write the report, print the problems and their
    fixes, stop the services; 0 if every check passed, else 1."""
    from node_runtime import sshd
    from node_runtime.coordinate import current_environment, prepare, service
    from node_runtime.keys import forget_secret
    from node_runtime.launch import stop_services
    from node_runtime.masters import Masters
    from node_runtime.mpirun import with_runtime_environment

    started = time.monotonic()
    env = current_environment(environ)
    if not env.is_primary:
        raise InvalidInput(f"doctor runs on the primary node only: this node is {env.current_address}, the primary "
                           f"is {env.primary_address}")
    svc = service(env)
    if svc.files.user_key.is_file() and svc.files.known_hosts.is_file():
        sshd.write_client_config(svc)
    else:
        svc = prepare(env)
    forget_secret()
    ranks_env = with_runtime_environment(sshd.clean_environ(), sys.prefix, sys.base_prefix)
    remote = [h for h in env.hosts_primary_first if h != env.current_address]
    doctor = Doctor(env.hosts_primary_first, env.current_address, timeout)
    masters = Masters(svc, remote, timeout)
    try:
        masters.start()
        doctor.sessions[env.current_address] = AgentSession(
            env.current_address, agent_argv(env.current_address),
            {**ranks_env, SERVICE_DIR_VARIABLE: str(svc.files.directory)})
        masters.finished.wait()  # every master answered or gave up at its deadline
        ssh = shutil.which("ssh") or "ssh"
        for host in remote:
            if host in masters.opened:
                doctor.sessions[host] = AgentSession(
                    host, [ssh, "-F", str(svc.client_config), host, remote_command(host, ranks_env)],
                    sshd.clean_environ())
            else:
                node = doctor.nodes[host]
                node.service, node.failure = False, masters.failures.get(host, f"no answer within {timeout:g} s")
        doctor.converse(env.ssh_port)
    finally:
        masters.cancel()
        masters.wait()
        stop_services(svc, masters)
    primary = doctor.nodes[env.current_address].facts or {}
    own = fabric.NodeFabric.from_dict(primary["fabric"]) if primary.get("fabric") else None
    limits = Limits(ranks_per_node(own, len(env.hosts), ppn, threads, NODE_ADDRESS_VARIABLE in environ),
                    max_clock_skew, min_free_disk, env.ssh_port)
    report = {**doctor.report(limits), "job_id": env.job_id, "task_id": env.task_id,
              "seconds": round(time.monotonic() - started, 3)}
    path = env.working_dir / report_name
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)
    print(render_text(report), flush=True)
    return 0 if report["ok"] else 1
