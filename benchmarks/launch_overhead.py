"""Launch overhead of the node runtime on a 3-node network-namespace cluster (needs root).

Measures, as medians over interleaved repetitions:
- ``node-runtime launch -- python mpi_probe.py`` on the primary vs. the bare ``mpirun`` argv it runs (taken from
  launch-report.json: same hosts, same options, same program, same environment, services already up);
- ``node-runtime coordinate`` per node, from nothing (service stopped) and again on a live service;
- ``node-runtime --help``.
Targets: launch/mpirun <= 1.10, coordinate <= 250 ms, --help < 100 ms. Results replace this benchmark's section of
docs/benchmarks.md (``--no-write`` to only print them).

Usage: sudo .venv/bin/python benchmarks/launch_overhead.py [--repeat N] [--no-write]
(on a shared machine, `nice -n -19` in front shields the measurement a little from other jobs)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.docsection import DOC, write_section  # noqa: E402
from node_runtime.sshd import service_for  # noqa: E402
from tests.support.netns import VENV_BIN, NetnsCluster  # noqa: E402

PROBE = [str(VENV_BIN / "python"), str(REPO / "tests" / "programs" / "mpi_probe.py")]
BEGIN, END = "<!-- launch_overhead:begin -->", "<!-- launch_overhead:end -->"
TARGETS = {"ratio": 1.10, "coordinate_ms": 250.0, "help_ms": 100.0}


def timed(run: Callable[[], subprocess.CompletedProcess[str]], cpus: list[float] | None = None) -> float:
    """Wall time of ``run()``; appends its CPU time (user + system of the processes it waited for) to ``cpus``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = run()
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"benchmark step failed ({done.returncode}): {done.args}\n{done.stdout}\n{done.stderr}")
    if cpus is not None:
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return elapsed


def cpu_timed(argv: Sequence[str], repeat: int) -> tuple[list[float], float]:
    """Wall times of ``repeat`` runs of ``argv``, and its median CPU time (user + system, less load-sensitive)."""
    walls, cpus = [], []
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        walls.append(timed(functools.partial(subprocess.run, argv, capture_output=True, text=True, timeout=30,
                                             check=False)))
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return walls, statistics.median(cpus)


def coordinate_all(cluster: NetnsCluster, cpus: list[float] | None = None) -> list[float]:
    """Wall times of ``coordinate`` on every node; appends their CPU times (user + system of ip/unshare/sh and
    node-runtime, not of the sshd it leaves running) to ``cpus``."""
    return [timed(functools.partial(cluster.node_runtime, i, "coordinate"), cpus) for i in range(len(cluster.nodes))]


def without_runtime(argv: Sequence[str]) -> list[str]:
    """launch's mpirun argv as a user would type it: without the rank wrapper (``python -I -S .../ranktap.py``)
    and without ``-m node_runtime.rankmain`` in front of the program (both are launch's cost, measured here)."""
    out = list(argv)
    for i, word in enumerate(out):
        if word.endswith("ranktap.py") and out[i - 2:i] == ["-I", "-S"]:
            del out[i - 3:i + 1]
            break
    for i in range(len(out) - 1):
        if out[i:i + 2] == ["-m", "node_runtime.rankmain"]:
            del out[i:i + 2]
            break
    return out


def bare_mpirun(cluster: NetnsCluster, argv: Sequence[str]) -> Callable[[], subprocess.CompletedProcess[str]]:
    """mpirun as launch runs it (its options and environment: no secret, node-local TMPDIR), running the program
    itself (:func:`without_runtime`)."""
    argv = without_runtime(argv)
    node = cluster.nodes[0]
    tmpdir = service_for(node.task_dir, node.address, int(node.env["MPILAUNCH_SSH_PORT"])).tmp_dir
    return lambda: cluster.run_on(0, argv, env={"TMPDIR": str(tmpdir)}, drop=["MPILAUNCH_TASK_SECRET"], timeout=120)


