"""launch's output pump (node_runtime.output) and the ranks.log format (node_runtime.contract): frames cut back
exactly, lines tagged, a slow ranks.log never holding mpirun, the end; and the real thing under Open MPI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from node_runtime import ranktap
from node_runtime.contract import RANKS_LOG_NAME, RankLine, format_rank_line, parse_rank_line
from node_runtime.output import DROPPED, LINE_MAX, Chunk, Deframer, Lines, Pump, RanksLog
from node_runtime.ranktap import MAGIC, frame

TAP = [sys.executable, "-I", "-S", str(Path(ranktap.__file__))]


# ----------------------------------------------------------------------------------------------------- contract
@pytest.mark.parametrize(("rank", "stream", "text", "line"), [
    (3, "stdout", b"hello", b"[3] hello\n"),
    (12, "stderr", b"Traceback (most recent call last):", b"[12:err] Traceback (most recent call last):\n"),
    (0, "stdout", b"", b"[0] \n"),
    (1, "stdout", b"[1] the program's own tag", b"[1] [1] the program's own tag\n"),
    (None, "stderr", b"MPI_ABORT was invoked on rank 1", b"MPI_ABORT was invoked on rank 1\n"),
    (None, "stdout", b"[7] looks tagged", b"[mpi] [7] looks tagged\n"),  # MPI's own line that would read as rank 7's
])
def test_ranks_log_lines_read_back(rank: int | None, stream: str, text: bytes, line: bytes) -> None:
    assert format_rank_line(rank, stream, text) == line
    assert parse_rank_line(line) == RankLine(rank, stream if rank is not None else "mpi", text.decode())
    assert parse_rank_line(line.decode().rstrip("\n")) == parse_rank_line(line)


def test_parse_rank_line_takes_any_bytes() -> None:
    assert parse_rank_line(b"[2:err] \xff\xfe\n") == RankLine(2, "stderr", "\ufffd\ufffd")
    assert parse_rank_line("[x] not a rank") == RankLine(None, "mpi", "[x] not a rank")


# ----------------------------------------------------------------------------------------------------- deframing
def stream_of(*parts: bytes | tuple[int, bytes, bytes]) -> bytes:
    return b"".join(p if isinstance(p, bytes) else frame(*p) for p in parts)


def merged(chunks: list[Chunk]) -> list[tuple[int | None, str, bytes]]:
    """Adjacent chunks of one (rank, stream) joined: how they were cut into reads does not matter."""
    out: list[tuple[int | None, str, bytes]] = []
    for c in chunks:
        if out and out[-1][:2] == (c.rank, c.stream):
            out[-1] = (c.rank, c.stream, out[-1][2] + c.data)
        else:
            out.append((c.rank, c.stream, c.data))
    return out


SAMPLE = stream_of(b"MPI says hi\n", (1, b"o", b"partial"), (2, b"e", b"err\n"), (1, b"o", b" rest\n"),
                   b"\x1e\x1fMPL not a frame\n", (0, b"o", bytes(range(256))), (3, b"m", b'{"exit": 0}'), b"end")


def test_deframer_cuts_frames_from_mpis_own_bytes_however_the_reads_fall() -> None:
    expected = [(None, "stderr", b"MPI says hi\n"), (1, "stdout", b"partial"), (2, "stderr", b"err\n"),
                (1, "stdout", b" rest\n"), (None, "stderr", b"\x1e\x1fMPL not a frame\n"),
                (0, "stdout", bytes(range(256))), (3, "meta", b'{"exit": 0}'), (None, "stderr", b"end")]
    whole = Deframer("stderr")
    assert merged(whole.feed(SAMPLE) + whole.flush()) == expected
    for size in (1, 2, 3, 7, 13, 64):
        d = Deframer("stderr")
        chunks = [c for i in range(0, len(SAMPLE), size) for c in d.feed(SAMPLE[i:i + size])] + d.flush()
        assert merged(chunks) == expected, size


def test_deframer_holds_what_may_begin_a_frame_and_gives_it_up_at_the_end() -> None:
    d = Deframer("stdout")
    assert merged(d.feed(b"text" + MAGIC[:3])) == [(None, "stdout", b"text")]
    assert merged(d.flush()) == [(None, "stdout", MAGIC[:3])]
    d = Deframer("stdout")
    broken = frame(1, b"o", b"abc")[:-1] + b"X"  # the trailer is not where the length says: not a frame
    assert b"".join(c.data for c in d.feed(broken + b"more") + d.flush()) == broken + b"more"
    cut = frame(1, b"o", b"abc")[:12]  # mpirun died mid-frame
    assert [c.data for c in Deframer("stdout").flush()] == [] and merged(
        (d2 := Deframer("stdout")).feed(cut) + d2.flush()) == [(None, "stdout", cut)]


# ----------------------------------------------------------------------------------------------------- lines
def test_lines_are_cut_per_rank_and_stream() -> None:
    got: list[tuple[int | None, str, bytes, float]] = []
    lines = Lines(lambda *a: got.append(a), partial_after=0.5)
    lines.feed(1, "stdout", b"a\nb", 0.0)
    lines.feed(2, "stdout", b"x\n", 0.1)
    lines.feed(1, "stderr", b"e1\n\n", 0.2)
    lines.feed(1, "stdout", b"c\nd", 0.3)
    assert got == [(1, "stdout", b"a", 0.0), (2, "stdout", b"x", 0.1), (1, "stderr", b"e1", 0.2),
                   (1, "stderr", b"", 0.2), (1, "stdout", b"bc", 0.3)]
    lines.tick(0.7)  # "d" waits since 0.3: not yet
    assert len(got) == 5
    lines.tick(0.8)
    assert got[-1] == (1, "stdout", b"d", 0.8)
    lines.feed(3, "stdout", b"p" * (LINE_MAX + 10) + b"\n", 1.0)
    assert [len(g[2]) for g in got[6:]] == [LINE_MAX, 10]
    lines.feed(3, "stdout", b"left", 2.0)
    lines.flush(2.1)
    assert got[-1] == (3, "stdout", b"left", 2.1)


def test_ranks_log_drops_rather_than_waits_for_a_slow_disk(tmp_path: Path) -> None:
    """ranks.log on a FIFO nobody reads yet (a disk that does not keep up): adding never blocks; what does not fit
    in the queue is dropped and said so once the file takes bytes again."""
    fifo = tmp_path / "ranks.log"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    log = RanksLog(fifo, limit=10_000)
    line = b"x" * 99 + b"\n"
    started = time.monotonic()
    for _ in range(2000):  # 200 kB: the pipe takes 64 kB, the queue 10 kB
        log.add(line)
    assert time.monotonic() - started < 2.0
    got = bytearray()

    def drain() -> None:
        os.set_blocking(reader, True)
        while data := os.read(reader, 65536):
            got.extend(data)

    draining = threading.Thread(target=drain)
    draining.start()
    log.add(b"after\n")
    log.close()
    draining.join(10)
    os.close(reader)
    text = got.decode()
    assert text.count(line.decode()) < 2000 and "lines of rank output were dropped here" in text.replace(
        "line(s)", "lines")
    assert text.endswith("after\n") or DROPPED.split("{n}")[0] in text.splitlines()[-1]


# ----------------------------------------------------------------------------------------------------- the pump
class Seen:
    def __init__(self) -> None:
        self.lines: list[tuple[int | None, str, bytes]] = []
        self.ends: list[tuple[int, dict[str, Any]]] = []

    def line(self, rank: int | None, stream: str, text: bytes, at: float) -> None:
        self.lines.append((rank, stream, text))

    def ended(self, rank: int, info: dict[str, Any], at: float) -> None:
        self.ends.append((rank, info))


def pump_in(tmp_path: Path) -> tuple[Pump, int, int, Path, Path, Seen]:
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    so_r, so_w = os.pipe()
    se_r, se_w = os.pipe()
    seen = Seen()
    pump = Pump(so_r, se_r, tmp_path, observer=seen, out=os.open(out, os.O_WRONLY | os.O_CREAT),
                err=os.open(err, os.O_WRONLY | os.O_CREAT)).start()
    return pump, so_w, se_w, out, err, seen


def test_the_pump_writes_raw_bytes_and_tagged_lines(tmp_path: Path) -> None:
    pump, so_w, se_w, out, err, seen = pump_in(tmp_path)
    os.write(so_w, b"mpirun on stdout\n")
    os.write(se_w, SAMPLE)
    os.close(so_w)
    os.close(se_w)
    pump.finish()
    assert out.read_bytes() == b"mpirun on stdout\npartial rest\n" + bytes(range(256))
    assert err.read_bytes() == b"MPI says hi\nerr\n\x1e\x1fMPL not a frame\nend"
    log = (tmp_path / RANKS_LOG_NAME).read_bytes()
    assert log.endswith(b"\n")
    assert sorted(log.split(b"\n")[:-1]) == sorted([
        b"mpirun on stdout", b"MPI says hi", b"[2:err] err", b"[1] partial rest", b"\x1e\x1fMPL not a frame",
        b"[0] " + bytes(range(10)), b"[0] " + bytes(range(11, 256)), b"end"])  # (byte 10 is a line end)
    assert seen.ends == [(3, {"exit": 0})] and (2, "stderr", b"err") in seen.lines
    assert pump.bytes == {"stdout": len(out.read_bytes()), "stderr": len(err.read_bytes())}


def test_a_line_reaches_stdout_and_ranks_log_at_once(tmp_path: Path) -> None:
    pump, so_w, se_w, out, _err, _seen = pump_in(tmp_path)
    try:
        started = time.monotonic()
        os.write(se_w, frame(5, b"o", b"step 1 done\n"))
        deadline = started + 5
        while time.monotonic() < deadline and (
                out.stat().st_size == 0 or b"[5] step 1" not in (tmp_path / RANKS_LOG_NAME).read_bytes()):
            time.sleep(0.005)
        latency = time.monotonic() - started
        assert latency < 0.5, f"{latency:.3f}s"
        os.write(se_w, frame(5, b"o", b"a prompt: "))  # unended: ranks.log gets it after PARTIAL_LINE_SECONDS
        time.sleep(0.9)
        assert b"[5] a prompt: " in (tmp_path / RANKS_LOG_NAME).read_bytes()
        assert out.read_bytes() == b"step 1 done\na prompt: "
    finally:
        os.close(so_w)
        os.close(se_w)
        pump.finish()


def test_the_pump_ends_after_mpirun_even_if_someone_holds_its_pipes(tmp_path: Path) -> None:
    """mpirun killed, one of its ssh children still alive holding the pipes: the pump ends once they are quiet."""
    pump, so_w, se_w, out, _err, _seen = pump_in(tmp_path)
    os.write(se_w, frame(0, b"o", b"last words\n"))
    started = time.monotonic()
    pump.finish()
    assert time.monotonic() - started < 3 and out.read_bytes() == b"last words\n"
    os.close(so_w)
    os.close(se_w)


# ----------------------------------------------------------------------------------------------------- for real
needs_mpirun = pytest.mark.skipif(shutil.which("mpirun") is None, reason="Open MPI is not installed")
LOSSY = ("import os, sys\nr = int(os.environ['OMPI_COMM_WORLD_RANK'])\n"
         "for i in range(20000): print(i)\n"
         "os.write(1, b'\\n' * 5000 + bytes(range(256)) + b'no end')\n")


def mpirun_argv(program: str, *, tap: bool) -> list[str]:
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    argv = ["mpirun", *root, "--oversubscribe", "-np", "3", "--mca", "btl", "self,tcp"]
    return [*argv, *(TAP if tap else ["--tag-output"]), sys.executable, "-c", program]


@needs_mpirun
def test_open_mpi_through_the_tap_and_the_pump_loses_nothing(tmp_path: Path) -> None:
    """3 ranks printing 20000 short lines, 5000 empty ones, binary bytes and an unended line: stdout.txt has every
    byte of every rank (in whatever interleaving), ranks.log every line, tagged. (Open MPI 4.1's own --tag-output
    drops about a fifth of such output: see docs/node-runtime.md.)"""
    so_r, so_w = os.pipe()
    se_r, se_w = os.pipe()
    child = subprocess.Popen(mpirun_argv(LOSSY, tap=True), stdout=so_w, stderr=se_w, stdin=subprocess.DEVNULL)
    os.close(so_w)
    os.close(se_w)
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    seen = Seen()
    pump = Pump(so_r, se_r, tmp_path, observer=seen, out=os.open(out, os.O_WRONLY | os.O_CREAT),
                err=os.open(err, os.O_WRONLY | os.O_CREAT)).start()
    assert child.wait(120) == 0
    pump.finish()
    one_rank = "".join(f"{i}\n" for i in range(20000)).encode() + b"\n" * 5000 + bytes(range(256)) + b"no end"
    raw = out.read_bytes()
    assert len(raw) == 3 * len(one_rank) and raw.count(b"\n") == 3 * one_rank.count(b"\n")
    log = [parse_rank_line(line) for line in (tmp_path / RANKS_LOG_NAME).read_bytes().splitlines()]
    for rank in range(3):
        numbers = [x.text for x in log if x.rank == rank and x.text.isdigit()]
        assert numbers == [str(i) for i in range(20000)], rank
        assert sum(1 for x in log if x.rank == rank and x.text == "") >= 5000
    assert sorted(r for r, info in seen.ends if info == {"pid": info["pid"], "exit": 0}) == [0, 1, 2]
