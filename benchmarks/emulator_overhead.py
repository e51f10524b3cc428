"""Overhead of the local Batch emulator: submit → completed of a trivial 3-node multi-instance task vs. bare commands.

An emulator (``EmulatorServer``, default process provider, port 0) runs in this process; the unmodified azure-batch
SDK creates a 3-node pool (not timed), then, interleaved for ``--repeat`` rounds:

- *emulator*: ``create_task`` of a multi-instance task (coordination ``python -c pass`` on 3 nodes, command
  ``python -c pass`` on the primary) until ``get_task`` (polled every 10 ms) says completed;
- *bare*: the same commands as local processes: the 3 coordination commands in parallel, then the command.

Overhead = emulator - bare (median over rounds). Target: <= 1.0 s. Results replace this benchmark's section of
docs/benchmarks.md (``--no-write`` to only print them).

Usage: .venv/bin/python benchmarks/emulator_overhead.py [--repeat N] [--no-write]
"""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import emulator_pool, parser, publish, wait_completed

BEGIN, END = "<!-- emulator_overhead:begin -->", "<!-- emulator_overhead:end -->"
TARGET = 1.0
ARGV = [sys.executable, "-c", "pass"]


def bare_once() -> float:
    start = time.perf_counter()
    procs = [subprocess.Popen(ARGV) for _ in range(3)]
    if any(p.wait() != 0 for p in procs) or subprocess.run(ARGV, check=False).returncode != 0:
        raise RuntimeError("bare commands failed")
    return time.perf_counter() - start


def measure(repeat: int) -> dict[str, Any]:
    from azure.batch import models as m

    from mpilaunch.emulator.nodes.process import isolation_available

    emulated, bare = [], []
    with emulator_pool(3) as pool:
        for i in range(repeat + 1):
            start = time.perf_counter()
            pool.client.create_task(pool.job_id, m.BatchTaskCreateOptions(
                id=f"t{i}", command_line=shlex.join(ARGV),
                multi_instance_settings=m.MultiInstanceSettings(number_of_instances=3,
                                                                coordination_command_line=shlex.join(ARGV))))
            wait_completed(pool.client, pool.job_id, f"t{i}", timeout=60)
            wall = time.perf_counter() - start
            bare_wall = bare_once()
            if i:  # round 0 warms caches up
                emulated.append(wall)
                bare.append(bare_wall)
    return {"emulated": emulated, "bare": bare, "isolated": isolation_available()}


def markdown(results: dict[str, Any]) -> str:
    emu, bare = statistics.median(results["emulated"]), statistics.median(results["bare"])
    overhead = emu - bare
    verdict = "meets" if overhead <= TARGET else "MISSES"
    return "\n".join([
        BEGIN,
        "## Emulator overhead (`benchmarks/emulator_overhead.py`)",
        "",
        f"Trivial 3-node multi-instance task, submit → completed through the azure-batch SDK, vs. the bare "
        f"commands; median of {len(results['emulated'])} rounds on {platform.node() or 'this machine'} "
        f"({os.cpu_count()} cores, Python {platform.python_version()}, process provider, per-node namespaces: "
        f"{'yes' if results['isolated'] else 'no'}).",
        "",
        "| measurement | median | min | max |",
        "|---|---|---|---|",
        *(f"| {name} | {statistics.median(v):.3f} s | {min(v):.3f} s | {max(v):.3f} s |"
          for name, v in (("emulator: submit → completed", results["emulated"]),
                          ("bare: 3 coordination commands ∥, then the command", results["bare"]))),
        f"| **overhead** | **{overhead:.3f} s** | | |",
        "",
        f"Target: overhead <= {TARGET:.1f} s — {verdict} it.",
        END,
    ])


def main() -> int:
    args = parser(__doc__, repeat=10).parse_args()
    publish(markdown(measure(args.repeat)), BEGIN, END, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
