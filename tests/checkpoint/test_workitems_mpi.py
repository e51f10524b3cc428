"""Exactly-once work items under real ``mpirun -np 3``: clean runs, killed ranks, killed jobs, failing items."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from node_runtime.checkpoint import load_committed, open_store
from tests.checkpoint.conftest import blob_container_url
from tests.checkpoint.mpirun import EXAMPLES, PROGRAMS, Run, mpirun
from tests.checkpoint.programs.faulty_sweep import value

SWEEP = PROGRAMS / "faulty_sweep.py"
RANKS = 3
pytestmark = pytest.mark.slow


def expected(n: int) -> list[list[str]]:
    return [[f"k{i:05d}", value(f"k{i:05d}", i)] for i in range(n)]


def computations(log: Path) -> Counter[str]:
    return Counter(line for f in log.glob("*.log") for line in f.read_text().split())


def sweep(tmp: Path, ckpt: str, *extra: str, n: int = 300, batch: int = 16, timeout: float = 120,
          kill_when: Callable[[], bool] | None = None) -> Run:
    return mpirun(SWEEP, "--checkpoint", ckpt, "--n", str(n), "--batch", str(batch), "--log", str(tmp / "log"),
                  "--out", str(tmp / "out.json"), *extra, timeout=timeout, kill_when=kill_when)


def assert_exactly_once(tmp: Path, ckpt: str, n: int, batch: int) -> int:
    """Final results equal a clean run, every item committed exactly once; returns the number of items redone."""
    assert json.loads((tmp / "out.json").read_text()) == expected(n)
    committed = load_committed(open_store(ckpt), "items")
    assert committed.duplicates == 0 and not committed.corrupt
    assert sorted(committed.results) == [f"k{i:05d}" for i in range(n)]
    done = computations(tmp / "log")
    assert set(done) == {f"k{i:05d}" for i in range(n)}
    redone = sum(done.values()) - n
    assert redone <= RANKS * batch, f"{redone} items recomputed, more than ranks x batch = {RANKS * batch}"
    return redone


def test_clean_run_computes_each_item_once_and_returns_them_in_order(tmp_path: Path) -> None:
    run = sweep(tmp_path, str(tmp_path / "ck"), "--all-ranks")
    assert run.returncode == 0, run.stderr
    assert assert_exactly_once(tmp_path, str(tmp_path / "ck"), 300, 16) == 0
    for r in (1, 2):  # all_ranks=True: every rank has the complete results
        assert json.loads((tmp_path / f"out.json.rank{r}").read_text()) == expected(300)
    assert len(computations(tmp_path / "log")) == 300
    # a re-run of a finished sweep computes nothing
    again = sweep(tmp_path, str(tmp_path / "ck"))
    assert again.returncode == 0 and "300 of 300 items already committed" in again.stderr
    assert sum(computations(tmp_path / "log").values()) == 300


@pytest.mark.parametrize("seed", range(8))
def test_killed_rank_then_rerun_loses_and_duplicates_nothing(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    ckpt, n, batch = str(tmp_path / "ck"), 300, rng.choice([4, 16, 32])
    first = sweep(tmp_path, ckpt, "--kill-rank", str(rng.randrange(RANKS)), "--kill-after",
                  str(rng.randrange(1, 80)), "--kill-by-end", batch=batch)  # a rank's share is 100 +- scheduling
    assert first.returncode != 0 and not (tmp_path / "out.json").exists()
    second = sweep(tmp_path, ckpt, batch=batch)
    assert second.returncode == 0, second.stderr
    assert_exactly_once(tmp_path, ckpt, n, batch)


@pytest.mark.parametrize("seed", range(8))
def test_whole_job_killed_at_random_point_then_rerun_is_exact(tmp_path: Path, seed: int) -> None:
    """mpirun and every rank SIGKILLed at once (a node loss) once a seeded number of items is computed."""
    rng = random.Random(1000 + seed)
    ckpt, n, batch = str(tmp_path / "ck"), 400, 16
    progress = rng.randrange(5, n - 40)
    first = sweep(tmp_path, ckpt, "--ms", "3", "--hold-at-end", n=n, batch=batch,  # cannot finish before the kill
                  kill_when=lambda: sum(computations(tmp_path / "log").values()) >= progress)
    assert first.killed and not (tmp_path / "out.json").exists()
    second = sweep(tmp_path, ckpt, n=n, batch=batch)
    assert second.returncode == 0, second.stderr
    assert_exactly_once(tmp_path, ckpt, n, batch)


def test_failing_item_aborts_the_job_with_its_key_and_keeps_finished_work(tmp_path: Path) -> None:
    ckpt = str(tmp_path / "ck")
    run = sweep(tmp_path, ckpt, "--fail-key", "k00150", timeout=60)
    assert run.returncode != 0
    assert "work item 'k00150' raised ValueError" in run.stderr
    assert "ValueError: cannot handle 150" in run.stderr  # the traceback is there
    assert not (tmp_path / "out.json").exists()
    kept = load_committed(open_store(ckpt), "items").results
    assert "k00150" not in kept
    # How far the other ranks got before the abort depends on scheduling; what is kept does not: the failing rank
    # commits everything it finished before aborting, the others lose at most the batch they were filling (+1 item
    # logged but not yet handed to the batcher when killed).
    failing = re.search(r"rank (\d+): work item 'k00150' raised", run.stderr)
    assert failing, run.stderr
    logs = sorted((tmp_path / "log").glob("*.log"))
    assert len(logs) == RANKS
    for log in logs:
        lost = set(log.read_text().split()) - set(kept)
        assert len(lost) <= (0 if log.name.endswith(f"-r{failing[1]}.log") else 16 + 1), (log.name, sorted(lost))
    rerun = sweep(tmp_path, ckpt)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(kept)} of 300 items already committed" in rerun.stderr
    assert json.loads((tmp_path / "out.json").read_text()) == expected(300)


@pytest.mark.parametrize("rank", [0, 2])
def test_failure_on_the_dispatcher_or_a_worker_ends_the_job_without_hanging(tmp_path: Path, rank: int) -> None:
    run = sweep(tmp_path, str(tmp_path / "ck"), "--fail-rank", str(rank), "--kill-after", "30", timeout=60)
    assert run.returncode != 0
    assert f"[mpilaunch checkpoint] rank {rank}: work item 'k" in run.stderr and "raised ValueError" in run.stderr


def test_ranks_with_different_items_fail_clearly(tmp_path: Path) -> None:
    run = sweep(tmp_path, str(tmp_path / "ck"), "--rank-keys-differ", timeout=60)
    assert run.returncode != 0
    assert "work item keys differ between ranks (rank(s) [1, 2] disagree with rank 0)" in run.stderr


@pytest.mark.azurite
@pytest.mark.parametrize("seed", range(2))
def test_blob_store_survives_a_killed_rank(tmp_path: Path, azurite: object, seed: int) -> None:
    rng = random.Random(2000 + seed)
    ckpt, n, batch = blob_container_url(azurite), 200, 8
    first = sweep(tmp_path, ckpt, "--kill-rank", str(rng.randrange(RANKS)), "--kill-after",
                  str(rng.randrange(5, 50)), "--kill-by-end", n=n, batch=batch)
    assert first.returncode != 0
    second = sweep(tmp_path, ckpt, n=n, batch=batch)
    assert second.returncode == 0, second.stderr
    assert_exactly_once(tmp_path, ckpt, n, batch)


def test_sweep_example_killed_and_rerun_matches_a_clean_run(tmp_path: Path) -> None:
    """examples/sweep.py as documented: a whole-job kill part-way, a re-run, the same results file as a clean run.

    The killed run holds at its end (held_example.py) so it cannot finish before the polled trigger fires; the
    trigger counts batch objects, which only ever grow (a completed run's snapshot leaves them in place)."""
    args = ["--grid", "12", "--steps", "1500", "--batch", "8"]
    clean = mpirun(EXAMPLES / "sweep.py", *args, "--checkpoint", str(tmp_path / "clean"), "--out",
                   str(tmp_path / "clean.json"))
    assert clean.returncode == 0, clean.stderr
    ckpt = str(tmp_path / "ck")
    batches = tmp_path / "ck" / "work" / "pendulum"
    first = mpirun(PROGRAMS / "held_example.py", "sweep", *args, "--checkpoint", ckpt, "--out",
                   str(tmp_path / "out.json"), kill_when=lambda: batches.is_dir() and len(list(batches.iterdir())) >= 6)
    assert first.killed and not (tmp_path / "out.json").exists()
    rerun = mpirun(EXAMPLES / "sweep.py", *args, "--checkpoint", ckpt, "--out", str(tmp_path / "out.json"))
    assert rerun.returncode == 0, rerun.stderr
    assert "144 points" in rerun.stdout and "items already committed" in rerun.stderr
    assert (tmp_path / "out.json").read_text() == (tmp_path / "clean.json").read_text()
    assert load_committed(open_store(ckpt), "pendulum").duplicates == 0
