"""An mpi4py program that fails on one rank while the others wait in a barrier (they would wait forever, unless an
uncaught exception ends the job): ``mpi_fail.py exception|module RANK``.

``exception``: RANK raises ``ValueError: bad input on rank RANK`` from a function; ``module``: RANK imports a module
no node has. Every rank prints a line first (stdout and stderr), so the output of the others is there too.
"""

from __future__ import annotations

import sys
import time

from mpi4py import MPI


def parse(value: str, rank: int) -> float:
    raise ValueError(f"bad input on rank {rank}: {value!r}")


def main() -> None:
    case, failing = sys.argv[1], int(sys.argv[2])
    comm = MPI.COMM_WORLD
    print(f"rank {comm.rank} of {comm.size} up", flush=True)
    print(f"rank {comm.rank} is about to wait", file=sys.stderr, flush=True)
    if comm.rank == failing:
        time.sleep(0.5)
        if case == "exception":
            parse("x", comm.rank)
        elif case == "module":
            import mpilaunch_no_such_module  # type: ignore[import-not-found]  # noqa: F401
    comm.Barrier()  # the others wait here
    print(f"rank {comm.rank} passed the barrier", flush=True)


if __name__ == "__main__":
    main()
