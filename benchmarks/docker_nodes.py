"""The task image and the emulator's docker nodes: build times, image size, and task latency on docker nodes.

Image: ``scripts/build-image`` in a scratch copy of the build context (own tag, the machine's layer cache, the base
image already present): a build without cache (``docker build --no-cache``), a rebuild after a one-line source
change, and a call with nothing changed; plus the image size.

Docker nodes: an emulator (``EmulatorServer`` in this process with the docker provider) and the unmodified
azure-batch SDK; a container pool of 3 nodes (create → 3 idle), then, for ``--repeat`` rounds, submit → completed of
a trivial 3-node multi-instance task (coordination and command ``true``) and of a real one (``node-runtime
coordinate`` on each node, ``node-runtime launch`` of an mpi4py allreduce on 3 containers).

Targets: image <= 400 MB; rebuild after a source change <= 20 s; trivial task on docker nodes <= 2.5 s.
Results replace this benchmark's section of docs/benchmarks.md (``--no-write`` to only print them).

Usage: .venv/bin/python benchmarks/docker_nodes.py [--repeat N] [--no-write] [--skip-image (prints only)]
"""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, emulator_pool, parser, publish, wait_completed

BEGIN, END = "<!-- docker_nodes:begin -->", "<!-- docker_nodes:end -->"
IMAGE = "mpilaunch:latest"
CONTEXT = ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md", "node_runtime", "certs", "scripts/build-image",
           "scripts/lib")
MAX_MB, MAX_REBUILD, MAX_TRIVIAL = 400, 20.0, 2.5
ALLREDUCE = "from mpi4py import MPI; assert MPI.COMM_WORLD.allreduce(1) == 3"


def timed(argv: list[str], **kwargs: Any) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, check=False, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} exited {done.returncode}: {done.stderr[-2000:]}")
    return time.perf_counter() - start


def measure_image() -> dict[str, float]:
    tag = f"mpilaunch-bench:{os.getpid()}"
    subprocess.run([str(REPO / "scripts" / "build-image")], check=True)  # the base image and the layer cache
    with tempfile.TemporaryDirectory(prefix="imagebench-") as tmp:
        ctx = Path(tmp)
        for name in CONTEXT:
            src, dst = REPO / name, ctx / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(src, dst)
        env = os.environ | {"DOCKER_BUILDKIT": "0"}
        try:
            cold = timed(["docker", "build", "-q", "--no-cache", "-t", tag, str(ctx)], env=env)
            timed([str(ctx / "scripts" / "build-image"), tag], cwd=ctx)  # labels it as up to date
            with (ctx / "mpilaunch" / "__init__.py").open("a") as f:
                f.write("# a source change\n")
            rebuild = timed([str(ctx / "scripts" / "build-image"), tag], cwd=ctx)
            noop = timed([str(ctx / "scripts" / "build-image"), tag], cwd=ctx)
            size = int(subprocess.run(["docker", "image", "inspect", "-f", "{{.Size}}", tag], check=True,
                                      capture_output=True, text=True).stdout)
        finally:
            subprocess.run(["docker", "rmi", "-f", tag], check=False, capture_output=True)
    return {"cold": cold, "rebuild": rebuild, "noop": noop, "size_mb": size / 1e6}


