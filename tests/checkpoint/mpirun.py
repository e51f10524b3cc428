"""Running real ``mpirun -np N`` jobs from tests: loopback-only Open MPI, always under a timeout, killable."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROGRAMS = Path(__file__).resolve().parent / "programs"
EXAMPLES = REPO / "examples"

MPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMPI_MCA_pml": "ob1",
    "OMPI_MCA_btl": "self,vader,tcp", "OMPI_MCA_btl_tcp_if_include": "lo", "OMPI_MCA_oob_tcp_if_include": "lo",
    "OMPI_MCA_rmaps_base_oversubscribe": "1", "PYTHONPATH": str(REPO),
}


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    killed: bool  # we SIGKILLed the whole job (as a node loss would)


def mpirun(script: Path, *args: str, np: int = 3, timeout: float = 120, kill_when: Callable[[], bool] | None = None,
           env: dict[str, str] | None = None) -> Run:
    """Run ``python script args`` on ``np`` ranks; SIGKILL mpirun and every rank as soon as ``kill_when()`` is true
    (polled every 10 ms)."""
    argv = ["mpirun", "-np", str(np), sys.executable, str(script), *args]
    full_env = {**os.environ, **MPI_ENV, **(env or {})}
    proc = subprocess.Popen(argv, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    killed = False
    try:
        deadline = time.monotonic() + timeout
        while kill_when is not None and proc.poll() is None and time.monotonic() < deadline:
            if kill_when():
                killed = _kill_session(proc.pid)
                break
            time.sleep(0.01)
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_session(proc.pid)
        out, err = proc.communicate()
        raise AssertionError(f"mpirun hung for {timeout} s: {' '.join(argv)}\n{err[-3000:]}") from None
    finally:
        _kill_session(proc.pid)  # no rank may outlive its job (an orphan would keep committing)
    return Run(proc.returncode, out, err, killed)


def _session(sid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                zombie = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
                if os.getsid(int(entry)) == sid and not zombie:
                    found.append(int(entry))
            except OSError:
                pass  # exited meanwhile
    return found


def _kill_session(sid: int) -> bool:
    """SIGKILL every process of the job's session at once, as a node loss would: mpirun and the ranks, which
    Open MPI puts in process groups of their own. True if anything was alive."""
    hit = False
    for _ in range(100):
        pids = _session(sid)
        if not pids:
            return hit
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                hit = True
        time.sleep(0.01)
    raise AssertionError(f"processes of session {sid} survive SIGKILL: {_session(sid)}")
