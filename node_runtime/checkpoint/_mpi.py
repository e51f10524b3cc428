"""The few MPI helpers the checkpoint API shares; mpi4py is imported only when no communicator is given."""

from __future__ import annotations

import os
import secrets
import sys
import time
import traceback
from typing import Any, NoReturn

from node_runtime.errors import MpilaunchError


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
