"""What the benchmark scripts share: their command line, publishing their docs/benchmarks.md section, and an
in-process emulator with a ready multi-instance pool, driven through the unmodified azure-batch SDK.

Scripts run as ``.venv/bin/python benchmarks/NAME.py``; they put the repository on ``sys.path`` before importing
this module.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.docsection import DOC, write_section

REPO = Path(__file__).resolve().parents[1]


def parser(doc: str | None, *, repeat: int | None = None, writes: bool = True) -> argparse.ArgumentParser:
    """The script's parser: its module docstring as help, ``--repeat`` when given a default, and ``--no-write``
    for scripts that write their section (see :func:`publish`)."""
    made = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if repeat is not None:
        made.add_argument("--repeat", type=int, default=repeat, help="measured rounds (after one warm-up round)")
    if writes:
        made.add_argument("--no-write", action="store_true", help="print the results only")
    return made


def publish(section: str, begin: str, end: str, *, write: bool) -> None:
    """Print ``section`` and, with ``write``, put it between ``begin`` and ``end`` in docs/benchmarks.md."""
    print(section)
    if write:
        write_section(section, begin, end)
        print(f"written to {DOC.relative_to(REPO)}")


def wait_completed(client: Any, job_id: str, task_id: str, timeout: float = 120.0) -> Any:
    """Poll (every 10 ms) until the task completed; it, or an error if it failed or took over ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        task = client.get_task(job_id, task_id)
        if task.state == "completed":
            if task.execution_info.result != "success":
                raise RuntimeError(f"task {task_id} failed: {task.execution_info.failure_info}")
            return task
        time.sleep(0.01)
    raise RuntimeError(f"task {task_id} did not complete in {timeout}s")


@dataclass(frozen=True)
class MpiPool:
    """A running emulator's SDK client, and a job on its ready pool of idle nodes."""

    client: Any
    pool_id: str
    job_id: str
    ready_seconds: float
    """Pool create → all nodes idle."""


@contextlib.contextmanager
def emulator_pool(nodes: int = 3, *, images: Sequence[str] = (), provider: Any = None,
                  timeout: float = 120.0) -> Iterator[MpiPool]:
    """An emulator (this process, port 0, scratch state; ``provider``'s nodes, process nodes if None) with a pool of
    ``nodes`` idle nodes for multi-instance tasks (a container pool of ``images`` if given) and a job on it."""
    from azure.batch import models as m

    from mpilaunch.emulator.server import EmulatorServer
    from tests.support.emulator import RunningEmulator

    with tempfile.TemporaryDirectory(prefix="emubench-") as tmp:
        server = EmulatorServer(Path(tmp) / "data", host="127.0.0.1", port=0, provider=provider)
        server.start()
        try:
            handle = RunningEmulator(Path(tmp) / "data")
            handle.endpoint = server.endpoint
            client = handle.client()
            pool_id, job_id = f"bench-{uuid.uuid4().hex[:6]}", "bench"
            image = (m.BatchVmImageReference(publisher="microsoft-dsvm", offer="ubuntu-hpc", sku="2204") if images
                     else m.BatchVmImageReference(publisher="canonical", offer="ubuntu", sku="22_04-lts"))
            containers = (m.BatchContainerConfiguration(type="dockerCompatible", container_image_names=list(images))
                          if images else None)
            start = time.perf_counter()
            client.create_pool(m.BatchPoolCreateOptions(
                id=pool_id, vm_size="standard_d2s_v3", target_dedicated_nodes=nodes, task_slots_per_node=1,
                enable_inter_node_communication=True,
                virtual_machine_configuration=m.VirtualMachineConfiguration(
                    image_reference=image, node_agent_sku_id="batch.node.ubuntu 22.04",
                    container_configuration=containers)))
            while [n.state for n in client.list_nodes(pool_id)] != ["idle"] * nodes:
                if time.perf_counter() - start > timeout:
                    raise RuntimeError(f"pool {pool_id} did not get {nodes} idle nodes in {timeout:.0f}s")
                time.sleep(0.05)
            ready = time.perf_counter() - start
            client.create_job(m.BatchJobCreateOptions(id=job_id, pool_info=m.BatchPoolInfo(pool_id=pool_id)))
            yield MpiPool(client, pool_id, job_id, ready)
        finally:
            server.stop()
