"""The live-output follower's logic with fake node files (no HTTP): whole lines only, byte ranges never read twice,
files that appear late, shrink or move to another node, and which stderr lines the rank view shows."""

from __future__ import annotations

from typing import Any

import pytest

from mpilaunch.client import follow
from mpilaunch.client.follow import RANKS_LOG, Follower, Tail, Where
from mpilaunch.client.results import InstanceResult, TaskResults
from node_runtime.contract import format_rank_line


class Growing:
    """A file as a byte string that tests append to; records the ranges read."""

    def __init__(self, data: bytes = b"") -> None:
        self.data = data
        self.ranges: list[tuple[int, int]] = []

    def read(self, start: int, end: int) -> bytes:
        self.ranges.append((start, end))
        return self.data[start:end]


def test_tail_gives_whole_lines_and_reads_each_byte_once() -> None:
    f, tail = Growing(b"one\ntw"), Tail()
    assert tail.advance(len(f.data), f.read) == [b"one"]
    assert tail.advance(len(f.data), f.read) == []  # nothing new: no read at all
    f.data += b"o\nthree"
    assert tail.advance(len(f.data), f.read) == [b"two"]
    f.data += b"\n"
    assert tail.advance(len(f.data), f.read) == [b"three"]
    assert f.ranges == [(0, 6), (6, 13), (13, 14)]
    assert tail.finish() == []


def test_tail_missing_file_partial_end_and_truncation() -> None:
    f, tail = Growing(), Tail()
    assert tail.advance(None, f.read) == [] and f.ranges == []  # not there yet
    f.data = b"first attempt\nunfinished"
    assert tail.advance(len(f.data), f.read) == [b"first attempt"]
    f.data = b"new\n"  # truncated and rewritten: the old unfinished line is over, the new file is read from 0
    assert tail.advance(len(f.data), f.read) == [b"unfinished", b"new"]
    assert f.ranges[-1] == (0, 4)
    f.data += b"last words"
    assert tail.advance(len(f.data), f.read) == []
    assert tail.finish() == [b"last words"]  # the writer ended: the half line is shown