def measure(repeat: int) -> dict[str, float | int | str]:
    load_before = os.getloadavg()[0]
    with NetnsCluster.create(3) as cluster:
        launch = functools.partial(cluster.node_runtime, 0, "launch", "--", *PROBE, timeout=120)
        coordinate_all(cluster)
        first = launch()  # warm-up; also gives the argv to compare with
        if first.returncode != 0:
            raise SystemExit(f"launch failed: {first.stderr}")
        argv = json.loads((cluster.nodes[0].working_dir / "launch-report.json").read_text())["argv"]
        bare = bare_mpirun(cluster, argv)
        launches: list[float] = []
        bares: list[float] = []
        cold: list[float] = []
        warm: list[float] = []
        cold_cpu: list[float] = []
        launch_cpu: list[float] = []
        bare_cpu: list[float] = []
        for _ in range(repeat):  # interleaved, so load drift on a shared machine hits both alike
            cold += coordinate_all(cluster, cold_cpu)
            warm += coordinate_all(cluster)
            bares.append(timed(bare, bare_cpu))
            launches.append(timed(launch, launch_cpu))  # stops every service at its end: the next round starts cold
        helps, help_cpu = cpu_timed([str(VENV_BIN / "node-runtime"), "--help"], repeat * 2)
        pythons, python_cpu = cpu_timed([str(VENV_BIN / "python"), "-c", "pass"], repeat * 2)
    med = statistics.median
    return {
        "repeat": repeat, "launch_ms": med(launches) * 1e3, "mpirun_ms": med(bares) * 1e3,
        "ratio": med(launches) / med(bares), "coordinate_ms": med(cold) * 1e3, "coordinate_live_ms": med(warm) * 1e3,
        "coordinate_cpu_ms": med(cold_cpu) * 1e3, "launch_cpu_ms": med(launch_cpu) * 1e3,
        "mpirun_cpu_ms": med(bare_cpu) * 1e3,
        "help_ms": med(helps) * 1e3, "help_cpu_ms": help_cpu * 1e3, "python_ms": med(pythons) * 1e3,
        "python_cpu_ms": python_cpu * 1e3, "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"load average {load_before:.2f} at start, {os.getloadavg()[0]:.2f} at end, nice {os.nice(0)}",
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def markdown(r: dict[str, float | int | str]) -> str:
    def row(name: str, value: float, target: str, ok: bool) -> str:
        met = "" if not target else "yes" if ok else "**no**"
        return f"| {name} | {value:.0f} ms | {target} | {met} |"

    return "\n".join([
        BEGIN,
        "## Node runtime: launch overhead (`benchmarks/launch_overhead.py`)",
        "",
        f"3-node network-namespace cluster, 1 rank per node, `tests/programs/mpi_probe.py` (allreduce, bcast, ring, "
        f"gather); medians of {r['repeat']} interleaved runs; {r['machine']}; {r['when']}. Wall times include "
        "`ip netns exec` + `unshare` (~5 ms).",
        "",
        "| Measure | Median | Target | Met |",
        "|---|---|---|---|",
        row(f"`node-runtime launch` (wait for services, mpirun, stop services; CPU {float(r['launch_cpu_ms']):.0f} ms)",
            float(r["launch_ms"]), "", True),
        row(f"bare `mpirun`, same options and environment, the program run directly "
            f"(CPU {float(r['mpirun_cpu_ms']):.0f} ms)", float(r["mpirun_ms"]), "", True),
        f"| ratio launch / mpirun | {float(r['ratio']):.2f} | <= {TARGETS['ratio']:.2f} | "
        f"{'yes' if float(r['ratio']) <= TARGETS['ratio'] else '**no**'} |",
        row(f"`node-runtime coordinate` per node, service stopped (CPU {float(r['coordinate_cpu_ms']):.0f} ms)",
            float(r["coordinate_ms"]),
            f"<= {TARGETS['coordinate_ms']:.0f} ms", float(r["coordinate_ms"]) <= TARGETS["coordinate_ms"]),
        row("`node-runtime coordinate` per node, service live", float(r["coordinate_live_ms"]), "", True),
        row(f"`node-runtime --help` (CPU {float(r['help_cpu_ms']):.0f} ms)", float(r["help_ms"]),
            f"< {TARGETS['help_ms']:.0f} ms", float(r["help_ms"]) < TARGETS["help_ms"]),
        row(f"for scale: `python -c pass` (CPU {float(r['python_cpu_ms']):.0f} ms)", float(r["python_ms"]), "", True),
        "",
        "Where the time goes (measured with strace, cProfile, `-X importtime` and A/B runs on this machine):",
        "- `coordinate` verifies its service with a login of OpenSSH's `ssh` (`sshd.verify`, no remote command):",
        "  ~100-140 ms on loopback, most of it waiting on ~40 ms TCP delayed ACKs during the handshake, ~15 ms sshd",
        "  re-executing itself for the connection. Our own in-process SSH client did it in ~30 ms (TCP_NODELAY +",
        "  TCP_QUICKACK) and was replaced: protocol code belongs to a maintained implementation (issue 14).",
        "  What remains is process start-up: the interpreter (see",
        "  `python -c pass`), cryptography and the stdlib, the key derivation and sshd's own start (~12 ms until it",
        "  listens). On 2 cores shared with other jobs every process start stretches with the load average: compare",
        "  the CPU time with the wall time.",
        "- Since issue 12 every rank runs behind the rank wrapper (`ranktap.py`: rank-tagged output, how each rank",
        "  ended) and Python ranks through `node_runtime.rankmain` (an uncaught exception ends the job); the bare",
        "  mpirun here runs the program without either. Side by side (`mpirun -np 3` on one host, 5 runs each,",
        "  2026-12-03): plain 463 ms, rankmain 477 ms, wrapper 516 ms, both 544 ms. That is what moved the ratio",
        "  from 0.90 to ~1.2: the target is missed until the wrapper gets cheaper (it is a Python process per",
        "  rank; `-I -S` keeps its start-up at ~20 ms).",
        "- `launch` costs its own start-up (~45 ms: the interpreter, the stdlib, our modules; no click, no",
        "  cryptography) and the stop of the services at the end (~10 ms). The wait for the services costs nothing on",
        "  top: each remote node's is the login of an OpenSSH control master (`node_runtime/masters.py`), and mpirun,",
        "  started meanwhile behind a flock gate, sends its session to that node through the master instead of",
        "  logging in itself. Bare mpirun pays that same login (~100-140 ms, mostly delayed-ACK stalls) after its own",
        "  ~45 ms start-up; launch starts the masters ~55 ms after its exec, so the two reach the remote nodes at",
        "  about the same time. Before this design (an in-process login per node as the wait, then mpirun's own ssh",
        "  login) the ratio was 1.24.",
        "- Every node's fabric detection (`node.json`, see docs/fabric.md) reaches the primary as its service's ssh",
        "  banner, which sshd sends during that same login. The first version had the master's session print the",
        "  file instead: the line came 50-55 ms after the login (a session round trip, a shell, a delayed ACK;",
        "  medians 148 vs 96 ms per master, 15 logins each), inside the wait, and the ratio went to 1.13. With the",
        "  banner, logins with and without it took the same time (median 100 vs 98 ms).",
        "- CPU times count the processes on the measuring side that were waited for (for `launch`: itself, its ssh",
        "  masters, mpirun and the primary's rank, not the remote nodes' sshd and ranks). On a loaded machine they",
        "  say more than the wall times: every process start there waits for a core.",
        "  At a load average of 4-9, identical bare mpiruns varied by +-50 ms between A/B positions: the ratio is only",
        "  as good as the load lets it be.",
        "",
        END,
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--no-write", action="store_true", help="print the results only")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("launch_overhead: needs root (it builds network namespaces)", file=sys.stderr)
        return 2
    results = measure(args.repeat)
    section = markdown(results)
    print(section)
    if not args.no_write:
        write_section(section, BEGIN, END)
        print(f"written to {DOC.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
