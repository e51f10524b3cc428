"""launch's output pump: mpirun's stdout and stderr, cut back into the ranks' own streams.

Every rank runs behind :mod:`node_runtime.ranktap`, which sends each chunk the program writes as one *frame* (rank,
stream, the bytes untouched) on its stderr, so mpirun's output is its own text with whole frames in between
(:class:`Deframer`). The pump (one thread reading both of mpirun's pipes, in arrival order):

* writes every byte of a rank UNTAGGED to launch's own stdout or stderr (the rank's stream, not the pipe it came
  on), as it arrives, unbuffered: Batch's stdout.txt/stderr.txt keep the program's output exactly, partial lines and
  binary data included, visible within milliseconds; MPI's own text goes where mpirun wrote it;
* writes every line TAGGED to ``ranks.log`` in the working directory (:data:`node_runtime.contract.RANKS_LOG_NAME`,
  format and parser there), both streams of every rank interleaved in arrival order, MPI's own lines untagged.
  The file is written by its own thread through a bounded queue (:data:`QUEUE_BYTES`): a slow disk under ranks.log
  never holds up mpirun; what does not fit is dropped and said so in the file (:data:`DROPPED`). A line a rank
  left unended for :data:`node_runtime.contract.PARTIAL_LINE_SECONDS` (a prompt, a progress bar) is written as it is;
* gives every line and every rank's end (the tap's meta frame) to an observer (:class:`node_runtime.failure.Analyzer`
  in launch) that keeps what it needs, bounded.

What blocks: only the raw writes, when launch's own stdout/stderr do not take bytes (as mpirun writing to them
directly would block: the same backpressure as before, never a deadlock: the two pipes are read by one thread with a
selector, never one to its end before the other). The pump ends when both pipes reached end-of-file, or, once mpirun
has ended (:meth:`Pump.finish`), when they stayed quiet for :data:`QUIET` seconds (mpirun's ssh children may hold
the pipes open after mpirun was killed), :data:`FINISH_MAX` at most.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import queue
import selectors
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from node_runtime.contract import PARTIAL_LINE_SECONDS, RANKS_LOG_NAME, format_rank_line
from node_runtime.ranktap import HEADER, MAGIC, STREAMS, TRAILER

READ_SIZE = 65536
LINE_MAX = 64 * 1024  # a longer line goes to ranks.log in pieces of this size
QUEUE_BYTES = 8 << 20  # ranks.log bytes waiting for the disk; beyond this, lines are dropped (and counted)
DROPPED = "[ranks.log: {n} line(s) of rank output were dropped here: the disk did not keep up]"
TICK = 0.1  # seconds between looks at partial lines while nothing arrives
QUIET = 0.5  # after mpirun ended: the pipes quiet this long end the pump
FINISH_MAX = 5.0


@dataclass(frozen=True)
class Chunk:
    """Bytes of mpirun's output: of ``rank``'s ``stream`` (``stdout``/``stderr``/``meta``), or MPI's own (rank
    None, ``stream`` = the pipe they came on)."""

    rank: int | None
    stream: str
    data: bytes


class Deframer:
    """Cuts one of mpirun's pipes into :class:`Chunk`\\ s: frames of :mod:`node_runtime.ranktap`, and MPI's own bytes
    in between. A frame that does not check out (its trailer is not where its length says) was not one: its bytes are
    MPI's own. Bytes that may begin a frame are held until it is complete (:meth:`flush` gives them up at the end)."""

    def __init__(self, stream: str) -> None:
        self.stream = stream
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Chunk]:
        self._buf.extend(data)
        out: list[Chunk] = []
        while self._buf:
            start = self._buf.find(MAGIC)
            if start < 0:
                keep = _partial_magic(self._buf)
                self._text(out, len(self._buf) - keep)
                break
            self._text(out, start)
            if len(self._buf) < HEADER.size:
                break
            _magic, rank, stream, length = HEADER.unpack_from(self._buf)
            end = HEADER.size + length
            if len(self._buf) < end + len(TRAILER):
                if stream in STREAMS:
                    break  # the rest is on its way
                self._text(out, 1)  # not a frame: the magic bytes were MPI's own
                continue
            if stream not in STREAMS or self._buf[end:end + len(TRAILER)] != TRAILER:
                self._text(out, 1)
                continue
            out.append(Chunk(rank, STREAMS[stream], bytes(self._buf[HEADER.size:end])))
            del self._buf[:end + len(TRAILER)]
        return out

    def flush(self) -> list[Chunk]:
        """Whatever is held, as MPI's own bytes (mpirun ended in the middle of a frame)."""
        out: list[Chunk] = []
        self._text(out, len(self._buf))
        return out

    def _text(self, out: list[Chunk], n: int) -> None:
        if n > 0:
            out.append(Chunk(None, self.stream, bytes(self._buf[:n])))
            del self._buf[:n]


