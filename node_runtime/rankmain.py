"""``python3 -m node_runtime.rankmain [mpi4py options] [-m MOD | -c CMD | - | FILE] ARGS...``: how launch starts a
Python rank. It behaves exactly as ``python3 -m mpi4py`` (it *is* :func:`mpi4py.run.main`: the same options, the
program run through :mod:`runpy`, and an uncaught exception on any rank makes mpi4py call ``MPI_Abort`` at exit, so
the whole job ends at once instead of the other ranks waiting forever), and in addition registers a stack dump:

:data:`STACK_SIGNAL` makes :mod:`faulthandler` write the Python stack of every thread of the rank to its own file
(never the program's stdout or stderr). faulthandler writes from its C signal handler, so a rank answers even while
it is blocked inside MPI's C code (a barrier, a receive) and never gets back to the interpreter. Each rank records
itself beside its dump (:func:`stack_files`: its pid, start time, rank, signal and main thread), in the stacks
directory of its TMPDIR, which launch and the task's sshd set to the task's own node-local directory; ``node-runtime
stacks`` (:mod:`node_runtime.stacks`) finds the task's ranks there, signals them and reads their dumps.

Without mpi4py installed the program still runs (through :mod:`runpy`, with the stack dump; there is no MPI job to
abort then). This module imports nothing but the standard library (and mpi4py), so a rank starts as fast as with
``python3 -m mpi4py``.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

STACK_SIGNAL = signal.SIGRTMIN + 4
"""The signal that dumps a rank's stacks: a real-time one, which no common library claims (SIGUSR1 is taken by
e.g. PyTorch Lightning's and submitit's SLURM requeueing, whose handler would replace ours); its default action
would end the process, so only processes whose record names it are ever sent it."""
STACKS_DIR_NAME = "mpilaunch-stacks"
"""The directory of the records and dumps, in the rank's TMPDIR (the task's node-local directory under launch)."""
RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def stacks_dir(tmp: str | None = None) -> Path:
    """Where the ranks of this node (of this task, under launch) record themselves: ``$TMPDIR/mpilaunch-stacks``."""
    return Path(tmp or tempfile.gettempdir()) / STACKS_DIR_NAME


def stack_files(directory: Path, pid: int) -> tuple[Path, Path]:
    """The record (JSON) and the dump file of process ``pid``."""
    return directory / f"rank-{pid}.json", directory / f"rank-{pid}.stack"


def start_time(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot (field 22 of /proc/PID/stat); None if it is gone. A pid
    with another start time is another process (pids are reused)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _first(environ: Mapping[str, str], names: tuple[str, ...]) -> int | None:
    for name in names:
        with contextlib.suppress(KeyError, ValueError):
            return int(environ[name])
    return None


def register_stack_dump() -> tuple[IO[bytes], Path] | None:
    """Make :data:`STACK_SIGNAL` dump every thread's stack to this rank's dump file and record the rank; returns the
    open dump file and the record, or None if the stacks directory is not usable (then nothing is registered:
    a run is never refused for want of a stack dump). The directory must be ours and private."""
    directory = stacks_dir()
    try:
        directory.mkdir(mode=0o700, exist_ok=True)
        st = directory.lstat()
        if st.st_uid != os.getuid() or not Path(directory).is_dir() or directory.is_symlink():
            return None
        pid = os.getpid()
        record, dump = stack_files(directory, pid)
        out = dump.open("ab", buffering=0)  # open as long as the rank: the handler writes to it
    except OSError:
        return None
    faulthandler.register(STACK_SIGNAL, file=out, all_threads=True, chain=False)
    doc: dict[str, Any] = {
        "pid": pid, "start_time": start_time(pid), "signal": int(STACK_SIGNAL), "dump": dump.name,
        "rank": _first(os.environ, RANK_VARIABLES), "size": _first(os.environ, SIZE_VARIABLES),
        "main_thread": threading.get_ident(), "argv": sys.argv[1:],
    }
    tmp = record.with_name(f".{record.name}.tmp")
    try:
        tmp.write_text(json.dumps(doc))
        tmp.replace(record)  # whole or absent: a reader never sees half a record
    except OSError:
        faulthandler.unregister(STACK_SIGNAL)
        out.close()
        return None
    return out, record


def _unregister(registered: tuple[IO[bytes], Path] | None) -> None:
    if registered is None:
        return
    out, record = registered
    faulthandler.unregister(STACK_SIGNAL)
    record.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        Path(out.name).unlink(missing_ok=True)
    out.close()


def _run_without_mpi4py(args: list[str]) -> None:
    """``python3 [-m MOD | -c CMD | - | FILE] ARGS`` through runpy, as mpi4py.run would (only when mpi4py is absent:
    its command line options then cannot be honoured)."""
    import runpy

    if not args or (args[0] in ("-m", "-c") and len(args) < 2):
        sys.exit("usage: python3 -m node_runtime.rankmain [-m MOD | -c CMD | - | FILE] ARGS...")
    sys.argv[:] = args
    if args[0] == "-m":
        del sys.argv[0]
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    elif args[0] in ("-c", "-"):
        source = sys.stdin.read() if args[0] == "-" else sys.argv.pop(1)
        code = compile(source, "<stdin>" if args[0] == "-" else "<string>", "exec")
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})  # noqa: S102 (python3 -c does this)
    else:
        if not sys.flags.isolated:
            sys.path[0] = os.path.realpath(os.path.dirname(args[0]))  # noqa: PTH120 (as python3 FILE sets it)
        runpy.run_path(args[0], run_name="__main__")


def main() -> None:
    """Register the stack dump, then run the program as ``python3 -m mpi4py`` does (``sys.argv[1:]``)."""
    registered = register_stack_dump()
    try:
        try:
            from mpi4py.run import main as mpi4py_main
        except ImportError:
            _run_without_mpi4py(sys.argv[1:])
        else:
            mpi4py_main()
    finally:
        _unregister(registered)


if __name__ == "__main__":
    main()
