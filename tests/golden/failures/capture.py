"""Capture real Open MPI (and MPICH Hydra) output of failing 3-rank jobs, each rank behind node_runtime.ranktap as
launch runs it: ``<case>.stdout`` / ``<case>.stderr`` are mpirun's raw pipes, ``<case>.json`` how it was run.

Run as root on a machine with Open MPI, mpi4py and (for the hydra cases) MPICH: ``.venv/bin/python
tests/golden/failures/capture.py [CASE...]``; the ``oom`` case needs a cgroup (v1 or v2) memory controller, ``shm``
``unshare -m``. Review the diff: tests/unit/test_failure.py derives the first failure from these files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
TAP = [sys.executable, "-I", "-S", str(ROOT / "node_runtime" / "ranktap.py")]
PY = sys.executable
MPIRUN = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "3"]
PROGRAM = str(HERE / "program.py")
HYDRA_PROGRAM = ["-c", "import os, sys, time; r = int(os.environ['PMI_RANK']); print(f'rank {r} up', flush=True); "
                       "time.sleep(0.2) if r == 1 else time.sleep(2); "
                       "r == 1 and (sys.exit(3) if sys.argv[1] == 'exit' else os.kill(os.getpid(), 9) "
                       "if sys.argv[1] == 'kill' else 1 / 0)"]
CGROUP_LIMIT = 600 << 20


def cases() -> dict[str, list[str]]:
    mpi4py = [*TAP, PY, "-m", "mpi4py", PROGRAM]
    plain = [*TAP, PY, PROGRAM]
    return {
        "exception": [*MPIRUN, *mpi4py, "exception"],
        "exception-noabort": [*MPIRUN, *plain, "exception-noabort"],
        "exit": [*MPIRUN, *plain, "exit"],
        "sigkill": [*MPIRUN, *mpi4py, "sigkill"],
        "segv": [*MPIRUN, *mpi4py, "segv"],
        "module": [*MPIRUN, *mpi4py, "module"],
        "abort": [*MPIRUN, *mpi4py, "abort"],
        "oom": [*MPIRUN, *mpi4py, "oom"],
        "shm": ["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o size=1m tmpfs /dev/shm && exec "$@"', "sh",
                *MPIRUN, "--mca", "btl", "self,vader", *mpi4py, "ok"],
        "ssh-refused": ["mpirun", "--allow-run-as-root", "-np", "2", "--host", "127.0.0.1:1,127.0.0.2:1", "--mca",
                        "plm_rsh_args", "-p 1 -o BatchMode=yes -o ConnectTimeout=3", *mpi4py, "ok"],
        "hydra-exit": ["mpiexec.mpich", "-launcher", "fork", "-n", "3", *TAP, PY, *HYDRA_PROGRAM, "exit"],
        "hydra-kill": ["mpiexec.mpich", "-launcher", "fork", "-n", "3", *TAP, PY, *HYDRA_PROGRAM, "kill"],
        "hydra-exception": ["mpiexec.mpich", "-launcher", "fork", "-n", "3", *TAP, PY, *HYDRA_PROGRAM, "exc"],
    }


def in_memory_cgroup(argv: list[str]) -> tuple[list[str], Path]:
    """``argv`` run in a new memory cgroup limited to :data:`CGROUP_LIMIT` (v2, else v1)."""
    v2 = Path("/sys/fs/cgroup/cgroup.controllers")
    if v2.exists() and "memory" in v2.read_text().split():
        group = Path("/sys/fs/cgroup/mpl-capture-oom")
        group.mkdir(exist_ok=True)
        (group / "memory.max").write_text(str(CGROUP_LIMIT))
    else:
        group = Path("/sys/fs/cgroup/memory/mpl-capture-oom")
        group.mkdir(exist_ok=True)
        (group / "memory.limit_in_bytes").write_text(str(CGROUP_LIMIT))
    return ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh", *argv], group


def capture(name: str, argv: list[str]) -> None:
    group = None
    if name == "oom":
        argv, group = in_memory_cgroup(argv)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, timeout=120, env=env, cwd=HERE, check=False)
    (HERE / f"{name}.stdout").write_bytes(done.stdout)
    (HERE / f"{name}.stderr").write_bytes(done.stderr)
    (HERE / f"{name}.json").write_text(json.dumps({
        "argv": [a.replace(str(ROOT), "<repo>").replace(PY, "<python>") for a in argv],
        "exit_code": done.returncode, "seconds": round(time.monotonic() - started, 2),
        "mpirun": subprocess.run(["mpirun", "--version"], capture_output=True, text=True,
                                 check=False).stdout.splitlines()[0],
    }, indent=2) + "\n")
    print(f"{name}: exit {done.returncode}")
    if group is not None:
        time.sleep(0.5)
        group.rmdir()


if __name__ == "__main__":
    wanted = sys.argv[1:] or list(cases())
    for case_name, case_argv in cases().items():
        if case_name in wanted:
            capture(case_name, case_argv)
