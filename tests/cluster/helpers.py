"""Shared steps of the cluster tests (the cluster itself comes from tests/support/netns.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tests.support.netns import REPO, NetnsCluster

PROBE = [sys.executable, str(REPO / "tests" / "programs" / "mpi_probe.py")]


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