def _partial_magic(buf: bytearray) -> int:
    """How many bytes at the end of ``buf`` may be the start of :data:`MAGIC`."""
    for n in range(min(len(MAGIC) - 1, len(buf)), 0, -1):
        if buf.endswith(MAGIC[:n]):
            return n
    return 0


class Observer(Protocol):
    def line(self, rank: int | None, stream: str, text: bytes, at: float) -> None: ...

    def ended(self, rank: int, info: dict[str, Any], at: float) -> None: ...


@dataclass
class _Partial:
    data: bytearray = field(default_factory=bytearray)
    since: float = 0.0


class Lines:
    """Cuts each (rank, stream)'s bytes into lines (``\\n`` ends one; the ``\\n`` is not kept), hands complete ones to
    ``emit``; a line unended for ``partial_after`` seconds (or longer than :data:`LINE_MAX`) is handed on as it is."""

    def __init__(self, emit: Callable[[int | None, str, bytes, float], None], *,
                 partial_after: float = PARTIAL_LINE_SECONDS) -> None:
        self.emit = emit
        self.partial_after = partial_after
        self._partial: dict[tuple[int | None, str], _Partial] = {}

    def feed(self, rank: int | None, stream: str, data: bytes, at: float) -> None:
        key = (rank, stream)
        pending = self._partial.pop(key, None)
        line, since = (pending.data, pending.since) if pending is not None else (bytearray(), at)
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            line.extend(data[start:end])
            for piece in range(0, max(len(line), 1), LINE_MAX):
                self.emit(rank, stream, bytes(line[piece:piece + LINE_MAX]), at)
            line, since, start = bytearray(), at, end + 1
        line.extend(data[start:])
        while len(line) > LINE_MAX:
            self.emit(rank, stream, bytes(line[:LINE_MAX]), at)
            del line[:LINE_MAX]
        if line:
            self._partial[key] = _Partial(line, since)

    def tick(self, now: float) -> None:
        """Hand on the lines unended for ``partial_after`` seconds."""
        for key, pending in list(self._partial.items()):
            if now - pending.since >= self.partial_after:
                del self._partial[key]
                self.emit(key[0], key[1], bytes(pending.data), now)

    def flush(self, now: float) -> None:
        for key, pending in list(self._partial.items()):
            del self._partial[key]
            self.emit(key[0], key[1], bytes(pending.data), now)


