"""What a node offers MPI, and the fabric, rank layout and MPI settings launch derives from it.

``node-runtime coordinate`` detects this node (:func:`detect`) and writes the result in the service directory
(:data:`NODE_FILE`, nothing secret; also the service's ssh banner); the primary learns every other node's from the
banner its control master shows at login (:mod:`node_runtime.masters`) and refuses nodes that disagree
(:func:`disagreements`) or whose ``/dev/shm`` is too small (:func:`shm_problems`). Detection reads files below a root
(``/``; unit tests give a fake sysfs/proc tree) and asks the MPI itself (Open MPI: ``ompi_info``, ~0.2 s, so the
answer is cached per node, keyed by the binary).

The builders (:func:`choose`, :func:`layout`, :func:`mpi_settings`) are pure.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from node_runtime import proc
from node_runtime.contract import MpiFlavor
from node_runtime.errors import InvalidInput, MpilaunchError

NODE_FILE = "node.json"  # in the service directory: this node's detection, for the primary
CACHE_FILE = ".mpilaunch-mpi-cache.json"  # in AZ_BATCH_NODE_SHARED_DIR: the MPI's answer, across tasks
SHM_PER_RANK = 64 * 2**20  # bytes of /dev/shm a rank may need (shared-memory transports' segments and large messages)
SHM_MOUNT = "/dev/shm"  # noqa: S108 (the shared-memory mount MPI uses, not a temporary file)
UCX_TCP_TLS = "tcp,sm,self"  # UCX without RDMA: TCP between nodes, shared memory within one


@dataclass(frozen=True)
class RdmaPort:
    """One port of an RDMA device (``/sys/class/infiniband/DEVICE/ports/PORT``)."""

    device: str
    port: int
    link_layer: str  # InfiniBand, Ethernet (RoCE, or Azure's accelerated-networking NIC)
    state: str  # e.g. "4: ACTIVE"

    @property
    def active_infiniband(self) -> bool:
        return self.link_layer == "InfiniBand" and self.state.endswith("ACTIVE")

    def __str__(self) -> str:
        return f"{self.device}:{self.port}"


@dataclass(frozen=True)
class NodeFabric:
    """What one node offers MPI."""

    rdma: tuple[RdmaPort, ...]
    mpi: str | None  # the flavor of mpirun on PATH (None: no mpirun)
    ucx: bool  # that MPI can use UCX (Open MPI: its pml ucx and osc ucx components; Intel MPI: OFI's mlx)
    shm_bytes: int  # size of /dev/shm
    physical_cores: int  # the cores this node lets us run on (hardware threads of one core count once)
    interface: str | None  # the network interface holding this node's host-list address

    @property
    def infiniband(self) -> tuple[str, ...]:
        """The active InfiniBand ports, as UCX names them (``mlx5_ib0:1``)."""
        return tuple(str(p) for p in self.rdma if p.active_infiniband)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NodeFabric:
        return cls(rdma=tuple(RdmaPort(**p) for p in data["rdma"]), mpi=data["mpi"], ucx=bool(data["ucx"]),
                   shm_bytes=int(data["shm_bytes"]), physical_cores=int(data["physical_cores"]),
                   interface=data["interface"])

    def shared(self) -> dict[str, Any]:
        """What every node of a task must have alike (all but /dev/shm, which each node is checked for)."""
        return {"infiniband": list(self.infiniband), "mpi": self.mpi, "ucx": self.ucx,
                "physical_cores": self.physical_cores, "interface": self.interface}


# --- detection -------------------------------------------------------------------------------------------------

def detect_flavor(version_text: str) -> MpiFlavor:
    """The flavor that printed ``version_text`` (the output of ``mpirun --version``)."""
    if "Open MPI" in version_text or "OpenRTE" in version_text:
        return MpiFlavor.OPENMPI
    if "Intel(R) MPI" in version_text or "Intel MPI" in version_text:
        return MpiFlavor.INTELMPI
    if "HYDRA" in version_text or "MPICH" in version_text:
        return MpiFlavor.MPICH
    first = next((line.strip() for line in version_text.splitlines() if line.strip()), "")
    raise InvalidInput(f"cannot tell the MPI implementation from 'mpirun --version' output {first!r}; "
                       f"choose one with --mpi ({', '.join(f.value for f in MpiFlavor)})")


def rdma_ports(root: Path = Path("/")) -> tuple[RdmaPort, ...]:
    """Every port of every RDMA device in sysfs (none without ``/sys/class/infiniband``)."""
    ports = []
    for device in sorted((root / "sys/class/infiniband").glob("*")):
        for port in sorted((device / "ports").glob("*"), key=lambda p: p.name):
            if port.name.isdigit():
                ports.append(RdmaPort(device.name, int(port.name), _read(port / "link_layer"), _read(port / "state")))
    return tuple(ports)


def shm_size(root: Path = Path("/")) -> int:
    """The size of ``/dev/shm`` in bytes: the ``size=`` of its tmpfs mount (docker: 64 MB), else its file system's
    size, 0 if there is none."""
    with contextlib.suppress(OSError):
        for line in (root / "proc/self/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) > 3 and fields[1] == SHM_MOUNT:
                for option in fields[3].split(","):
                    if option.startswith("size="):
                        return _bytes(option[5:])
    try:
        stat = os.statvfs(root / SHM_MOUNT.lstrip("/"))
    except OSError:
        return 0
    return stat.f_blocks * stat.f_frsize


def physical_cores(cpus: Iterable[int], root: Path = Path("/")) -> int:
    """How many cores ``cpus`` (logical CPU numbers, e.g. this process's affinity) span: hardware threads of one
    core (same package and core id in sysfs) count once; a CPU without topology counts as a core."""
    cores = set()
    for cpu in cpus:
        topology = root / f"sys/devices/system/cpu/cpu{cpu}/topology"
        package, core = _read(topology / "physical_package_id"), _read(topology / "core_id")
        cores.add((package, core) if package and core else ("cpu", str(cpu)))
    return max(1, len(cores))


def interface_of(address: str) -> str | None:
    """The network interface that holds ``address`` (None if none does)."""
    import psutil

    return next((name for name, addrs in psutil.net_if_addrs().items() if any(a.address == address for a in addrs)),
                None)


def mpi_support(environ: Mapping[str, str], cache_dir: Path | None) -> tuple[str | None, bool]:
    """(flavor of mpirun on PATH, whether it can use UCX). Open MPI's answer (``ompi_info --parsable`` lists pml
    ucx and osc ucx) is cached in ``cache_dir``, keyed by the binary's path, size and mtime."""
    path = environ.get("PATH")
    mpirun = shutil.which("mpirun", path=path)
    if mpirun is None:
        return None, False
    try:
        version = proc.run([mpirun, "--version"], timeout=30, check=False, env=environ)
        flavor = detect_flavor((version.stdout + version.stderr).decode(errors="replace"))
    except MpilaunchError:
        return None, False
    if flavor is MpiFlavor.INTELMPI:
        return flavor.value, True  # its OFI mlx provider runs over UCX
    tool = shutil.which("ompi_info" if flavor is MpiFlavor.OPENMPI else "mpichversion", path=path)
    if tool is None:
        return flavor.value, False
    return flavor.value, _cached(Path(tool).resolve(), cache_dir, lambda: _asks_ucx(flavor, tool, environ))


