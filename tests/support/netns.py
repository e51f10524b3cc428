"""A real multi-host cluster on one machine: N nodes as network namespaces on a bridge, each with its own address,
its own hostname (``unshare --uts``), its own ``cores`` CPUs (``taskset``: what the runtime detects as the node's
physical cores, as in ``CCP_NODES``) and its own Azure Batch node root with the environment Batch sets.

``NetnsCluster`` is plain Python (the demo and the benchmark use it too); ``netns_cluster`` is the pytest fixture
(a factory: ``netns_cluster(3)``). Needs root; names are unique per process so parallel runs don't collide, and
teardown always kills the nodes' processes and deletes the namespaces.
"""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from node_runtime.sshd import service_for

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
SUBNET = "10.77.0"  # private to the namespaces: never routed, so every cluster can use the same one
SSH_PORT = 2222
MASTER_PORT = 6000  # the port Batch reserves in AZ_BATCH_MASTER_NODE
JOB_ID = "mpljob"
TASK_ID = "mpltask"
_counter = itertools.count()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


@dataclass
class Node:
    index: int
    netns: str
    hostname: str
    address: str
    root: Path
    env: dict[str, str]
    cpus: str  # the CPUs its processes may run on (taskset -c)

    @property
    def task_dir(self) -> Path:
        return Path(self.env["AZ_BATCH_TASK_DIR"])

    @property
    def working_dir(self) -> Path:
        return Path(self.env["AZ_BATCH_TASK_WORKING_DIR"])