def measure_nodes(repeat: int) -> dict[str, Any]:
    from azure.batch import models as m

    from mpilaunch.emulator.nodes.docker import DockerProvider, remove_scope

    scope = f"mplbench-{os.getpid()}"
    try:
        with emulator_pool(3, images=[IMAGE], provider=DockerProvider(scope=scope)) as pool:
            secret = [m.EnvironmentSetting(name="AZ_BATCH_NODE_COUNT", value="3"),
                      m.EnvironmentSetting(name="MPILAUNCH_TASK_SECRET", value=uuid.uuid4().hex * 2)]
            kinds = {"trivial": ("true", "true"),
                     "mpi": ("node-runtime coordinate",
                             shlex.join(["node-runtime", "launch", "--ppn", "1", "--", "python3", "-c", ALLREDUCE]))}
            walls: dict[str, list[float]] = {k: [] for k in kinds}
            for i in range(repeat + 1):
                for kind, (coordination, command) in kinds.items():
                    start = time.perf_counter()
                    pool.client.create_task(pool.job_id, m.BatchTaskCreateOptions(
                        id=f"{kind}{i}", command_line=command, environment_settings=secret,
                        container_settings=m.BatchTaskContainerSettings(image_name=IMAGE),
                        multi_instance_settings=m.MultiInstanceSettings(number_of_instances=3,
                                                                        coordination_command_line=coordination)))
                    wait_completed(pool.client, pool.job_id, f"{kind}{i}")
                    if i:  # round 0 warms caches up
                        walls[kind].append(time.perf_counter() - start)
    finally:
        remove_scope(scope)
    return {"pool_ready": pool.ready_seconds, **walls}


def server_version() -> str:
    done = subprocess.run(["docker", "version", "-f", "{{.Server.Version}}"], check=True, capture_output=True,
                          text=True)
    return done.stdout.strip()


def verdict(ok: bool) -> str:
    return "meets it" if ok else "MISSES it"


def image_lines(image: dict[str, float]) -> list[str]:
    return [
        "| image (`scripts/build-image`, base image present) | seconds |",
        "|---|---|",
        f"| build without cache (apt + pip from the network) | {image['cold']:.1f} |",
        f"| rebuild after a source change (project layer only) | {image['rebuild']:.1f} |",
        f"| nothing changed (no build) | {image['noop']:.2f} |",
        "",
        f"Image size: **{image['size_mb']:.0f} MB** (target <= {MAX_MB} MB: {verdict(image['size_mb'] <= MAX_MB)}). "
        f"Rebuild after a source change: target <= {MAX_REBUILD:.0f} s: {verdict(image['rebuild'] <= MAX_REBUILD)}. "
        "Not included: creating the base image (debootstrap + import, once per machine).",
        "",
    ]


def markdown(image: dict[str, float] | None, nodes: dict[str, Any], repeat: int) -> str:
    """The section; without ``image`` (``--skip-image``) only the docker-node table, for printing."""
    trivial = statistics.median(nodes["trivial"])
    return "\n".join([
        BEGIN,
        "## Task image and docker nodes (`benchmarks/docker_nodes.py`)",
        "",
        f"On {platform.node() or 'this machine'} ({os.cpu_count()} cores, Docker {server_version()}, legacy builder, "
        f"load average {os.getloadavg()[0]:.1f} at the end), {time.strftime('%Y-%m-%d')}.",
        "",
        *(image_lines(image) if image is not None else []),
        f"Emulator with docker nodes, azure-batch SDK, median of {repeat} rounds:",
        "",
        "| measurement | median | min | max |",
        "|---|---|---|---|",
        f"| container pool: create → 3 idle nodes | {nodes['pool_ready']:.2f} s | | |",
        *(f"| {label}: submit → completed | {statistics.median(nodes[k]):.2f} s | {min(nodes[k]):.2f} s | "
          f"{max(nodes[k]):.2f} s |"
          for k, label in (("trivial", "3-node task, `true` everywhere"),
                           ("mpi", "3-node mpi4py allreduce via `node-runtime coordinate`/`launch`"))),
        "",
        f"Target: trivial task <= {MAX_TRIVIAL:.1f} s — {verdict(trivial <= MAX_TRIVIAL)} (each attempt creates and "
        "starts one task container per node; the process provider's figure is in the emulator overhead section).",
        END,
    ])


def main() -> int:
    ap = parser(__doc__, repeat=5)
    ap.add_argument("--skip-image", action="store_true", help="measure the docker nodes only (no image builds)")
    args = ap.parse_args()
    if args.skip_image:
        print(markdown(None, measure_nodes(args.repeat), args.repeat))
        return 0
    image = measure_image()
    publish(markdown(image, measure_nodes(args.repeat), args.repeat), BEGIN, END, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
