"""node-runtime doctor: the checks' evaluation (pure), the version/size helpers, and the agent's protocol, in process
and as the child the primary starts."""

from __future__ import annotations

import copy
import io
import json
import socket
import sys
import time
from typing import Any

import pytest

from mpilaunch.cli.doctor import node_argv, render_tables
from node_runtime import doctor
from node_runtime.doctor import (
    CHECKS,
    FAIL,
    OK,
    SKIP,
    AgentSession,
    Limits,
    NodeState,
    evaluate,
    measure_clock,
    parse_size,
    size_text,
)
from node_runtime.errors import InvalidInput
from node_runtime.fabric import NodeFabric, RdmaPort

GIB = 2**30
FABRIC = json.loads(json.dumps(NodeFabric((), "openmpi", True, 8 * GIB, 4, "eth0").to_dict()))  # as agents say it
FACTS = {"node_id": "tvm-0", "hostname": "node0", "runtime": "0.1.0", "python": "3.11.7", "mpi4py": "4.1.2",
         "mpi_library": "Open MPI v4.1.4", "mpirun": "mpirun (Open MPI) 4.1.4", "fabric": FABRIC,
         "disk": {"path": "/mnt/batch/tasks/workitems/j/job-1/t/wd", "free": 50 * GIB, "total": 100 * GIB},
         "probe_port": 40000}
LIMITS = Limits(ppn=4, max_clock_skew=1.0, min_free_disk=GIB, ssh_port=2222)


def reached(host: str, others: list[str]) -> list[dict[str, Any]]:
    return [{"host": o, "address": o, "port": port, "kind": kind, "ok": True, "ms": 0.2}
            for o in others if o != host for kind, port in (("mpi", 40000), ("task", 2222))]


def healthy(count: int = 3) -> list[NodeState]:
    hosts = [f"10.0.0.{4 + i}" for i in range(count)]
    return [NodeState(h, primary=i == 0, facts={**copy.deepcopy(FACTS), "node_id": f"tvm-{i}"},
                      clock=None if i == 0 else {"offset": 0.002, "uncertainty": 0.0005}, reach=reached(h, hosts))
            for i, h in enumerate(hosts)]


def checks(report: dict[str, Any], host: str) -> dict[str, dict[str, str]]:
    row = next(r for r in report["nodes"] if r["host"] == host)
    return {c["check"]: c for c in row["checks"]}


def failing(report: dict[str, Any]) -> dict[str, list[str]]:
    """{host: [failed checks]} of the nodes with failures."""
    out = {}
    for row in report["nodes"]:
        bad = [c["check"] for c in row["checks"] if c["status"] == FAIL]
        if bad:
            out[row["host"]] = bad
        assert row["ok"] == (not bad)
    return out


def test_healthy_nodes_pass_every_check() -> None:
    report = evaluate(healthy(), LIMITS)
    assert report["ok"] and report["problems"] == 0 and report["schema"] == doctor.SCHEMA_ID
    assert [r["primary"] for r in report["nodes"]] == [True, False, False]
    for row in report["nodes"]:
        assert [c["check"] for c in row["checks"]] == list(CHECKS)
        assert {c["status"] for c in row["checks"]} == {OK}
        assert all(c["problem"] == "" and c["fix"] == "" for c in row["checks"])
    first = checks(report, "10.0.0.4")
    assert first["versions"]["summary"] == "py 3.11.7, mpi4py 4.1.2, Open MPI 4.1.4"
    assert first["clock"]["summary"] == "reference" and checks(report, "10.0.0.5")["clock"]["summary"] == \
        "+0.002±0.001 s"
    assert first["reach"]["summary"] == "4/4" and first["shm"]["summary"] == "8.0 GiB"
    assert first["fabric"]["summary"] == "no IB, openmpi+UCX, eth0"
    assert report["fabric"].startswith("fabric tcp: TCP, because the nodes have no active InfiniBand port")
    assert json.loads(json.dumps(report)) == report  # JSON as it is
    assert doctor.render_text(report).endswith("doctor: every check passed")


