"""Exactly-once work items: run keyed items through a function on all ranks, resumably.

Rank 0 is both a worker and the dispatcher: between its own items it answers the other ranks' requests for chunks of
item indices (guided self-scheduling, so chunks shrink as the queue drains). Each rank commits its results in
batches: one sealed, create-only object per half ``batch`` of results, named ``work/NAME/RUN-rRANK-SEQ``, written by
a background thread while the next half fills, so at most ``batch`` finished results per rank are lost to a kill.
On a re-run rank 0 reads every committed batch, skips those items, and dispatches only the rest. At the end rank 0
(or every rank) gets all results in item order.
"""

from __future__ import annotations

import hashlib
import pickle
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from node_runtime.checkpoint._mpi import abort, beat, new_run_id, say, world
from node_runtime.checkpoint.location import open_store
from node_runtime.checkpoint.stores import Store, seal, unseal
from node_runtime.errors import CheckpointError, InvalidInput

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
R = TypeVar("R")

TAG_REQUEST = 7301
TAG_CHUNK = 7302
MAX_CHUNK = 16
IDLE_POLL_SECONDS = 0.0005
SNAPSHOT = "snapshot-"


@dataclass
class Committed:
    """What a store holds for one work collection."""

    results: dict[Any, Any] = field(default_factory=dict)
    batches: int = 0  # batch objects read (those not already merged into a snapshot)
    snapshots: int = 0  # snapshot objects read
    objects: list[str] = field(default_factory=list)  # every object listed: what a new snapshot supersedes
    corrupt: list[str] = field(default_factory=list)  # objects skipped because they failed verification
    duplicates: int = 0  # keys committed more than once (never expected; tests assert 0)

    def add(self, pairs: Iterable[tuple[Any, Any]]) -> None:
        for key, result in pairs:
            if key in self.results:
                self.duplicates += 1
            else:
                self.results[key] = result


def batch_prefix(name: str) -> str:
    return f"work/{name}/"


def _is_snapshot(obj: str) -> bool:
    return obj.rpartition("/")[2].startswith(SNAPSHOT)


def _verified(found: Committed, obj: str, data: bytes | None, what: str) -> Any:
    """The unpickled payload of ``obj``, or None (missing, or corrupt: then recorded in ``found.corrupt``)."""
    if data is None:
        return None
    try:
        return pickle.loads(unseal(data, f"{what} {obj!r}"))  # noqa: S301 - our own store, checksummed
    except CheckpointError as e:
        found.corrupt.append(f"{obj}: {e}")
        return None


def load_committed(store: Store, name: str) -> Committed:
    """Read and verify what collection ``name`` committed; corrupt objects are reported and skipped.

    The newest valid snapshot (written when a run completes) is read first; the batches it merged are not read again.
    """
    found = Committed(objects=store.names(batch_prefix(name)))
    merged: set[str] = set()
    for obj in sorted((o for o in found.objects if _is_snapshot(o)), reverse=True):
        doc = None if obj in merged else _verified(found, obj, store.get(obj), "snapshot")
        if doc is not None:
            found.snapshots += 1
            merged.update(doc["merged"])
            found.add(doc["results"])
    batches = [o for o in found.objects if o not in merged and not _is_snapshot(o)]
    for obj, data in zip(batches, store.get_many(batches), strict=True):
        pairs = _verified(found, obj, data, "batch")
        if pairs is not None:
            found.batches += 1
            found.add(pairs)
    return found


def write_snapshot(store: Store, name: str, run: str, results: dict[Any, Any], merged: list[str]) -> None:
    """Merge a completed collection into one object, so that a re-run reads one object instead of every batch.

    Created before anything is deleted; only older snapshots are then deleted (batches stay, listed as merged).
    """
    doc = {"merged": sorted(merged), "results": list(results.items())}
    store.put(f"{batch_prefix(name)}{SNAPSHOT}{run}", seal(pickle.dumps(doc, protocol=pickle.HIGHEST_PROTOCOL)))
    for obj in merged:
        if _is_snapshot(obj):
            store.delete(obj)


def _put(store: Store, name: str, data: bytes) -> None:
    """A commit: the object, then a heartbeat for launch's hang watchdog."""
    store.put(name, data)
    beat()