def _asks_ucx(flavor: MpiFlavor, tool: str, environ: Mapping[str, str]) -> bool:
    try:
        text = proc.run([tool, "--parsable"] if flavor is MpiFlavor.OPENMPI else [tool], timeout=60, check=False,
                        env=environ).stdout.decode(errors="replace")
    except MpilaunchError:
        return False
    if flavor is MpiFlavor.OPENMPI:
        return "mca:pml:ucx:" in text and "mca:osc:ucx:" in text
    return re.search(r"Device:\s*ch4:ucx", text) is not None


def _cached(tool: Path, cache_dir: Path | None, ask: Callable[[], bool]) -> bool:
    try:
        stat = tool.stat()
    except OSError:
        return ask()
    key = f"{tool}:{stat.st_size}:{stat.st_mtime_ns}"
    cache = None if cache_dir is None else cache_dir / CACHE_FILE
    known: dict[str, bool] = {}
    if cache is not None:
        with contextlib.suppress(OSError, ValueError):
            known = json.loads(cache.read_text())
        if isinstance(known.get(key), bool):
            return known[key]
    answer = ask()
    if cache is not None:
        with contextlib.suppress(OSError):
            tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({key: answer}))
            tmp.replace(cache)
    return answer


def detect(address: str, environ: Mapping[str, str], cache_dir: Path | None, root: Path = Path("/")) -> NodeFabric:
    """This node, as seen from ``root`` and by the MPI on ``environ``'s PATH."""
    mpi, ucx = mpi_support(environ, cache_dir)
    return NodeFabric(rdma=rdma_ports(root), mpi=mpi, ucx=ucx, shm_bytes=shm_size(root),
                      physical_cores=physical_cores(sorted(os.sched_getaffinity(0)), root),
                      interface=interface_of(address))


