"""Shared steps of the cluster tests (the cluster itself comes from tests/support/netns.py)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from node_runtime import sshd
from tests.support.netns import REPO, NetnsCluster

PROBE = [sys.executable, str(REPO / "tests" / "programs" / "mpi_probe.py")]
MPICH = Path("/usr/bin/mpiexec.hydra")  # Debian's mpich (scripts/setup installs it; `mpirun` stays Open MPI's)
needs_mpich = pytest.mark.skipif(not MPICH.exists(), reason="MPICH is not installed (scripts/setup installs it)")


def coordinate(cluster: NetnsCluster, *nodes: int) -> None:
    """Run ``node-runtime coordinate`` on ``nodes`` (default: all) and require success."""
    for i in nodes or range(len(cluster.nodes)):
        done = cluster.node_runtime(i, "coordinate", timeout=60)
        assert done.returncode == 0, f"coordinate on node {i}: {done.stdout}{done.stderr}"


def ranks(stdout: str) -> list[dict[str, Any]]:
    """The per-rank JSON records mpi_probe.py printed, in rank order."""
    records = [json.loads(line) for line in stdout.splitlines() if line.startswith('{"addresses"')]
    return sorted(records, key=lambda r: r["rank"])


def report(cluster: NetnsCluster) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((cluster.nodes[0].working_dir / "launch-report.json").read_text())
    return data


def sshd_pids(cluster: NetnsCluster, i: int) -> list[int]:
    found = []
    for pid in cluster.pids(i):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "sshd":
                found.append(pid)
        except OSError:
            pass  # exited meanwhile
    return found


def sshd_running(cluster: NetnsCluster, i: int) -> bool:
    return bool(sshd_pids(cluster, i))


def service_of(cluster: NetnsCluster, i: int, env: Mapping[str, str] | None = None) -> sshd.Service:
    """Node ``i``'s service as its runtime sees it (with ``env`` overriding the node's environment)."""
    full = {**cluster.nodes[i].env, **(env or {})}
    return sshd.service_for(full["AZ_BATCH_TASK_SHARED_DIR"], cluster.nodes[i].address,
                            int(full["MPILAUNCH_SSH_PORT"]), node_root=Path(full["AZ_BATCH_NODE_ROOT_DIR"]),
                            environ=full)


def files_with_keys(root: Path) -> list[Path]:
    """The files below ``root`` that hold an OpenSSH private key."""
    return [path for path in root.rglob("*") if path.is_file() and not path.is_symlink()
            and any(mark in path.read_bytes() for mark in (b"PRIVATE KEY", b"openssh-key-v1"))]


def environ_shows(pid: int, secret: str) -> bool:
    """Whether process ``pid``'s environment, as /proc shows it to others, holds ``secret`` (False once it is gone)."""
    try:
        return secret.encode() in Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False


def mpich_first(directory: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Debian's MPICH first on the nodes' PATH, through links in ``directory`` (Hydra finds hydra_pmi_proxy beside
    itself): the nodes' extra environment, and launch's. mpi4py's wheel would load the ``libmpi.so`` development link
    (Open MPI's here: every rank would run alone, size 1) and its MPICH module needs ``libmpi.so.12``, which Debian
    names ``libmpich.so.12``."""
    for name in ("hydra_pmi_proxy", "mpichversion"):
        (directory / name).symlink_to(MPICH.parent / name)
    (directory / "mpirun").symlink_to(MPICH)
    (directory / "lib").mkdir()
    (directory / "lib" / "libmpi.so.12").symlink_to(next(Path("/usr/lib").glob("*/libmpich.so.12")))
    nodes = {"PATH": f"{directory}:{os.environ['PATH']}"}
    launch = {"MPI4PY_LIBMPI": "libmpi.so.12", "LD_LIBRARY_PATH": str(directory / "lib"),
              "MPILAUNCH_EXPORT_ENV": "MPI4PY_LIBMPI"}
    return nodes, launch
