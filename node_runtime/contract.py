"""What the client and the nodes agree on, defined once, here on the node side; the client builds from it.

The variables the client puts in a task's environment, the default coordination port, the MPI flavors, the fabric
choices, the coordination and launch command lines, the runtime version every node must share with the client, and
the files the primary's launch leaves in its working directory for the client: ``launch-report.json`` and
``ranks.log`` (its line format and :func:`parse_rank_line`).
"""

from __future__ import annotations

import enum
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass

from node_runtime import __version__
from node_runtime.durations import format_duration

RUNTIME_VERSION = __version__
PROGRAM = "node-runtime"
DEFAULT_SSH_PORT = 2222

NODE_COUNT_VARIABLE = "AZ_BATCH_NODE_COUNT"  # Azure does not set it; the client does, the runtime cross-checks
SECRET_VARIABLE = "MPILAUNCH_TASK_SECRET"  # noqa: S105 (a variable name, not a secret)
SSH_PORT_VARIABLE = "MPILAUNCH_SSH_PORT"
EXPORT_VARIABLE = "MPILAUNCH_EXPORT_ENV"
CHECKPOINT_VARIABLE = "MPILAUNCH_CHECKPOINT_URL"
VERSION_VARIABLE = "MPILAUNCH_RUNTIME_VERSION"
NODE_ADDRESS_VARIABLE = "MPILAUNCH_NODE_ADDRESS"  # set by the emulator only (several nodes on one machine)


class MpiFlavor(str, enum.Enum):
    """The MPI implementations whose ``mpirun`` we drive (``str()`` is the value, as ``enum.StrEnum`` of 3.11)."""

    OPENMPI = "openmpi"
    MPICH = "mpich"
    INTELMPI = "intelmpi"

    def __str__(self) -> str:
        return str(self.value)


FLAVORS = tuple(f.value for f in MpiFlavor)
FABRICS = ("auto", "ucx", "tcp")  # launch --fabric: auto picks UCX over InfiniBand when every node has it, else TCP
DEFAULT_FABRIC = "auto"
COORDINATION_COMMAND_LINE = shlex.join([PROGRAM, "coordinate"])
HANG_REPORT_NAME = "hang-report.json"  # beside launch-report.json: what launch's hang watchdog found (every stack)
HEARTBEAT_NAME = ".mpilaunch-heartbeat"
"""In the primary's working directory while launch's hang watchdog runs: the checkpoint API touches it on every
commit (an mtime change is progress, like output); it is never created anywhere else."""


LAUNCH_REPORT_NAME = "launch-report.json"  # in the primary's working directory: what launch did and how it ended
RANKS_LOG_NAME = "ranks.log"
"""In the primary's working directory: every line of every rank, tagged, both streams in arrival order, written by
launch's output pump (:mod:`node_runtime.output`) as the lines arrive: ``[3] text`` (rank 3's stdout), ``[3:err]
text`` (its stderr), and MPI's own lines (mpirun's, the daemons') as they are. A line the program left unended for
:data:`PARTIAL_LINE_SECONDS` (a prompt, a progress bar) is written as it is, its rest on a line of its own; bytes
are the program's (not necessarily UTF-8). Read it with :func:`parse_rank_line`. stdout.txt/stderr.txt keep the
program's raw output."""
PARTIAL_LINE_SECONDS = 0.5
_RANK_TAG = re.compile(r"^\[(\d+)(:err)?\] ")
MPI_LINE_ESCAPE = "[mpi] "
"""Put in front of one of MPI's own lines that would otherwise read as tagged (it starts like ``[3] ``)."""


@dataclass(frozen=True)
class RankLine:
    """One line of :data:`RANKS_LOG_NAME`: ``rank`` None for MPI's own lines; ``stream`` ``stdout``, ``stderr`` or
    ``mpi``; ``text`` without the tag and the line end."""

    rank: int | None
    stream: str
    text: str


def format_rank_line(rank: int | None, stream: str, text: bytes) -> bytes:
    """The line of ``ranks.log`` for ``text`` (one line of the program, without its end) of ``rank``'s ``stream``
    (``stdout``/``stderr``); ``rank`` None: one of MPI's own lines."""
    if rank is None:
        if _RANK_TAG.match(text[:24].decode("latin-1")) or text.startswith(MPI_LINE_ESCAPE.encode()):
            text = MPI_LINE_ESCAPE.encode() + text
        return text + b"\n"
    return f"[{rank}{':err' if stream == 'stderr' else ''}] ".encode() + text + b"\n"


def parse_rank_line(line: str | bytes) -> RankLine:
    """A line of ``ranks.log`` (with or without its end; bytes are decoded as UTF-8 with replacement)."""
    text = line.decode(errors="replace") if isinstance(line, bytes) else line
    text = text[:-1] if text.endswith("\n") else text
    match = _RANK_TAG.match(text)
    if match is None:
        if text.startswith(MPI_LINE_ESCAPE):
            text = text[len(MPI_LINE_ESCAPE):]
        return RankLine(None, "mpi", text)
    return RankLine(int(match.group(1)), "stderr" if match.group(2) else "stdout", text[match.end():])


def launch_command_line(argv: Sequence[str], *, ppn: int | None = None, mpi: str | None = None,
                        fabric: str = DEFAULT_FABRIC, threads_per_rank: int | None = None,
                        hang_timeout: float | None = None, abort_on_exception: bool = True) -> str:
    """The primary's command line; ``shlex.split`` of it gives back ``node-runtime launch ... -- *argv``.
    ``hang_timeout`` (seconds, whole ones: rounded up) becomes ``--hang-timeout`` in the client's duration syntax.
    ``abort_on_exception=False`` is ``--no-abort-on-exception``: a Python program runs as given, a rank's uncaught
    exception no longer ends the job (see :func:`node_runtime.mpirun.python_rank_command`)."""
    options: list[str] = []
    if not abort_on_exception:
        options.append("--no-abort-on-exception")
    if hang_timeout is not None:
        if not hang_timeout > 0:
            raise ValueError(f"hang timeout {hang_timeout!r} must be positive (seconds)")
        options += ["--hang-timeout", format_duration(hang_timeout)]
    if ppn is not None:
        options += ["--ppn", str(ppn)]
    if threads_per_rank is not None:
        options += ["--threads-per-rank", str(threads_per_rank)]
    if mpi is not None:
        options += ["--mpi", MpiFlavor(mpi).value]
    if fabric != DEFAULT_FABRIC:
        if fabric not in FABRICS:
            raise ValueError(f"fabric {fabric!r} is not one of {', '.join(FABRICS)}")
        options += ["--fabric", fabric]
    return shlex.join([PROGRAM, "launch", *options, "--", *argv])
