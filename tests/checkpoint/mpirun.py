"""Running real ``mpirun -np N`` jobs from tests: loopback-only Open MPI, always under a timeout, killable."""

from __future__ import annotations

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


def mpirun(script: Path, *args: str, np: int = 3, timeout: float = 120, kill_after: float | None = None,
           kill_when: Callable[[], bool] | None = None, env: dict[str, str] | None = None) -> Run:
    """Run ``python script args`` on ``np`` ranks; SIGKILL mpirun and every rank ``kill_after`` seconds after the
    start, or as soon as ``kill_when()`` is true (polled every 10 ms)."""
    argv = ["mpirun", "-np", str(np), sys.executable, str(script), *args]
    full_env = {**os.environ, **MPI_ENV, **(env or {})}
    proc = subprocess.Popen(argv, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    killed = False
    try:
        if kill_after is not None:
            try:
                proc.wait(kill_after)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
        deadline = time.monotonic() + timeout
        while kill_when is not None and proc.poll() is None and time.monotonic() < deadline:
            if kill_when():
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
                break
            time.sleep(0.01)
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"mpirun hung for {timeout} s: {' '.join(argv)}\n{err[-3000:]}") from None
    finally:
        _reap_group(proc.pid)
    return Run(proc.returncode, out, err, killed)


def _reap_group(pgid: int) -> None:
    """Make sure no rank of the job outlives it (ranks of a killed mpirun would keep writing)."""
    for _ in range(50):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return
        time.sleep(0.02)