class _Batcher:
    """Commits this rank's results so that at most ``limit`` finished results are ever uncommitted.

    With ``limit`` >= 2 a background thread writes each object of ``limit // 2`` results while the next half fills,
    so commit latency (fsync, a blob round trip) overlaps the computation; with ``limit`` 1 writes are synchronous.
    ``seconds`` also triggers a commit, so slow items are committed regularly.
    """

    def __init__(self, store: Store | None, prefix: str, limit: int, seconds: float) -> None:
        self.store, self.prefix, self.seconds = store, prefix, seconds
        self.size = max(1, limit // 2)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint") if store and limit >= 2 else None
        self.inflight: Future[None] | None = None
        self.pending: list[tuple[Any, Any]] = []
        self.written: list[str] = []
        self.seq = 0
        self.last = time.monotonic()

    def add(self, key: Any, result: Any) -> None:
        if self.store is None:
            return
        self.pending.append((key, result))
        if len(self.pending) >= self.size or time.monotonic() - self.last >= self.seconds:
            self._commit()

    def _commit(self) -> None:
        assert self.store is not None
        self._wait()
        data = seal(pickle.dumps(self.pending, protocol=pickle.HIGHEST_PROTOCOL))
        name = f"{self.prefix}-{self.seq:06d}"
        self.written.append(name)
        self.seq += 1
        self.pending = []
        self.last = time.monotonic()
        if self.pool is None:
            _put(self.store, name, data)
        else:
            self.inflight = self.pool.submit(_put, self.store, name, data)

    def _wait(self) -> None:
        inflight, self.inflight = self.inflight, None
        if inflight is not None:
            inflight.result()  # re-raises the write's CheckpointError here, in the rank's thread

    def flush(self) -> None:
        """Make every result added so far durable."""
        if self.store is not None and self.pending:
            self._commit()
        self._wait()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)


def _pairs(items: Mapping[K, V] | Iterable[tuple[K, V]]) -> list[tuple[K, V]]:
    pairs: list[Any] = list(items.items()) if isinstance(items, Mapping) else [tuple(p) for p in items]
    seen: set[Any] = set()
    for pair in pairs:
        if len(pair) != 2:
            raise InvalidInput(f"work items must be (key, item) pairs or a mapping; got {pair!r:.80}")
        if pair[0] in seen:
            raise InvalidInput(f"duplicate work item key {pair[0]!r}: keys identify results and must be unique")
        seen.add(pair[0])
    return pairs


