"""Live output of a running task: follow growing node files through the Batch file API with byte ranges.

Each poll asks for a followed file's size (Get File Properties, a HEAD) and fetches only the bytes it has not seen
(Get File with ``ocp-range``); nothing is downloaded twice. Lines are shown whole: a partial line waits for its end,
unless the task ended. A file that does not exist yet is simply not there yet; one that shrank was truncated or
replaced and is read again from its start.

What is shown (docs/client.md, "Live output"):

* the rank view (default): the primary's ``wd/ranks.log`` (every rank's lines tagged ``[3]`` / ``[3:err]``, MPI's own
  lines untagged), plus lines of the primary's ``stderr.txt``: all of them while ranks.log does not exist yet (what
  the coordination command and launch say before mpirun starts, a shell's ``command not found``), then only the
  node runtime's own (``node-runtime: ...``: launch's warnings and errors, the hang watchdog's summary), since every
  rank's line is in ranks.log;
* ``raw``: an instance's ``stdout.txt`` and ``stderr.txt`` (or one of them) as the program wrote them; the only
  view of the other instances (their ranks' output reaches the primary through mpirun).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from mpilaunch.client.results import TaskResults, node_file_path
from node_runtime.contract import PROGRAM, RANKS_LOG_NAME

READ_CHUNK = 4 << 20
"""The most bytes one Get File asks for."""
MAX_LINE = 64 << 10
"""A line longer than this is shown in pieces (a writer that never ends its line must not fill memory)."""
RANKS_LOG = f"wd/{RANKS_LOG_NAME}"
RUNTIME_PREFIX = f"{PROGRAM}: ".encode()
"""How the node runtime's own messages start (``node-runtime: launch: ...``, ``node-runtime: error: ...``)."""
_T = TypeVar("_T")
SDK_LOGGER = "azure.batch._utils.model_base"

Emit = Callable[[str, bool], None]
"""Shows one line (without its newline); the flag: it came from a stderr stream."""
Read = Callable[[int, int], bytes]
"""``read(start, end)``: the file's bytes ``[start, end)`` (fewer, even none, if it shrank meanwhile)."""


def _text(line: bytes) -> str:
    return line.rstrip(b"\r").decode(errors="replace")


class Tail:
    """The part of one growing file read so far: an offset and the partial last line."""

    def __init__(self) -> None:
        self.offset = 0
        self._partial = b""

    def advance(self, size: int | None, read: Read) -> list[bytes]:
        """The complete new lines of a file that now has ``size`` bytes (``None``: it does not exist (yet))."""
        if size is None or size == self.offset:
            return []
        lines = []
        if size < self.offset:  # truncated or replaced: its unfinished line will not be finished
            lines = self.finish()
            self.offset = 0
        while self.offset < size:
            data = read(self.offset, min(size, self.offset + READ_CHUNK))
            if not data:
                break
            self.offset += len(data)
            lines += self._split(data)
        return lines

    def _split(self, data: bytes) -> list[bytes]:
        *lines, self._partial = (self._partial + data).split(b"\n")
        while len(self._partial) > MAX_LINE:
            lines.append(self._partial[:MAX_LINE])
            self._partial = self._partial[MAX_LINE:]
        return lines

    def finish(self) -> list[bytes]:
        """The unfinished last line, as a line (its writer ended)."""
        last, self._partial = self._partial, b""
        return [last] if last else []


@dataclass(frozen=True)
class Where:
    """Where an instance's files are: its pool, node and task root (as Batch reports it)."""

    pool: str
    node: str
    task_root: str

    def path(self, name: str) -> str:
        return node_file_path(self.task_root, name)


