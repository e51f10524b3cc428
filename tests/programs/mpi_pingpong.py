"""An mpi4py micro-benchmark between ranks 0 and 1 (one per node), for ``benchmarks/fabric.py``.

Ping-pong of 8 B (latency: half the round trip) and of 4 MiB (bandwidth: 4 MiB over half the round trip), then
``Allreduce`` (sum) of one double and of 4 MiB of doubles over every rank. Each measurement is the median of single
calls timed on rank 0 (``--count`` of 4 MiB, 50 times as many of 8 B). Rank 0 prints one JSON line: ``latency_us``,
``bandwidth_MBps``, ``allreduce_small_us``, ``allreduce_large_us``. Usage: mpi_pingpong.py [--count N] (no numpy).
"""

from __future__ import annotations

import argparse
import json
import statistics
from array import array
from collections.abc import Callable

from mpi4py import MPI

SMALL = 8
LARGE = 4 * 2**20


def median_time(comm: MPI.Intracomm, run: Callable[[], None], count: int) -> float:
    """Median seconds of one ``run()`` over ``count`` timed calls (after ``count // 10 + 1`` untimed ones). Each call
    is timed on its own: on a shared machine the median skips the calls a preemption stretched."""
    times = []
    comm.Barrier()
    for call in range(count + count // 10 + 1):
        started = MPI.Wtime()
        run()
        if call > count // 10:
            times.append(MPI.Wtime() - started)
    return statistics.median(times)


def ping_pong(comm: MPI.Intracomm, size: int) -> Callable[[], None]:
    """One round trip of ``size`` bytes between ranks 0 and 1 (other ranks do nothing)."""
    buffer = bytearray(size)
    rank = comm.Get_rank()

    def run() -> None:
        if rank == 0:
            comm.Send([buffer, MPI.BYTE], dest=1)
            comm.Recv([buffer, MPI.BYTE], source=1)
        elif rank == 1:
            comm.Recv([buffer, MPI.BYTE], source=0)
            comm.Send([buffer, MPI.BYTE], dest=0)

    return run


def allreduce(comm: MPI.Intracomm, size: int) -> Callable[[], None]:
    """One Allreduce (sum) of ``size`` bytes of doubles."""
    send, receive = array("d", [1.0]) * (size // 8), array("d", [0.0]) * (size // 8)
    return lambda: comm.Allreduce([send, MPI.DOUBLE], [receive, MPI.DOUBLE], op=MPI.SUM)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=20, help="timed calls of 4 MiB (of 8 B: 50 times as many)")
    count = parser.parse_args().count
    comm = MPI.COMM_WORLD
    round_trip_small = median_time(comm, ping_pong(comm, SMALL), 50 * count)
    round_trip_large = median_time(comm, ping_pong(comm, LARGE), count)
    small = median_time(comm, allreduce(comm, SMALL), 50 * count)
    large = median_time(comm, allreduce(comm, LARGE), count)
    if comm.Get_rank() == 0:
        print(json.dumps({"latency_us": round_trip_small / 2 * 1e6,
                          "bandwidth_MBps": LARGE / (round_trip_large / 2) / 1e6,
                          "allreduce_small_us": small * 1e6, "allreduce_large_us": large * 1e6}), flush=True)


if __name__ == "__main__":
    main()
