"""The hang watchdog's pure parts and its timing: durations, faulthandler dumps parsed, where a rank is, grouping,
the summary, hang-report.json, and a Watchdog over a real child process that it ends (or leaves alone while output
or a checkpoint heartbeat shows progress)."""

from __future__ import annotations

import faulthandler
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from node_runtime.checkpoint import _mpi
from node_runtime.contract import HANG_REPORT_NAME, HEARTBEAT_NAME, RANKS_LOG_NAME, launch_command_line
from node_runtime.durations import format_duration, parse_duration, positive_duration
from node_runtime.errors import HANG_EXIT_CODE, HangDetected, InvalidInput
from node_runtime.stacks import Frame, RankStack, Thread, parse_dump, program_frames
from node_runtime.watchdog import (
    Located,
    NodeStacks,
    Watchdog,
    build_report,
    call_on,
    group,
    is_library,
    place_of,
    remote_command,
    summarize,
)

# ------------------------------------------------------------------------------------------------- durations


@pytest.mark.parametrize(("text", "seconds"), [
    ("30s", 30), ("5m", 300), ("1h", 3600), ("2h30m", 9000), ("1d", 86400), ("00:01:30", 90), (" 45m ", 2700),
])
def test_durations_parse_like_the_clients(text: str, seconds: int) -> None:
    from mpilaunch.client.spec import parse_duration as client_parse

    assert parse_duration(text) == seconds
    assert client_parse(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["", "5", "5x", "1.5h", "m", "1:30", "-5s", "5 s"])
def test_bad_durations_are_errors_naming_the_value(text: str) -> None:
    with pytest.raises(InvalidInput, match=f"invalid duration {text!r}"):
        parse_duration(text)


def test_a_hang_timeout_is_at_least_a_second_and_round_trips_through_the_command_line() -> None:
    with pytest.raises(Exception, match="must be at least 1s"):
        positive_duration("0s")
    assert positive_duration("1m") == 60
    assert [format_duration(s) for s in (5, 90, 3600, 86400 + 61, 0.2)] == ["5s", "1m30s", "1h", "1d1m1s", "1s"]
    for seconds in (1, 59, 61, 7322, 90061):
        assert parse_duration(format_duration(seconds)) == seconds
    words = shlex.split(launch_command_line(["python3", "app.py"], hang_timeout=90))
    assert words == ["node-runtime", "launch", "--hang-timeout", "1m30s", "--", "python3", "app.py"]
    assert "--hang-timeout" not in launch_command_line(["a"])
    with pytest.raises(ValueError, match="must be positive"):
        launch_command_line(["a"], hang_timeout=0)


# ---------------------------------------------------------------------------------------------- dumps parsed


def _real_dump(tmp_path: Path) -> str:
    """A faulthandler dump of this process, with a second thread blocked in an Event."""
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait, name="worker", daemon=True)
    worker.start()
    path = tmp_path / "dump"
    try:
        with path.open("wb") as f:
            faulthandler.dump_traceback(f, all_threads=True)
    finally:
        stop.set()
        worker.join()
    return path.read_text()


def test_a_real_dump_parses_into_threads_with_the_main_one_marked(tmp_path: Path) -> None:
    text = _real_dump(tmp_path)
    threads = parse_dump(text, threading.main_thread().ident)
    assert len(threads) >= 2
    main = next(t for t in threads if t.main)
    assert main.current and main.frames[0].function == "_real_dump" and main.frames[0].file == __file__
    others = [t for t in threads if not t.main]
    assert any(f.function == "wait" and f.file.endswith("threading.py") for t in others for f in t.frames)


