"""Pure logic of work items and step checkpoints, in one process (a one-rank communicator, no MPI)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from node_runtime.checkpoint import StepCheckpoints, Store, load_committed, open_store, run_items
from node_runtime.checkpoint.stores import DelegatingStore
from node_runtime.checkpoint.workitems import _chunk
from node_runtime.errors import CheckpointError, InvalidInput


class SelfComm:
    """The one-rank subset of an mpi4py communicator the API uses."""

    def Get_rank(self) -> int:
        return 0

    def Get_size(self) -> int:
        return 1

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return obj

    def gather(self, obj: Any, root: int = 0) -> list[Any]:
        return [obj]

    def allgather(self, obj: Any) -> list[Any]:
        return [obj]


COMM = SelfComm()


def test_results_in_item_order_and_resume_skips_committed(tmp_path: Path) -> None:
    calls: list[int] = []

    def square(x: int) -> int:
        calls.append(x)
        return x * x

    items = {f"k{i}": i for i in reversed(range(50))}
    first = run_items(items, square, checkpoint=str(tmp_path), batch=8, comm=COMM)
    assert first == {k: v * v for k, v in items.items()}
    assert len(calls) == 50
    assert list(run_items(items, square, checkpoint=str(tmp_path), batch=8, comm=COMM) or {}) == list(items)
    assert len(calls) == 50  # nothing recomputed
    more = {**items, "extra": 7}
    assert (run_items(more, square, checkpoint=str(tmp_path), comm=COMM) or {})["extra"] == 49
    assert calls[50:] == [7]


def test_a_failed_item_keeps_the_finished_ones(tmp_path: Path) -> None:
    def fragile(x: int) -> int:
        if x == 30:
            raise ZeroDivisionError("boom")
        return x

    with pytest.raises(ZeroDivisionError, match="boom"):  # one rank: the exception itself propagates
        run_items([(i, i) for i in range(40)], fragile, checkpoint=str(tmp_path), batch=7, comm=COMM)
    assert sorted(load_committed(open_store(str(tmp_path)), "items").results) == list(range(30))


def test_corrupt_batch_is_reported_and_its_items_recomputed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def fails_at_15(x: int) -> str:
        if x == 15:
            raise RuntimeError("killed")
        return str(x)

    with pytest.raises(RuntimeError):  # an interrupted run: batches of 5, no snapshot
        run_items({i: i for i in range(20)}, fails_at_15, checkpoint=str(tmp_path), batch=10, comm=COMM)
    batch = sorted((tmp_path / "work/items").iterdir())[1]
    batch.write_bytes(batch.read_bytes()[:-1])
    found = load_committed(open_store(str(tmp_path)), "items")
    assert len(found.corrupt) == 1 and len(found.results) == 10 and found.snapshots == 0
    calls: list[int] = []

    def record(x: int) -> str:
        calls.append(x)
        return str(x)

    out = run_items({i: i for i in range(20)}, record, checkpoint=str(tmp_path), comm=COMM)
    assert out == {i: str(i) for i in range(20)} and sorted(calls) == [5, 6, 7, 8, 9, 15, 16, 17, 18, 19]
    assert "skipping a corrupt object" in capsys.readouterr().err
    # the completed run wrote a snapshot that merges everything, the corrupt batch included: it is not read again
    found = load_committed(open_store(str(tmp_path)), "items")
    assert (found.snapshots, found.batches, found.corrupt, len(found.results)) == (1, 0, [], 20)


class CountingStore(DelegatingStore):
    reads = 0

    def get(self, name: str) -> bytes | None:
        self.reads += 1
        return self.inner.get(name)

    def get_many(self, names: Iterable[str]) -> list[bytes | None]:
        return [self.get(n) for n in names]


def test_a_completed_run_leaves_a_snapshot_and_a_corrupt_one_falls_back(tmp_path: Path) -> None:
    items = {i: i for i in range(100)}
    run_items(items, str, checkpoint=str(tmp_path), batch=10, comm=COMM)
    run_items({**items, 100: 100}, str, checkpoint=str(tmp_path), batch=10, comm=COMM)  # one more item
    snapshots = sorted((tmp_path / "work/items").glob("snapshot-*"))
    assert len(snapshots) == 1  # the older snapshot was superseded and deleted
    counting = CountingStore(open_store(str(tmp_path)))
    found = load_committed(counting, "items")
    assert counting.reads == 1 and len(found.results) == 101 and found.duplicates == 0
    snapshots[0].write_bytes(snapshots[0].read_bytes()[:-5])
    found = load_committed(open_store(str(tmp_path)), "items")
    assert found.corrupt and found.snapshots == 0 and len(found.results) == 101 and found.duplicates == 0


def test_flush_by_time_and_no_checkpoint_mode(tmp_path: Path) -> None:
    run_items({i: i for i in range(6)}, str, checkpoint=str(tmp_path), batch=1000, flush_seconds=0, comm=COMM)
    assert len(list((tmp_path / "work/items").glob("*-r00000-*"))) == 6
    assert run_items({1: 1}, str, checkpoint=False, comm=COMM) == {1: "1"}


def test_bad_items_are_refused() -> None:
    with pytest.raises(InvalidInput, match="duplicate work item key 'a'"):
        run_items([("a", 1), ("a", 2)], str, checkpoint=False, comm=COMM)
    with pytest.raises(InvalidInput, match=r"must be \(key, item\) pairs"):
        run_items([("a", 1, 2)], str, checkpoint=False, comm=COMM)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="batch must be >= 1"):
        run_items({}, str, checkpoint=False, batch=0, comm=COMM)


def test_chunks_shrink_as_the_queue_drains() -> None:
    queue = deque(range(1000))
    sizes = []
    while queue:
        sizes.append(len(_chunk(queue, 3)))
    assert sizes[0] == 16 and sizes[-1] == 1 and sum(sizes) == 1000 and sizes == sorted(sizes, reverse=True)


def test_steps_save_restore_and_keep(tmp_path: Path) -> None:
    ck = StepCheckpoints(str(tmp_path), name="s", keep=2, comm=COMM)
    assert ck.restore() is None and ck.latest() is None
    for step in (10, 20, 30):
        ck.save(step, {"x": step})
    assert ck.latest() == 30
    again = StepCheckpoints(str(tmp_path), name="s", comm=COMM)
    assert again.restore() == (30, {"x": 30})
    assert [p.name.split(".")[0] for p in sorted((tmp_path / "steps/s").iterdir())] == ["000000000020",
                                                                                        "000000000030"]
    with pytest.raises(InvalidInput, match="step must be an int >= 0"):
        ck.save(-1, None)


class FailingStore(DelegatingStore):
    def __init__(self, inner: Store, fail_suffix: str) -> None:
        super().__init__(inner)
        self.fail_suffix = fail_suffix

    def put(self, name: str, data: bytes) -> None:
        if name.endswith(self.fail_suffix):
            raise CheckpointError("disk full (simulated)")
        self.inner.put(name, data)


@pytest.mark.parametrize("failing", ["part-00000", "COMPLETE"])
def test_failed_save_is_all_or_nothing(tmp_path: Path, failing: str) -> None:
    StepCheckpoints(str(tmp_path), comm=COMM).save(1, "one")
    ck = StepCheckpoints(FailingStore(open_store(str(tmp_path)), failing), comm=COMM)
    with pytest.raises(CheckpointError, match="step 2 was not saved") as err:
        ck.save(2, "two")
    assert "disk full (simulated)" in str(err.value)
    assert StepCheckpoints(str(tmp_path), comm=COMM).restore() == (1, "one")


def test_corrupt_newest_step_falls_back(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ck = StepCheckpoints(str(tmp_path), keep=3, comm=COMM)
    ck.save(1, "one")
    ck.save(2, "two")
    part = next((tmp_path / "steps/steps").glob("000000000002.*/part-00000"))
    data = bytearray(part.read_bytes())
    data[-2] ^= 0xFF
    part.write_bytes(bytes(data))
    assert StepCheckpoints(str(tmp_path), comm=COMM).restore() == (1, "one")
    assert "skipping checkpoint of step 2" in capsys.readouterr().err


class SlowStore(DelegatingStore):
    """Writes take a while; records how many results were finished but not yet durable at each moment."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.durable = 0
        self.finished = 0
        self.worst = 0

    def put(self, name: str, data: bytes) -> None:
        import pickle
        import time

        from node_runtime.checkpoint.stores import unseal

        time.sleep(0.01)
        super().put(name, data)
        if "snapshot-" not in name:
            self.durable += len(pickle.loads(unseal(data, name)))


def test_at_most_batch_results_are_ever_uncommitted(tmp_path: Path) -> None:
    store = SlowStore(open_store(str(tmp_path)))

    def work(x: int) -> int:
        store.finished += 1
        store.worst = max(store.worst, store.finished - store.durable)
        return x

    out = run_items({i: i for i in range(200)}, work, checkpoint=store, batch=8, comm=COMM)
    assert out == {i: i for i in range(200)} and store.durable == 200
    assert 4 < store.worst <= 8  # writes overlapped the work, and never more than `batch` results were at risk


def test_restore_after_a_save_never_returns_a_stale_checkpoint(tmp_path: Path) -> None:
    """restore() looks again after save(); if nothing verifies then, the answer is None, not the earlier result."""
    ck = StepCheckpoints(str(tmp_path), keep=1, comm=COMM)
    ck.save(1, "one")
    assert ck.restore() == (1, "one")
    ck.save(2, "two")  # keep=1: step 1 is gone
    part = next((tmp_path / "steps/steps").glob("000000000002.*/part-00000"))
    part.write_bytes(part.read_bytes()[:-3])  # torn
    assert ck.restore() is None
