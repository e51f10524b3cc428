"""An mpi4py program for the hang watchdog's tests.

Usage: hang_probe.py [--stuck sleep|recv] [--mixed] [--chatty SECONDS] [--checkpointing SECONDS --store DIR].

``--stuck``: rank 1 blocks (in time.sleep, or in socket.recv on a socket nobody writes to) while every other rank
waits in Barrier (with ``--mixed``, rank 2 in allreduce): nothing is printed after the start line. ``--chatty S``:
every rank prints a line every second for S seconds, then all end normally (a job that is busy, not hung).
``--checkpointing S``: the ranks print nothing but save a step checkpoint in DIR every second for S seconds (busy
too: the checkpoint API's heartbeat says so).
"""

from __future__ import annotations

import argparse
import socket
import sys
import time

from mpi4py import MPI


def stuck(comm: MPI.Comm, how: str, mixed: bool) -> None:
    if comm.rank == 1:
        if how == "recv":
            quiet, _other = socket.socketpair()
            quiet.recv(1024)  # nobody ever writes: blocks forever
        else:
            time.sleep(3600)
    elif comm.rank == 2 and mixed:
        comm.allreduce(comm.rank)
    else:
        comm.Barrier()


def chatty(comm: MPI.Comm, seconds: float) -> None:
    end = time.monotonic() + seconds
    beat = 0
    while time.monotonic() < end:
        print(f"rank {comm.rank}: working {beat}", flush=True)
        beat += 1
        time.sleep(1.0)
    comm.Barrier()
    if comm.rank == 0:
        print("chatty: done", flush=True)


def checkpointing(comm: MPI.Comm, seconds: float, store: str) -> None:
    """Silent, but a step checkpoint every second (the watchdog's heartbeat)."""
    from node_runtime.checkpoint import StepCheckpoints

    steps = StepCheckpoints(store, name="probe")
    end = time.monotonic() + seconds
    step = 0
    while comm.bcast(time.monotonic() < end if comm.rank == 0 else None, root=0):
        time.sleep(1.0)
        steps.save(step, {"rank": comm.rank, "step": step})
        step += 1
    if comm.rank == 0:
        print(f"checkpointing: done after {step} checkpoints", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stuck", choices=("sleep", "recv"))
    parser.add_argument("--mixed", action="store_true")
    parser.add_argument("--chatty", type=float)
    parser.add_argument("--checkpointing", type=float, metavar="SECONDS")
    parser.add_argument("--store", help="checkpoint location for --checkpointing")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    comm.Barrier()
    if comm.rank == 0:
        print(f"hang_probe: {comm.size} ranks started", flush=True)
    if args.stuck:
        stuck(comm, args.stuck, args.mixed)
    elif args.chatty:
        chatty(comm, args.chatty)
    elif args.checkpointing:
        checkpointing(comm, args.checkpointing, args.store)
    return 0


if __name__ == "__main__":
    sys.exit(main())
