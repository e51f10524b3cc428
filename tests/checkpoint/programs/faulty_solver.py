"""examples/solver.py with a store that SIGKILLs one rank at a chosen point of one step's checkpoint."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import time
from pathlib import Path
from types import ModuleType

from mpi4py import MPI

from node_runtime.checkpoint import Store, open_store
from node_runtime.checkpoint.stores import DelegatingStore


def _load_example(name: str) -> ModuleType:
    path = Path(__file__).resolve().parents[3] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


solve = _load_example("solver").solve


class KillingStore(DelegatingStore):
    """Rank ``rank`` dies just before or just after writing ``obj`` of step ``step``.

    Dying *before* its write, it first waits until another rank's object of that step is stored: nothing orders the
    other ranks' part writes before this death, so without the wait mpirun could abort them all first and leave no
    checkpoint at all instead of a torn one, depending on scheduling.
    """

    def __init__(self, inner: Store, rank: int, step: int, obj: str, before: bool) -> None:
        super().__init__(inner)
        self.rank, self.step, self.obj, self.before = rank, step, obj, before

    def put(self, name: str, data: bytes) -> None:
        hit = (MPI.COMM_WORLD.Get_rank() == self.rank and f"/{self.step:012d}." in name
               and name.endswith("/" + self.obj))
        if hit and self.before:
            where, deadline = name.rpartition("/")[0] + "/", time.monotonic() + 60
            while not set(self.inner.names(where)) - {name} and time.monotonic() < deadline:
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGKILL)
        self.inner.put(name, data)
        if hit:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default=None, help="default: $MPILAUNCH_CHECKPOINT_URL")
    p.add_argument("--cells", type=int, default=240)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--keep", type=int, default=2)
    p.add_argument("--kill-rank", type=int, default=-1)
    p.add_argument("--kill-step", type=int, default=-1)
    p.add_argument("--kill-object", default="part", help="'part' (the rank's part) or 'marker' (rank 0's COMPLETE)")
    p.add_argument("--kill-before", action="store_true")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--hold-at-end", action="store_true",
                   help="never finish: wait to be killed after the last step (so a kill trigger cannot come too late)")
    a = p.parse_args()
    store = open_store(a.checkpoint)
    if a.kill_rank >= 0:
        obj = "COMPLETE" if a.kill_object == "marker" else f"part-{a.kill_rank:05d}"
        store = KillingStore(store, a.kill_rank, a.kill_step, obj, a.kill_before)
    field = solve(a.cells, a.steps, a.every, store, a.keep)
    if a.hold_at_end:
        time.sleep(3600)
    if field is not None:
        a.out.write_text(json.dumps(field))


if __name__ == "__main__":
    main()
