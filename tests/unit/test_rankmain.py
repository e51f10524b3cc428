"""``python3 -m node_runtime.rankmain`` runs a program exactly as ``python3 -m mpi4py`` does (and as python3 would),
an uncaught exception on one rank of a real mpirun job ends the job at once, and its stack dump: registered in the
TMPDIR, answered by a rank blocked anywhere, never on the program's output; ``node-runtime stacks`` finds the
ranks of its TMPDIR only and never signals a process its record does not name."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node_runtime.rankmain import STACK_SIGNAL, STACKS_DIR_NAME, stack_files, start_time
from node_runtime.stacks import collect, node_stacks
from tests.checkpoint.mpirun import MPI_ENV, REPO

SHOW = """import json, os, sys
print(json.dumps({"argv": sys.argv, "name": __name__, "path0": sys.path[0], "main": sys.modules["__main__"].__file__
                  if hasattr(sys.modules["__main__"], "__file__") else None}))
"""


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp), **extra}


def _run(tmp: Path, *argv: str, cwd: Path | None = None, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=_env(tmp, **extra),
                          cwd=cwd or tmp, timeout=60, check=False)


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    (tmp_path / "t").mkdir()
    return tmp_path / "t"


def test_a_file_module_or_string_runs_as_under_python3(tmp: Path, tmp_path: Path) -> None:
    script = tmp_path / "app" / "show.py"
    script.parent.mkdir()
    script.write_text(SHOW)
    plain = json.loads(_run(tmp, str(script), "a", "--b").stdout)
    ours = json.loads(_run(tmp, "-m", "node_runtime.rankmain", str(script), "a", "--b").stdout)
    assert ours == plain == {"argv": [str(script), "a", "--b"], "name": "__main__", "path0": str(script.parent),
                             "main": str(script)}
    (tmp_path / "app" / "showmod.py").write_text(SHOW)
    ours = json.loads(_run(tmp, "-m", "node_runtime.rankmain", "-m", "showmod", "x", cwd=script.parent).stdout)
    plain = json.loads(_run(tmp, "-m", "showmod", "x", cwd=script.parent).stdout)
    assert ours["argv"] == plain["argv"] == [str(script.parent / "showmod.py"), "x"]
    assert ours["name"] == plain["name"] == "__main__"
    ours = json.loads(_run(tmp, "-m", "node_runtime.rankmain", "-c", SHOW, "y").stdout)
    assert ours["argv"] == ["-c", "y"] and ours["name"] == "__main__"


def test_exit_codes_and_tracebacks_are_python3s(tmp: Path) -> None:
    done = _run(tmp, "-m", "node_runtime.rankmain", "-c", "raise ValueError('boom')")
    assert done.returncode == 1 and done.stderr.strip().endswith("ValueError: boom")
    assert _run(tmp, "-m", "node_runtime.rankmain", "-c", "raise SystemExit(3)").returncode == 3
    assert _run(tmp, "-m", "node_runtime.rankmain", "-c", "print('ok')").stdout == "ok\n"
    usage = _run(tmp, "-m", "node_runtime.rankmain")
    assert usage.returncode == 1 and "No path specified for execution" in usage.stderr  # mpi4py's own usage


def test_without_mpi4py_the_program_still_runs(tmp: Path, tmp_path: Path) -> None:
    fake = tmp_path / "fake" / "mpi4py"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no mpi4py here')\n")
    env = {"PYTHONPATH": f"{fake.parent}{os.pathsep}{REPO}"}
    done = subprocess.run([sys.executable, "-m", "node_runtime.rankmain", "-c", SHOW, "z"], capture_output=True,
                          text=True, env={**_env(tmp), **env}, timeout=60, check=False)
    assert json.loads(done.stdout)["argv"] == ["-c", "z"], done.stderr
    done = subprocess.run([sys.executable, "-m", "node_runtime.rankmain", "-c", "raise KeyError(5)"],
                          capture_output=True, text=True, env={**_env(tmp), **env}, timeout=60, check=False)
    assert done.returncode == 1 and done.stderr.strip().endswith("KeyError: 5")


BLOCKED = """import sys, threading, time
def helper():
    time.sleep(60)
