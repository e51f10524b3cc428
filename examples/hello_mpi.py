"""Example mpi4py program: every rank reports its host, rank 0 checks a collective and prints a summary.

Run it on 3 local nodes:  mpilaunch run --local -n 3 -i examples/hello_mpi.py -- python3 hello_mpi.py
"""

from __future__ import annotations

import socket
import sys

from mpi4py import MPI


def main() -> int:
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    host = socket.gethostname()
    print(f"rank {rank}/{size} on {host}", flush=True)
    total = comm.allreduce(rank, op=MPI.SUM)
    hosts = comm.gather(host, root=0)
    if rank == 0:
        expected = size * (size - 1) // 2
        assert hosts is not None
        print(f"allreduce sum of ranks = {total} (expected {expected}); {len(set(hosts))} distinct host(s): "
              f"{', '.join(sorted(set(hosts)))}", flush=True)
        return 0 if total == expected else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
