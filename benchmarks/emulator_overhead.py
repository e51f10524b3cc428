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

import argparse
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DOC = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- emulator_overhead:begin -->", "<!-- emulator_overhead:end -->"
TARGET = 1.0
ARGV = [sys.executable, "-c", "pass"]


def wait_completed(client: Any, job_id: str, task_id: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        task = client.get_task(job_id, task_id)
        if task.state == "completed":
            return task
        time.sleep(0.01)
    raise RuntimeError(f"task {task_id} did not complete in {timeout}s")


def bare_once() -> float:
    start = time.perf_counter()
    procs = [subprocess.Popen(ARGV) for _ in range(3)]
    if any(p.wait() != 0 for p in procs) or subprocess.run(ARGV, check=False).returncode != 0:
        raise RuntimeError("bare commands failed")
    return time.perf_counter() - start


def measure(repeat: int) -> dict[str, Any]:
    from azure.batch import models as m

    from mpilaunch.emulator.nodes.process import isolation_available
    from mpilaunch.emulator.server import EmulatorServer
    from tests.support.emulator import RunningEmulator

    with tempfile.TemporaryDirectory(prefix="emubench-") as tmp:
        server = EmulatorServer(Path(tmp) / "data", port=0)
        server.start()
        try:
            handle = RunningEmulator(Path(tmp) / "data")
            handle.endpoint = server.endpoint
            client = handle.client()
            pool_id, job_id = f"bench-{uuid.uuid4().hex[:6]}", "bench"
            client.create_pool(m.BatchPoolCreateOptions(
                id=pool_id, vm_size="standard_d2s_v3", target_dedicated_nodes=3, task_slots_per_node=1,
                enable_inter_node_communication=True,
                virtual_machine_configuration=m.VirtualMachineConfiguration(
                    image_reference=m.BatchVmImageReference(publisher="canonical", offer="ubuntu", sku="22_04-lts"),
                    node_agent_sku_id="batch.node.ubuntu 22.04")))
            deadline = time.monotonic() + 60
            while [n.state for n in client.list_nodes(pool_id)] != ["idle"] * 3:
                if time.monotonic() > deadline:
                    raise RuntimeError("pool did not get 3 idle nodes")
                time.sleep(0.05)
            client.create_job(m.BatchJobCreateOptions(id=job_id, pool_info=m.BatchPoolInfo(pool_id=pool_id)))
            emulated, bare = [], []
            for i in range(repeat + 1):
                start = time.perf_counter()
                client.create_task(job_id, m.BatchTaskCreateOptions(
                    id=f"t{i}", command_line=shlex.join(ARGV),
                    multi_instance_settings=m.MultiInstanceSettings(number_of_instances=3,
                                                                    coordination_command_line=shlex.join(ARGV))))
                task = wait_completed(client, job_id, f"t{i}")
                wall = time.perf_counter() - start
                if task.execution_info.result != "success":
                    raise RuntimeError(f"task t{i} failed: {task.execution_info.failure_info}")
                bare_wall = bare_once()
                if i:  # round 0 warms caches up
                    emulated.append(wall)
                    bare.append(bare_wall)
        finally:
            server.stop()
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


def write_section(section: str) -> None:
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n\nResults of the scripts in `benchmarks/`.\n"
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    text = pattern.sub(lambda _m: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    DOC.write_text(text.rstrip("\n") + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--no-write", action="store_true", help="print the results only")
    args = parser.parse_args()
    section = markdown(measure(args.repeat))
    print(section)
    if not args.no_write:
        write_section(section)
        print(f"written to {DOC.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
