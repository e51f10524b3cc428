"""``node-runtime stacks [--tmpdir DIR] [--timeout DURATION]``: this node's ranks' Python stacks, as JSON."""

from __future__ import annotations

import argparse

from node_runtime.durations import positive_duration


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tmpdir", metavar="DIR",
                        help="The task's node-local directory, the ranks' TMPDIR (default: $TMPDIR, which the "
                             "task's coordination service sets for every session).")
    parser.add_argument("--timeout", type=positive_duration, default=3, metavar="DURATION",
                        help="How long to wait for every rank's dump, e.g. 5s (default: %(default)s seconds).")


def run(args: argparse.Namespace) -> int:
    """Print the Python stack of every rank of this task on this node as JSON (its host name, and per rank: pid,
    rank, threads with their frames, or why there is none). The ranks started through node_runtime.rankmain
    recorded themselves in the task's node-local directory; each is sent the signal it registered and answers with a
    faulthandler dump, even while blocked in MPI. Other tasks' processes are never touched. Launch's hang watchdog
    runs it on every node."""
    import json

    from node_runtime.stacks import node_stacks

    print(json.dumps(node_stacks(args.tmpdir, args.timeout)))
    return 0
