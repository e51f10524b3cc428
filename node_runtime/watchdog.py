"""launch's hang watchdog (``node-runtime launch --hang-timeout DURATION``), on the primary, while mpirun runs.

Progress is a rank writing output or the checkpoint API committing: the watchdog looks at the mtimes of the tagged
rank-output file in the working directory (``contract.RANKS_LOG_NAME``, written by launch's output pump as lines
arrive), of launch's own stdout and stderr (Batch's stdout.txt/stderr.txt, which the ranks' output reaches too), and
of the heartbeat file (:data:`node_runtime.contract.HEARTBEAT_NAME`, created here, touched by the checkpoint API on
every commit of a rank on this node, see :func:`node_runtime.checkpoint._mpi.beat`). When none changed for the
timeout, the job hangs: the watchdog collects the Python stack of every rank on every node (this node's in process,
the others' through the task's ssh control masters, each node running ``node-runtime stacks``: see
:mod:`node_runtime.stacks`), groups identical stacks, writes :data:`node_runtime.contract.HANG_REPORT_NAME` beside
launch-report.json, kills mpirun and makes launch fail with :class:`node_runtime.errors.HangDetected` (exit 124),
whose message says where the ranks are, e.g. ``2 of 3 ranks wait in Barrier at solver.py:57; rank 1 is in
time.sleep at io.py:12 on node 10.0.0.5``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from node_runtime import proc
from node_runtime.contract import HANG_REPORT_NAME, HEARTBEAT_NAME, RANKS_LOG_NAME
from node_runtime.durations import format_duration
from node_runtime.errors import CommandFailed, HangDetected
from node_runtime.stacks import Frame, RankStack, node_stacks

if TYPE_CHECKING:
    from node_runtime.sshd import Service

REPORT_VERSION = 1
REMOTE_TIMEOUT = 20.0  # seconds for a node's `node-runtime stacks` through its master (it waits 3 s for dumps)
KILL_GRACE = 5.0  # seconds mpirun gets after SIGTERM to end the job before it (and what it started here) is killed
MAX_POLL = 1.0

# MPI operations whose names say "waits for other ranks"; lower case, as mpi4py's lower-case (pickle) API spells
# them; its buffer API capitalises them (Barrier, Allreduce, Recv).
_MPI_CALLS = frozenset({
    "barrier", "ibarrier", "bcast", "reduce", "allreduce", "gather", "gatherv", "allgather", "allgatherv",
    "scatter", "scatterv", "alltoall", "alltoallv", "alltoallw", "scan", "exscan", "reduce_scatter",
    "reduce_scatter_block", "recv", "send", "ssend", "bsend", "rsend", "sendrecv", "sendrecv_replace", "probe",
    "mprobe", "mrecv", "wait", "waitall", "waitany", "waitsome", "fence", "win_fence", "neighbor_allgather",
    "neighbor_alltoall", "join", "accept", "connect", "spawn", "disconnect",
})
# ... of which these are common words elsewhere too (socket.recv, Event.wait): MPI only on a communicator or a
# request, or capitalised
_AMBIGUOUS = frozenset({"recv", "send", "wait", "probe", "join", "accept", "connect", "spawn", "reduce", "scan",
                        "gather", "scatter", "disconnect", "fence"})
_MPI_RECEIVER = re.compile(r"comm|mpi|world|req|win", re.IGNORECASE)
_CALL = re.compile(r"([A-Za-z_][\w.]*)\s*\(")
_KEYWORDS = frozenset({"if", "elif", "while", "for", "return", "yield", "assert", "not", "and", "or", "in", "with",
                       "lambda", "await", "print"})
_LIBRARY = re.compile(r"^<|/(?:site|dist)-packages/|/lib/python3\.\d+/|/node_runtime/")


# ----------------------------------------------------------------------------------------------- what ranks do


@dataclass(frozen=True)
class Place:
    """Where a rank's main thread is: its innermost own frame (not a library's), and the call on that line."""

    frame: Frame
    call: str  # e.g. "Barrier", "time.sleep"; "" if the line shows none
    mpi: bool  # the call is an MPI operation (the rank waits for others)

    def describe(self, count: int) -> str:
        """``wait in Barrier at solver.py:57`` / ``is in time.sleep at io.py:12`` (``are`` for several ranks)."""
        at = f"at {self.frame.where}" + ("" if self.call else f" (in {self.frame.function})")
        if self.mpi:
            return f"{'waits' if count == 1 else 'wait'} in {self.call} {at}"
        return f"{'is' if count == 1 else 'are'} {'in ' + self.call + ' ' if self.call else ''}{at}"


def is_library(path: str) -> bool:
    """Whether ``path`` is the interpreter's, an installed package's or ours rather than the program's."""
    return bool(_LIBRARY.search(path))


