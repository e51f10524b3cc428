"""The few MPI helpers the checkpoint API shares; mpi4py is imported only when no communicator is given."""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
import time
import traceback
from typing import Any, NoReturn

from node_runtime.contract import HEARTBEAT_NAME
from node_runtime.errors import MpilaunchError

BEAT_INTERVAL = 0.5  # seconds: a rank touches the heartbeat at most this often
_last_beat = -BEAT_INTERVAL


def world(comm: Any = None) -> Any:
    """``comm``, or mpi4py's ``COMM_WORLD``."""
    if comm is not None:
        return comm
    from mpi4py import MPI

    return MPI.COMM_WORLD


def say(comm: Any, message: str) -> None:
    """One line on stderr, prefixed with this rank (what users read in the node's stderr.txt)."""
    print(f"[mpilaunch checkpoint] rank {comm.Get_rank()}: {message}", file=sys.stderr, flush=True)


def new_run_id() -> str:
    """A short id, roughly time-ordered, unique per run of the program (taken on rank 0 and broadcast)."""
    return f"{time.time_ns() // 1_000_000:011x}{secrets.token_hex(3)}"


def abort(comm: Any, error: BaseException, context: str) -> NoReturn:
    """Report ``error`` clearly and end the whole job: comm.Abort with ranks, the exception itself if serial.

    Aborting (rather than raising on one rank) is what keeps the other ranks from waiting forever for this one.
    """
    if comm.Get_size() == 1:
        raise error
    code = error.exit_code if isinstance(error, MpilaunchError) else 1
    tb = "".join(traceback.format_exception(error)).rstrip()
    say(comm, f"{context}; aborting the whole job (exit code {code})\n{tb}")
    sys.stderr.flush()
    comm.Abort(code)
    os._exit(code)  # Abort does not return; this only satisfies the type checker and odd MPI builds


def beat() -> None:
    """Progress for launch's hang watchdog (``--hang-timeout``): touch the heartbeat file in this node's task
    working directory if it exists (the watchdog creates it on the primary only; elsewhere this is one failed
    ``utime``), at most every :data:`BEAT_INTERVAL` seconds. Called on every commit and on rank 0's dispatching."""
    global _last_beat  # noqa: PLW0603 (one timestamp per process)
    now = time.monotonic()
    if now - _last_beat < BEAT_INTERVAL:
        return
    _last_beat = now
    directory = os.environ.get("AZ_BATCH_TASK_WORKING_DIR")
    if directory:
        with contextlib.suppress(OSError):
            os.utime(os.path.join(directory, HEARTBEAT_NAME))  # noqa: PTH118 (the cheapest form: one syscall)
