"""``node-runtime launch [--ppn N] [--threads-per-rank T] [--mpi F] [--fabric auto|ucx|tcp] [--allow-small-shm]
[--timeout S] [--hang-timeout DURATION] [--no-abort-on-exception] [--] COMMAND ARGS...``: the task's command
line."""

from __future__ import annotations

import argparse

from node_runtime.argtypes import positive_float, positive_int
from node_runtime.contract import DEFAULT_FABRIC, FABRICS, FLAVORS
from node_runtime.durations import positive_duration


class _Command(argparse.Action):
    """COMMAND ARGS...: every argument from the program on (our options included), without a leading ``--``."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        command = list(values) if isinstance(values, list) else []
        if command[:1] == ["--"]:
            del command[0]
        if not command:
            parser.error("the following arguments are required: COMMAND")
        setattr(namespace, self.dest, command)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.usage = ("%(prog)s [-h] [--ppn N] [--threads-per-rank T] [--mpi F] [--fabric auto|ucx|tcp] "
                    "[--allow-small-shm] [--timeout S] [--hang-timeout DURATION] [--no-abort-on-exception] "
                    "[--] COMMAND ARGS...")
    parser.add_argument("--ppn", type=positive_int, metavar="N",
                        help="MPI processes per node (default: the node's physical cores / threads per rank).")
    parser.add_argument("--threads-per-rank", dest="threads", type=positive_int, metavar="T",
                        help="OpenMP threads per rank, for hybrid MPI+OpenMP: OMP_NUM_THREADS=T, each rank bound "
                             "to T cores (default: one core per rank, OMP_NUM_THREADS left as exported).")
    parser.add_argument("--fabric", choices=FABRICS, default=DEFAULT_FABRIC,
                        help="auto: UCX over InfiniBand when every node has it, else TCP; ucx: UCX (over "
                             "InfiniBand, else over TCP and shared memory); tcp (default: %(default)s).")
    parser.add_argument("--allow-small-shm", action="store_true",
                        help="Go on when /dev/shm is smaller than the ranks of a node need (default: refuse).")
    parser.add_argument("--mpi", dest="flavor", choices=FLAVORS, metavar="F",
                        help="The MPI implementation of mpirun: %(choices)s (default: detected from "
                             "'mpirun --version').")
    parser.add_argument("--timeout", type=positive_float, default=30.0, metavar="S",
                        help="Seconds to wait for every node's coordination service to answer (default: "
                             "%(default)s).")
    parser.add_argument("--hang-timeout", type=positive_duration, metavar="DURATION",
                        help="End the job when no rank wrote output and no checkpoint was committed for DURATION "
                             "(e.g. 90s, 30m, 2h): every rank's Python stack goes to hang-report.json, the "
                             "summary to stderr, and launch exits 124 (default: no limit).")
    parser.add_argument("--no-abort-on-exception", dest="abort_on_exception", action="store_false",
                        help="Run a Python program as given: without it, `python3 app.py` runs as `python3 -m "
                             "node_runtime.rankmain app.py` (as `python3 -m mpi4py`: an uncaught exception on any "
                             "rank calls MPI_Abort, so the whole job ends at once instead of the other ranks "
                             "waiting forever).")
    parser.add_argument("command", nargs=argparse.REMAINDER, action=_Command, metavar="COMMAND ARGS...",
                        help="The program and its arguments; from the program on, options are the program's.")


def run(args: argparse.Namespace) -> int:
    """Run COMMAND on every node of the task under mpirun (primary node only). Waits for every node's
    coordination service, streams output, forwards SIGTERM/SIGINT, exits with mpirun's exit code, writes
    launch-report.json in the working directory and stops every node's service at the end."""
    import os

    from node_runtime import launch as launching
    from node_runtime.contract import MpiFlavor
    from node_runtime.coordinate import current_environment

    env = current_environment()
    return launching.launch(env, os.environ, args.command, ppn=args.ppn, threads=args.threads,
                            flavor=MpiFlavor(args.flavor) if args.flavor else None, fabric_request=args.fabric,
                            allow_small_shm=args.allow_small_shm, timeout=args.timeout,
                            hang_timeout=args.hang_timeout, abort_on_exception=args.abort_on_exception)
