"""``node-runtime doctor [--ppn N] [--threads-per-rank T] [--max-clock-skew S] [--min-free-disk SIZE] [--timeout S]
[--report NAME]``: the command line of ``mpilaunch doctor``'s task (``--agent --address A``: the per-node part)."""

from __future__ import annotations

import argparse

from node_runtime.argtypes import positive_float, positive_int


def _size(text: str) -> int:
    from node_runtime.doctor import parse_size
    from node_runtime.errors import InvalidInput

    try:
        return parse_size(text)
    except InvalidInput as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def configure(parser: argparse.ArgumentParser) -> None:
    # No default here is node_runtime.doctor's constant: importing it costs every node-runtime command ~50 ms.
    parser.add_argument("--ppn", type=positive_int, metavar="N",
                        help="Ranks per node /dev/shm must hold (default: as launch picks: the node's physical "
                             "cores / threads per rank).")
    parser.add_argument("--threads-per-rank", dest="threads", type=positive_int, metavar="T",
                        help="OpenMP threads per rank (for the default --ppn).")
    parser.add_argument("--max-clock-skew", type=positive_float, metavar="S",
                        help="Seconds a node's clock may differ from the primary's (default: 1).")
    parser.add_argument("--min-free-disk", type=_size, metavar="SIZE",
                        help="Free space the task directory must have, e.g. 500M, 2G (default: 1G).")
    parser.add_argument("--timeout", type=positive_float, metavar="S",
                        help="Seconds to wait for every node's coordination service, and again for every node's "
                             "answers (default: 30).")
    parser.add_argument("--report", metavar="NAME",
                        help="The report's file name in the working directory (default: doctor.json).")
    parser.add_argument("--agent", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    """Check every node of the task for what MPI needs (primary node only: the command line of `mpilaunch doctor`'s
    task). The checks: every coordination service answers; TCP between the nodes on their MPI interface and on the
    task port; the same runtime, Python, mpi4py and MPI everywhere; the fabric; /dev/shm for the ranks per node;
    clock skew; free disk in the task directory. Writes doctor.json in the working directory, prints every problem
    with its fix, stops every node's service; exits 0 only if every check passed, else 1."""
    import os

    from node_runtime import doctor

    if args.agent:
        import sys

        if not args.address:
            from node_runtime.errors import InvalidInput

            raise InvalidInput("doctor --agent needs --address (the primary starts it)")
        return doctor.agent(args.address, os.environ, sys.stdin, sys.stdout)
    given = {"max_clock_skew": args.max_clock_skew, "min_free_disk": args.min_free_disk, "timeout": args.timeout,
             "report_name": args.report}
    return doctor.run_doctor(os.environ, ppn=args.ppn, threads=args.threads,
                             **{name: value for name, value in given.items() if value is not None})
