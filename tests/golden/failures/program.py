"""The failing programs of the captured samples: rank 1 fails as ``argv[1]`` says, the others wait in a barrier
(or end, for ``exit`` and ``exception-noabort``, which run without MPI_Abort and would wait forever)."""

import ctypes
import os
import signal
import sys
import time

from mpi4py import MPI

comm = MPI.COMM_WORLD
rank = comm.rank
case = sys.argv[1]
print(f"rank {rank} of {comm.size} starting", flush=True)
print(f"rank {rank} note on stderr", file=sys.stderr, flush=True)


def solve(x: float) -> float:
    return 1 / x


if rank == 1:
    time.sleep(0.3)
    if case in ("exception", "exception-noabort"):
        solve(0)
    elif case == "exit":
        sys.exit(3)
    elif case == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif case == "segv":
        ctypes.string_at(0)
    elif case == "module":
        import no_such_module_xyz  # noqa: F401
    elif case == "abort":
        comm.Abort(7)
    elif case == "oom":
        blocks = []
        while True:
            blocks.append(bytearray(64 << 20))
            blocks[-1][::4096] = b"x" * len(blocks[-1][::4096])
if case not in ("exit", "exception-noabort"):
    comm.Barrier()
print(f"rank {rank} done", flush=True)