class NodeFiles:
    """Sizes and byte ranges of node files through the azure-batch SDK (the same calls on Azure and the emulator)."""

    def __init__(self, batch: Any) -> None:
        self.batch = batch

    def size(self, where: Where, name: str) -> int | None:
        """The file's length, ``None`` if it (or its node) is not there (now)."""
        props = self._call(lambda: self.batch.get_node_file_properties(where.pool, where.node, where.path(name)))
        return None if props is None else int(props.content_length)

    def reader(self, where: Where, name: str) -> Read:
        def read(start: int, end: int) -> bytes:
            data = self._call(lambda: b"".join(self.batch.download_node_file(
                where.pool, where.node, where.path(name), ocp_range=f"bytes={start}-{end - 1}")))
            return data or b""

        return read

    def _call(self, request: Callable[[], _T]) -> _T | None:
        """``request()``; ``None`` for "not there now": 404 (file or node gone), 409 (node not ready), 416 (the file
        shrank). The SDK's warning about the body of these answers (it logs one, with a traceback, for every error
        answer to a HEAD or a streamed download: they have none to read) is dropped."""
        from azure.core.exceptions import HttpResponseError

        sdk_log = logging.getLogger(SDK_LOGGER)
        sdk_log.addFilter(_no_failsafe_warning)
        try:
            return request()
        except HttpResponseError as exc:
            if exc.status_code not in (404, 409, 416):
                raise
            return None
        finally:
            sdk_log.removeFilter(_no_failsafe_warning)


def _no_failsafe_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Ran into a deserialization error")


class Follower:
    """One instance's live output, in the rank view or ``raw``; :meth:`update` with each look at the task,
    :meth:`poll` every interval, :meth:`finish` once the task completed."""

    def __init__(self, files: NodeFiles, emit: Emit, *, raw: bool = False, instance: int = 0,
                 streams: tuple[str, ...] = ("stdout.txt", "stderr.txt")) -> None:
        self.files = files
        self.emit = emit
        self.raw = raw or instance != 0  # ranks.log is on the primary only
        self.instance = instance
        self.streams = streams
        """The files followed when ``raw``."""
        self.where: Where | None = None
        self._tails: dict[str, Tail] = {}
        self._mpirun_started = False

    def update(self, results: TaskResults) -> None:
        """Follow the instance where ``results`` say it runs; a new node or task directory starts afresh."""
        row = next((r for r in results.instances if r.instance == self.instance), None)
        if row is None or not (row.node and row.pool and row.task_root):
            return
        where = Where(row.pool, row.node, row.task_root)
        if where != self.where:
            if self.where is not None:
                self._drain()
            self.where, self._tails, self._mpirun_started = where, {}, False

    def poll(self) -> None:
        """Show what the followed files gained since the last poll (whole lines only)."""
        if self.where is not None:
            self._read(final=False)

    def finish(self, results: TaskResults | None = None) -> None:
        """The last read (after ``results``, the completed task) and every unfinished line."""
        if results is not None:
            self.update(results)
        self._drain()

    def _drain(self) -> None:
        if self.where is not None:
            self._read(final=True)

    def _lines(self, name: str, size: int | None, final: bool) -> list[bytes]:
        """New whole lines of ``name``, now ``size`` bytes long; ``final``: also its unfinished line."""
        assert self.where is not None
        tail = self._tails.setdefault(name, Tail())
        lines = tail.advance(size, self.files.reader(self.where, name))
        return lines + tail.finish() if final else lines

    def _read(self, final: bool) -> None:
        where = self.where
        assert where is not None
        if self.raw:
            for name in self.streams:
                for line in self._lines(name, self.files.size(where, name), final):
                    self.emit(_text(line), name == "stderr.txt")
            return
        size = self.files.size(where, RANKS_LOG)  # asked first: once it exists, ranks write nowhere else
        self._mpirun_started = self._mpirun_started or size is not None
        for line in self._lines("stderr.txt", self.files.size(where, "stderr.txt"), final):
            if not self._mpirun_started or line.startswith(RUNTIME_PREFIX):
                self.emit(_text(line), True)
        for line in self._lines(RANKS_LOG, size, final):
            self.emit(_text(line), False)