def test_a_version_that_differs_is_named_on_the_odd_node_with_the_fix() -> None:
    nodes = healthy()
    assert nodes[2].facts is not None
    nodes[2].facts.update(python="3.10.12", mpi_library="Open MPI v4.1.2")
    report = evaluate(nodes, LIMITS)
    assert failing(report) == {"10.0.0.6": ["versions"]}
    versions = checks(report, "10.0.0.6")["versions"]
    assert "Python '3.10.12' (others: '3.11.7')" in versions["problem"]
    assert "MPI library 'Open MPI v4.1.2' (others: 'Open MPI v4.1.4')" in versions["problem"]
    assert versions["fix"] == doctor.VERSIONS_FIX and versions["summary"].endswith("(differs)")


def test_on_a_tie_the_primary_has_the_expected_versions() -> None:
    nodes = healthy(2)
    assert nodes[1].facts is not None
    nodes[1].facts["mpi4py"] = "3.1.6"
    assert failing(evaluate(nodes, LIMITS)) == {"10.0.0.5": ["versions"]}


def test_mpi4py_that_does_not_load_and_a_missing_mpirun() -> None:
    nodes = healthy()
    assert nodes[1].facts is not None
    nodes[1].facts.update(mpi4py=None, mpi_library=None, mpirun=None,
                          mpi4py_error="ImportError: libmpi.so.40: cannot open shared object file")
    report = evaluate(nodes, LIMITS)
    assert failing(report) == {"10.0.0.5": ["versions"]}
    versions = checks(report, "10.0.0.5")["versions"]
    assert "mpi4py cannot be loaded (ImportError: libmpi.so.40" in versions["problem"]
    assert "no mpirun on the ranks' PATH" in versions["problem"]
    assert versions["fix"].startswith("1) install mpi4py") and "2) install an MPI" in versions["fix"]


def test_a_node_whose_fabric_differs() -> None:
    nodes = healthy()
    assert nodes[0].facts is not None
    ib = NodeFabric((RdmaPort("mlx5_ib0", 1, "InfiniBand", "4: ACTIVE"),), "openmpi", True, 8 * GIB, 4, "eth0")
    for node in nodes[1:]:
        assert node.facts is not None
        node.facts["fabric"] = ib.to_dict()
    report = evaluate(nodes, LIMITS)
    assert failing(report) == {"10.0.0.4": ["fabric"]}  # the primary is the odd one out: the majority has IB
    fabric = checks(report, "10.0.0.4")["fabric"]
    assert "infiniband [] (others: ['mlx5_ib0:1'])" in fabric["problem"] and fabric["fix"] == doctor.FABRIC_FIX
    assert checks(report, "10.0.0.5")["fabric"]["summary"] == "IB mlx5_ib0:1, openmpi+UCX, eth0"


def test_shm_too_small_for_the_ranks_per_node() -> None:
    nodes = healthy()
    assert nodes[1].facts is not None
    nodes[1].facts["fabric"] = {**FABRIC, "shm_bytes": 64 * 2**20}  # docker's default
    report = evaluate(nodes, LIMITS)
    assert failing(report) == {"10.0.0.5": ["shm"]}
    shm = checks(report, "10.0.0.5")["shm"]
    assert shm["problem"] == "/dev/shm is 64 MiB, 4 ranks need 256 MiB"
    assert "--container-run-options=--shm-size=256m" in shm["fix"] and not shm["fix"].startswith("fix:")
    assert evaluate(nodes, Limits(ppn=1))["ok"]  # a single rank needs no shared memory


def test_little_free_disk() -> None:
    nodes = healthy()
    assert nodes[2].facts is not None
    nodes[2].facts["disk"]["free"] = 200 * 2**20
    report = evaluate(nodes, LIMITS)
    assert failing(report) == {"10.0.0.6": ["disk"]}
    disk = checks(report, "10.0.0.6")["disk"]
    assert disk["problem"] == ("200 MiB free in the task directory /mnt/batch/tasks/workitems/j/job-1/t/wd "
                               "(of 100 GiB), less than 1.0 GiB")
    assert disk["fix"] == doctor.DISK_FIX
    nodes[2].facts["disk"] = {"path": "/x", "error": "No such file or directory"}
    assert "unknown: No such file or directory" in checks(evaluate(nodes, LIMITS), "10.0.0.6")["disk"]["problem"]


