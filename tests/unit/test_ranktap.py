"""node_runtime.ranktap, the process in front of every rank: frames, pacing, what the program sees, how it ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from node_runtime import ranktap
from node_runtime.output import Chunk, Deframer
from node_runtime.ranktap import HEADER, MAGIC, PAYLOAD_MAX, frame

TAP = [sys.executable, "-I", "-S", str(Path(ranktap.__file__))]
RANK_ENV = {**os.environ, "OMPI_COMM_WORLD_RANK": "4"}


def tapped(program: list[str], *, env: dict[str, str] | None = None, stdout: int | None = subprocess.PIPE,
           timeout: float = 30) -> tuple[subprocess.CompletedProcess[bytes], list[Chunk]]:
    done = subprocess.run([*TAP, *program], stdout=stdout, stderr=subprocess.PIPE, env=env or RANK_ENV,
                          timeout=timeout, check=False)
    return done, Deframer("stderr").feed(done.stderr)


def joined(chunks: list[Chunk], stream: str) -> bytes:
    return b"".join(c.data for c in chunks if c.stream == stream)


def meta(chunks: list[Chunk]) -> dict[str, object]:
    found = [json.loads(c.data) for c in chunks if c.stream == "meta"]
    assert len(found) == 1, chunks
    return found[0]


def test_frames_carry_every_byte_and_the_end() -> None:
    data = bytes(range(256)) * 40 + b"\n" * 5000 + b"no end of line"
    program = [sys.executable, "-c", f"import os, sys; os.write(1, {data!r}); os.write(2, b'err\\n'); sys.exit(3)"]
    done, chunks = tapped(program)
    assert done.returncode == 3 and done.stdout == b""  # everything went out framed, on stderr
    assert all(c.rank == 4 for c in chunks) and joined(chunks, "stdout") == data
    assert joined(chunks, "stderr") == b"err\n"
    assert all(len(c.data) <= PAYLOAD_MAX for c in chunks)
    assert not [c for c in chunks if c.rank is None], "nothing outside a frame"
    end = meta(chunks)
    assert end["exit"] == 3 and isinstance(end["pid"], int)


def test_a_program_killed_by_a_signal_kills_the_tap_alike() -> None:
    done, chunks = tapped(["sh", "-c", "echo before; kill -USR2 $$"])
    assert done.returncode == -signal.SIGUSR2
    assert joined(chunks, "stdout") == b"before\n" and meta(chunks)["signal"] == signal.SIGUSR2


def test_sigkill_comes_with_the_oom_counters_and_sigbus_with_dev_shm() -> None:
    _done, chunks = tapped(["sh", "-c", "kill -KILL $$"])
    end = meta(chunks)
    assert end["signal"] == signal.SIGKILL and end["oom_kills"] == {} and isinstance(end["kernel"], list)
    _done, chunks = tapped(["sh", "-c", "kill -BUS $$"])
    end = meta(chunks)
    assert end["signal"] == signal.SIGBUS and isinstance(end["shm_free"], int) and isinstance(end["shm_size"], int)
    assert set(ranktap.oom_counters()) >= {"node"}  # /proc/vmstat has it on every kernel since 4.13


def test_the_program_gets_a_terminal_when_we_have_one() -> None:
    """Open MPI gives ranks a pseudo-terminal as stdout (programs stay line-buffered): so does the tap, with the same
    settings (Open MPI's orted turns ONLCR off: no \r is added)."""
    ours, theirs = os.openpty()
    attrs = termios.tcgetattr(theirs)
    attrs[1] &= ~(termios.ONLCR | termios.OCRNL)  # as orted sets its ranks' terminal
    termios.tcsetattr(theirs, termios.TCSANOW, attrs)
    try:
        done, chunks = tapped([sys.executable, "-c", "import sys; print(sys.stdout.isatty(), sys.stderr.isatty())"],
                              stdout=theirs)
    finally:
        os.close(ours)
        os.close(theirs)
    assert done.returncode == 0 and joined(chunks, "stdout") == b"True False\n"


def test_without_a_rank_the_tap_is_the_program() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ranktap.RANK_VARIABLES}
    done = subprocess.run([*TAP, sys.executable, "-c", "import os; print(os.getpid())"], env=env,
                          capture_output=True, timeout=30, check=False)
    assert done.returncode == 0 and MAGIC not in done.stderr and done.stdout.strip().isdigit()
    assert ranktap.rank_of({"PMI_RANK": "7"}) == 7 and ranktap.rank_of({"PMIX_RANK": "x"}) is None


def test_a_signal_to_the_group_reaches_the_program_and_the_tap_outlives_it() -> None:
    """MPI's daemons signal the rank's process group: the program gets it directly; the tap ignores it, moves the
    program's last words and ends as the program did."""
    program = ("import signal, sys, time\n"
               "def bye(*_):\n    print('got TERM', flush=True); sys.exit(5)\n"
               "signal.signal(signal.SIGTERM, bye); print('ready', flush=True); time.sleep(30)")
    tap = subprocess.Popen([*TAP, sys.executable, "-c", program], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           env=RANK_ENV, start_new_session=True)
    try:
        assert tap.stderr is not None
        deadline = time.monotonic() + 20
        seen = b""
        while b"ready" not in seen and time.monotonic() < deadline:
            seen += os.read(tap.stderr.fileno(), 4096)
        os.killpg(tap.pid, signal.SIGTERM)
        rest = tap.stderr.read()
        assert tap.wait(20) == 5
    finally:
        if tap.poll() is None:
            os.killpg(tap.pid, signal.SIGKILL)
    chunks = Deframer("stderr").feed(seen + rest)
    assert joined(chunks, "stdout") == b"ready\ngot TERM\n" and meta(chunks)["exit"] == 5


def test_the_reader_gets_one_whole_frame_per_read() -> None:
    """The pacing: a frame is written once the pipe is empty, so a reader (Open MPI's daemon reads 4096 bytes at a
    time) always reads exactly one frame, however fast the program writes: mpirun then writes frames whole."""
    program = [sys.executable, "-c", "import sys\nfor i in range(20000): print(i)"]
    tap = subprocess.Popen([*TAP, *program], stderr=subprocess.PIPE, env=RANK_ENV)
    assert tap.stderr is not None
    reads = []
    while data := os.read(tap.stderr.fileno(), 4096):
        reads.append(data)
        time.sleep(0.0005 if len(reads) % 7 else 0.02)  # a reader that is sometimes slow
    assert tap.wait(30) == 0
    for data in reads:
        _magic, _rank, _stream, length = HEADER.unpack_from(data)
        assert data.startswith(MAGIC) and len(data) == HEADER.size + length + len(ranktap.TRAILER)
    chunks = Deframer("stderr").feed(b"".join(reads))
    assert joined(chunks, "stdout") == "".join(f"{i}\n" for i in range(20000)).encode()


def test_frame_refuses_an_oversized_payload() -> None:
    assert len(frame(1, b"o", b"x" * PAYLOAD_MAX)) == ranktap.FRAME_MAX
    with pytest.raises(ValueError, match="payload"):
        frame(1, b"o", b"x" * (PAYLOAD_MAX + 1))


def test_a_program_that_cannot_start() -> None:
    done, chunks = tapped(["/nonexistent/program"])
    assert done.returncode == 127 and b"No such file or directory" in joined(chunks, "stderr")
    assert meta(chunks)["exit"] == 127
