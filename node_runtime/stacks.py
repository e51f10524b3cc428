"""The Python stacks of this node's ranks of this task: found, signalled, read and parsed (``node-runtime stacks``).

Ranks started through :mod:`node_runtime.rankmain` record themselves in the stacks directory of their TMPDIR, which
is the task's own node-local directory (launch sets it on the primary, the task's sshd for every session on the
other nodes, ``mpl-<uid>-<hash>``: unique per task, node and user). :func:`collect` reads those records only, so it
can never signal another task's process: a record names a pid *and* its start time, and a pid that now belongs to
another process (pids are reused), to another user, or to nobody is skipped and its record removed. Each live rank
is sent the signal its record names; faulthandler in the rank writes every thread's stack to the rank's dump file,
from its C signal handler, even while the rank is blocked in MPI's C code.

A process of this task that runs as a rank (an MPI rank variable in its environment, the task's TMPDIR) but did not
register (not a Python rank started through rankmain: ``bash run.sh``, a C program) is listed without a stack, with
its state and kernel wait channel. Reading another process's environment needs the same user (and the classic
``ptrace`` read check, which Yama's ``ptrace_scope=1`` does not restrict: it restricts attaching only).
"""

from __future__ import annotations

import contextlib
import json
import linecache
import os
import re
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from node_runtime.rankmain import RANK_VARIABLES, SIZE_VARIABLES, STACKS_DIR_NAME, stack_files, start_time

DUMP_TIMEOUT = 3.0  # seconds for every signalled rank to finish writing its dump
SETTLE = 0.05  # a dump that has not grown for this long is complete (faulthandler writes it in a few ms)
POLL = 0.01

_THREAD = re.compile(r"^(?P<current>Current thread|Thread) (?P<ident>0x[0-9a-fA-F]+)(?: \[(?P<name>[^\]]*)\])? "
                     r"\(most recent call first\):$")
_FRAME = re.compile(r'^\s+File "(?P<file>.*)", line (?P<line>-?\d+|\?\?\?) in (?P<function>.*)$')
_WRAPPERS = ("mpi4py/run.py", "node_runtime/rankmain.py")  # what runs the program: cut from its stacks
_RUNPY = ("<frozen runpy>", "/runpy.py")
WRAPPERS = ("node_runtime.ranktap",)
"""Modules that run between the MPI daemon and a rank's program (launch's output tap): never a rank themselves."""


@dataclass
class Frame:
    file: str  # as the rank sees it (absolute when the rank's cwd made it so)
    line: int
    function: str
    code: str = ""  # the source line, read on the rank's node

    @property
    def where(self) -> str:
        return f"{Path(self.file).name}:{self.line}"


@dataclass
class Thread:
    ident: int
    main: bool
    current: bool  # the thread that ran faulthandler's handler (any thread may receive the signal)
    name: str = ""
    frames: list[Frame] = field(default_factory=list)  # innermost first, the runner's own frames cut