@pytest.mark.parametrize(("offset", "uncertainty", "status"), [
    (2.0, 0.01, FAIL), (-1.5, 0.01, FAIL), (0.9, 0.01, OK), (-1.05, 0.1, OK),  # within the uncertainty: not proven
])
def test_clock_skew_beyond_the_uncertainty_fails(offset: float, uncertainty: float, status: str) -> None:
    nodes = healthy()
    nodes[1].clock = {"offset": offset, "uncertainty": uncertainty}
    clock = checks(evaluate(nodes, LIMITS), "10.0.0.5")["clock"]
    assert clock["status"] == status
    if status == FAIL:
        way = "ahead of" if offset > 0 else "behind"
        assert clock["problem"] == (f"its clock is {abs(offset):.3f} s {way} the primary's (±{uncertainty:.3f} s), "
                                    "more than 1 s")
        assert "chrony" in clock["fix"]


def test_unreachable_ports_name_the_target_and_the_fix() -> None:
    nodes = healthy()
    assert nodes[1].reach is not None
    nodes[1].reach[0].update(ok=False, error="connection refused")  # 10.0.0.4's listener
    nodes[1].reach[3].update(ok=False, error="no answer within 3 s (filtered?)")  # 10.0.0.6's task port
    report = evaluate(nodes, LIMITS)
    assert failing(report) == {"10.0.0.5": ["reach"]}
    reach = checks(report, "10.0.0.5")["reach"]
    assert reach["summary"] == "2/4"
    assert reach["problem"] == ("cannot connect to 10.0.0.4 port 40000 (MPI interface): connection refused; "
                                "10.0.0.6 port 2222 (task port): no answer within 3 s (filtered?)")
    assert doctor.REACH_MPI_FIX in reach["fix"] and "allow TCP port 2222" in reach["fix"]


def test_a_silent_node_and_a_node_whose_agent_failed() -> None:
    nodes = healthy()
    nodes[1] = NodeState("10.0.0.5", service=False, failure="ssh: connect to host 10.0.0.5 port 2222: timed out")
    nodes[2] = NodeState("10.0.0.6", failure="python3: No such file or directory")
    report = evaluate(nodes, LIMITS)
    assert failing(report) == {"10.0.0.5": ["service"], "10.0.0.6": ["service"]}
    silent, broken = checks(report, "10.0.0.5"), checks(report, "10.0.0.6")
    assert silent["service"]["summary"] == "no answer" and "timed out" in silent["service"]["problem"]
    assert "node-runtime coordinate" in silent["service"]["fix"]
    assert broken["service"]["summary"] == "check failed" and "No such file" in broken["service"]["problem"]
    assert {c["status"] for name, c in silent.items() if name != "service"} == {SKIP}
    text = doctor.render_text(report)
    assert "10.0.0.5: service: its coordination service did not answer the primary: ssh: connect" in text
    assert text.endswith("doctor: 2 problem(s)")
    assert sum(line.startswith("  fix: ") for line in text.splitlines()) == 2


def test_sizes() -> None:
    assert parse_size("1G") == GIB and parse_size("1.5GiB") == 3 * GIB // 2 and parse_size("512m") == 2**29
    assert parse_size("1073741824") == GIB and parse_size("2TB") == 2 * 2**40 and parse_size("1P") == 2**50
    with pytest.raises(InvalidInput, match="invalid size 'lots'"):
        parse_size("lots")
    assert [size_text(v) for v in (512, 2**20, 1.5 * GIB, 64 * GIB, 2**50)] == [
        "512 B", "1.0 MiB", "1.5 GiB", "64 GiB", "1.0 PiB"]


