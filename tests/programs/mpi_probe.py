"""An mpi4py program for cluster tests: rank 0 prints one JSON line per rank (where it ran, collective results).

Usage: mpi_probe.py [--env] [--exit CODE] [--sleep S]. ``--env`` adds each rank's whole environment (for the
"secret never reaches the ranks" test); ``--exit`` makes every rank exit with CODE after reporting; ``--sleep``
makes rank 0 sleep before the collectives (for signal tests).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

from mpi4py import MPI


def addresses() -> list[str]:
    import psutil

    return sorted(a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                  if a.family == socket.AF_INET and not a.address.startswith("127."))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--env", action="store_true")
    parser.add_argument("--exit", type=int, default=0)
    parser.add_argument("--sleep", type=float, default=0.0)
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if rank == 0 and args.sleep:
        print(json.dumps({"sleeping": args.sleep}), flush=True)
        time.sleep(args.sleep)
    total = comm.allreduce(rank + 1, op=MPI.SUM)
    token = comm.bcast("token-from-0" if rank == 0 else None, root=0)
    right, left = (rank + 1) % size, (rank - 1) % size
    from_left = comm.sendrecv(rank, dest=right, source=left)
    record = {
        "rank": rank, "size": size, "hostname": socket.gethostname(), "addresses": addresses(),
        "allreduce": total, "bcast": token, "ring_from_left": from_left, "cwd": os.getcwd(),
        "tmpdir": os.environ.get("TMPDIR"),
    }
    if args.env:
        record["env"] = dict(os.environ)
    records = comm.gather(record, root=0)
    if rank == 0:
        assert records is not None
        for item in records:
            print(json.dumps(item, sort_keys=True))
        sys.stdout.flush()
    comm.Barrier()
    return int(args.exit)


if __name__ == "__main__":
    sys.exit(main())
