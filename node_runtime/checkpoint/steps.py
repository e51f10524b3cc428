"""Step checkpoints for iterative solvers: all-or-nothing collective save, restore of the newest valid one.

Layout under the store: ``steps/NAME/STEP.RUN/part-RANK`` (one sealed object per rank) and ``steps/NAME/STEP.RUN/
COMPLETE``, the completion marker. Rank 0 writes the marker only after every rank reported its part durable; the
marker records the number of ranks and each part's SHA-256 and size. A checkpoint without a marker never counts. On
restore the candidates are tried newest first: every rank verifies its part against the marker (and the part's own
seal) and the ranks agree collectively; if any part is missing or corrupt, the checkpoint is reported and skipped.
"""

from __future__ import annotations

import datetime
import json
import pickle
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from node_runtime.checkpoint._mpi import beat, new_run_id, say, world
from node_runtime.checkpoint.location import open_store
from node_runtime.checkpoint.stores import Store, seal, sha256, unseal
from node_runtime.errors import CheckpointError, InvalidInput

MARKER = "COMPLETE"
FORMAT = 1


@dataclass(frozen=True)
class Marker:
    step: int
    run: str
    parts: tuple[tuple[str, int], ...]  # (sha256, size) of each rank's part, by rank

    @property
    def ranks(self) -> int:
        return len(self.parts)

    def to_bytes(self, name: str) -> bytes:
        doc = {"format": FORMAT, "name": name, "step": self.step, "run": self.run, "ranks": self.ranks,
               "parts": [{"sha256": h, "bytes": n} for h, n in self.parts],
               "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        return seal(json.dumps(doc, indent=1).encode())

    @classmethod
    def from_bytes(cls, data: bytes, what: str, step: int, run: str) -> Marker:
        doc = json.loads(unseal(data, what))
        parts = tuple((p["sha256"], int(p["bytes"])) for p in doc["parts"])
        if doc.get("format") != FORMAT or doc["step"] != step or doc["run"] != run or doc["ranks"] != len(parts):
            raise CheckpointError(f"{what} does not match its location (format {doc.get('format')!r})")
        return cls(step, run, parts)


def _split_dir(dirname: str) -> tuple[int, str] | None:
    step, dot, run = dirname.partition(".")
    return (int(step), run) if dot and step.isdigit() and run else None


class StepCheckpoints:
    """Collective checkpoints of per-rank solver state; every method must be called by all ranks."""

    def __init__(self, checkpoint: str | Store | None = None, *, name: str = "steps", keep: int = 2,
                 comm: Any = None) -> None:
        if keep < 1:
            raise InvalidInput(f"keep must be >= 1, got {keep!r}")
        self.comm = world(comm)
        self.store = checkpoint if isinstance(checkpoint, Store) else open_store(checkpoint)
        self.name, self.keep = name, keep
        self._run: str | None = None
        self._restored: tuple[int, Any] | None = None
        self._looked = False

    def _prefix(self) -> str:
        return f"steps/{self.name}/"

    def _dir(self, step: int, run: str) -> str:
        return f"{self._prefix()}{step:012d}.{run}"

    def save(self, step: int, state: Any) -> None:
        """Save this rank's ``state`` for ``step``; returns once the checkpoint is complete on every rank.

        All-or-nothing: if any rank fails to write its part, no marker is written and every rank raises
        CheckpointError (the previous checkpoints stay usable).
        """
        if not isinstance(step, int) or step < 0:
            raise InvalidInput(f"checkpoint step must be an int >= 0, got {step!r}")
        comm, rank = self.comm, self.comm.Get_rank()
        if self._run is None:
            self._run = comm.bcast(new_run_id() if rank == 0 else None, root=0)
        where = self._dir(step, self._run)
        data = seal(pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))
        try:
            self.store.put(f"{where}/part-{rank:05d}", data)
            mine = (sha256(data), len(data), "")
        except CheckpointError as e:
            mine = ("", 0, str(e))
        parts = comm.gather(mine, root=0)
        error = None
        if rank == 0:
            failed = [f"rank {r}: {err}" for r, (_, _, err) in enumerate(parts) if err]
            try:
                if not failed:
                    self.store.put(f"{where}/{MARKER}", Marker(step, self._run, tuple((h, n) for h, n, _ in parts))
                                   .to_bytes(self.name))
            except CheckpointError as e:
                failed.append(f"rank 0 (completion marker): {e}")
            error = failed or None
            if not failed:
                self._cleanup(step, self._run)
        error = comm.bcast(error, root=0)
        if not error:
            beat()  # for launch's hang watchdog: a checkpoint was committed
        self._looked = False  # the newest checkpoint may have changed: restore()/latest() look again
        if error:
            raise CheckpointError(f"checkpoint of step {step} was not saved (earlier ones are intact)", details=error)

    def _cleanup(self, step: int, run: str) -> None:
        """Rank 0: keep the newest ``keep`` complete checkpoints; drop older ones and torn leftovers older than now."""
        try:
            by_dir: dict[str, list[str]] = defaultdict(list)
            for obj in self.store.names(self._prefix()):
                by_dir[obj.rpartition("/")[0]].append(obj)
            keyed = sorted(((k, d) for d in by_dir if (k := _split_dir(d.rpartition("/")[2]))), reverse=True)
            complete = [d for _, d in keyed if f"{d}/{MARKER}" in by_dir[d]]
            drop = set(complete[self.keep:])
            drop |= {d for k, d in keyed if k < (step, run) and d not in complete}
            for d in sorted(drop):
                objs = sorted(by_dir[d], key=lambda o: not o.endswith("/" + MARKER))  # marker first
                for obj in objs:
                    self.store.delete(obj)
        except CheckpointError as e:
            say(self.comm, f"old checkpoints not cleaned up (the new one is saved): {e}")

    def _candidates(self) -> list[Marker]:
        """Rank 0: the verified markers, newest first; unreadable markers are reported and skipped."""
        markers = [o for o in self.store.names(self._prefix()) if o.endswith("/" + MARKER)]
        found = []
        for obj, data in zip(markers, self.store.get_many(markers), strict=True):
            key = _split_dir(obj.rsplit("/", 2)[1])
            if key is None or data is None:
                continue
            try:
                found.append(Marker.from_bytes(data, f"completion marker {obj!r}", *key))
            except (CheckpointError, ValueError, KeyError, TypeError) as e:
                say(self.comm, f"skipping checkpoint {obj.rpartition('/')[0]!r}: bad marker: {e}")
        return sorted(found, key=lambda m: (m.step, m.run), reverse=True)

    def _load_part(self, marker: Marker) -> tuple[Any, str]:
        rank = self.comm.Get_rank()
        obj = f"{self._dir(marker.step, marker.run)}/part-{rank:05d}"
        try:
            data = self.store.get(obj)
            if data is None:
                return None, f"rank {rank}: part {obj!r} is missing"
            if sha256(data) != marker.parts[rank][0] or len(data) != marker.parts[rank][1]:
                return None, f"rank {rank}: part {obj!r} does not match the checksum in its marker"
            return pickle.loads(unseal(data, f"part {obj!r}")), ""  # noqa: S301 - our own store, checksummed
        except CheckpointError as e:
            return None, f"rank {rank}: {e}"

    def restore(self) -> tuple[int, Any] | None:
        """``(step, this rank's state)`` of the newest checkpoint that verifies on every rank, or None."""
        if self._looked:
            return self._restored
        self._restored = None  # a fresh look: an earlier answer may have been deleted or corrupted since
        comm, rank, size = self.comm, self.comm.Get_rank(), self.comm.Get_size()
        candidates: list[Marker] | str = []
        if rank == 0:
            try:
                candidates = self._candidates()
            except CheckpointError as e:
                candidates = str(e)
        candidates = comm.bcast(candidates, root=0)
        if isinstance(candidates, str):
            raise CheckpointError(candidates)
        for marker in candidates:
            if marker.ranks != size:
                raise CheckpointError(f"the newest complete checkpoint (step {marker.step}) was saved by "
                                      f"{marker.ranks} ranks but this job has {size}: run with {marker.ranks} ranks "
                                      "or use a new checkpoint name")
            state, problem = self._load_part(marker)
            problems = comm.gather(problem, root=0)
            if rank == 0 and any(problems):
                say(comm, f"skipping checkpoint of step {marker.step} (run {marker.run}): "
                          + "; ".join(p for p in problems if p))
            if comm.bcast(not any(problems) if rank == 0 else None, root=0):
                self._restored = (marker.step, state)
                break
        self._looked = True
        return self._restored

    def latest(self) -> int | None:
        """The step :meth:`restore` returns (verifying it the same way), or None."""
        found = self.restore()
        return found[0] if found else None