def _chunk(queue: deque[int], ranks: int) -> list[int]:
    n = max(1, min(MAX_CHUNK, len(queue) // (2 * ranks)))
    return [queue.popleft() for _ in range(min(n, len(queue)))]


class _Runner:
    def __init__(self, comm: Any, pairs: list[Any], fn: Callable[[Any], Any], batcher: _Batcher) -> None:
        self.comm, self.pairs, self.fn, self.batcher = comm, pairs, fn, batcher
        self.done: dict[int, Any] = {}

    def do(self, index: int) -> None:
        key, item = self.pairs[index]
        try:
            result = self.fn(item)
        except Exception as e:
            self._flush_quietly()
            abort(self.comm, e, f"work item {key!r} raised {type(e).__name__}")
        self.done[index] = result
        try:
            self.batcher.add(key, result)
        except CheckpointError as e:
            abort(self.comm, e, "cannot commit results")

    def _flush_quietly(self) -> None:
        try:
            self.batcher.flush()  # keep what this rank finished: a re-run need not redo it
        except CheckpointError as e:
            say(self.comm, f"could not commit finished results before aborting: {e}")

    def dispatch_and_work(self, queue: deque[int]) -> None:
        """Rank 0: answer chunk requests between own items until the queue is empty and every worker is told so."""
        comm, size = self.comm, self.comm.Get_size()
        if size == 1:
            while queue:
                self.do(queue.popleft())
            return
        from mpi4py import MPI

        status = MPI.Status()
        stopped = 0
        while stopped < size - 1 or queue:
            while comm.Iprobe(source=MPI.ANY_SOURCE, tag=TAG_REQUEST, status=status):
                source = status.Get_source()
                comm.recv(source=source, tag=TAG_REQUEST)
                chunk = _chunk(queue, size)
                comm.send(chunk, dest=source, tag=TAG_CHUNK)
                beat()  # a worker finished its chunk: progress, wherever it runs
                stopped += not chunk
            if queue:
                self.do(queue.popleft())
            elif stopped < size - 1:
                time.sleep(IDLE_POLL_SECONDS)  # don't spin: nodes are often oversubscribed

    def work(self) -> None:
        """Ranks > 0: ask for a chunk, ask for the next one before working (so it is there when needed)."""
        comm = self.comm
        comm.send(None, dest=0, tag=TAG_REQUEST)
        chunk = comm.recv(source=0, tag=TAG_CHUNK)
        while chunk:
            comm.send(None, dest=0, tag=TAG_REQUEST)
            for index in chunk:
                self.do(index)
            chunk = comm.recv(source=0, tag=TAG_CHUNK)


def _same_everywhere(comm: Any, pairs: list[Any]) -> None:
    digest = hashlib.sha256(pickle.dumps([k for k, _ in pairs], protocol=4)).hexdigest()
    digests = comm.allgather(digest)
    odd = [r for r, d in enumerate(digests) if d != digests[0]]
    if odd:
        raise InvalidInput(f"work item keys differ between ranks (rank(s) {odd} disagree with rank 0): "
                           "every rank must pass the same items in the same order")


def _plan(comm: Any, store: Store | None, name: str, pairs: list[Any]) -> tuple[Committed, deque[int]]:
    """Rank 0: what is committed already, and the queue of item indices still to compute."""
    committed = Committed()
    try:
        if store is not None:
            committed = load_committed(store, name)
    except CheckpointError as e:
        abort(comm, e, f"cannot read committed results of {name!r}")
    for problem in committed.corrupt:
        say(comm, f"skipping a corrupt object (its items are recomputed): {problem}")
    queue = deque(i for i, (key, _) in enumerate(pairs) if key not in committed.results)
    if store is not None and len(queue) < len(pairs):
        say(comm, f"{name}: {len(pairs) - len(queue)} of {len(pairs)} items already committed in "
                  f"{store.location}; computing {len(queue)}")
    return committed, queue


def _assemble(comm: Any, store: Store | None, name: str, run: str, *, pairs: list[Any], committed: Committed,
              gathered: list[tuple[dict[int, Any], list[str]]]) -> dict[Any, Any]:
    """Rank 0: every result in item order; then (best effort) the snapshot that makes the next re-run cheap."""
    new = {pairs[i][0]: r for done, _ in gathered for i, r in done.items()}
    missing = [k for k, _ in pairs if k not in new and k not in committed.results]
    if missing:  # would be a bug in the dispatcher; never return partial results silently
        abort(comm, CheckpointError(f"{len(missing)} work items have no result, e.g. {missing[0]!r}"), "internal")
    written = [obj for _, names in gathered for obj in names]
    if store is not None and (written or committed.batches or committed.snapshots > 1):
        try:
            write_snapshot(store, name, run, {**committed.results, **new}, committed.objects + written)
        except CheckpointError as e:  # an optimisation only: every result is committed in its batch already
            say(comm, f"could not write the snapshot of {name!r} (re-runs will read every batch): {e}")
    return {k: new[k] if k in new else committed.results[k] for k, _ in pairs}


def run_items(items: Mapping[K, V] | Iterable[tuple[K, V]], fn: Callable[[V], R], *,
              checkpoint: str | Store | Literal[False] | None = None, name: str = "items", batch: int = 64,
              flush_seconds: float = 10.0, all_ranks: bool = False, comm: Any = None) -> dict[K, R] | None:
    """Compute ``fn(item)`` for every ``(key, item)``, once, across all ranks; collective.

    ``checkpoint``: a store URL, a Store, None for ``$MPILAUNCH_CHECKPOINT_URL``, or False for no checkpointing.
    ``name`` separates collections sharing a location. ``batch`` bounds the finished results per rank that a kill
    can lose (they are committed in halves of it, in the background, and at least every ``flush_seconds``).
    Returns ``{key: result}`` in item order on rank 0 (on every rank if ``all_ranks``), None elsewhere. If ``fn``
    raises on any rank the job is aborted with the item's key and traceback on stderr (in a single-process run the
    exception propagates).
    """
    if batch < 1:
        raise InvalidInput(f"batch must be >= 1, got {batch!r}")
    comm = world(comm)
    rank = comm.Get_rank()
    pairs = _pairs(items)
    _same_everywhere(comm, pairs)
    store = None if checkpoint is False else checkpoint if isinstance(checkpoint, Store) else open_store(checkpoint)
    committed, queue = _plan(comm, store, name, pairs) if rank == 0 else (Committed(), deque[int]())
    run = comm.bcast(new_run_id() if rank == 0 else None, root=0)
    runner = _Runner(comm, pairs, fn, _Batcher(store, f"{batch_prefix(name)}{run}-r{rank:05d}", batch,
                                                flush_seconds))
    try:
        if rank == 0:
            runner.dispatch_and_work(queue)
        else:
            runner.work()
        try:
            runner.batcher.flush()
        except CheckpointError as e:
            abort(comm, e, "cannot commit results")
    finally:
        runner.batcher.close()
    gathered = comm.gather((runner.done, runner.batcher.written), root=0)
    results = (_assemble(comm, store, name, run, pairs=pairs, committed=committed, gathered=gathered)
               if rank == 0 else None)
    return comm.bcast(results, root=0) if all_ranks else results