@dataclass
class NetnsCluster:
    """Build with :meth:`create`; always :meth:`destroy` (or use as a context manager)."""

    name: str
    base: Path
    nodes: list[Node] = field(default_factory=list)
    secret: str = ""

    @classmethod
    def create(cls, count: int, *, cores: int = 1, secret: str | None = None, port: int = SSH_PORT,
               extra_env: Mapping[str, str] | None = None) -> NetnsCluster:
        if os.geteuid() != 0:
            raise PermissionError("network-namespace clusters need root")
        name = f"mpl{os.getpid()}x{next(_counter)}"
        cluster = cls(name, Path(tempfile.mkdtemp(prefix=f"{name}-", dir="/tmp")))
        cluster.secret = secret if secret is not None else secrets.token_urlsafe(32)
        try:
            cluster._build(count, cores, port, dict(extra_env or {}))
        except BaseException:
            cluster.destroy()
            raise
        return cluster

    def __enter__(self) -> NetnsCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    @property
    def bridge_netns(self) -> str:
        return f"{self.name}-br"

    @property
    def addresses(self) -> list[str]:
        return [n.address for n in self.nodes]

    def _build(self, count: int, cores: int, port: int, extra_env: dict[str, str]) -> None:
        br = self.bridge_netns
        _ip("netns", "add", br)
        _ip("-n", br, "link", "add", "br0", "type", "bridge")
        _ip("-n", br, "link", "set", "br0", "up")
        _ip("-n", br, "addr", "add", f"{SUBNET}.254/24", "dev", "br0")
        addresses = [f"{SUBNET}.{i + 1}" for i in range(count)]
        for i, address in enumerate(addresses):
            netns = f"{self.name}-n{i}"
            _ip("netns", "add", netns)
            _ip("-n", br, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0", "netns", netns)
            _ip("-n", br, "link", "set", f"v{i}", "master", "br0", "up")
            _ip("-n", netns, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", netns, "link", "set", "eth0", "up")
            _ip("-n", netns, "link", "set", "lo", "up")
            root = self.base / f"n{i}"
            env = batch_environment(root, addresses, i, cores=cores, secret=self.secret, port=port)
            env.update(extra_env)
            cpus = ",".join(str((i * cores + k) % (os.cpu_count() or 1)) for k in range(cores))
            self.nodes.append(Node(i, netns, f"node{i}", address, root, env, cpus))
            for d in ("shared", "startup", "fsmounts"):
                (root / d).mkdir(parents=True, exist_ok=True)
            Path(env["AZ_BATCH_TASK_WORKING_DIR"]).mkdir(parents=True, exist_ok=True)

    def argv_on(self, i: int, argv: Sequence[str]) -> list[str]:
        """The argv that runs ``argv`` inside node ``i`` (its namespace, its own hostname, its CPUs)."""
        node = self.nodes[i]
        return ["ip", "netns", "exec", node.netns, "taskset", "-c", node.cpus, "unshare", "--uts", "--", "sh", "-c",
                'hostname "$0" && exec "$@"', node.hostname, *argv]

    def run_on(self, i: int, argv: Sequence[str], *, timeout: float = 60, env: Mapping[str, str] | None = None,
               drop: Sequence[str] = (), check: bool = False) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` on node ``i`` with its Batch environment (plus ``env``, minus ``drop``), in its working dir."""
        node = self.nodes[i]
        full = {**node.env, **(env or {})}
        for name in drop:
            full.pop(name, None)
        return subprocess.run(self.argv_on(i, argv), env=full, cwd=node.working_dir, capture_output=True,
                              text=True, timeout=timeout, check=check)

    def node_runtime(self, i: int, *args: str, timeout: float = 60, env: Mapping[str, str] | None = None,
                     drop: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
        """Run ``node-runtime ARGS`` (from this checkout's venv) on node ``i``."""
        return self.run_on(i, [str(VENV_BIN / "node-runtime"), *args], timeout=timeout, env=env, drop=drop)

    def link_down(self, i: int) -> None:
        _ip("-n", self.nodes[i].netns, "link", "set", "eth0", "down")

    def pids(self, i: int) -> list[int]:
        out = _ip("netns", "pids", self.nodes[i].netns, check=False).stdout
        return [int(p) for p in out.split()]

    def kill_processes(self, i: int, comm: str | None = None, sig: int = signal.SIGKILL) -> int:
        """Signal node ``i``'s processes (only those named ``comm`` if given); returns how many."""
        hit = 0
        for pid in self.pids(i):
            try:
                if comm is None or Path(f"/proc/{pid}/comm").read_text().strip() == comm:
                    os.kill(pid, sig)
                    hit += 1
            except (OSError, ProcessLookupError):
                pass
        return hit

    def kill_sshd(self, i: int) -> int:
        return self.kill_processes(i, "sshd")

    def destroy(self) -> None:
        """Kill every process of every node, delete the namespaces and the node roots. Safe to call twice."""
        for i, node in enumerate(self.nodes):
            self.kill_processes(i)
            service = service_for(node.task_dir, node.address, int(node.env["MPILAUNCH_SSH_PORT"]),
                                  node_root=node.root, environ=node.env)
            shutil.rmtree(service.tmp_dir, ignore_errors=True)
            shutil.rmtree(service.files.private, ignore_errors=True)  # the key dir of a killed service
        existing = _ip("netns", "list", check=False).stdout.split()
        for netns in [n.netns for n in self.nodes] + [self.bridge_netns]:
            if netns in existing:
                _ip("netns", "del", netns, check=False)
        shutil.rmtree(self.base, ignore_errors=True)
        self.nodes.clear()


def batch_environment(root: Path, addresses: Sequence[str], index: int, *, cores: int, secret: str,
                      port: int = SSH_PORT, job_id: str = JOB_ID, task_id: str = TASK_ID) -> dict[str, str]:
    """The environment Azure Batch (plus our client's environment settings) gives subtask ``index`` of a task."""
    task_dir = root / "workitems" / job_id / "job-1" / task_id
    path = os.pathsep.join([str(VENV_BIN), "/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin",
                            "/bin"])
    return {
        "PATH": path,
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
        "USER": "root" if os.geteuid() == 0 else os.environ.get("USER", ""),
        "AZ_BATCH_ACCOUNT_NAME": "mplaccount",
        "AZ_BATCH_ACCOUNT_URL": "https://mplaccount.westeurope.batch.azure.com/",
        "AZ_BATCH_POOL_ID": "mplpool",
        "AZ_BATCH_NODE_ID": f"tvmps_{index:064x}"[:70],
        "AZ_BATCH_NODE_IS_DEDICATED": "true",
        "AZ_BATCH_JOB_ID": job_id,
        "AZ_BATCH_TASK_ID": task_id,
        "AZ_BATCH_NODE_ROOT_DIR": str(root),
        "AZ_BATCH_NODE_SHARED_DIR": str(root / "shared"),
        "AZ_BATCH_NODE_STARTUP_DIR": str(root / "startup"),
        "AZ_BATCH_NODE_MOUNTS_DIR": str(root / "fsmounts"),
        "AZ_BATCH_TASK_DIR": str(task_dir),
        "AZ_BATCH_TASK_SHARED_DIR": str(task_dir),
        "AZ_BATCH_TASK_WORKING_DIR": str(task_dir / "wd"),
        "AZ_BATCH_TASK_USER": "_azbatch",
        "AZ_BATCH_TASK_USER_IDENTITY": "PoolNonAdmin",
        "AZ_BATCH_HOST_LIST": ",".join(addresses),
        "AZ_BATCH_NODE_LIST": ";".join(addresses),
        "AZ_BATCH_MASTER_NODE": f"{addresses[0]}:{MASTER_PORT}",
        "AZ_BATCH_IS_CURRENT_NODE_MASTER": "true" if index == 0 else "false",
        "CCP_NODES": " ".join([str(len(addresses)), *itertools.chain.from_iterable((a, str(cores))
                                                                                    for a in addresses)]),
        "AZ_BATCH_NODE_COUNT": str(len(addresses)),
        "MPILAUNCH_TASK_SECRET": secret,
        "MPILAUNCH_SSH_PORT": str(port),
    }


def skip_unless_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("network-namespace clusters need root (CI runs as root): run the cluster tests as root")
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        pytest.skip("iproute2/util-linux missing: run scripts/setup")


@pytest.fixture
def netns_cluster() -> Iterator[Callable[..., NetnsCluster]]:
    """Factory fixture: ``netns_cluster(3)`` builds a 3-node cluster that is torn down after the test."""
    skip_unless_root()
    built: list[NetnsCluster] = []

    def make(count: int = 3, **kwargs: object) -> NetnsCluster:
        cluster = NetnsCluster.create(count, **kwargs)  # type: ignore[arg-type]
        built.append(cluster)
        return cluster

    try:
        yield make
    finally:
        for cluster in built:
            cluster.destroy()


def demo(count: int = 3) -> int:
    """A real ``count``-node MPI job through the node runtime, as Batch would run it (scripts/demo)."""
    import json

    program = [str(VENV_BIN / "python"), str(REPO / "tests" / "programs" / "mpi_probe.py")]
    with NetnsCluster.create(count) as cluster:
        print(f"cluster: {count} nodes (network namespaces {cluster.name}-n*), hosts {','.join(cluster.addresses)}")
        for i, node in enumerate(cluster.nodes):
            done = cluster.node_runtime(i, "coordinate")
            print(f"  {node.hostname}$ node-runtime coordinate -> {(done.stdout + done.stderr).strip()}")
            if done.returncode:
                return done.returncode
        print(f"  node0$ node-runtime launch -- {' '.join(program)}")
        done = cluster.node_runtime(0, "launch", "--", *program, timeout=300)
        records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        records = [r for r in records if "rank" in r]
        for r in records:
            print(f"    rank {r['rank']}/{r['size']} on {r['hostname']} ({', '.join(r['addresses'])}): "
                  f"allreduce={r['allreduce']} bcast={r['bcast']!r} ring_from_left={r['ring_from_left']}")
        if done.stderr.strip():
            print(done.stderr.rstrip())
        report = json.loads((cluster.nodes[0].working_dir / "launch-report.json").read_text())
        print(f"  launch-report.json: exit code {report['exit_code']}, timings {report['timings']}, "
              f"services stopped {sum(report['services_stopped'].values())}/{count}")
        expected = count * (count + 1) // 2
        ok = (done.returncode == 0 and len({r["hostname"] for r in records}) == count
              and all(r["allreduce"] == expected for r in records))
        print("demo: OK, one rank on each node, collectives agree" if ok else "demo: FAILED")
        return 0 if ok else 1


if __name__ == "__main__":  # python -m tests.support.netns [COUNT]: the demo
    if os.geteuid() != 0:
        sys.exit("demo: needs root to build network namespaces (run it as root, e.g. with sudo)")
    sys.exit(demo(int(sys.argv[1]) if len(sys.argv) > 1 else 3))