def test_the_frames_that_run_the_program_are_cut() -> None:
    text = """Current thread 0x00007f66effe6b80 (most recent call first):
  File "hang.py", line 6 in <module>
  File "<frozen runpy>", line 88 in _run_code
  File "<frozen runpy>", line 98 in _run_module_code
  File "<frozen runpy>", line 291 in run_path
  File "/venv/lib/python3.11/site-packages/mpi4py/run.py", line 53 in run_command_line
  File "/venv/lib/python3.11/site-packages/mpi4py/run.py", line 320 in main
  File "/venv/lib/python3.11/site-packages/node_runtime/rankmain.py", line 141 in main
  File "/venv/lib/python3.11/site-packages/node_runtime/rankmain.py", line 147 in <module>
  File "<frozen runpy>", line 88 in _run_code
  File "<frozen runpy>", line 198 in _run_module_as_main

Thread 0x00007f66e0000640 [loader] (most recent call first):
  File "/usr/lib/python3.11/threading.py", line 320 in wait
  ...
"""
    main, other = parse_dump(text, 0x7F66EFFE6B80)
    assert main.main and main.current and [(f.file, f.line, f.function) for f in main.frames] == [
        ("hang.py", 6, "<module>")]
    assert not other.main and other.name == "loader" and other.frames[0].where == "threading.py:320"
    untouched = [Frame("a.py", 1, "f"), Frame("<frozen runpy>", 88, "_run_code")]
    assert program_frames(untouched) == untouched  # no runner below: nothing is cut


# ----------------------------------------------------------------------------------------- where ranks are


@pytest.mark.parametrize(("code", "call", "mpi"), [
    ("comm.Barrier()", "Barrier", True),
    ("total = comm.allreduce(rank + 1, op=MPI.SUM)", "allreduce", True),
    ("MPI.COMM_WORLD.Allreduce(a, b)", "Allreduce", True),
    ("world.Recv(buf, source=1)", "Recv", True),
    ("data = comm.recv(source=0, tag=7)", "recv", True),
    ("MPI.Request.Waitall(requests)", "Waitall", True),
    ("req.wait()", "wait", True),
    ("data = sock.recv(1024)", "sock.recv", False),
    ("event.wait()", "event.wait", False),
    ("time.sleep(3600)  # comm.Barrier() later", "time.sleep", False),
    ("if queue.get(timeout=5):", "queue.get", False),
    ("x = np.asarray(comm.bcast(x, root=0))", "bcast", True),
    ("x = 1", "", False),
    ("", "", False),
])
def test_the_call_a_rank_waits_in_is_read_from_its_source_line(code: str, call: str, mpi: bool) -> None:
    assert call_on(code) == (call, mpi)


def _rank(rank: int, *frames: tuple[str, int, str, str], error: str = "", size: int = 4) -> RankStack:
    thread = Thread(1, True, True, frames=[Frame(*f) for f in frames])
    return RankStack(1000 + rank, rank, size, "R", "", [] if error else [thread], error=error)


BARRIER = ("/job/solver.py", 57, "step", "comm.Barrier()")
MAIN = ("/job/solver.py", 90, "<module>", "step()")
SLEEP = ("/job/io.py", 12, "fetch", "time.sleep(60)")


def test_a_rank_in_a_library_is_placed_at_its_own_innermost_frame() -> None:
    stack = _rank(0, ("/usr/lib/python3.11/threading.py", 320, "wait", "waiter.acquire()"),
                  ("/job/app.py", 9, "main", "done.wait()"), MAIN)
    place = place_of(stack)
    assert place is not None and place.frame.where == "app.py:9" and place.call == "done.wait"
    assert is_library("/opt/mpilaunch/x/lib/python3.12/site-packages/mpi4py/run.py")
    assert is_library("<frozen runpy>") and not is_library("/job/app.py")
    assert place_of(RankStack(1, 0, 1)) is None


def test_identical_stacks_are_grouped_and_the_odd_rank_is_named_with_its_node() -> None:
    located = [Located("10.0.0.4", _rank(0, BARRIER, MAIN)), Located("10.0.0.5", _rank(1, SLEEP, MAIN)),
               Located("10.0.0.5", _rank(3, BARRIER, MAIN)), Located("10.0.0.4", _rank(2, BARRIER, MAIN))]
    groups = group(located)
    assert [g.ranks for g in groups] == [[0, 2, 3], [1]]
    assert groups[0].nodes == ["10.0.0.4", "10.0.0.5"]
    assert summarize(groups, 4) == ("3 of 4 ranks wait in Barrier at solver.py:57; rank 1 is in time.sleep at "
                                    "io.py:12 on node 10.0.0.5")