def test_mpi_versions_from_their_tools() -> None:
    assert doctor.mpirun_version("mpirun (Open MPI) 4.1.4\n\nReport bugs to http://www.open-mpi.org/\n") == \
        "mpirun (Open MPI) 4.1.4"
    hydra = "HYDRA build details:\n    Version:                                 4.0.2\n    Release Date: x\n"
    assert doctor.mpirun_version(hydra) == "mpirun (MPICH Hydra) 4.0.2"
    assert (doctor.mpirun_version("Intel(R) MPI Library for Linux* OS, Version 2021.9 Build 2023\n") or "").startswith(
        "Intel(R) MPI Library")
    assert doctor.mpirun_version("") is None
    assert doctor.short_mpi("mpirun (Open MPI) 4.1.4") == "Open MPI 4.1.4"
    assert doctor.library_version("Open MPI v4.1.4, package: Debian OpenMPI, ident: 4.1.4\n") == "Open MPI v4.1.4"
    assert doctor.library_version("MPICH Version:\t4.0.2\nMPICH Release date: x\n") == "MPICH Version: 4.0.2"


def test_ranks_per_node_as_launch_picks_them() -> None:
    node = NodeFabric((), "openmpi", False, GIB, 16, "eth0")
    assert doctor.ranks_per_node(node, 4, None, None, False) == 16
    assert doctor.ranks_per_node(node, 4, None, 4, False) == 4
    assert doctor.ranks_per_node(node, 4, 7, None, False) == 7
    assert doctor.ranks_per_node(node, 4, None, None, True) == 4  # 4 emulated nodes share the 16 cores


def test_every_node_probes_every_other_one() -> None:
    nodes = healthy()
    nodes[2].facts = None  # no agent there: only its task port can be tried
    targets = doctor.targets_for(nodes[0], nodes, 2222)
    assert [(t["host"], t["kind"], t["port"]) for t in targets] == [
        ("10.0.0.5", "mpi", 40000), ("10.0.0.5", "task", 2222), ("10.0.0.6", "task", 2222)]


def test_the_agent_answers_time_and_reach_requests() -> None:
    with socket.socket() as open_port, socket.socket() as closed:
        open_port.bind(("127.0.0.1", 0))
        open_port.listen()
        closed.bind(("127.0.0.1", 0))  # bound, not listening: refused
        targets = [{"host": "a", "address": "127.0.0.1", "port": s.getsockname()[1], "kind": "mpi"}
                   for s in (open_port, closed)]
        requests = io.StringIO("".join(json.dumps(r) + "\n" for r in ({"op": "time"}, {"op": "reach",
                                                                                      "targets": targets})))
        out = io.StringIO()
        assert doctor.agent("127.0.0.1", {"PATH": "/usr/bin:/bin"}, requests, out) == 0
    facts, clock, reach = (json.loads(line) for line in out.getvalue().splitlines())
    assert facts["address"] == "127.0.0.1" and facts["probe_port"] > 0 and facts["python"] == \
        ".".join(map(str, sys.version_info[:3]))
    assert facts["disk"]["free"] > 0 and NodeFabric.from_dict(facts["fabric"]).shm_bytes >= 0
    assert isinstance(clock["time"], float)
    assert [r["ok"] for r in reach["reach"]] == [True, False] and reach["reach"][1]["error"] == "connection refused"


def test_an_agent_child_measured_and_probed_by_the_primary_side() -> None:
    session = AgentSession("127.0.0.1", doctor.agent_argv("127.0.0.1"), {"PATH": "/usr/bin:/bin"})
    try:
        facts = session.read()
        clock = measure_clock(session)
        assert abs(clock["offset"]) <= clock["uncertainty"] + 0.01  # one machine, one clock
        answer = session.ask({"op": "reach", "targets": [{"host": "me", "address": "127.0.0.1",
                                                           "port": facts["probe_port"], "kind": "mpi"}]})
        assert answer["reach"][0]["ok"]
        with pytest.raises(doctor.AgentFailed, match="unknown request 'nonsense'"):
            session.ask({"op": "nonsense"})
    finally:
        session.close()
    assert session.process.returncode == 0


def test_an_agent_that_cannot_start_says_why() -> None:
    session = AgentSession("x", [sys.executable, "-c", "import sys; sys.exit('no runtime here')"], {})
    with pytest.raises(doctor.AgentFailed, match="no runtime here"):
        session.read()
    session.close()