def call_on(code: str) -> tuple[str, bool]:
    """The call a source line makes that a rank is likeliest to be blocked in, and whether it is an MPI operation:
    the first MPI operation on the line (``comm.Barrier()``: ``Barrier``), else its first call (``time.sleep``)."""
    calls = [c for c in _CALL.findall(code.split("#", 1)[0]) if c not in _KEYWORDS]
    for dotted in calls:
        receiver, _, name = dotted.rpartition(".")
        if name.lower() in _MPI_CALLS and (name[0].isupper() or name not in _AMBIGUOUS
                                           or bool(_MPI_RECEIVER.search(receiver))):
            return name, True
    return (calls[0], False) if calls else ("", False)


def place_of(stack: RankStack) -> Place | None:
    """Where ``stack``'s main thread is (None without frames)."""
    thread = stack.main
    if thread is None or not thread.frames:
        return None
    frame = next((f for f in thread.frames if not is_library(f.file)), thread.frames[0])
    call, mpi = call_on(frame.code)
    return Place(frame, call, mpi)


# ------------------------------------------------------------------------------------------------- grouping


@dataclass(frozen=True)
class Located:
    """A rank's stack and the node it runs on."""

    node: str
    stack: RankStack


@dataclass
class Group:
    """Ranks whose main threads have the same stack (or that gave no stack for the same reason)."""

    members: list[Located]
    place: Place | None
    error: str = ""

    @property
    def ranks(self) -> list[int]:
        return sorted(m.stack.rank for m in self.members if m.stack.rank is not None)

    @property
    def nodes(self) -> list[str]:
        return list(dict.fromkeys(m.node for m in self.members))


def _key(stack: RankStack) -> tuple[Any, ...]:
    if stack.error or stack.main is None:
        return ("error", stack.error or "no threads")
    return ("stack", *((f.file, f.line, f.function) for f in stack.main.frames))


def group(located: Sequence[Located]) -> list[Group]:
    """Ranks with identical main-thread stacks together; the largest group first (ties: lowest rank first), ranks
    without a stack last."""
    groups: dict[tuple[Any, ...], Group] = {}
    for item in located:
        key = _key(item.stack)
        if key not in groups:
            groups[key] = Group([], place_of(item.stack), item.stack.error if key[0] == "error" else "")
        groups[key].members.append(item)

    def order(g: Group) -> tuple[bool, int, int]:
        return (bool(g.error) or g.place is None, -len(g.members), min(g.ranks, default=1 << 30))

    return sorted(groups.values(), key=order)


def _ranks_text(ranks: Sequence[int], unknown: int = 0) -> str:
    if not ranks:
        return f"{unknown} process{'es' if unknown != 1 else ''} of unknown rank"
    return ("rank " if len(ranks) == 1 else "ranks ") + _spans(ranks)


def _spans(numbers: Sequence[int]) -> str:
    """``1, 3-5, 8``."""
    runs: list[list[int]] = []
    for n in sorted(set(numbers)):
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def _nodes_text(nodes: Sequence[str]) -> str:
    return ("on node " if len(nodes) == 1 else "on nodes ") + ", ".join(nodes)


def summarize(groups: Sequence[Group], total: int, silent: Mapping[str, str] | None = None) -> str:
    """One line: the largest group by count, every other group by its ranks and nodes, the nodes that did not
    answer; e.g. ``2 of 3 ranks wait in Barrier at solver.py:57; rank 1 is in time.sleep at io.py:12 on node
    10.0.0.5``."""
    parts: list[str] = []
    for i, g in enumerate(groups):
        count = len(g.members)
        unknown = count - len(g.ranks)
        if g.error or g.place is None:
            reason = g.error or "no Python frames"
            parts.append(f"{_ranks_text(g.ranks, unknown)} gave no stack ({reason}) {_nodes_text(g.nodes)}")
        elif i == 0 and len(groups) > 1 and count > 1:
            parts.append(f"{count} of {total} ranks {g.place.describe(count)}")
        elif i == 0 and count == total and count > 1:
            parts.append(f"all {count} ranks {g.place.describe(count)}")
        else:
            parts.append(f"{_ranks_text(g.ranks, unknown)} {g.place.describe(count)} {_nodes_text(g.nodes)}")
    for host, why in (silent or {}).items():
        parts.append(f"node {host} gave no stacks ({why})")
    return "; ".join(parts) if parts else "no rank process was found"