def test_tail_reads_in_chunks_and_survives_a_file_that_shrinks_meanwhile(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(follow, "READ_CHUNK", 4)
    f, tail = Growing(b"abcdefghij\n"), Tail()
    assert tail.advance(len(f.data), f.read) == [b"abcdefghij"]
    assert f.ranges == [(0, 4), (4, 8), (8, 11)]
    assert tail.advance(20, lambda start, end: b"") == []  # the size said 20, the read found nothing: try later
    assert tail.offset == 11


def test_tail_cuts_endless_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(follow, "MAX_LINE", 5)
    f, tail = Growing(b"x" * 12), Tail()
    assert tail.advance(12, f.read) == [b"xxxxx", b"xxxxx"]
    assert tail.finish() == [b"xx"]


class FakeFiles:
    """Node files by (node, name), as :class:`NodeFiles` gives them; counts the requests."""

    def __init__(self) -> None:
        self.files: dict[tuple[str, str], Growing] = {}
        self.requests = 0

    def append(self, node: str, name: str, data: bytes) -> None:
        self.files.setdefault((node, name), Growing()).data += data

    def size(self, where: Where, name: str) -> int | None:
        self.requests += 1
        f = self.files.get((where.node, name))
        return None if f is None else len(f.data)

    def reader(self, where: Where, name: str) -> Any:
        def read(start: int, end: int) -> bytes:
            self.requests += 1
            return self.files[(where.node, name)].read(start, end)
        return read


def results(node: str | None = "n0", state: str = "running", instances: int = 2) -> TaskResults:
    rows = tuple(InstanceResult(i, node and f"{node}-{i}" if i else node, "pool" if node else None, state, None,
                                None, None, None, None, "workitems/j/job-1/t" if node else None)
                 for i in range(instances))
    return TaskResults("j", "t", state, None, None, None, 0, rows)


def collect() -> tuple[list[tuple[str, bool]], Any]:
    shown: list[tuple[str, bool]] = []
    return shown, lambda line, is_err: shown.append((line, is_err))


def rank_line(rank: int, text: str, err: bool = False) -> bytes:
    return format_rank_line(rank, "stderr" if err else "stdout", text.encode())


def test_rank_view_shows_tagged_lines_and_the_runtime_messages() -> None:
    files, (shown, emit) = FakeFiles(), collect()
    live = Follower(files, emit)  # type: ignore[arg-type]
    live.poll()
    assert shown == [] and files.requests == 0  # no node yet: nothing asked
    live.update(results())
    files.append("n0", "stderr.txt", b"node-runtime: launch: waiting for 1 node\nbash: warning: before mpirun\n")
    live.poll()
    assert shown == [("node-runtime: launch: waiting for 1 node", True), ("bash: warning: before mpirun", True)]
    shown.clear()
    files.append("n0", RANKS_LOG, rank_line(0, "hello") + rank_line(1, "oops", err=True))
    files.append("n0", "stderr.txt", b"oops\n")  # the untagged copy of rank 1's stderr line: shown tagged only
    live.poll()
    assert shown == [("[0] hello", False), ("[1:err] oops", False)]
    shown.clear()
    files.append("n0", "stderr.txt", b"node-runtime: launch: hang: ending the job\nTraceback (most recent")
    files.append("n0", RANKS_LOG, b"[0] half a li")
    live.poll()
    assert shown == [("node-runtime: launch: hang: ending the job", True)]  # whole lines only
    requests = files.requests
    live.poll()
    assert files.requests - requests == 2  # idle: one size request per followed file
    live.finish(results(state="completed"))
    assert shown[1:] == [("[0] half a li", False)]  # the end: the unfinished lines too (a rank's stays hidden)


def test_rank_view_before_mpirun_starts_shows_the_primary_stderr() -> None:
    files, (shown, emit) = FakeFiles(), collect()
    live = Follower(files, emit)  # type: ignore[arg-type]
    live.update(results())
    files.append("n0", "stderr.txt", b"node-runtime: error: coordination failed\nlast")
    live.poll()
    live.finish(results(state="completed"))
    assert shown == [("node-runtime: error: coordination failed", True), ("last", True)]


def test_raw_view_and_other_instances() -> None:
    files, (shown, emit) = FakeFiles(), collect()
    files.append("n0", "stdout.txt", b"out\n")
    files.append("n0", "stderr.txt", b"err\n")
    files.append("n0", RANKS_LOG, rank_line(0, "out"))
    files.append("n0-1", "stdout.txt", b"sub\n")
    raw = Follower(files, emit, raw=True)  # type: ignore[arg-type]
    raw.update(results())
    raw.poll()
    assert shown == [("out", False), ("err", True)]
    shown.clear()
    sub = Follower(files, emit, instance=1, streams=("stdout.txt",))  # type: ignore[arg-type]
    sub.update(results())
    sub.finish()
    assert shown == [("sub", False)]


def test_a_new_node_drains_the_old_one_and_starts_afresh() -> None:
    files, (shown, emit) = FakeFiles(), collect()
    live = Follower(files, emit, raw=True, streams=("stdout.txt",))  # type: ignore[arg-type]
    live.update(results("a"))
    files.append("a", "stdout.txt", b"attempt 1\ncut")
    live.poll()
    live.update(results("b"))  # requeued onto another node
    files.append("b", "stdout.txt", b"attempt 2\n")
    live.poll()
    assert shown == [("attempt 1", False), ("cut", False), ("attempt 2", False)]


class Clock:
    """``time`` for :mod:`mpilaunch.client.api`: sleeping advances it."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_wait_ticks_every_interval_while_its_polls_back_off(monkeypatch: pytest.MonkeyPatch) -> None:
    from azure.batch import models as bm

    from mpilaunch.client import api
    from mpilaunch.client.api import Launcher, TaskRef
    from mpilaunch.client.config import BatchConfig, Settings
    from mpilaunch.client.results import build_results
    from mpilaunch.emulator import defaults

    clock = Clock()
    monkeypatch.setattr(api, "time", clock)
    launcher = Launcher(Settings(BatchConfig("http://127.0.0.1:9", defaults.ACCOUNT, defaults.KEY), None))
    states = iter(["running"] * 5 + ["completed"])
    polls: list[float] = []

    def look(_ref: TaskRef) -> TaskResults:
        polls.append(clock.now)
        return build_results("j", bm.BatchTask({"id": "t", "state": next(states)}), [])

    monkeypatch.setattr(launcher, "results", look)
    ticks: list[float] = []
    launcher.wait(TaskRef("j", "t"), interval=1.0, max_interval=4.0, on_tick=lambda: ticks.append(clock.now))
    assert polls == [0.0, 1.0, 2.5, 4.75, 8.125, 12.125]  # backing off (x1.5, at most 4 s)
    assert ticks == [float(t) for t in range(13)]  # live output keeps its pace: every second, once


def test_progress_prints_output_lines_as_written(capsys: pytest.CaptureFixture[str]) -> None:
    """Above rich's live line, a program's line is not taken for rich markup ("[0]", "[bold]") and keeps its text."""
    from mpilaunch.cli.progress import Progress

    with Progress(enabled=True) as progress:
        progress.update(results())
        progress.output("[0] [bold]not markup[/bold] \x1b[31mred\x1b[0m")
    assert "[0] [bold]not markup[/bold] red" in capsys.readouterr().err


@pytest.mark.parametrize(("args", "says"), [
    (["wait", "t", "--interval", "0"], "'--interval': 0.0 is not in the range x>=0.1"),
    (["logs", "t", "-f", "--interval", "0.01"], "'--interval': 0.01 is not in the range x>=0.1"),
    (["logs", "t", "--raw"], "--raw goes with -f"),
    (["logs", "t", "-f", "--output", "json"], "--output json does not apply"),
])
def test_bad_live_output_options_are_refused(args: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    from mpilaunch.cli import cli
    from mpilaunch.cli.clickutil import run_cli

    assert run_cli(cli, "mpilaunch", args) == 2
    assert says in capsys.readouterr().err


def test_node_files_take_absence_in_stride_and_raise_the_rest() -> None:
    from azure.core.exceptions import HttpResponseError

    from mpilaunch.client.follow import NodeFiles

    def failing(status: int) -> Any:
        def call(*_args: Any, **_kwargs: Any) -> Any:
            exc = HttpResponseError(message=f"status {status}")
            exc.status_code = status
            raise exc
        return call

    where = Where("pool", "node", "\\workitems\\j\\job-1\\t")
    for status in (404, 409, 416):
        batch = type("Batch", (), {"get_node_file_properties": failing(status), "download_node_file": failing(status)})
        files = NodeFiles(batch())
        assert files.size(where, "stderr.txt") is None and files.reader(where, "stderr.txt")(0, 10) == b""
    files = NodeFiles(type("Batch", (), {"get_node_file_properties": failing(403)})())
    with pytest.raises(HttpResponseError):
        files.size(where, "stderr.txt")
    asked: list[tuple[Any, ...]] = []

    class Recording:
        def download_node_file(self, *args: Any, **kwargs: Any) -> Any:
            asked.append((*args, kwargs["ocp_range"]))
            return iter([b"ab", b"c"])

    assert NodeFiles(Recording()).reader(where, "wd/ranks.log")(5, 8) == b"abc"
    assert asked == [("pool", "node", "workitems/j/job-1/t/wd/ranks.log", "bytes=5-7")]
