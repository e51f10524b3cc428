"""An mpi4py program for cluster tests: one-sided MPI across nodes, and what each rank sees of Batch.

Every rank: ``Win.Allocate`` (a Put to its right neighbour, fenced), ``Win.Create`` on its own buffer (every rank
Accumulates rank+1 into rank 0's, then Gets the sum back), a passive-target Lock/Put/Unlock to rank 0 of
``Win.Allocate``; rank 0 prints one JSON line per rank with the results, its hostname and its ``AZ_BATCH_*``
variables, and whether the task secret is in its environment. Usage: mpi_onesided.py (no options).
"""

from __future__ import annotations

import json
import os
import socket
import sys
from array import array

from mpi4py import MPI

SECRET_VARIABLE = "MPILAUNCH_TASK_SECRET"


def one_sided(comm: MPI.Intracomm) -> dict[str, object]:
    rank, size = comm.Get_rank(), comm.Get_size()
    right, left = (rank + 1) % size, (rank - 1) % size
    item = MPI.INT64_T.Get_size()

    allocated = MPI.Win.Allocate(size * item, item, comm=comm)
    allocated.Fence()
    allocated.Put([array("q", [rank + 1]), MPI.INT64_T], right, target=(rank, 1, MPI.INT64_T))
    allocated.Fence()
    put_from_left = array("q", bytes(allocated.tomemory()))[left]
    comm.Barrier()
    allocated.Lock(0, MPI.LOCK_SHARED)  # passive target: every rank writes its own slot of rank 0's window
    allocated.Put([array("q", [100 + rank]), MPI.INT64_T], 0, target=(rank, 1, MPI.INT64_T))
    allocated.Unlock(0)
    comm.Barrier()
    passive = list(array("q", bytes(allocated.tomemory()))) if rank == 0 else None
    allocated.Free()

    buffer = array("q", [0])
    created = MPI.Win.Create(buffer, item, comm=comm)
    created.Fence()
    created.Accumulate([array("q", [rank + 1]), MPI.INT64_T], 0, target=(0, 1, MPI.INT64_T), op=MPI.SUM)
    created.Fence()
    got = array("q", [0])
    created.Get([got, MPI.INT64_T], 0, target=(0, 1, MPI.INT64_T))
    created.Fence()
    created.Free()
    return {"put_from_left": put_from_left, "accumulate_get": got[0], "passive_put": passive}


def main() -> int:
    comm = MPI.COMM_WORLD
    record: dict[str, object] = {"rank": comm.Get_rank(), "size": comm.Get_size(), "hostname": socket.gethostname()}
    try:
        record.update(one_sided(comm))
    except MPI.Exception as exc:
        record["error"] = f"{exc.Get_error_class()}: {exc.Get_error_string()}"
    record["batch"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith("AZ_BATCH_")}
    record["secret_in_env"] = SECRET_VARIABLE in os.environ
    record["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    records = comm.gather(record, root=0)
    if records is not None:
        for item in records:
            print(json.dumps(item, sort_keys=True))
        sys.stdout.flush()
    comm.Barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
