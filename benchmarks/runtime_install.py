"""What `pool create --install-runtime` costs: building and staging the runtime wheel, and the StartTask on a node.

In one run, against `mpilaunch local up` (emulator + Azurite) in a scratch MPILAUNCH_HOME:
- the wheel build from the source tree (``runtime_wheel``), twice: the bytes must be the same;
- staging the wheel and the install script into a fresh container, then again when both are there already (the
  content-addressed upload: one existence check per file, nothing sent);
- the StartTask on a VM-like node (bare Debian container: apt installs Open MPI, OpenSSH, Python; pip installs the
  wheel and its dependencies), then its re-run after a reboot through the SDK (everything already there);
- the task image's size (node side only), and the VM image's.

Targets: a re-run StartTask <= 10% of a first install; an unchanged wheel is sent 0 times.
Results replace this benchmark's section of docs/benchmarks.md (``--no-write`` to only print them).

Usage: .venv/bin/python benchmarks/runtime_install.py [--no-write]   (root, docker, scripts/setup done)
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, parser, publish

BEGIN, END = "<!-- runtime_install:begin -->", "<!-- runtime_install:end -->"
MAX_RERUN_RATIO = 0.10


def seconds(start: float) -> float:
    return time.perf_counter() - start


def start_task_seconds(batch: Any, pool_id: str, node_id: str, after: datetime | None) -> tuple[float, datetime]:
    """Wait until the node is idle with a StartTask that started after ``after``; its duration and start."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        node = batch.get_node(pool_id, node_id)
        info = node.start_task_info
        if (getattr(node.state, "value", node.state) == "idle" and info is not None and info.end_time is not None
                and (after is None or info.start_time > after)):
            if info.exit_code != 0:
                raise RuntimeError(f"the StartTask failed: {info.failure_info}")
            return (info.end_time - info.start_time).total_seconds(), info.start_time
        time.sleep(0.5)
    raise RuntimeError("the node did not become idle in 600 s")


def image_mb(tag: str) -> float:
    out = subprocess.run(["docker", "image", "inspect", "-f", "{{.Size}}", tag], check=True, capture_output=True,
                         text=True).stdout
    return int(out) / 1e6


def measure() -> dict[str, Any]:
    from mpilaunch.client import local, pools, runtime, storage
    from mpilaunch.client.api import Launcher
    from mpilaunch.emulator.defaults import KIND_VM, VM_IMAGE

    for script in ("build-image", "build-vm-image"):
        subprocess.run([str(REPO / "scripts" / script)], check=True)
    results: dict[str, Any] = {"image_mb": image_mb("mpilaunch:latest"), "vm_image_mb": image_mb(VM_IMAGE)}
    with tempfile.TemporaryDirectory(prefix="runtimebench-") as tmp:
        os.environ["MPILAUNCH_HOME"] = str(Path(tmp) / "home")
        os.environ["MPILAUNCH_CONFIG"] = str(Path(tmp) / "none.toml")
        local.up(1, default_ports=False)
        try:
            start = time.perf_counter()
            wheel = runtime.runtime_wheel(None, Path(tmp) / "w1")
            results["build_s"] = seconds(start)
            again = runtime.build_wheel(REPO, Path(tmp) / "w2")
            results["reproducible"] = hashlib.sha256(wheel.read_bytes()).digest() == \
                hashlib.sha256(again.read_bytes()).digest()
            results["wheel_kb"] = wheel.stat().st_size / 1e3
            launcher = Launcher.local()
            store = storage.StagingStore(replace(launcher.settings.storage, container=f"bench{uuid.uuid4().hex[:8]}"))
            files = storage.walk_inputs([wheel, runtime.INSTALL_SCRIPT])
            start = time.perf_counter()
            first = store.upload(files)
            results["upload_first_s"], results["sent_first"] = seconds(start), len(first.uploaded)
            start = time.perf_counter()
            second = store.upload(files)
            results["upload_again_s"], results["sent_again"] = seconds(start), len(second.uploaded)
            results["files"] = len(files)

            pool_id = f"bench-{uuid.uuid4().hex[:6]}"
            spec = pools.PoolSpec(pool_id, nodes=1, install_runtime=True, emulator_nodes=KIND_VM)
            pools.ensure_pool(launcher.batch, spec, launcher.stage_runtime())
            while not (listed := list(launcher.batch.list_nodes(pool_id))):  # the resize adds it
                time.sleep(0.2)
            node_id = listed[0].id
            results["install_s"], started = start_task_seconds(launcher.batch, pool_id, node_id, None)
            from azure.batch.models._models import BatchNodeRebootOptions  # the SDK takes it, but does not export it

            launcher.batch.begin_reboot_node(pool_id, node_id, BatchNodeRebootOptions(node_reboot_kind="requeue"),
                                             polling_interval=0.5).result()
            results["rerun_s"], _ = start_task_seconds(launcher.batch, pool_id, node_id, started)
        finally:
            local.down()
            from mpilaunch.emulator.nodes.docker import remove_scope

            remove_scope(local.docker_scope())
    return results


def section(r: dict[str, Any]) -> str:
    ratio = r["rerun_s"] / r["install_s"]
    verdict = "meets it" if ratio <= MAX_RERUN_RATIO else "misses it"
    return "\n".join([
        BEGIN,
        "## Runtime install: wheel, staging, StartTask (`benchmarks/runtime_install.py`)",
        "",
        f"On {platform.node() or 'this machine'} ({os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f} at the end), {time.strftime('%Y-%m-%d')}; emulator + Azurite, one VM-like node.",
        "",
        "| step | figure |",
        "|---|---|",
        f"| build the runtime wheel from the source tree | {r['build_s']:.2f} s ({r['wheel_kb']:.0f} kB; "
        f"byte-identical when built again: {'yes' if r['reproducible'] else 'NO'}) |",
        f"| stage wheel + install script into an empty container | {r['upload_first_s'] * 1000:.0f} ms, "
        f"{r['sent_first']} of {r['files']} files sent |",
        f"| stage them again (already there) | {r['upload_again_s'] * 1000:.0f} ms, {r['sent_again']} sent, "
        f"{r['files']} existence checks |",
        f"| StartTask, first install on a bare node (apt + venv + pip) | {r['install_s']:.1f} s |",
        f"| StartTask re-run after a reboot (`begin_reboot_node`; all there) | {r['rerun_s']:.1f} s "
        f"(**{ratio:.2f}** of the first; target <= {MAX_RERUN_RATIO:.2f}: {verdict}) |",
        "",
        f"Task image (`mpilaunch:latest`, node side only: node_runtime + checkpoint extra): "
        f"**{r['image_mb']:.0f} MB**; "
        "it was 280 MB with the client and emulator and their dependencies inside (measured side by side on "
        "2026-12-03, commit e9dcd20 vs dd97ca3). VM image of the emulator's VM-like nodes (bare Debian + CA "
        f"certificates): {r['vm_image_mb']:.0f} MB.",
        "",
        "The first install's time is mostly apt and PyPI downloads here; on Azure it depends on the region's mirrors.",
        END,
    ])


def main() -> None:
    args = parser(__doc__).parse_args()
    publish(section(measure()), BEGIN, END, write=not args.no_write)


if __name__ == "__main__":
    main()
