"""First-failure attribution: which rank failed first, on which node, how, in one line (``first_failure`` of
launch-report.json).

:class:`Analyzer` watches what the output pump (:mod:`node_runtime.output`) sees, in arrival order: every rank's
lines (tagged by the rank's tap, :mod:`node_runtime.ranktap`), MPI's own lines, and each rank's end as its tap
reported it (exit code or signal, with the node's evidence: OOM-killer counters, the kernel's line, /dev/shm). It
keeps only what it needs, bounded: the last :data:`TAIL_LINES` stderr lines of each rank, the traceback state of
each rank, and the first :data:`MAX_EVENTS` failure events.

Events are *causes* (a Python traceback, ``MPI_ABORT``, a non-zero exit, a signal a program dies of by itself
(SEGV, BUS, ABRT, FPE, ILL), SIGKILL with OOM evidence, ssh failing to reach a node, /dev/shm too small, MPI failing
to start) or *consequences* (SIGTERM, SIGINT, SIGHUP, SIGKILL without evidence: what MPI does to the other ranks
once one failed). The first failure is the earliest cause (else the earliest consequence), completed with what is
known of the same rank (its exception line, exit code, signal, evidence, its own stderr tail).
"""

from __future__ import annotations

import re
import signal
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

TAIL_LINES = 20  # stderr lines of the failing rank in the report
TAIL_KEPT = 40  # kept per rank (launcher frames of its traceback are left out of the report)
SHM = "/dev/shm"  # noqa: S108 (named in messages, never written)
TAIL_LINE_MAX = 500  # characters kept of one tail line
MAX_EVENTS = 64
MPI_LINES = 400  # MPI's own lines kept (for the multi-line messages)
TRACEBACK = "Traceback (most recent call last):"
CHAINED = ("During handling of the above exception", "The above exception was the direct cause")
CONSEQUENCE_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGKILL, signal.SIGPIPE})
HOWS = ("exception", "module_missing", "mpi_abort", "exit_code", "signal", "oom", "shm", "ssh", "mpi_init", "hang",
        "launch", "unknown")
"""The ``how`` of a first failure (documented in docs/node-runtime.md, and results.schema.json on the client)."""

_ABORT_OMPI = re.compile(r"MPI_ABORT was invoked on rank (\d+) in communicator (\S+)")
_ABORT_CODE = re.compile(r"with errorcode (-?\d+)")
_ABORT_HYDRA = re.compile(r"Abort\((-?\d+)\) on node (\d+) \(rank (\d+) in comm")
_PROCESS_NAME = re.compile(r"Process name:\s*\[\[\d+,\d+\],(\d+)\]")
_EXIT_CODE = re.compile(r"^\s*Exit code:\s*(-?\d+)")
_NOTICED = re.compile(r"process rank (\d+) with PID \d+ on node (\S+) exited on signal (\d+)")
_HYDRA_BAD = re.compile(r"RANK (\d+) PID \d+ RUNNING AT (\S+)")
_HYDRA_EXIT = re.compile(r"(?:KILLED BY SIGNAL: (\d+)|EXIT CODE: (\d+))")
_SSH = re.compile(r"(?:ssh: connect to host (\S+) port \d+: (.+)|Connection to (\S+) port \d+ (timed out)|"
                  r"(Host key verification failed\.)|(Permission denied \(.+\)\.?)|"
                  r"ssh: Could not resolve hostname (\S+): (.+))")
_DAEMONS = ("ORTE was unable to reliably start one or more daemons", "ORTE does not know how to route",
            "HYDU_sock_connect", "unable to connect to")
_SHM = re.compile(r"not enough space for (/dev/shm\S*)")
_LOCAL_HOST = re.compile(r"^\s*Local host:\s*(\S+)")
_INIT = ("MPI_INIT has failed", "An error occurred in MPI_Init", "It looks like MPI_INIT failed")
_REPORTED_BY = re.compile(r"reported by process \[(\d+),(\d+)\]")
_MODULE = re.compile(r"^(ModuleNotFoundError|ImportError): (.*)")
_LAUNCHER_FRAME = re.compile(
    r'^  File "(<frozen runpy>|[^"]*/mpi4py/(run|__main__)\.py|[^"]*/node_runtime/rankmain\.py)"')
"""Frames of how a Python rank was started (runpy, mpi4py.run, rankmain), below the program's own."""
_OMPI_FRAME = re.compile(r"^\[[^\]\s]+:\d+\] \[\s*\d+\] ")  # "[host:pid] [ 3] /lib/libc.so.6(+0x3c050)[0x7f...]"


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