def detect_in_background(address: str, environ: Mapping[str, str],
                         cache_dir: Path | None) -> Callable[[], NodeFabric]:
    """Start :func:`detect` in a thread (``ompi_info`` then overlaps the service's start); call the result to get
    it."""
    found: list[NodeFabric] = []
    failed: list[BaseException] = []

    def run() -> None:
        try:
            found.append(detect(address, environ, cache_dir))
        except BaseException as exc:  # re-raised in the caller
            failed.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def result() -> NodeFabric:
        thread.join()
        if failed:
            raise failed[0]
        return found[0]

    return result


def write_node_file(directory: Path, node: NodeFabric) -> None:
    """Record ``node`` for the primary (one JSON line: the master's session prints it)."""
    path = directory / NODE_FILE
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(node.to_dict()) + "\n")
    tmp.replace(path)


def read_node(text: str) -> NodeFabric | None:
    """A node's detection from what its :data:`NODE_FILE` holds (None if it holds none)."""
    try:
        return NodeFabric.from_dict(json.loads(text))
    except (ValueError, KeyError, TypeError):
        return None


# --- across nodes --------------------------------------------------------------------------------------------------

def disagreements(nodes: Mapping[str, NodeFabric | None]) -> list[str]:
    """One line per node that differs from the others (the majority; on a tie the first node, the primary), naming
    it and what differs; a node that reported nothing is named too."""
    known = {host: node.shared() for host, node in nodes.items() if node is not None}
    problems = [f"{host}: reported no fabric detection (did 'node-runtime coordinate' run there?)"
                for host, node in nodes.items() if node is None]
    if not known:
        return problems
    counts = Counter(json.dumps(v, sort_keys=True) for v in known.values())
    top = max(counts.values())
    usual = json.loads(next(k for k in (json.dumps(v, sort_keys=True) for v in known.values()) if counts[k] == top))
    for host, shared in known.items():
        differs = [f"{name} {shared[name]!r} (others: {usual[name]!r})" for name in usual
                   if shared[name] != usual[name]]
        if differs:
            problems.append(f"{host}: {', '.join(differs)}")
    return problems


def shm_problems(nodes: Mapping[str, NodeFabric | None], ranks_per_node: int) -> list[str]:
    """The nodes whose ``/dev/shm`` is smaller than ``ranks_per_node`` ranks need (none for a single rank)."""
    if ranks_per_node < 2:
        return []
    needed = ranks_per_node * SHM_PER_RANK
    return [f"{host}: {SHM_MOUNT} is {_mib(node.shm_bytes)}, {ranks_per_node} ranks need {_mib(needed)}"
            for host, node in nodes.items() if node is not None and node.shm_bytes < needed]