def test_summaries_of_a_uniform_hang_of_missing_stacks_and_of_silent_nodes() -> None:
    same = [Located("h", _rank(r, BARRIER, MAIN)) for r in range(4)]
    assert summarize(group(same), 4) == "all 4 ranks wait in Barrier at solver.py:57"
    odd = [*same[:2], Located("h2", _rank(2, error="no stack within 3s (process state D)")),
           Located("h2", _rank(3, error="no stack within 3s (process state D)")),
           Located("h3", _rank(4, SLEEP)), Located("h3", _rank(5, SLEEP)), Located("h3", _rank(7, SLEEP))]
    assert summarize(group(odd), 8, {"h4": "no answer within 20s"}) == (
        "3 of 8 ranks are in time.sleep at io.py:12; ranks 0-1 wait in Barrier at solver.py:57 on "
        "node h; ranks 2-3 gave no stack (no stack within 3s (process state D)) on node h2; node h4 gave no stacks "
        "(no answer within 20s)")
    lonely = [Located("h", _rank(0, ("/job/a.py", 3, "spin", "x += 1")))]
    assert summarize(group(lonely), 1) == "rank 0 is at a.py:3 (in spin) on node h"
    assert summarize([], 0) == "no rank process was found"


def test_the_report_holds_every_rank_every_group_and_what_is_missing() -> None:
    nodes = [NodeStacks("10.0.0.4", "node-a", [_rank(0, BARRIER, MAIN), _rank(2, BARRIER, MAIN)]),
             NodeStacks("10.0.0.5", "node-b", [_rank(1, SLEEP, MAIN)])]
    report, summary, lines = build_report(nodes, timeout=5, idle=5.25, source="ranks.log")
    assert report["ranks_total"] == 4 and report["ranks_missing"] == [3]
    assert summary == report["summary"] == ("2 of 4 ranks wait in Barrier at solver.py:57; rank 1 is in time.sleep "
                                            "at io.py:12 on node 10.0.0.5; rank 3 not found on any node")
    assert [r["rank"] for r in report["ranks"]] == [0, 1, 2] and report["ranks"][1]["node"] == "10.0.0.5"
    assert report["groups"][0] | {"frames": None} == {
        "count": 2, "ranks": [0, 2], "nodes": ["10.0.0.4"], "error": "", "location": "solver.py:57",
        "call": "Barrier", "mpi": True, "frames": None}
    assert report["nodes"]["10.0.0.5"] == {"hostname": "node-b", "ranks": 1, "error": ""}
    assert lines[1] == "rank 1 (10.0.0.5): io.py:12 in fetch: time.sleep(60) <- solver.py:90 in <module>: step()"
    json.dumps(report)  # serialisable as it is
    assert remote_command("/opt/py/bin/python3") == ["/opt/py/bin/python3", "-m", "node_runtime", "stacks"]


# ------------------------------------------------------------------------------------------------ the watchdog


@pytest.fixture
def sleeper() -> subprocess.Popen[bytes]:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield child
    child.kill()
    child.wait()


def _dog(tmp_path: Path, timeout: float, collected: list[list[str]]) -> Watchdog:
    def collect(hosts: list[str]) -> list[NodeStacks]:
        collected.append(list(hosts))
        return [NodeStacks("10.0.0.4", "a", [_rank(0, BARRIER, MAIN, size=2)]),
                NodeStacks("10.0.0.5", "b", [_rank(1, SLEEP, MAIN, size=2)])]

    err = open(os.devnull, "w")  # noqa: SIM115 (closed with the test process)
    return Watchdog(timeout, working_dir=tmp_path, local_host="10.0.0.4", local_tmp=tmp_path / "tmp",
                    ssh_config=tmp_path / "ssh_config", err=err, streams=(), collect=collect)