def test_the_client_table_gives_every_problem_its_fix() -> None:
    from rich.console import Console

    nodes = healthy()
    for node in nodes:
        assert node.facts is not None
        node.facts["fabric"] = {**FABRIC, "shm_bytes": 64 * 2**20}
    nodes[1].clock = {"offset": 5.0, "uncertainty": 0.001}
    report = {**evaluate(nodes, LIMITS), "job_id": "mpilaunch", "task_id": "doctor-1"}
    console = Console(width=200, record=True)
    for table in render_tables(report):
        console.print(table)
    text = console.export_text()
    assert "doctor mpilaunch/doctor-1: 4 problem(s)" in text and "problems and their fixes" in text
    assert text.count("/dev/shm is 64 MiB, 4 ranks need 256 MiB") == 1  # one row for the three nodes
    assert "give the nodes a larger /dev/shm" in text and "synchronise the nodes' clocks" in text
    assert len(render_tables(evaluate(healthy(), LIMITS))) == 1  # no problems: no second table


def test_the_client_passes_its_options_to_the_node() -> None:
    assert node_argv({"ppn": 8, "threads_per_rank": None, "max_clock_skew": 0.5, "service_timeout": None,
                      "min_free_disk": "2G"}) == [
        "node-runtime", "doctor", "--ppn", "8", "--max-clock-skew", "0.5", "--min-free-disk", str(2 * GIB)]


def test_the_primary_side_with_agent_children_and_one_that_never_answers() -> None:
    """Doctor.converse on three addresses of this machine: two real agents, one that hangs (killed at the deadline);
    the task port is a listener on every address."""
    hosts = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]  # none on an interface (127.0.0.1 is on lo): alike
    run = doctor.Doctor(hosts, hosts[0], timeout=1.0)
    with socket.socket() as task_port:
        task_port.bind(("0.0.0.0", 0))  # every loopback address of the test
        task_port.listen()
        port = task_port.getsockname()[1]
        for host in hosts[:2]:
            run.sessions[host] = AgentSession(host, doctor.agent_argv(host), {"PATH": "/usr/bin:/bin"})
        run.sessions[hosts[2]] = AgentSession(hosts[2], [sys.executable, "-c", "import time; time.sleep(60)"], {})
        started = time.monotonic()
        run.converse(port)
        assert time.monotonic() - started < run.deadline_s + 5
        report = run.report(Limits(ppn=1, ssh_port=port))
    assert all(s.process.returncode is not None for s in run.sessions.values())
    assert failing(report) == {"127.0.0.4": ["service"]}
    assert checks(report, "127.0.0.4")["service"]["problem"] == \
        f"the doctor could not run there: no answer within {run.deadline_s:g} s"
    first, second = (checks(report, h) for h in hosts[:2])
    assert first["reach"]["summary"] == "3/3" and second["reach"]["summary"] == "3/3"  # no listener on .4: 3 targets
    assert second["clock"]["status"] == OK and first["clock"]["summary"] == "reference"


def test_the_client_command_refuses_bad_options_before_any_network_call(capsys: pytest.CaptureFixture[str]) -> None:
    import subprocess

    from mpilaunch.cli import cli
    from mpilaunch.cli.clickutil import run_cli

    code = run_cli(cli, "mpilaunch", ["doctor", "--endpoint", "http://127.0.0.1:9", "--min-free-disk", "lots"])
    assert code == 2 and "invalid size 'lots'" in capsys.readouterr().err
    code = run_cli(cli, "mpilaunch", ["doctor", "--endpoint", "http://127.0.0.1:9", "-n", "0"])
    assert code == 2 and "-n" in capsys.readouterr().err
    probe = ("import sys\nfrom mpilaunch.cli import cli\nfrom mpilaunch.cli.clickutil import run_cli\n"
             "run_cli(cli, 'mpilaunch', ['doctor', '--help'])\n"
             "print('AZURE:' + ','.join(m for m in sys.modules if m.startswith('azure')))\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert "problem comes with its fix" in done.stdout and done.stdout.strip().endswith("AZURE:")