@dataclass
class Event:
    """One failure seen: ``kind`` one of :data:`HOWS`; ``cause`` False for what MPI does to the other ranks."""

    kind: str
    at: float
    rank: int | None = None
    node: str | None = None
    cause: bool = True
    exit_code: int | None = None
    signal: int | None = None
    exception: str | None = None
    evidence: list[str] = field(default_factory=list)
    detail: str | None = None


@dataclass
class _Traceback:
    at: float
    last: str | None = None  # the last line that was not a frame: the exception, once the traceback ended


class Analyzer:
    """See the module docstring; ``hosts`` primary first and ``ppn`` ranks per node place rank r on
    ``hosts[r // ppn]`` (mpirun's ``--map-by ppr:N:node`` and Hydra's ``-ppn N`` do so)."""

    def __init__(self, hosts: Sequence[str], ppn: int, *, tail: int = TAIL_KEPT) -> None:
        self.hosts, self.ppn = list(hosts), max(ppn, 1)
        self.tails: dict[int, deque[str]] = {}
        self.tail = tail
        self.events: list[Event] = []
        self.ends: dict[int, dict[str, Any]] = {}
        self._tracebacks: dict[int, _Traceback] = {}
        self._mpi: deque[str] = deque(maxlen=MPI_LINES)
        self._pending_abort: Event | None = None
        self._pending_process: int | None = None
        self._pending_shm: Event | None = None
        self._ssh: list[Event] = []

    # ------------------------------------------------------------------------------------------ what comes in
    def node_of(self, rank: int | None) -> str | None:
        if rank is None or rank < 0 or rank // self.ppn >= len(self.hosts):
            return None
        return self.hosts[rank // self.ppn]

    def line(self, rank: int | None, stream: str, text: bytes, at: float) -> None:
        line = text.decode(errors="replace").rstrip("\r")
        if rank is None:
            self._mpi_line(line, at)
            return
        if stream != "stderr":
            return
        if not _OMPI_FRAME.match(line):  # Open MPI's in-process backtrace: boilerplate, 30 lines of addresses
            self.tails.setdefault(rank, deque(maxlen=self.tail)).append(line[:TAIL_LINE_MAX])
        self._traceback_line(rank, line, at)
        self._mpi_line(line, at, rank=rank)  # MPICH's ranks print their own Abort(...) lines

    def ended(self, rank: int, info: dict[str, Any], at: float) -> None:
        """A rank's tap said how the program ended (``exit``, or ``signal`` with ``oom_kills``, ``kernel``,
        ``shm_free``/``shm_size``)."""
        self.ends.setdefault(rank, info)
        node = self.node_of(rank)
        if isinstance(info.get("exit"), int):
            if info["exit"] != 0:
                self._add(Event("exit_code", at, rank, node, exit_code=info["exit"]))
            return
        sig = info.get("signal")
        if not isinstance(sig, int):
            return
        oom = {k: v for k, v in (info.get("oom_kills") or {}).items() if isinstance(v, int) and v > 0}
        kernel = [str(k) for k in info.get("kernel") or ()]
        if sig == signal.SIGKILL and (oom or kernel):
            evidence = [f"the kernel's OOM killer killed {n} process(es) {_where(k)} while the rank ran"
                        for k, n in sorted(oom.items())] + [f"kernel: {k}" for k in kernel]
            self._add(Event("oom", at, rank, node, signal=sig, evidence=evidence))
        elif sig == signal.SIGBUS and isinstance(info.get("shm_free"), int):
            free, size = info["shm_free"], info.get("shm_size")
            evidence = [f"{SHM} on that node: {_mib(free)} free of {_mib(size) if isinstance(size, int) else None}"]
            self._add(Event("signal", at, rank, node, signal=sig, evidence=evidence))
        else:
            self._add(Event("signal", at, rank, node, cause=sig not in CONSEQUENCE_SIGNALS, signal=sig))

    def _traceback_line(self, rank: int, line: str, at: float) -> None:
        if line.startswith(TRACEBACK):
            state = self._tracebacks.get(rank)
            if state is None:
                self._tracebacks[rank] = _Traceback(at)
            else:
                state.last = None  # a chained one: its own exception comes last
            return
        state = self._tracebacks.get(rank)
        if state is None or not line or line[0].isspace() or line.startswith(CHAINED):
            return
        if state.last is None:
            state.last = line  # the first unindented line after the frames: "ValueError: ..."

    def _mpi_line(self, line: str, at: float, *, rank: int | None = None) -> None:
        if rank is None:
            self._mpi.append(line)
        if (m := _ABORT_OMPI.search(line)) is not None:
            self._pending_abort = self._add(Event("mpi_abort", at, int(m.group(1)), self.node_of(int(m.group(1))),
                                                  detail=f"MPI_Abort on {m.group(2)}"))
        elif (m := _ABORT_CODE.search(line)) is not None and self._pending_abort is not None:
            self._pending_abort.exit_code = int(m.group(1))
            self._pending_abort = None
        elif (m := _ABORT_HYDRA.search(line)) is not None:
            who = int(m.group(3))
            self._add(Event("mpi_abort", at, who, self.node_of(who), exit_code=int(m.group(1)),
                            detail="MPI_Abort"))
        if rank is not None:
            return
        self._mpi_only_line(line, at)

    def _mpi_only_line(self, line: str, at: float) -> None:
        for rule in (self._exit_rule, self._hydra_rule, self._ssh_rule, self._shm_rule, self._init_rule):
            if rule(line, at):
                return

    def _exit_rule(self, line: str, at: float) -> bool:
        """Open MPI: ``Process name: [[x,y],N]`` then ``Exit code: C``; ``process rank N ... exited on signal S``."""
        if (m := _PROCESS_NAME.search(line)) is not None:
            self._pending_process = int(m.group(1))
        elif (m := _EXIT_CODE.search(line)) is not None and self._pending_process is not None:
            who, self._pending_process = self._pending_process, None
            self._add(Event("exit_code", at, who, self.node_of(who), exit_code=int(m.group(1))))
        elif (m := _NOTICED.search(line)) is not None:
            self._signal(int(m.group(1)), int(m.group(3)), at)
        else:
            return False
        return True

    def _hydra_rule(self, line: str, at: float) -> bool:
        """Hydra: ``RANK N PID P RUNNING AT host`` then ``KILLED BY SIGNAL: S`` or ``EXIT CODE: C``."""
        if (m := _HYDRA_BAD.search(line)) is not None:
            self._pending_process = int(m.group(1))
        elif (m := _HYDRA_EXIT.search(line)) is not None and self._pending_process is not None:
            who, self._pending_process = self._pending_process, None
            if m.group(1):
                self._signal(who, int(m.group(1)), at)
            elif int(m.group(2)):
                self._add(Event("exit_code", at, who, self.node_of(who), exit_code=int(m.group(2))))
        else:
            return False
        return True

    def _signal(self, rank: int, sig: int, at: float) -> None:
        self._add(Event("signal", at, rank, self.node_of(rank), cause=sig not in CONSEQUENCE_SIGNALS, signal=sig))

    def _ssh_rule(self, line: str, at: float) -> bool:
        """ssh's own complaint (kept), then mpirun saying its daemons did not start (the failure)."""
        if (m := _SSH.search(line)) is not None:
            host = m.group(1) or m.group(3) or m.group(7)
            why = m.group(2) or m.group(4) or m.group(5) or m.group(6) or m.group(8)
            self._ssh.append(Event("ssh", at, None, host, detail=f"ssh: {why.strip()}"))
        elif any(marker in line for marker in _DAEMONS):
            self._add(self._ssh[0] if self._ssh else Event("ssh", at, detail=line.strip()))
        else:
            return False
        return True

    def _shm_rule(self, line: str, at: float) -> bool:
        """Open MPI's shared memory: ``not enough space for /dev/shm/...``, ``Local host:``, ``Space Available:``."""
        if (m := _SHM.search(line)) is not None:
            self._pending_shm = self._add(Event("shm", at, detail=f"not enough space for {m.group(1)}"))
        elif (m := _LOCAL_HOST.search(line)) is not None and self._pending_shm is not None:
            self._pending_shm.node = m.group(1)
        elif line.startswith("  Space Available:") and self._pending_shm is not None:
            self._pending_shm.evidence.append(f"{SHM} space {line.split(':', 1)[1].strip()} available")
            self._pending_shm = None
        else:
            return False
        return True

    def _init_rule(self, line: str, at: float) -> bool:
        """``MPI_INIT has failed`` and the like, then ``reported by process [job,N]``."""
        if any(marker in line for marker in _INIT):
            self._add(Event("mpi_init", at, detail=line.strip(" *")))
        elif (m := _REPORTED_BY.search(line)) is not None:
            for event in self.events:
                if event.kind == "mpi_init" and event.rank is None:
                    event.rank = int(m.group(2))
                    event.node = self.node_of(event.rank)
        else:
            return False
        return True

    def _add(self, event: Event) -> Event:
        if len(self.events) < MAX_EVENTS:
            self.events.append(event)
        return event

    # ------------------------------------------------------------------------------------------ the verdict
    def first(self) -> Event | None:
        """The earliest cause (a rank's traceback counts from its first line), else the earliest consequence."""
        candidates = list(self.events)
        for rank, state in self._tracebacks.items():
            if self.ends.get(rank, {}).get("exit") == 0:
                continue  # it printed a traceback and went on (logging.exception): not why the job failed
            module = _MODULE.match(state.last or "")
            kind = "module_missing" if module and module.group(1) == "ModuleNotFoundError" else "exception"
            candidates.append(Event(kind, state.at, rank, self.node_of(rank), exception=state.last))
        causes = [e for e in candidates if e.cause]
        pool = causes or candidates
        return min(pool, key=lambda e: e.at) if pool else None

    def first_failure(self, exit_code: int | None = None) -> dict[str, Any] | None:
        """``first_failure`` of launch-report.json (None when nothing failed and mpirun's ``exit_code`` is 0)."""
        event = self.first()
        if event is None:
            if not exit_code:
                return None
            event = Event("exit_code", 0.0, exit_code=exit_code) if exit_code < 128 else \
                Event("signal", 0.0, signal=exit_code - 128, detail=f"mpirun ended with {exit_code}")
        self._complete(event)
        doc = {
            "rank": event.rank, "node": event.node, "how": event.kind, "exit_code": event.exit_code,
            "signal": event.signal, "signal_name": None if event.signal is None else signal_name(event.signal),
            "exception": event.exception, "evidence": event.evidence, "detail": event.detail,
            "summary": summary(event),
            "stderr_tail": own_lines(self.tails.get(event.rank, ()))[-TAIL_LINES:] if event.rank is not None else [],
        }
        return doc

    def _complete(self, event: Event) -> None:
        """What else is known of the same rank: its exception, exit code, signal, evidence."""
        if event.rank is None:
            return
        state = self._tracebacks.get(event.rank)
        if event.exception is None and state is not None:
            event.exception = state.last
            if event.kind in ("exit_code", "mpi_abort", "unknown"):
                module = _MODULE.match(state.last or "")
                event.kind = "module_missing" if module and module.group(1) == "ModuleNotFoundError" \
                    else "exception"
        end = self.ends.get(event.rank, {})
        if event.exit_code is None and isinstance(end.get("exit"), int):
            event.exit_code = end["exit"]
        if event.signal is None and isinstance(end.get("signal"), int) and event.exit_code is None:
            event.signal = end["signal"]
        for other in self.events:
            if other is not event and other.rank == event.rank:
                event.evidence.extend(e for e in other.evidence if e not in event.evidence)
                if event.detail is None:
                    event.detail = other.detail


def own_lines(lines: Sequence[str]) -> list[str]:
    """``lines`` without the traceback frames of how the rank was started (:data:`_LAUNCHER_FRAME` and the source
    line under each): a traceback then starts at the program's own code."""
    out: list[str] = []
    skip_source = False
    for line in lines:
        if _LAUNCHER_FRAME.match(line):
            skip_source = True
            continue
        if skip_source and line.startswith("    "):
            continue
        skip_source = False
        out.append(line)
    return out


def _where(key: str) -> str:
    return "on that node" if key == "node" else "in the task's memory cgroup on that node"


def _mib(n: int | None) -> str:
    return "?" if n is None else f"{n / (1 << 20):.1f} MiB"


def summary(event: Event) -> str:
    """One line: ``rank 1 on 10.0.0.5: ZeroDivisionError: division by zero``."""
    who = "" if event.rank is None else f"rank {event.rank}"
    if event.node:
        who = f"{who} on {event.node}" if who else f"node {event.node}"
    what = _what(event)
    return f"{who}: {what}" if who else what


def _what(event: Event) -> str:  # noqa: PLR0911 (one phrase per kind)
    sig = None if event.signal is None else f"{signal_name(event.signal)} ({event.signal})"
    if event.kind in ("exception", "module_missing"):
        text = event.exception or "a Python exception"
        return f"{text}" + (" (a module missing on that node)" if event.kind == "module_missing" else "")
    if event.kind == "mpi_abort":
        code = "" if event.exit_code is None else f" with error code {event.exit_code}"
        return f"called MPI_Abort{code}"
    if event.kind == "oom":
        limit = "its memory cgroup's limit" if any("cgroup" in e for e in event.evidence) else "the node's memory"
        return f"killed by the kernel's OOM killer ({sig}): out of {limit}"
    if event.kind == "signal":
        extra = f"; {event.evidence[0]}" if event.evidence else ""
        return f"killed by {sig}{extra}"
    if event.kind == "exit_code":
        return f"exited with code {event.exit_code}"
    if event.kind == "ssh":
        return f"mpirun could not start its daemon there ({event.detail})" if event.node else \
            f"mpirun could not start its daemons ({event.detail})"
    if event.kind == "shm":
        return f"{event.detail} (shared memory between the ranks of a node)" + (
            f"; {event.evidence[0]}" if event.evidence else "")
    if event.kind == "mpi_init":
        return f"MPI failed to start: {event.detail}"
    return event.detail or event.kind