def test_a_silent_job_is_ended_after_the_timeout_with_a_report(tmp_path: Path,
                                                                sleeper: subprocess.Popen[bytes]) -> None:
    collected: list[list[str]] = []
    dog = _dog(tmp_path, 1, collected)
    started = time.monotonic()
    dog.start(sleeper, ["10.0.0.5"])
    assert (tmp_path / HEARTBEAT_NAME).exists()
    sleeper.wait(10)
    ended = time.monotonic() - started
    assert 1.0 <= ended < 2.0 + 0.5, ended  # the timeout, one poll (0.1 s here) and the kill
    with pytest.raises(HangDetected) as caught:
        dog.finish()
    assert caught.value.exit_code == HANG_EXIT_CODE == 124
    assert caught.value.message == ("hang: no output and no checkpoint for 1s (--hang-timeout): rank 0 waits in "
                                    "Barrier at solver.py:57 on node 10.0.0.4; rank 1 is in time.sleep at io.py:12 "
                                    "on node 10.0.0.5")
    assert collected == [["10.0.0.5"]]
    report = json.loads((tmp_path / HANG_REPORT_NAME).read_text())
    assert report["last_progress"] == "start" and report["idle_s"] >= 1 and report["timings"]["collect_s"] >= 0
    assert not (tmp_path / HEARTBEAT_NAME).exists()


def test_output_and_checkpoint_heartbeats_keep_a_job_alive(tmp_path: Path, sleeper: subprocess.Popen[bytes],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    collected: list[list[str]] = []
    dog = _dog(tmp_path, 1, collected)
    dog.start(sleeper, [])
    monkeypatch.setenv("AZ_BATCH_TASK_WORKING_DIR", str(tmp_path))
    monkeypatch.setattr(_mpi, "_last_beat", -1.0)
    for i in range(10):  # 2.5 s of progress: every 0.25 s, output and commits by turns
        time.sleep(0.25)
        if i % 2:
            (tmp_path / RANKS_LOG_NAME).write_text(f"[0] line {i}\n")
        else:
            _mpi.beat()
            monkeypatch.setattr(_mpi, "_last_beat", -1.0)
    assert sleeper.poll() is None and collected == []
    assert dog.idle()[1] in (RANKS_LOG_NAME, HEARTBEAT_NAME)
    sleeper.kill()
    sleeper.wait()
    dog.finish()  # mpirun ended on its own: no hang
    assert not (tmp_path / HANG_REPORT_NAME).exists()


def test_launch_own_stdout_counts_as_output(tmp_path: Path) -> None:
    out = (tmp_path / "stdout.txt").open("w")
    dog = Watchdog(10, working_dir=tmp_path, local_host="h", local_tmp=tmp_path, ssh_config=tmp_path,
                   streams=(out.fileno(),))
    dog._started = time.time() - 100  # as if started long ago
    assert dog.idle()[1] == "stdout"  # the file was just created: that is its mtime
    os.utime(out.fileno(), (time.time() - 50, time.time() - 50))
    idle, source = dog.idle()
    assert source == "stdout" and 49 < idle < 52
    out.close()


def test_the_checkpoint_heartbeat_touches_only_an_existing_file_and_at_most_twice_a_second(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AZ_BATCH_TASK_WORKING_DIR", str(tmp_path))
    monkeypatch.setattr(_mpi, "_last_beat", -1.0)
    _mpi.beat()
    assert not (tmp_path / HEARTBEAT_NAME).exists(), "a node without watchdog gets no file"
    beat = tmp_path / HEARTBEAT_NAME
    beat.touch()
    os.utime(beat, (1, 1))
    monkeypatch.setattr(_mpi, "_last_beat", -1.0)
    _mpi.beat()
    assert beat.stat().st_mtime > 1
    os.utime(beat, (1, 1))
    _mpi.beat()  # right after the last: skipped
    assert beat.stat().st_mtime == 1