class RanksLog:
    """``ranks.log``, appended to by its own thread from a bounded queue (see the module docstring)."""

    def __init__(self, path: Path, limit: int = QUEUE_BYTES) -> None:
        self.path = path
        self.limit = limit
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._queued = 0
        self._dropped = 0
        self._lock = threading.Lock()
        self._file = path.open("wb", buffering=0)  # one launch, one ranks.log
        self._thread = threading.Thread(target=self._write, name="ranks-log", daemon=True)
        self._thread.start()

    def add(self, line: bytes) -> None:
        with self._lock:
            if self._queued + len(line) > self.limit:
                self._dropped += 1
                return
            if self._dropped:
                note = DROPPED.format(n=self._dropped).encode() + b"\n"
                self._dropped = 0
                self._queued += len(note)
                self._queue.put(note)
            self._queued += len(line)
        self._queue.put(line)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (and say what was dropped), then close (within ``timeout``: a disk that hangs does
        not hold launch)."""
        with self._lock:
            if self._dropped:
                self._queue.put(DROPPED.format(n=self._dropped).encode() + b"\n")
                self._dropped = 0
        self._queue.put(None)
        self._thread.join(timeout)

    def _write(self) -> None:
        try:
            while True:
                item = self._queue.get()
                batch = [] if item is None else [item]
                while item is not None:  # everything that is there: one write
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is not None:
                        batch.append(item)
                if batch:
                    data = b"".join(batch)
                    with contextlib.suppress(OSError):
                        self._file.write(data)
                    with self._lock:
                        self._queued -= sum(len(b) for b in batch)
                if item is None:
                    return
        finally:
            self._file.close()


class Pump:
    """Moves mpirun's ``stdout``/``stderr`` pipes (file descriptors) as the module docstring says, on a thread of
    its own; ``out``/``err``: where raw bytes go (launch's own stdout and stderr)."""

    def __init__(self, stdout: int, stderr: int, directory: Path, *, observer: Observer | None = None,
                 out: int = 1, err: int = 2, clock: Callable[[], float] = time.monotonic,
                 log: RanksLog | None = None) -> None:
        """``log``: ranks.log opened already (else it is opened here, in ``directory``)."""
        self.fds = {stdout: "stdout", stderr: "stderr"}
        self.raw = {"stdout": out, "stderr": err}
        self.observer = observer
        self.clock = clock
        self.log = log or RanksLog(directory / RANKS_LOG_NAME)
        self.path = self.log.path
        self.lines = Lines(self._line)
        self.deframers = {fd: Deframer(name) for fd, name in self.fds.items()}
        self.bytes = {"stdout": 0, "stderr": 0}  # raw bytes written
        self._ending: float | None = None
        self._selector = selectors.DefaultSelector()
        for fd in self.fds:
            os.set_blocking(fd, False)
            self._selector.register(fd, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._run, name="output-pump", daemon=True)
        self._broken: set[int] = set()

    def start(self) -> Pump:
        self._thread.start()
        return self

    def finish(self, timeout: float = FINISH_MAX) -> None:
        """mpirun has ended: drain the pipes (until end-of-file, or :data:`QUIET` seconds without data, ``timeout``
        at most), hand on partial lines, write and close ranks.log."""
        self._ending = self.clock()
        self._thread.join(timeout + 1.0)
        self.log.close()

    def _run(self) -> None:
        last_data = self.clock()
        try:
            while self._selector.get_map():
                now = self.clock()
                if self._ending is not None and (now - max(last_data, self._ending) >= QUIET
                                                 or now - self._ending >= FINISH_MAX):
                    break
                for key, _events in self._selector.select(TICK):
                    if self._read(int(key.fd)):
                        last_data = self.clock()
                self.lines.tick(self.clock())
        finally:
            for fd, deframer in self.deframers.items():
                for chunk in deframer.flush():
                    self._chunk(chunk)
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(fd)
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.lines.flush(self.clock())

    def _read(self, fd: int) -> bool:
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            self._selector.unregister(fd)
            return False
        for chunk in self.deframers[fd].feed(data):
            self._chunk(chunk)
        return True

    def _chunk(self, chunk: Chunk) -> None:
        now = self.clock()
        if chunk.stream == "meta":
            if self.observer is not None and chunk.rank is not None:
                with contextlib.suppress(ValueError):
                    info = json.loads(chunk.data)
                    if isinstance(info, dict):
                        self.observer.ended(chunk.rank, info, now)
            return
        self._write_raw(chunk.stream, chunk.data)
        self.lines.feed(chunk.rank, chunk.stream, chunk.data, now)

    def _write_raw(self, stream: str, data: bytes) -> None:
        fd = self.raw[stream]
        if fd in self._broken:
            return
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:  # our stdout was handed to us non-blocking: wait until it takes more
                time.sleep(0.005)
            except OSError as exc:
                if exc.errno in (errno.EPIPE, errno.EBADF, errno.EIO):
                    self._broken.add(fd)  # nobody reads our output any more: ranks.log still gets it
                    return
                raise
        self.bytes[stream] += len(data)

    def _line(self, rank: int | None, stream: str, text: bytes, at: float) -> None:
        self.log.add(format_rank_line(rank, stream, text))
        if self.observer is not None:
            self.observer.line(rank, stream, text, at)