@dataclass
class RankStack:
    """One rank process of this node: its stack, or why there is none."""

    pid: int
    rank: int | None
    size: int | None
    state: str = ""  # R running, S sleeping, D uninterruptible (as /proc/PID/stat says)
    wchan: str = ""  # where in the kernel it waits, if it does
    threads: list[Thread] = field(default_factory=list)
    error: str = ""
    argv: list[str] = field(default_factory=list)

    @property
    def main(self) -> Thread | None:
        return next((t for t in self.threads if t.main), self.threads[0] if self.threads else None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> RankStack:
        threads = [Thread(**{**t, "frames": [Frame(**f) for f in t.get("frames", [])]}) for t in doc.get("threads", [])]
        return cls(**{**doc, "threads": threads})


def parse_dump(text: str, main_ident: int | None = None) -> list[Thread]:
    """The threads of one faulthandler dump (``all_threads=True``), frames innermost first; the thread whose ident
    is ``main_ident`` is marked main. Lines that are not part of a thread block are ignored."""
    threads: list[Thread] = []
    for line in text.splitlines():
        if found := _THREAD.match(line):
            ident = int(found["ident"], 16)
            threads.append(Thread(ident, ident == main_ident, found["current"] == "Current thread",
                                  found["name"] or ""))
        elif (frame := _FRAME.match(line)) and threads:
            number = frame["line"]
            threads[-1].frames.append(Frame(frame["file"], int(number) if number != "???" else 0, frame["function"]))
    for thread in threads:
        thread.frames = program_frames(thread.frames)
    return threads


def program_frames(frames: list[Frame]) -> list[Frame]:
    """``frames`` (innermost first) without the frames that only run the program: rankmain, mpi4py.run and runpy
    below the program's own outermost frame."""
    for i, frame in enumerate(frames):
        if frame.file.endswith(_WRAPPERS):
            kept = frames[:i]
            while kept and kept[-1].file.endswith(_RUNPY):
                kept.pop()
            return kept
    return frames


def _resolve(frame: Frame, cwd: str | None) -> Frame:
    path = frame.file
    if not path.startswith(("/", "<")) and cwd:
        path = os.path.join(cwd, path)  # noqa: PTH118 (a string the rank printed)
    code = linecache.getline(path, frame.line).strip() if frame.line > 0 and not path.startswith("<") else ""
    return Frame(frame.file, frame.line, frame.function, code)


def _proc_state(pid: int) -> tuple[str, str]:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        state = ""
    try:
        wchan = Path(f"/proc/{pid}/wchan").read_text().strip()
    except OSError:
        wchan = ""
    return state, "" if wchan == "0" else wchan


def _owned(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}").stat().st_uid == os.getuid()
    except OSError:
        return False


@dataclass
class _Target:
    record: dict[str, Any]
    dump: Path
    offset: int
    stack: RankStack


def _records(directory: Path) -> list[tuple[Path, dict[str, Any]]]:
    found = []
    with contextlib.suppress(OSError):
        for path in sorted(directory.glob("rank-*.json")):
            try:
                found.append((path, json.loads(path.read_text())))
            except (OSError, ValueError):
                continue
    return found


def _live(path: Path, record: Mapping[str, Any]) -> bool:
    """Whether the record's process still runs (same pid, same start time, ours); a dead one's files are removed."""
    pid = record.get("pid")
    if isinstance(pid, int) and start_time(pid) == record.get("start_time") and _owned(pid):
        return True
    path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        (path.parent / str(record.get("dump", ""))).unlink(missing_ok=True)
    return False


def collect(directory: Path, timeout: float = DUMP_TIMEOUT) -> list[RankStack]:
    """The stacks of the ranks recorded in ``directory`` (a stacks directory, see
    :func:`node_runtime.rankmain.stacks_dir`), then the unregistered rank processes of the same TMPDIR; sorted by
    rank."""
    targets: list[_Target] = []
    for path, record in _records(directory):
        if not _live(path, record):
            continue
        pid = int(record["pid"])
        _, dump = stack_files(directory, pid)
        try:
            offset = dump.stat().st_size
        except OSError:
            offset = 0
        stack = RankStack(pid, record.get("rank"), record.get("size"), argv=list(record.get("argv") or []))
        try:
            os.kill(pid, int(record["signal"]))
        except (OSError, KeyError, ValueError) as exc:
            stack.error = f"could not be signalled: {exc}"
        targets.append(_Target(record, dump, offset, stack))
    _wait_for_dumps([t for t in targets if not t.stack.error], timeout)
    stacks = [t.stack for t in targets]
    for target in targets:
        _read(target)
    registered = {t.stack.pid for t in targets}
    stacks += unregistered(directory.parent, registered)
    return sorted(stacks, key=lambda s: (s.rank is None, s.rank if s.rank is not None else 0, s.pid))


def _wait_for_dumps(targets: list[_Target], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    sizes = {id(t): t.offset for t in targets}
    changed = {id(t): 0.0 for t in targets}
    waiting = list(targets)
    while waiting and time.monotonic() < deadline:
        time.sleep(POLL)
        now = time.monotonic()
        for target in list(waiting):
            try:
                size = target.dump.stat().st_size
            except OSError:
                size = target.offset
            if size != sizes[id(target)]:
                sizes[id(target)], changed[id(target)] = size, now
            elif size > target.offset and now - changed[id(target)] >= SETTLE:
                waiting.remove(target)


def _read(target: _Target) -> None:
    stack = target.stack
    stack.state, stack.wchan = _proc_state(stack.pid)
    if stack.error:
        return
    try:
        with target.dump.open("rb") as f:
            f.seek(target.offset)
            text = f.read().decode(errors="replace")
    except OSError as exc:
        stack.error = f"its dump could not be read: {exc}"
        return
    if not text.strip():
        stack.error = (f"no stack within {DUMP_TIMEOUT:g}s (process state {stack.state or '?'}"
                       + (f", waiting in {stack.wchan}" if stack.wchan else "") + ")")
        return
    try:
        cwd = str(Path(f"/proc/{stack.pid}/cwd").readlink())
    except OSError:
        cwd = None
    threads = parse_dump(text, target.record.get("main_thread"))
    for thread in threads:
        thread.frames = [_resolve(f, cwd) for f in thread.frames]
    stack.threads = threads


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def _first(environ: Mapping[str, str], names: Iterable[str]) -> int | None:
    for name in names:
        with contextlib.suppress(KeyError, ValueError):
            return int(environ[name])
    return None


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _argv(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def unregistered(tmp_dir: Path, registered: set[int]) -> list[RankStack]:
    """The rank processes of this user whose TMPDIR is ``tmp_dir`` (the task's node-local dir) that did not register
    a stack dump (not started through rankmain), without stack: their state and wait channel only. Only the
    outermost program of each rank is listed: not what it started (which inherits its variables), not the
    processes between the MPI daemon and a registered rank (launch's output tap, :data:`WRAPPERS`), nor the
    wrappers themselves."""
    mine = str(tmp_dir)
    found: dict[int, dict[str, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or (pid := int(entry.name)) in registered or pid == os.getpid():
            continue
        if not _owned(pid):
            continue
        environ = _environ(pid)
        if environ.get("TMPDIR") == mine and _first(environ, RANK_VARIABLES) is not None:
            found[pid] = environ
    parents = {pid: _parent(pid) for pid in [*found, *registered]}
    wrappers = {pid for pid in found if any(w in _argv(pid) for w in WRAPPERS)}
    above_registered: set[int] = set()  # what runs a registered rank (e.g. a shell that started it)
    for pid in registered:
        parent = parents.get(pid, 0)
        while parent in found and parent not in above_registered:
            above_registered.add(parent)
            parent = parents.get(parent, 0)
    stacks = []
    for pid, environ in found.items():
        parent = parents[pid]
        while parent in wrappers:  # a wrapper's child is a rank's outermost program
            parent = parents.get(parent, 0)
        if pid in wrappers or pid in above_registered or parent in found or parent in registered:
            continue
        state, wchan = _proc_state(pid)
        stacks.append(RankStack(pid, _first(environ, RANK_VARIABLES), _first(environ, SIZE_VARIABLES), state, wchan,
                                error="no Python stack: not started through node_runtime.rankmain", argv=_argv(pid)))
    return stacks


def node_stacks(tmp: str | None = None, timeout: float = DUMP_TIMEOUT) -> dict[str, Any]:
    """What ``node-runtime stacks`` prints: this node's host name and its ranks' stacks (see :func:`collect`), for
    the ranks of the TMPDIR ``tmp`` (default: ours, which the task's sshd sets for every session)."""
    import tempfile

    base = Path(tmp or tempfile.gettempdir())
    return {"hostname": socket.gethostname(), "ranks": [s.to_dict() for s in collect(base / STACKS_DIR_NAME,
                                                                                     timeout)]}

