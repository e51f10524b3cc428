"""Exactly-once work items: run keyed items through a function on all ranks, resumably.

Rank 0 is both a worker and the dispatcher: between its own items it answers the other ranks' requests for chunks of
item indices (guided self-scheduling, so chunks shrink as the queue drains). Each rank commits its results in batches:
one sealed, create-only object per batch, named ``work/NAME/RUN-rRANK-SEQ``. A batch is the unit of atomicity: after a
kill, at most one uncommitted batch per rank is recomputed. On a re-run rank 0 reads every committed batch, skips
those items, and dispatches only the rest. At the end rank 0 (or every rank) gets all results in item order.
"""

from __future__ import annotations

import hashlib
import pickle
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from mpilaunch.errors import CheckpointError, InvalidInput
from node_runtime.checkpoint._mpi import abort, new_run_id, say, world
from node_runtime.checkpoint.stores import Store, open_store, seal, unseal

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
R = TypeVar("R")

TAG_REQUEST = 7301
TAG_CHUNK = 7302
MAX_CHUNK = 16
IDLE_POLL_SECONDS = 0.0005


@dataclass
class Committed:
    """What a store holds for one work collection."""

    results: dict[Any, Any] = field(default_factory=dict)
    batches: int = 0
    corrupt: list[str] = field(default_factory=list)  # batch objects skipped because they failed verification
    duplicates: int = 0  # keys committed more than once (never expected; tests assert 0)


def batch_prefix(name: str) -> str:
    return f"work/{name}/"


def load_committed(store: Store, name: str) -> Committed:
    """Read and verify every committed batch of collection ``name``; corrupt batches are reported and skipped."""
    names = store.names(batch_prefix(name))
    found = Committed()
    for obj, data in zip(names, store.get_many(names), strict=True):
        if data is None:
            continue
        try:
            pairs = pickle.loads(unseal(data, f"batch {obj!r}"))  # noqa: S301 - our own store, checksummed
        except CheckpointError as e:
            found.corrupt.append(f"{obj}: {e}")
            continue
        found.batches += 1
        for key, result in pairs:
            if key in found.results:
                found.duplicates += 1
            else:
                found.results[key] = result
    return found


class _Batcher:
    """Buffers this rank's results and commits them as one object per ``size`` results (or per ``seconds``)."""

    def __init__(self, store: Store | None, prefix: str, size: int, seconds: float) -> None:
        self.store, self.prefix, self.size, self.seconds = store, prefix, size, seconds
        self.pending: list[tuple[Any, Any]] = []
        self.seq = 0
        self.last = time.monotonic()

    def add(self, key: Any, result: Any) -> None:
        if self.store is None:
            return
        self.pending.append((key, result))
        if len(self.pending) >= self.size or time.monotonic() - self.last >= self.seconds:
            self.flush()

    def flush(self) -> None:
        if self.store is None or not self.pending:
            return
        data = seal(pickle.dumps(self.pending, protocol=pickle.HIGHEST_PROTOCOL))
        self.store.put(f"{self.prefix}-{self.seq:06d}", data)
        self.seq += 1
        self.pending = []
        self.last = time.monotonic()


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


def run_items(items: Mapping[K, V] | Iterable[tuple[K, V]], fn: Callable[[V], R], *,
              checkpoint: str | Store | Literal[False] | None = None, name: str = "items", batch: int = 64,
              flush_seconds: float = 10.0, all_ranks: bool = False, comm: Any = None) -> dict[K, R] | None:
    """Compute ``fn(item)`` for every ``(key, item)``, once, across all ranks; collective.

    ``checkpoint``: a store URL, a Store, None for ``$MPILAUNCH_CHECKPOINT_URL``, or False for no checkpointing.
    ``name`` separates collections sharing a location. Results are committed every ``batch`` items or
    ``flush_seconds`` per rank. Returns ``{key: result}`` in item order on rank 0 (on every rank if ``all_ranks``),
    None elsewhere. If ``fn`` raises on any rank the job is aborted with the item's key and traceback on stderr
    (in a single-process run the exception propagates).
    """
    if batch < 1:
        raise InvalidInput(f"batch must be >= 1, got {batch!r}")
    comm = world(comm)
    rank = comm.Get_rank()
    pairs = _pairs(items)
    _same_everywhere(comm, pairs)
    store = None if checkpoint is False else checkpoint if isinstance(checkpoint, Store) else open_store(checkpoint)
    committed = Committed()
    queue: deque[int] = deque()
    if rank == 0:
        try:
            committed = load_committed(store, name) if store is not None else Committed()
        except CheckpointError as e:
            abort(comm, e, f"cannot read committed results of {name!r}")
        for problem in committed.corrupt:
            say(comm, f"skipping a corrupt batch (its items are recomputed): {problem}")
        queue.extend(i for i, (key, _) in enumerate(pairs) if key not in committed.results)
        if store is not None and len(queue) < len(pairs):
            say(comm, f"{name}: {len(pairs) - len(queue)} of {len(pairs)} items already committed in "
                      f"{store.location}; computing {len(queue)}")
    run = comm.bcast(new_run_id() if rank == 0 else None, root=0)
    runner = _Runner(comm, pairs, fn, _Batcher(store, f"{batch_prefix(name)}{run}-r{rank:05d}", batch,
                                                flush_seconds))
    if rank == 0:
        runner.dispatch_and_work(queue)
    else:
        runner.work()
    try:
        runner.batcher.flush()
    except CheckpointError as e:
        abort(comm, e, "cannot commit results")
    gathered = comm.gather(runner.done, root=0)
    results: dict[K, R] | None = None
    if rank == 0:
        new = {pairs[i][0]: r for part in gathered for i, r in part.items()}
        missing = [k for k, _ in pairs if k not in new and k not in committed.results]
        if missing:  # would be a bug in the dispatcher; never return partial results silently
            abort(comm, CheckpointError(f"{len(missing)} work items have no result, e.g. {missing[0]!r}"), "internal")
        results = {k: new[k] if k in new else committed.results[k] for k, _ in pairs}
    return comm.bcast(results, root=0) if all_ranks else results