def shm_fix(ranks_per_node: int) -> str:
    """How to give the ranks enough shared memory."""
    return (f"fix: give the nodes a larger /dev/shm (containers: --container-run-options=--shm-size="
            f"{ranks_per_node * SHM_PER_RANK // 2**20}m or more; a VM: mount -o remount,size=... /dev/shm), run "
            "fewer ranks per node (--ppn), or go on anyway with --allow-small-shm")


# --- the choice --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FabricChoice:
    """The fabric the job uses, and what it takes to drive it."""

    fabric: str  # "ucx" or "tcp"
    reason: str
    infiniband: tuple[str, ...] = ()  # UCX over these InfiniBand ports (else UCX runs over TCP and shared memory)
    interface: str | None = None  # the nodes' interface on the host-list network (TCP)
    ucx: bool = False  # the MPI can use UCX (with tcp: one-sided windows go through UCX over TCP)

    def describe(self) -> str:
        over = (f"UCX over InfiniBand ({','.join(self.infiniband)})" if self.fabric == "ucx" and self.infiniband
                else "UCX over TCP and shared memory" if self.fabric == "ucx" else "TCP")
        return f"fabric {self.fabric}: {over}, because {self.reason}"


PLAIN_TCP = FabricChoice("tcp", "no fabric was chosen")  # TCP alone (no UCX for one-sided windows)


def choose(requested: str, node: NodeFabric) -> FabricChoice:
    """The fabric for ``requested`` (auto, ucx, tcp) on nodes like ``node`` (all nodes must agree: see
    :func:`disagreements`); auto takes UCX over InfiniBand when the nodes have an active InfiniBand port and their MPI
    can use UCX, else TCP."""
    ib = node.infiniband

    def chosen(fabric: str, reason: str, ports: tuple[str, ...] = ()) -> FabricChoice:
        return FabricChoice(fabric, reason, ports, node.interface, node.ucx)

    if requested == "tcp":
        return chosen("tcp", "--fabric tcp was given")
    if requested == "ucx":
        if not node.ucx:
            raise InvalidInput(f"--fabric ucx: the nodes' MPI ({node.mpi or 'none found'}) cannot use UCX"
                               + (" (ompi_info lists no pml ucx/osc ucx)" if node.mpi == MpiFlavor.OPENMPI.value
                                  else ""))
        where = f"its InfiniBand ports are {','.join(ib)}" if ib else "the nodes have no active InfiniBand port"
        return chosen("ucx", f"--fabric ucx was given and {where}", ib)
    if requested != "auto":
        raise InvalidInput(f"--fabric {requested!r}: choose auto, ucx or tcp")
    if ib and node.ucx:
        return chosen("ucx", f"every node has an active InfiniBand port ({','.join(ib)}) and its MPI ({node.mpi}) "
                      "can use UCX", ib)
    if ib:
        return chosen("tcp", f"the nodes have InfiniBand ({','.join(ib)}) but their MPI ({node.mpi}) cannot use UCX")
    ports = ", ".join(f"{p} {p.link_layer} {p.state}" for p in node.rdma)
    return chosen("tcp", "the nodes have no active InfiniBand port"
                  + (f" ({ports})" if ports else " (no /sys/class/infiniband)"))


@dataclass(frozen=True)
class Layout:
    """Ranks per node, OpenMP threads per rank (None: not given, OMP_NUM_THREADS left alone, one core per rank), and
    whether each rank is bound to its cores."""

    ppn: int
    threads: int | None
    cores: int  # physical cores per node
    bind: bool  # each rank bound to `threads` cores (only when ppn x threads fit in the cores)
    shared: bool = False  # the nodes share one machine's cores: never bound

    def describe(self, nodes: int) -> str:
        width = self.threads or 1
        binding = (f"each bound to {width} core(s)" if self.bind
                   else "not bound (the nodes share one machine's cores)" if self.shared
                   else f"not bound ({self.ppn}x{width} > {self.cores} physical cores)")
        threads = f"{self.threads} thread(s) (OMP_NUM_THREADS={self.threads})" if self.threads else "1 core"
        return f"layout: {nodes} node(s) x {self.ppn} rank(s) x {threads}, {binding}"


