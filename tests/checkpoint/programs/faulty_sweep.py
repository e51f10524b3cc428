"""A sweep for fault-injection tests: logs every computation, can kill itself or raise at a chosen point."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import time
from pathlib import Path

from node_runtime.checkpoint import run_items


def value(key: str, x: int) -> str:
    """The deterministic result of an item, which tests recompute independently."""
    return hashlib.sha256(f"{key}:{x * x}".encode()).hexdigest()[:16]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--ms", type=float, default=1.0, help="time per item")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--log", type=Path, required=True, help="directory: one line per computed item, per rank")
    p.add_argument("--kill-rank", type=int, default=-1)
    p.add_argument("--kill-after", type=int, default=0, help="SIGKILL --kill-rank after computing N items")
    p.add_argument("--kill-by-end", action="store_true",
                   help="if --kill-rank's share of the items is under --kill-after (scheduling decides it), it dies "
                        "after its last one instead while the others hold: the job fails however it was scheduled")
    p.add_argument("--die-once", type=Path, help="kill only if this file does not exist yet (then create it)")
    p.add_argument("--fail-key", default="")
    p.add_argument("--fail-rank", type=int, default=-1, help="raise on this rank's --kill-after'th item")
    p.add_argument("--all-ranks", action="store_true")
    p.add_argument("--rank-keys-differ", action="store_true")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--hold-at-end", action="store_true",
                   help="never finish: wait to be killed after the last item (so a kill trigger cannot come too late)")
    a = p.parse_args()
    from mpi4py import MPI  # not at import: tests import value(), and importing mpi4py.MPI initialises MPI,
    # making the pytest process an MPI singleton (an orted, PMIX_* in every child's environment) for the session

    rank = MPI.COMM_WORLD.Get_rank()
    if a.die_once:  # the first attempt dies, a retry of the task does not
        if a.die_once.exists():
            a.kill_rank = -1
        MPI.COMM_WORLD.Barrier()
        if rank == 0:
            a.die_once.touch()
    a.log.mkdir(parents=True, exist_ok=True)
    log = os.open(a.log / f"{os.getpid()}-r{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    computed = 0

    def work(item: tuple[str, int]) -> str:
        nonlocal computed
        key, x = item
        if key == a.fail_key or (rank == a.fail_rank and computed + 1 == a.kill_after):
            raise ValueError(f"cannot handle {x}")
        deadline = time.perf_counter() + a.ms / 1000
        while time.perf_counter() < deadline:
            time.sleep(a.ms / 4000)
        os.write(log, f"{key}\n".encode())  # unbuffered: survives SIGKILL of this process
        computed += 1
        if rank == a.kill_rank and computed == a.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        return value(key, x)

    keys = [f"k{i:05d}" for i in range(a.n + (rank if a.rank_keys_differ else 0))]
    results = run_items([(k, (k, i)) for i, k in enumerate(keys)], work, checkpoint=a.checkpoint,
                        batch=a.batch, all_ranks=a.all_ranks)
    if a.hold_at_end or (a.kill_by_end and a.kill_rank >= 0):
        if rank == a.kill_rank:  # still alive: --kill-after was more than its share; nobody has written results
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(3600)
    if results is not None:
        out = a.out if rank == 0 else a.out.with_name(f"{a.out.name}.rank{rank}")
        out.write_text(json.dumps(list(results.items())))


if __name__ == "__main__":
    main()