threading.Thread(target=helper, name="helper", daemon=True).start()
print("ready", flush=True)
sys.stdin.read()  # blocked in a read until the test closes our stdin
"""


@pytest.fixture
def blocked(tmp: Path, tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """A rank (rank 2 of 4, as Open MPI says) blocked in a read, started through rankmain."""
    script = tmp_path / "blocked.py"
    script.write_text(BLOCKED)
    child = subprocess.Popen([sys.executable, "-m", "node_runtime.rankmain", str(script)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=_env(tmp, OMPI_COMM_WORLD_RANK="2", OMPI_COMM_WORLD_SIZE="4"))
    assert child.stdout is not None and child.stdout.readline() == "ready\n"
    yield child
    child.kill()
    child.communicate()


def test_a_blocked_rank_dumps_every_thread_to_its_file_not_to_its_output(tmp: Path,
                                                                          blocked: subprocess.Popen[str]) -> None:
    record, dump = stack_files(tmp / STACKS_DIR_NAME, blocked.pid)
    doc = json.loads(record.read_text())
    assert doc["rank"] == 2 and doc["size"] == 4 and doc["signal"] == STACK_SIGNAL and doc["start_time"]
    assert (tmp / STACKS_DIR_NAME).stat().st_mode & 0o777 == 0o700
    started = time.monotonic()
    stacks = collect(tmp / STACKS_DIR_NAME)
    assert time.monotonic() - started < 1.0
    assert [(s.pid, s.rank, s.size, s.error) for s in stacks] == [(blocked.pid, 2, 4, "")]
    main = stacks[0].main
    assert main is not None and main.frames[0].code.startswith("sys.stdin.read()")
    assert main.frames[0].file.endswith("blocked.py") and main.frames[0].line == 6 and len(main.frames) == 1
    helper = next(t for t in stacks[0].threads if not t.main)
    assert [f.code for f in helper.frames][:1] == ["time.sleep(60)"]
    assert collect(tmp / STACKS_DIR_NAME)[0].main.frames[0].line == 6  # asked again: the newest dump only
    out, err = blocked.communicate("", timeout=30)  # end-of-input: the program ends normally
    assert (out, err) == ("", ""), "nothing of the dumps on the program's output"
    assert blocked.returncode == 0
    assert not record.exists() and not dump.exists(), "a rank that ended removed its files"


def test_records_of_ended_or_other_processes_are_never_signalled(tmp: Path) -> None:
    directory = tmp / STACKS_DIR_NAME
    directory.mkdir(mode=0o700)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for pid, started in ((bystander.pid, (start_time(bystander.pid) or 0) + 1), (2**22 + 5, 1)):
            record, dump = stack_files(directory, pid)
            record.write_text(json.dumps({"pid": pid, "start_time": started, "signal": int(signal.SIGTERM),
                                          "dump": dump.name, "rank": 0}))
            dump.touch()
        assert collect(directory, timeout=0.5) == []
        time.sleep(0.2)
        assert bystander.poll() is None, "a pid reused by another process is not the rank the record named"
        assert list(directory.iterdir()) == [], "stale records and dumps are removed"
    finally:
        bystander.kill()
        bystander.wait()


def test_ranks_not_started_through_rankmain_are_listed_without_a_stack(tmp: Path, tmp_path: Path) -> None:
    parent = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
              "print('ready', flush=True); time.sleep(60)")
    ours = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True,
                            env=_env(tmp, PMI_RANK="5", PMI_SIZE="6"), start_new_session=True)
    other = tmp_path / "other"
    other.mkdir()
    theirs = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                              env=_env(other, PMI_RANK="1"), start_new_session=True)
    try:
        assert ours.stdout is not None and ours.stdout.readline() == "ready\n"
        stacks = node_stacks(str(tmp), timeout=1)["ranks"]
        assert [(s["pid"], s["rank"], s["size"]) for s in stacks] == [(ours.pid, 5, 6)], "its child is no rank"
        assert stacks[0]["error"] == "no Python stack: not started through node_runtime.rankmain"
        assert stacks[0]["state"] in ("R", "S")  # (about to sleep, or asleep)
    finally:
        for p in (ours, theirs):
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def test_the_stacks_command_prints_json(tmp: Path, blocked: subprocess.Popen[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "node_runtime", "stacks", "--tmpdir", str(tmp)], capture_output=True,
                          text=True, env=_env(tmp), timeout=60, check=True)
    doc = json.loads(done.stdout)
    assert doc["hostname"] and [r["rank"] for r in doc["ranks"]] == [2]
    assert doc["ranks"][0]["threads"][0]["frames"]


@pytest.mark.skipif(not os.path.exists("/usr/bin/mpirun"), reason="needs Open MPI's mpirun")
def test_an_uncaught_exception_on_one_rank_ends_the_whole_job_at_once(tmp: Path, tmp_path: Path) -> None:
    script = tmp_path / "raises.py"
    script.write_text("from mpi4py import MPI\ncomm = MPI.COMM_WORLD\nif comm.rank == 1:\n"
                      "    raise RuntimeError('rank 1 failed')\ncomm.Barrier()\n")
    started = time.monotonic()
    done = subprocess.run(["mpirun", "-np", "3", sys.executable, "-m", "node_runtime.rankmain", str(script)],
                          capture_output=True, text=True, env={**_env(tmp), **MPI_ENV}, timeout=120, check=False,
                          start_new_session=True)
    assert done.returncode != 0 and "RuntimeError: rank 1 failed" in done.stderr
    assert time.monotonic() - started < 30, "ranks 0 and 2 must not wait in the barrier forever"