def layout(cores: int, ppn: int | None, threads: int | None, *, shared: bool = False) -> Layout:
    """``ppn`` ranks per node (default: as many as ``threads``-core groups fit in the node's physical cores). Nodes
    that share one machine (``shared``) are never bound: Open MPI and Hydra bind every node's ranks to that node's
    first cores, the same cores on every node of one machine."""
    width = threads or 1
    ranks = ppn if ppn is not None else max(1, cores // width)
    return Layout(ranks, threads, cores, not shared and ranks * width <= cores, shared)


@dataclass(frozen=True)
class MpiSettings:
    """MCA parameters (Open MPI ``--mca``) and environment variables for the ranks that drive a fabric."""

    mca: tuple[tuple[str, str], ...]
    env: tuple[tuple[str, str], ...]


def mpi_settings(flavor: MpiFlavor, choice: FabricChoice, networks: str) -> MpiSettings:
    """How ``flavor`` drives ``choice`` (``networks``: the host-list CIDRs TCP is restricted to). Open MPI as Azure
    documents for UCX (pml ucx, ``UCX_NET_DEVICES``), UCX over TCP when there is no InfiniBand; with tcp, pml ob1 and
    the tcp btl, and one-sided windows through osc ucx over TCP when the MPI has it (no btl of ob1 can carry windows
    across nodes under MPI_THREAD_MULTIPLE). Intel MPI and MPICH through their OFI (or UCX) settings."""
    ib = ",".join(choice.infiniband)
    ucx_tcp = (("UCX_TLS", UCX_TCP_TLS), *((("UCX_NET_DEVICES", choice.interface),) if choice.interface else ()))
    ucx_env = (("UCX_NET_DEVICES", ib),) if ib else ucx_tcp
    if flavor is MpiFlavor.OPENMPI:
        if choice.fabric == "ucx":
            mca = [("pml", "ucx"), ("osc", "ucx"), ("btl", "^vader,tcp,openib")]
            if not ib:  # pml ucx declines a node without RDMA devices unless told any transport will do
                mca += [("pml_ucx_tls", "any"), ("pml_ucx_devices", "any")]
            return MpiSettings(tuple(mca), ucx_env)
        mca = [("pml", "ob1"), ("btl", "self,vader,tcp"), ("btl_tcp_if_include", networks)]
        return MpiSettings((*mca, ("osc", "ucx")), ucx_tcp) if choice.ucx else MpiSettings(tuple(mca), ())
    tcp_iface = (("FI_TCP_IFACE", choice.interface),) if choice.interface else ()
    if flavor is MpiFlavor.INTELMPI:
        if choice.fabric == "ucx":
            return MpiSettings((), (("I_MPI_FABRICS", "shm:ofi"), ("FI_PROVIDER", "mlx"), *ucx_env))
        return MpiSettings((), (("I_MPI_FABRICS", "shm:ofi"), ("FI_PROVIDER", "tcp"), *tcp_iface))
    if choice.ucx:  # MPICH built with ch4:ucx
        return MpiSettings((), ucx_env if choice.fabric == "ucx" else ucx_tcp)
    return MpiSettings((), (("FI_PROVIDER", "tcp;ofi_rxm"), *tcp_iface))


# --- helpers ---------------------------------------------------------------------------------------------------

def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _bytes(size: str) -> int:
    units = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    size = size.strip().lower()
    if size and size[-1] in units:
        return int(float(size[:-1]) * units[size[-1]])
    return int(size) if size.isdigit() else 0


def _mib(size: int) -> str:
    return f"{size / 2**20:.0f} MiB"
