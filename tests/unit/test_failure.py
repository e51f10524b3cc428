"""First-failure attribution (node_runtime.failure) from real captured mpirun output (tests/golden/failures: Open
MPI 4.1 and MPICH Hydra, 3 ranks, each behind the tap; tests/golden/failures/capture.py made them), through the very
pump launch uses; and from lines of cases that cannot be produced here."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from node_runtime.failure import Analyzer, Event, summary
from node_runtime.output import Pump

GOLDEN = Path(__file__).parents[1] / "golden" / "failures"
HOSTS = ("10.0.0.4", "10.0.0.5", "10.0.0.6")


def first_failure(name: str, tmp_path: Path, hosts: tuple[str, ...] = HOSTS, ppn: int = 1) -> dict[str, Any]:
    """Feed the captured pipes through a real :class:`Pump` into an :class:`Analyzer`."""
    analyzer = Analyzer(hosts, ppn)
    so_r, so_w = os.pipe()
    se_r, se_w = os.pipe()
    pump = Pump(so_r, se_r, tmp_path, observer=analyzer, out=os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT),
                err=os.open(tmp_path / "err", os.O_WRONLY | os.O_CREAT)).start()

    def feed(fd: int, data: bytes) -> None:
        os.write(fd, data)
        os.close(fd)

    feeders = [threading.Thread(target=feed, args=(so_w, (GOLDEN / f"{name}.stdout").read_bytes())),
               threading.Thread(target=feed, args=(se_w, (GOLDEN / f"{name}.stderr").read_bytes()))]
    for t in feeders:
        t.start()
    for t in feeders:
        t.join()
    pump.finish()
    code = json.loads((GOLDEN / f"{name}.json").read_text())["exit_code"]
    found = analyzer.first_failure(code)
    assert found is not None
    return found


CASES = {
    # name: (rank, node, how, summary, last line of the rank's own stderr tail)
    "exception": (1, "10.0.0.5", "exception", "rank 1 on 10.0.0.5: ZeroDivisionError: division by zero",
                  "ZeroDivisionError: division by zero"),
    "exception-noabort": (1, "10.0.0.5", "exception", "rank 1 on 10.0.0.5: ZeroDivisionError: division by zero",
                          "ZeroDivisionError: division by zero"),
    "module": (1, "10.0.0.5", "module_missing", "rank 1 on 10.0.0.5: ModuleNotFoundError: No module named "
               "'no_such_module_xyz' (a module missing on that node)",
               "ModuleNotFoundError: No module named 'no_such_module_xyz'"),
    "exit": (1, "10.0.0.5", "exit_code", "rank 1 on 10.0.0.5: exited with code 3", "rank 1 note on stderr"),
    "abort": (1, "10.0.0.5", "mpi_abort", "rank 1 on 10.0.0.5: called MPI_Abort with error code 7",
              "rank 1 note on stderr"),
    "sigkill": (1, "10.0.0.5", "signal", "rank 1 on 10.0.0.5: killed by SIGKILL (9)", "rank 1 note on stderr"),
    "segv": (1, "10.0.0.5", "signal", "rank 1 on 10.0.0.5: killed by SIGSEGV (11)", None),
    "oom": (1, "10.0.0.5", "oom", "rank 1 on 10.0.0.5: killed by the kernel's OOM killer (SIGKILL (9)): out of its "
            "memory cgroup's limit", "rank 1 note on stderr"),
    "shm": (None, "vm", "shm", None, None),
    "ssh-refused": (None, "127.0.0.2", "ssh", "node 127.0.0.2: mpirun could not start its daemon there (ssh: "
                    "Connection refused)", None),
    "hydra-exit": (1, "10.0.0.5", "exit_code", "rank 1 on 10.0.0.5: exited with code 3", None),
    "hydra-kill": (1, "10.0.0.5", "signal", "rank 1 on 10.0.0.5: killed by SIGKILL (9)", None),
    "hydra-exception": (1, "10.0.0.5", "exception", "rank 1 on 10.0.0.5: ZeroDivisionError: division by zero",
                        "ZeroDivisionError: division by zero"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_first_failure_of_real_runs(name: str, tmp_path: Path) -> None:
    rank, node, how, line, tail_end = CASES[name]
    found = first_failure(name, tmp_path)
    assert (found["rank"], found["node"], found["how"]) == (rank, node, how), found
    if line is not None:
        assert found["summary"] == line
    if tail_end is not None:
        assert found["stderr_tail"][-1] == tail_end
    assert set(found) == {"rank", "node", "how", "exit_code", "signal", "signal_name", "exception", "evidence",
                          "detail", "summary", "stderr_tail"}


def test_the_details_that_come_with_them(tmp_path: Path) -> None:
    exception = first_failure("exception", tmp_path / "a")
    assert exception["exit_code"] == 1 and exception["exception"] == "ZeroDivisionError: division by zero"
    tail = exception["stderr_tail"]
    # how the rank was started (runpy, mpi4py.run) is left out: the traceback goes straight to the program
    assert tail[tail.index("Traceback (most recent call last):") + 1].startswith('  File "')
    assert tail[tail.index("Traceback (most recent call last):") + 1].endswith('program.py", line 26, in <module>')
    assert not any("<frozen runpy>" in line or "mpi4py/" in line for line in tail)
    oom = first_failure("oom", tmp_path / "b")
    assert oom["signal_name"] == "SIGKILL"
    assert any("memory cgroup" in e for e in oom["evidence"]) and any(e.startswith("kernel: ") for e in
                                                                      oom["evidence"])
    segv = first_failure("segv", tmp_path / "c")
    tail = segv["stderr_tail"]
    assert any("Segmentation fault" in line for line in tail)
    assert not any("] [ " in line or "] [1" in line for line in tail), "Open MPI's backtrace frames are left out"
    shm = first_failure("shm", tmp_path / "d")
    assert "/dev/shm" in shm["summary"] and any("1048576 B" in e for e in shm["evidence"])
    assert first_failure("abort", tmp_path / "e")["exit_code"] == 7


@pytest.fixture(autouse=True)
def _dirs(tmp_path: Path) -> None:
    for sub in "abcde":
        (tmp_path / sub).mkdir()


def analyzer_with(lines: list[tuple[int | None, str, str]], ends: dict[int, dict[str, Any]] | None = None,
                  ppn: int = 2) -> Analyzer:
    analyzer = Analyzer(["10.0.0.4", "10.0.0.5"], ppn)
    for at, (rank, stream, text) in enumerate(lines):
        analyzer.line(rank, stream, text.encode(), float(at))
    for rank, info in (ends or {}).items():
        analyzer.ended(rank, info, 100.0 + rank)
    return analyzer


def test_ranks_map_to_nodes_by_ranks_per_node() -> None:
    analyzer = Analyzer(["10.0.0.4", "10.0.0.5"], 2)
    assert [analyzer.node_of(r) for r in (0, 1, 2, 3, 4, -1, None)] == [
        "10.0.0.4", "10.0.0.4", "10.0.0.5", "10.0.0.5", None, None, None]


def test_a_chained_exception_is_named_by_its_last_exception() -> None:
    found = analyzer_with([
        (3, "stderr", "Traceback (most recent call last):"), (3, "stderr", '  File "a.py", line 1, in <module>'),
        (3, "stderr", "KeyError: 'x'"), (3, "stderr", ""),
        (3, "stderr", "During handling of the above exception, another exception occurred:"),
        (3, "stderr", ""), (3, "stderr", "Traceback (most recent call last):"),
        (3, "stderr", '  File "a.py", line 3, in <module>'), (3, "stderr", "RuntimeError: config missing"),
    ], {3: {"exit": 1}}).first_failure(1)
    assert found is not None and found["summary"] == "rank 3 on 10.0.0.5: RuntimeError: config missing"


def test_a_traceback_of_a_rank_that_went_on_is_not_the_failure() -> None:
    """logging.exception() on rank 0 (which then ends with 0); rank 2 is killed by SIGSEGV later."""
    found = analyzer_with([(0, "stderr", "Traceback (most recent call last):"), (0, "stderr", "OSError: retrying")],
                          {0: {"exit": 0}, 2: {"signal": 11}}).first_failure(139)
    assert found is not None and (found["rank"], found["how"], found["signal_name"]) == (2, "signal", "SIGSEGV")


def test_what_mpi_does_to_the_others_is_not_the_cause() -> None:
    """The MPI_ABORT message lost (Open MPI 4.1 loses it now and then: "ORTE_ERROR_LOG: Data unpack would read past
    end of buffer"): rank 2's SIGTERM arrives before rank 1's own exit code, which is still the cause."""
    analyzer = Analyzer(HOSTS, 1)
    analyzer.ended(2, {"pid": 1, "signal": 15}, 1.0)
    analyzer.ended(1, {"pid": 2, "exit": 7}, 2.0)
    found = analyzer.first_failure(7)
    assert found is not None and (found["rank"], found["how"], found["exit_code"]) == (1, "exit_code", 7)
    only_killed = Analyzer(HOSTS, 1)
    only_killed.ended(0, {"pid": 1, "signal": 15}, 1.0)
    found = only_killed.first_failure(143)
    assert found is not None and found["summary"] == "rank 0 on 10.0.0.4: killed by SIGTERM (15)"


@pytest.mark.parametrize(("line", "node", "why"), [
    ("ssh: connect to host 10.0.0.9 port 2222: Connection refused", "10.0.0.9", "ssh: Connection refused"),
    ("Connection to 10.0.0.9 port 2222 timed out", "10.0.0.9", "ssh: timed out"),
    ("ssh: Could not resolve hostname tvm-3: Name or service not known", "tvm-3",
     "ssh: Name or service not known"),
    ("Host key verification failed.", None, "ssh: Host key verification failed."),
    ("user@10.0.0.9: Permission denied (publickey).", None, "ssh: Permission denied (publickey)."),
])
def test_ssh_failures(line: str, node: str | None, why: str) -> None:
    found = analyzer_with([(None, "stderr", line),
                           (None, "stderr", "ORTE was unable to reliably start one or more daemons.")]).first_failure(1)
    assert found is not None and (found["how"], found["node"], found["detail"]) == ("ssh", node, why)


def test_hydra_and_mpich_messages() -> None:
    found = analyzer_with([
        (1, "stderr", "Abort(17) on node 1 (rank 1 in comm 0): application called MPI_Abort(MPI_COMM_WORLD, 17) - "
                      "process 1"),
    ]).first_failure(17)
    assert found is not None and (found["rank"], found["how"], found["exit_code"]) == (1, "mpi_abort", 17)
    found = analyzer_with([
        (None, "stdout", "=   BAD TERMINATION OF ONE OF YOUR APPLICATION PROCESSES"),
        (None, "stdout", "=   RANK 3 PID 4242 RUNNING AT tvm-2"), (None, "stdout", "=   KILLED BY SIGNAL: 9 (Killed)"),
    ]).first_failure(9)
    assert found is not None and (found["rank"], found["node"], found["signal"]) == (3, "10.0.0.5", 9)


def test_mpi_init_failures_name_the_process() -> None:
    found = analyzer_with([(None, "stderr", "[vm:11567] *** An error occurred in MPI_Init_thread"),
                           (None, "stderr", "[vm:11567] *** reported by process [1105526785,3]")]).first_failure(1)
    assert found is not None and (found["how"], found["rank"], found["node"]) == ("mpi_init", 3, "10.0.0.5")


def test_nothing_failed() -> None:
    assert Analyzer(HOSTS, 1).first_failure(0) is None
    found = Analyzer(HOSTS, 1).first_failure(2)
    assert found is not None and (found["rank"], found["summary"]) == (None, "exited with code 2")
    assert summary(Event("signal", 0.0, signal=9)) == "killed by SIGKILL (9)"


def test_bounded() -> None:
    analyzer = Analyzer(HOSTS, 1, tail=5)
    for i in range(10_000):
        analyzer.line(1, "stderr", f"line {i}".encode() * 100, float(i))
        analyzer.ended(2, {"signal": 15}, float(i))
    assert len(analyzer.tails[1]) == 5 and all(len(x) <= 500 for x in analyzer.tails[1])
    assert len(analyzer.events) <= 64