def details(groups: Sequence[Group], frames: int = 4) -> list[str]:
    """Per group: its ranks and the innermost ``frames`` frames of their main thread (with the source lines)."""
    lines = []
    for g in groups:
        who = f"{_ranks_text(g.ranks, len(g.members) - len(g.ranks))} ({', '.join(g.nodes)})"
        first = g.members[0].stack
        if g.error or first.main is None:
            lines.append(f"{who}: {g.error or 'no Python frames'}")
            continue
        shown = [f"{f.where} in {f.function}" + (f": {f.code}" if f.code else "")
                 for f in first.main.frames[:frames]]
        more = len(first.main.frames) - frames
        lines.append(f"{who}: " + " <- ".join(shown) + (f" <- ({more} more)" if more > 0 else ""))
    return lines


# --------------------------------------------------------------------------------------------- collecting


def remote_command(python: str = sys.executable) -> list[str]:
    """What the watchdog runs on another node, through its master: the runtime's ``node-runtime stacks`` (by its
    interpreter's path, the same on every node of a pool: the sessions' PATH need not have it)."""
    return [python, "-m", "node_runtime", "stacks"]


def remote_stacks(host: str, ssh_config: Path, timeout: float = REMOTE_TIMEOUT) -> dict[str, Any]:
    """``node-runtime stacks`` on ``host`` over ``ssh -F ssh_config`` (through the node's control master, the
    config's ControlPath); its JSON, or ``{"error": why}``."""
    ssh = shutil.which("ssh") or "ssh"
    argv = [ssh, "-F", str(ssh_config), host, shlex.join(remote_command())]
    from node_runtime.sshd import ssh_environ

    try:
        done = proc.run(argv, timeout=timeout, env=ssh_environ(), input=b"", check=False)
    except CommandFailed as exc:
        timed_out = exc.returncode is None and "timed out" in exc.message
        return {"error": f"no answer within {timeout:g}s" if timed_out else f"ssh could not be started: {exc.message}"}
    text = done.stdout.decode(errors="replace").strip()
    try:
        doc = json.loads(text.splitlines()[-1]) if text else None
    except ValueError:
        doc = None
    if done.returncode != 0 or not isinstance(doc, dict):
        said = (done.stderr.decode(errors="replace").strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        return {"error": f"node-runtime stacks failed: {said}"}
    return doc


@dataclass
class NodeStacks:
    host: str
    hostname: str = ""
    ranks: list[RankStack] = field(default_factory=list)
    error: str = ""


def collect_all(local_host: str, local_tmp: Path, remote_hosts: Sequence[str], ssh_config: Path, *,
                local: Callable[[str], dict[str, Any]] | None = None,
                remote: Callable[[str], dict[str, Any]] | None = None) -> list[NodeStacks]:
    """Every node's stacks, in parallel: this node's in process (its ranks' TMPDIR is ``local_tmp``), the others'
    through ssh; in the order local, then ``remote_hosts``."""
    local = local or (lambda _host: node_stacks(str(local_tmp)))
    remote = remote or (lambda host: remote_stacks(host, ssh_config))
    hosts = [local_host, *remote_hosts]
    answers: dict[str, dict[str, Any]] = {}

    def ask(host: str) -> None:
        try:
            answers[host] = local(host) if host == local_host else remote(host)
        except Exception as exc:  # a thread has nobody to raise to: the node is reported with it
            answers[host] = {"error": f"{type(exc).__name__}: {exc}"}

    threads = [threading.Thread(target=ask, args=(h,), daemon=True) for h in hosts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(REMOTE_TIMEOUT + 5)
    nodes = []
    for host in hosts:
        doc = answers.get(host, {"error": "no answer"})
        ranks = [RankStack.from_dict(r) for r in doc.get("ranks", [])]
        nodes.append(NodeStacks(host, str(doc.get("hostname", "")), ranks, str(doc.get("error", ""))))
    return nodes


# ----------------------------------------------------------------------------------------------- the report


def build_report(nodes: Sequence[NodeStacks], *, timeout: float, idle: float, source: str,
                 expected: int | None = None) -> tuple[dict[str, Any], str, list[str]]:
    """hang-report.json's content, the one-line summary and the per-group detail lines."""
    located = [Located(n.host, r) for n in nodes for r in n.ranks]
    groups = group(located)
    sizes = [r.size for n in nodes for r in n.ranks if r.size]
    total = max([len(located), expected or 0, *sizes])
    silent = {n.host: n.error for n in nodes if n.error}
    summary = summarize(groups, total, silent)
    found = {r.rank for n in nodes for r in n.ranks if r.rank is not None}
    missing = sorted(set(range(total)) - found) if total else []
    if missing and not silent:
        summary += f"; {_ranks_text(missing)} not found on any node"
    lines = details(groups)
    report = {
        "version": REPORT_VERSION,
        "detected_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "hang_timeout_s": timeout,
        "idle_s": round(idle, 3),
        "last_progress": source,
        "summary": summary,
        "ranks_total": total,
        "ranks_missing": missing,
        "groups": [{
            "count": len(g.members), "ranks": g.ranks, "nodes": g.nodes, "error": g.error,
            "location": g.place.frame.where if g.place else None, "call": g.place.call if g.place else None,
            "mpi": g.place.mpi if g.place else None,
            "frames": [vars(f) for f in (g.members[0].stack.main.frames if g.members[0].stack.main else [])],
        } for g in groups],
        "nodes": {n.host: {"hostname": n.hostname, "ranks": len(n.ranks), "error": n.error} for n in nodes},
        "ranks": [{"node": item.node, **item.stack.to_dict()}
                  for item in sorted(located, key=lambda i: (i.stack.rank is None, i.stack.rank or 0))],
    }
    return report, summary, lines


def write_report(directory: Path, report: Mapping[str, Any]) -> Path:
    path = directory / HANG_REPORT_NAME
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)
    return path


# ------------------------------------------------------------------------------------------------ watching


def progress_files(working_dir: Path) -> list[Path]:
    """The files whose mtime says a rank made progress: the tagged rank output and the heartbeat."""
    return [working_dir / RANKS_LOG_NAME, working_dir / HEARTBEAT_NAME]


class Watchdog:
    """Started once mpirun passed the gate (:meth:`start`), stopped when it ended (:meth:`finish`, which raises
    :class:`HangDetected` if the watchdog ended the job)."""

    def __init__(self, timeout: float, *, working_dir: Path, local_host: str, local_tmp: Path, ssh_config: Path,
                 err: TextIO | None = None, streams: Sequence[int] = (1, 2),
                 collect: Callable[[Sequence[str]], list[NodeStacks]] | None = None) -> None:
        self.timeout = timeout
        self.working_dir = working_dir
        self.local_host, self.local_tmp, self.ssh_config = local_host, local_tmp, ssh_config
        self.err = err if err is not None else sys.stderr
        self.streams = tuple(streams)
        self._collect = collect
        self.poll = min(MAX_POLL, max(0.05, timeout / 10))
        self.fired = False
        self.summary = ""
        self.details: list[str] = []
        self.report_path: Path | None = None
        self.timings: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._child: subprocess.Popen[bytes] | None = None
        self._remote: list[str] = []
        self._started = 0.0
        self._last: dict[str, float] = {}

    @property
    def heartbeat(self) -> Path:
        return self.working_dir / HEARTBEAT_NAME

    def start(self, child: subprocess.Popen[bytes], remote_hosts: Sequence[str]) -> None:
        """Watch ``child`` (mpirun), whose ranks run on this node and ``remote_hosts``."""
        self._child, self._remote = child, list(remote_hosts)
        with contextlib.suppress(OSError):
            self.heartbeat.touch()
        self._started = time.time()
        self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)
        self._thread.start()

    def finish(self) -> None:
        """Stop watching (mpirun ended); raises :class:`HangDetected` if it was the watchdog that ended it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(REMOTE_TIMEOUT + KILL_GRACE + 10)
        with contextlib.suppress(OSError):
            self.heartbeat.unlink(missing_ok=True)
        if self.fired:
            where = f"every rank's stack: {self.report_path}" if self.report_path else "no hang report was written"
            raise HangDetected(f"hang: no output and no checkpoint for {format_duration(self.timeout)} "
                               f"(--hang-timeout): {self.summary}", details=[*self.details, where])

    def idle(self, now: float | None = None) -> tuple[float, str]:
        """Seconds since the last progress, and what showed it (a file name, ``stdout``/``stderr``, ``start``)."""
        latest, source = self._started, "start"
        for path in progress_files(self.working_dir):
            with contextlib.suppress(OSError):
                mtime = path.stat().st_mtime
                if mtime > latest:
                    latest, source = mtime, path.name
        for fd, name in zip(self.streams, ("stdout", "stderr"), strict=False):
            with contextlib.suppress(OSError):
                mtime = os.fstat(fd).st_mtime
                if mtime > latest:
                    latest, source = mtime, name
        return max(0.0, (time.time() if now is None else now) - latest), source

    def _watch(self) -> None:
        child = self._child
        assert child is not None
        # (launch's thread waits for mpirun: poll() would say None while it does; finish() sets _stop when it ended)
        while not self._stop.wait(self.poll):
            idle, source = self.idle()
            if idle >= self.timeout:
                self._fire(child, idle, source)
                return

    def _fire(self, child: subprocess.Popen[bytes], idle: float, source: str) -> None:
        began = time.monotonic()
        print(f"node-runtime: launch: no output and no checkpoint for {idle:.1f}s (--hang-timeout "
              f"{format_duration(self.timeout)}): collecting every rank's stack", file=self.err, flush=True)
        collect = self._collect or (lambda hosts: collect_all(self.local_host, self.local_tmp, hosts,
                                                             self.ssh_config))
        try:
            nodes = collect(self._remote)
        except Exception as exc:  # the job must end all the same
            nodes = [NodeStacks(self.local_host, error=f"{type(exc).__name__}: {exc}")]
        self.timings["collect_s"] = round(time.monotonic() - began, 3)
        report, self.summary, self.details = build_report(nodes, timeout=self.timeout, idle=idle, source=source)
        if self._stop.is_set() or child.returncode is not None:  # it ended on its own meanwhile: no hang
            return
        self.fired = True
        report["timings"] = self.timings
        self._write(report)  # before the kill: the stacks are kept whatever happens next
        print(f"node-runtime: launch: hang: ending the job (every rank's stack: {HANG_REPORT_NAME})", file=self.err,
              flush=True)
        end(child)
        self.timings["kill_s"] = round(time.monotonic() - began - self.timings["collect_s"], 3)
        self._write(report)

    def _write(self, report: dict[str, Any]) -> None:
        try:
            self.report_path = write_report(self.working_dir, report)
        except OSError as exc:
            problem = f"{HANG_REPORT_NAME} could not be written: {exc}"
            if problem not in self.details:
                self.details.append(problem)


@contextlib.contextmanager
def watching(timeout: float | None, working_dir: Path, service: Service, child: subprocess.Popen[bytes],
             remote_hosts: Sequence[str]) -> Iterator[Watchdog | None]:
    """launch's hook, around its wait for ``child`` (mpirun, through the gate): with a ``timeout``, a
    :class:`Watchdog` over it meanwhile, which raises :class:`HangDetected` at the end of the block if it ended the
    job. ``service`` is this node's (its address, its sessions' TMPDIR, the task's ssh_config)."""
    if timeout is None:
        yield None
        return
    dog = Watchdog(timeout, working_dir=working_dir, local_host=service.address, local_tmp=service.tmp_dir,
                   ssh_config=service.client_config)
    dog.start(child, remote_hosts)
    try:
        yield dog
    finally:
        dog.finish()


def end(child: subprocess.Popen[bytes], grace: float = KILL_GRACE) -> None:
    """End mpirun: SIGTERM (it ends the ranks on every node), after ``grace`` seconds SIGKILL to it and to every
    process it started here."""
    with contextlib.suppress(ProcessLookupError):
        child.send_signal(signal.SIGTERM)
    try:
        child.wait(grace)
        return
    except subprocess.TimeoutExpired:
        pass
    import psutil

    with contextlib.suppress(psutil.Error):
        family = psutil.Process(child.pid).children(recursive=True)
        for process in family:
            with contextlib.suppress(psutil.Error):
                process.kill()
    with contextlib.suppress(ProcessLookupError):
        child.kill()
