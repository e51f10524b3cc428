"""``python -I -S ranktap.py PROGRAM ARGS...``: what mpirun starts on every rank, in front of the program.

Why it exists: Open MPI 4.1's ``--tag-output`` loses output. Its mpirun tags each chunk an orted read from a rank
(at most 4096 bytes) into a fixed 8192-byte buffer, one tag (``[1,12]<stdout>:``, 15-50 bytes) per line, and drops
what does not fit: a rank printing short lines fast (``for i in range(20000): print(i)``) loses a fifth of them,
and binary output is cut mid-chunk (docs/node-runtime.md, "Rank output", has the measurement). Hydra's
``-prepend-rank`` is lossless but ambiguous (``[3] `` is common in programs' own output). So the rank is told by
the rank's own side, losslessly:

* the program gets what it would have got from the MPI daemon: a pseudo-terminal for stdout when ours is one (Open
  MPI's is: programs stay line-buffered), a pipe for stderr, our stdin, our process group (every signal the daemon
  sends to the group reaches it directly), and it dies with us (``PR_SET_PDEATHSIG``);
* every chunk it writes goes out, on our stderr, as one *frame* (:func:`frame`): a header naming the rank and the
  stream, then the bytes untouched. A frame is written whole (at most ``PIPE_BUF`` bytes: one atomic write) and only
  once the daemon has read the previous one (the pipe is empty: ``FIONREAD``), so each read of the daemon is exactly
  one frame, which mpirun writes out contiguously; launch (:mod:`node_runtime.output`) cuts mpirun's (untagged)
  output back into frames, writes their bytes raw to its stdout/stderr and tagged lines to ``ranks.log``;
* catchable signals are ignored here (the program got them through the group; we keep moving its output until it
  ends), and we end as it ended: its exit code, or killed by the same signal;
* when it ended, one more frame (stream ``m``, JSON, never shown as output) says how (exit code or signal), with
  the evidence only this node has at that moment (:func:`evidence`): for SIGKILL the kernel's OOM-killer counters
  (``/proc/vmstat``, the memory cgroup's ``oom_kill``) against their values when it started, and the kernel's own
  "Killed process PID" line when the kernel log is readable; for SIGBUS the free space of ``/dev/shm``.

Standard library only, nothing of ``node_runtime`` imported and no ``site`` (``-I -S``): it starts once per rank.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import json
import os
import select
import signal
import stat
import struct
import sys
import termios
import time

MAGIC = b"\x1e\x1fMPL:"
"""Starts every frame (record separator, unit separator, ``MPL:``): bytes no MPI prints in its own messages."""
HEADER = struct.Struct(">7sIcH")  # MAGIC, rank, stream (b"o" stdout, b"e" stderr, b"m" meta), payload length
TRAILER = b"\x1f\x1e"
FRAME_MAX = 4096  # PIPE_BUF on Linux (written atomically), and the size of one read of Open MPI's daemon
PAYLOAD_MAX = FRAME_MAX - HEADER.size - len(TRAILER)
STREAMS = {b"o": "stdout", b"e": "stderr", b"m": "meta"}
RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK")
"""Where MPI says the rank: Open MPI, PMIx, Hydra (MPICH, Intel MPI)."""
IGNORED = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGPIPE", "SIGALRM", "SIGTSTP",
           "SIGTTIN", "SIGTTOU")
BACKLOG_MAX = 1 << 20  # bytes read from the program and not written yet: past this it waits for us (as for MPI's)
DRAIN_IDLE = 0.2  # after the program ended: what its children still write within this is moved too
DRAIN_MAX = 2.0
GIVE_UP = 10.0  # after the program ended: output the reader has not taken by then is dropped (it is gone)
PACE_MIN, PACE_MAX = 0.0002, 0.005  # seconds between looks at whether the reader took the last frame
IDLE_POLL = 0.05
READ_SIZE = 65536
PR_SET_PDEATHSIG = 1
SHM_MOUNT = "/dev/shm"  # noqa: S108 (the POSIX shared memory mount, not a temporary file)
KMSG = "/dev/kmsg"
KMSG_MAX_RECORDS = 100_000  # never read an endless kernel log for long
KERNEL_LINE_MAX = 300  # characters of a kernel line kept (a meta frame stays one frame)


def frame(rank: int, stream: bytes, payload: bytes) -> bytes:
    """One frame: header (magic, rank, stream, length), the payload as it came, trailer."""
    if len(payload) > PAYLOAD_MAX:
        raise ValueError(f"payload of {len(payload)} bytes > {PAYLOAD_MAX}")
    return HEADER.pack(MAGIC, rank, stream, len(payload)) + payload + TRAILER


def rank_of(environ: dict[str, str] | os._Environ[str]) -> int | None:
    for name in RANK_VARIABLES:
        value = environ.get(name, "")
        if value.isdigit():
            return int(value)
    return None


def _read(path: str) -> str:
    with open(path) as f:  # noqa: PTH123 (pathlib costs every rank's start; this module imports little)
        return f.read()


def oom_counters() -> dict[str, int]:
    """How many processes the kernel's OOM killer killed so far: on this node (``/proc/vmstat``), and in our memory
    cgroup (v2 ``memory.events``, v1 ``memory.oom_control``: a cgroup's limit kills without a node-wide shortage).
    Counters that cannot be read are left out."""
    counts: dict[str, int] = {}
    with contextlib.suppress(OSError, ValueError, IndexError):
        counts["node"] = _counter(_read("/proc/vmstat"))
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in _read("/proc/self/cgroup").splitlines():
            hierarchy, controllers, path = line.split(":", 2)
            if hierarchy == "0" and not controllers:
                name = f"/sys/fs/cgroup{path.rstrip('/')}/memory.events"
            elif "memory" in controllers.split(","):
                name = f"/sys/fs/cgroup/memory{path.rstrip('/')}/memory.oom_control"
            else:
                continue
            with contextlib.suppress(OSError, ValueError, IndexError):
                counts["cgroup"] = _counter(_read(name))
                break
    return counts


def _counter(text: str) -> int:
    return int(next(line for line in text.splitlines() if line.startswith("oom_kill ")).split()[1])


def kernel_lines(pid: int, limit: int = 3) -> list[str]:
    """The kernel log's lines about ``pid`` being killed (``Killed process PID``, ``oom-kill:...,pid=PID,...``), if
    the log can be read here (``kernel.dmesg_restrict`` allows that to root only, usually)."""
    found: list[str] = []
    try:
        fd = os.open(KMSG, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return found
    try:
        for _ in range(KMSG_MAX_RECORDS):
            try:
                record = os.read(fd, 8192).decode(errors="replace")
            except BlockingIOError:
                break
            except OSError as exc:  # EPIPE: records were overwritten while we read; the next read goes on
                if exc.errno != errno.EPIPE:
                    break
                continue
            text = record.split(";", 1)[-1].split("\n", 1)[0][:KERNEL_LINE_MAX]
            if f"process {pid} " in text or f",pid={pid}," in text:
                found.append(text)
    finally:
        os.close(fd)
    return found[-limit:]


def evidence(status: int, pid: int, before: dict[str, int]) -> dict[str, object]:
    """How the program ended (wait status ``status``) and what this node knows about why (see the module doc)."""
    doc: dict[str, object] = {"pid": pid}
    if not os.WIFSIGNALED(status):
        doc["exit"] = os.waitstatus_to_exitcode(status)
        return doc
    sig = os.WTERMSIG(status)
    doc["signal"] = sig
    if sig == signal.SIGKILL:
        after = oom_counters()
        doc["oom_kills"] = {k: after[k] - before[k] for k in after if k in before and after[k] > before[k]}
        doc["kernel"] = kernel_lines(pid)
    elif sig == signal.SIGBUS:
        with contextlib.suppress(OSError):
            st = os.statvfs(SHM_MOUNT)
            doc["shm_free"] = st.f_bavail * st.f_frsize
            doc["shm_size"] = st.f_blocks * st.f_frsize
    return doc


def _unread(fd: int) -> int:
    """Bytes written to the pipe ``fd`` and not read yet."""
    buf = array.array("i", [0])
    try:
        fcntl.ioctl(fd, termios.FIONREAD, buf, True)
    except OSError:
        return 0
    return buf[0]


def _is_pipe(fd: int) -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(fd).st_mode)
    except OSError:
        return False


class _Out:
    """Writes frames to ``fd``, one at a time, each once the reader took the previous one (when ``fd`` is a pipe,
    which can say so; otherwise at once)."""

    def __init__(self, fd: int, rank: int) -> None:
        self.fd, self.rank = fd, rank
        self.backlog: list[tuple[bytes, bytearray]] = []  # (stream, bytes) in arrival order
        self.size = 0
        self.broken = False  # the reader is gone: what comes is dropped
        self.paced = _is_pipe(fd)

    def add(self, stream: bytes, data: bytes) -> None:
        if self.broken:
            return
        if self.backlog and self.backlog[-1][0] == stream and stream != b"m":
            self.backlog[-1][1].extend(data)
        else:
            self.backlog.append((stream, bytearray(data)))
        self.size += len(data)

    def ready(self) -> bool:
        return not self.paced or _unread(self.fd) == 0

    def write_one(self) -> None:
        stream, data = self.backlog[0]
        payload = bytes(data[:PAYLOAD_MAX])
        del data[:PAYLOAD_MAX]
        if not data:
            self.backlog.pop(0)
        self.size -= len(payload)
        out = memoryview(frame(self.rank, stream, payload))
        try:
            while out:
                out = out[os.write(self.fd, out):]
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.EBADF, errno.EIO):
                raise
            self.broken = True
            self.backlog.clear()
            self.size = 0


def _terminal_like(fd: int, other: int) -> None:
    """Give the pseudo-terminal ``other`` the settings and the window size of the terminal ``fd``."""
    with contextlib.suppress(OSError, termios.error):
        termios.tcsetattr(other, termios.TCSANOW, termios.tcgetattr(fd))
        fcntl.ioctl(other, termios.TIOCSWINSZ, fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))


def _die_with_parent() -> None:
    """In the child: SIGKILL when we die (``prctl(PR_SET_PDEATHSIG)``)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _exec_program(argv: list[str], parent_pid: int, fds: dict[int, int], close: list[int]) -> None:
    """In the child: ``fds`` (target -> descriptor) in place, signals as the daemon gave them to us, then exec."""
    try:
        for target, fd in fds.items():
            os.dup2(fd, target)
        for fd in close:
            os.close(fd)
        for name in IGNORED:  # SIG_IGN would survive exec; the daemon started us with the defaults
            signal.signal(getattr(signal, name), signal.SIG_DFL)
        _die_with_parent()
        if os.getppid() != parent_pid:  # we died before prctl
            os._exit(128 + signal.SIGKILL)
        os.execvp(argv[0], argv)  # noqa: S606 (argv as given, no shell)
    except OSError as exc:
        os.write(2, f"{argv[0]}: {exc.strerror}\n".encode())
        os._exit(127 if exc.errno == errno.ENOENT else 126)
    finally:
        os._exit(127)


def run(argv: list[str]) -> int:
    """Run ``argv`` as the module docstring says; returns the exit status (after a signal: dies of it)."""
    rank = rank_of(os.environ)
    if rank is None:  # not under an MPI that says the rank: nothing to tag, be the program itself
        os.execvp(argv[0], argv)  # noqa: S606 (argv as given, no shell)
    for name in IGNORED:
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    sources: dict[int, bytes] = {}
    ends: dict[int, int] = {}
    for target, stream in ((1, b"o"), (2, b"e")):
        ours, theirs = os.openpty() if os.isatty(target) else os.pipe()
        if os.isatty(target):
            _terminal_like(target, theirs)
        sources[ours], ends[target] = stream, theirs
    before = oom_counters()
    parent_pid = os.getpid()
    pid = os.fork()
    if pid == 0:
        _exec_program(argv, parent_pid, ends, [*sources, *ends.values()])
    for fd in ends.values():
        os.close(fd)
    status = _Pump(pid, sources, _Out(2, rank), before).run()
    if os.WIFSIGNALED(status):
        _die_of(os.WTERMSIG(status))
    return os.waitstatus_to_exitcode(status)


def _die_of(sig: int) -> None:
    """End as the program did: killed by ``sig`` (without a core file of our own; returns if ``sig`` spares us)."""
    import resource

    with contextlib.suppress(OSError, ValueError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    if sig not in (signal.SIGKILL, signal.SIGSTOP):
        signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
    os.kill(os.getpid(), sig)
    time.sleep(1)  # a signal to ourselves arrives before kill() returns; a stopping one (SIGTSTP...) we ignore


class _Pump:
    """Moves the program's output to ``out`` until it ended and its descriptors are drained (then its end, as a meta
    frame). Its children may hold its descriptors open: after its end, what they write within
    :data:`DRAIN_IDLE` is still moved (:data:`DRAIN_MAX` at most); output the reader has not taken within
    :data:`GIVE_UP` after the end is dropped (the MPI daemon is gone)."""

    def __init__(self, pid: int, sources: dict[int, bytes], out: _Out, before: dict[str, int]) -> None:
        self.pid, self.sources, self.out, self.before = pid, sources, out, before
        self.poller = select.poll()
        for fd in sources:
            self.poller.register(fd, select.POLLIN)
        self.open = set(sources)
        self.status: int | None = None
        self.ended_at = self.last_data = 0.0
        self.drained = False

    def run(self) -> int:
        pace = PACE_MIN
        while True:
            if self.status is None:
                done, status = os.waitpid(self.pid, os.WNOHANG)
                if done:
                    self.status, self.ended_at = status, time.monotonic()
            if self._finished():
                assert self.status is not None
                return self.status
            if self.out.backlog and self.out.ready():
                self.out.write_one()
                pace = PACE_MIN
                continue
            if self.out.backlog:  # the reader has not taken the last frame yet
                timeout, pace = pace, min(pace * 2, PACE_MAX)
            else:
                timeout = IDLE_POLL
            self._read(timeout)

    def _finished(self) -> bool:
        if self.status is None:
            return False
        now = time.monotonic()
        if not self.drained and (not self.open or now - max(self.ended_at, self.last_data) >= DRAIN_IDLE
                                 or now - self.ended_at >= DRAIN_MAX):
            self.drained = True
            self.out.add(b"m", json.dumps(evidence(self.status, self.pid, self.before)).encode())
        return self.drained and (not self.out.backlog or now - self.ended_at >= GIVE_UP)

    def _read(self, timeout: float) -> None:
        reading = self.open if self.out.size < BACKLOG_MAX and not self.drained else set()
        if not reading:
            time.sleep(timeout)
            return
        for fd, _mask in self.poller.poll(timeout * 1000):
            if fd not in reading:
                continue
            try:
                data = os.read(fd, READ_SIZE)
            except OSError as exc:  # EIO: the pseudo-terminal's last writer closed it
                if exc.errno not in (errno.EIO, errno.EBADF):
                    raise
                data = b""
            if data:
                self.out.add(self.sources[fd], data)
                self.last_data = time.monotonic()
            else:
                self.poller.unregister(fd)
                self.open.discard(fd)
                os.close(fd)


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("usage: python3 -I -S ranktap.py PROGRAM ARGS...", file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(run(argv))


if __name__ == "__main__":
    main()
