"""mpirun command lines: golden files per flavor, properties, validation, and one real local Open MPI run.

Rewrite the golden files with ``UPDATE_GOLDEN=1 pytest tests/unit/test_mpirun.py`` and review the diff.
"""

from __future__ import annotations

import base64
import ipaddress
import itertools
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node_runtime.contract import SECRET_VARIABLE
from node_runtime.env import NodeEnvironment
from node_runtime.errors import InvalidInput
from node_runtime.fabric import FabricChoice, detect_flavor
from node_runtime.mpirun import (
    RANKMAIN,
    LaunchSpec,
    MpiFlavor,
    aborts_on_exception,
    build_mpirun_argv,
    hostfile_text,
    is_python,
    python_rank_command,
    ranks_environment,
    spec_for_node,
    ssh_wrapper_script,
    tap_command,
)

GOLDEN = Path(__file__).parents[1] / "golden" / "mpirun"
SECRET = base64.urlsafe_b64encode(b"k" * 32).decode().rstrip("=")
TASK = "/mnt/batch/tasks/workitems/job1/job-1/task1"
ENVIRON = {
    "AZ_BATCH_HOST_LIST": "10.0.0.5,10.0.0.4,10.0.0.6", "AZ_BATCH_MASTER_NODE": "10.0.0.4:6000",
    "AZ_BATCH_IS_CURRENT_NODE_MASTER": "true", "AZ_BATCH_TASK_ID": "task1", "AZ_BATCH_JOB_ID": "job1",
    "AZ_BATCH_NODE_ID": "tvm-1", "AZ_BATCH_TASK_DIR": TASK, "AZ_BATCH_TASK_SHARED_DIR": TASK,
    "AZ_BATCH_TASK_WORKING_DIR": f"{TASK}/wd", "AZ_BATCH_NODE_ROOT_DIR": "/mnt/batch/tasks",
    "MPILAUNCH_TASK_SECRET": SECRET, "MPILAUNCH_SSH_PORT": "2222", "MPILAUNCH_EXPORT_ENV": "OMP_NUM_THREADS,DATA",
    "MPILAUNCH_CHECKPOINT_URL": "https://acct.blob.core.windows.net/ckpt", "OMP_NUM_THREADS": "2", "DATA": "/data",
    "PATH": "/opt/venv/bin:/usr/bin:/bin", "VIRTUAL_ENV": "/opt/venv", "HOME": "/root", "UNRELATED": "x",
}
SSH_CONFIG = Path(f"{TASK}/.mpilaunch/ssh_config")
WRAPPER = Path(f"{TASK}/.mpilaunch/ssh")
GATE = Path(f"{TASK}/.mpilaunch/gate.lock")
COMMAND = ("/opt/venv/bin/python", "app.py", "--steps", "10")
TAP = ("/opt/venv/bin/python", "-I", "-S", "/opt/venv/lib/python3.12/site-packages/node_runtime/ranktap.py")


def node() -> NodeEnvironment:
    return NodeEnvironment.from_environ(ENVIRON, local_addresses=["10.0.0.4"])


GOLDEN_SPECS = {
    "openmpi": dict(flavor=MpiFlavor.OPENMPI, ppn=2, as_root=True, gate=GATE),
    "openmpi-hostfile": dict(flavor=MpiFlavor.OPENMPI, ppn=1, as_root=False, hostfile=Path(f"{TASK}/wd/hostfile"),
                             extra_args=("--report-bindings",)),
    "mpich": dict(flavor=MpiFlavor.MPICH, ppn=4, as_root=True, ssh_wrapper=WRAPPER, interface="eth0"),
    "mpich-hostfile": dict(flavor=MpiFlavor.MPICH, ppn=1, as_root=False, ssh_wrapper=WRAPPER,
                           hostfile=Path(f"{TASK}/wd/hostfile")),
    "intelmpi": dict(flavor=MpiFlavor.INTELMPI, ppn=2, as_root=True, ssh_wrapper=WRAPPER, interface="eth0"),
}
# flavor x fabric: UCX over InfiniBand, UCX over TCP (no InfiniBand), TCP (Open MPI: one-sided through osc ucx)
IB = FabricChoice("ucx", "test", ("mlx5_ib0:1",), "eth0", ucx=True)
UCX_TCP = FabricChoice("ucx", "test", (), "eth0", ucx=True)
TCP_UCX = FabricChoice("tcp", "test", (), "eth0", ucx=True)
TCP_OFI = FabricChoice("tcp", "test", (), "eth0", ucx=False)
for _flavor, _wrapper in ((MpiFlavor.OPENMPI, None), (MpiFlavor.MPICH, WRAPPER), (MpiFlavor.INTELMPI, WRAPPER)):
    for _name, _choice in (("ucx-ib", IB), ("ucx-tcp", UCX_TCP), ("tcp", TCP_UCX), ("tcp-ofi", TCP_OFI)):
        if _flavor is MpiFlavor.INTELMPI and _name == "tcp-ofi":
            continue  # Intel MPI is OFI either way: its tcp is the same
        GOLDEN_SPECS[f"{_flavor.value}-{_name}"] = dict(
            flavor=_flavor, ppn=4, as_root=True, gate=GATE, ssh_wrapper=_wrapper, fabric=_choice,
            interface=None if _wrapper is None else "eth0", threads=2 if _name == "ucx-ib" else None, bind=True)


@pytest.mark.parametrize("name", sorted(GOLDEN_SPECS))
def test_golden_command_lines(name: str) -> None:
    """As launch builds them: every rank behind the tap (node_runtime.ranktap), the program after it."""
    spec = spec_for_node(node(), ENVIRON, command=COMMAND, ssh_config=SSH_CONFIG, tap=TAP,
                         **GOLDEN_SPECS[name])  # type: ignore[arg-type]
    text = "\n".join(build_mpirun_argv(spec)) + "\n"
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{name}: argv changed; if intended, rerun with UPDATE_GOLDEN=1 and review"
    assert SECRET not in text and SECRET_VARIABLE not in text


def test_golden_files_cover_every_flavor() -> None:
    names = {p.stem for p in GOLDEN.glob("*.txt")}
    assert names == set(GOLDEN_SPECS), "stale or missing golden files"
    assert {spec["flavor"] for spec in GOLDEN_SPECS.values()} == set(MpiFlavor)


def test_open_mpi_command_line_essentials() -> None:
    spec = spec_for_node(node(), ENVIRON, flavor=MpiFlavor.OPENMPI, ppn=2, command=COMMAND,
                         ssh_config=SSH_CONFIG, as_root=True)
    argv = build_mpirun_argv(spec)
    pairs = list(itertools.pairwise(argv))
    assert ("--host", "10.0.0.4:2,10.0.0.5:2,10.0.0.6:2") in pairs, "primary first, ppn slots each"
    assert ("-np", "6") in pairs and "--allow-run-as-root" in argv
    mca = {argv[i + 1]: argv[i + 2] for i, a in enumerate(argv) if a == "--mca"}
    assert mca == {"pml": "ob1", "btl": "self,vader,tcp", "btl_tcp_if_include": "10.0.0.4/30",
                   "oob_tcp_if_include": "10.0.0.4/30", "plm_rsh_agent": "ssh", "plm_rsh_args": f"-F {SSH_CONFIG}"}
    assert ("--map-by", "ppr:2:node") in pairs and ("--bind-to", "none") in pairs
    gated = build_mpirun_argv(replace(spec, gate=GATE))
    assert ("plm_rsh_agent", f"flock -s -o {GATE} ssh") in itertools.pairwise(gated)
    exported = [argv[i + 1] for i, a in enumerate(argv) if a == "-x"]
    # AZ_BATCH_* are each node's own (never the primary's)
    assert exported == ["PATH", "VIRTUAL_ENV", "MPILAUNCH_CHECKPOINT_URL", "MPILAUNCH_EXPORT_ENV",
                        "MPILAUNCH_SSH_PORT", "OMP_NUM_THREADS", "DATA"]
    threaded = build_mpirun_argv(replace(spec, threads=4))  # --threads-per-rank replaces the exported value
    assert next(threaded[i + 1] for i, a in enumerate(threaded) if a == "-x") == "OMP_NUM_THREADS=4"
    assert threaded.count("OMP_NUM_THREADS") == 0
    assert ("--wdir", f"{TASK}/wd") in pairs and tuple(argv[-4:]) == COMMAND


def test_hydra_flavors_pass_only_the_listed_environment() -> None:
    for flavor, launcher in ((MpiFlavor.MPICH, "-launcher-exec"), (MpiFlavor.INTELMPI, "-bootstrap-exec")):
        spec = spec_for_node(node(), ENVIRON, flavor=flavor, ppn=3, command=COMMAND, ssh_config=SSH_CONFIG,
                             as_root=False, ssh_wrapper=WRAPPER)
        argv = build_mpirun_argv(spec)
        pairs = list(itertools.pairwise(argv))
        assert ("-n", "9") in pairs and ("-ppn", "3") in pairs and ("-hosts", "10.0.0.4,10.0.0.5,10.0.0.6") in pairs
        assert (launcher, str(WRAPPER)) in pairs
        assert "-genvnone" not in argv  # beside -genvlist, Hydra refuses it: "duplicate environment setting"
        names = argv[argv.index("-genvlist") + 1].split(",")
        assert names == list(ranks_environment(ENVIRON, ["OMP_NUM_THREADS", "DATA"]))
        assert "-iface" not in argv and "--allow-run-as-root" not in argv


def test_ranks_environment_filters() -> None:
    env = ranks_environment(dict(ENVIRON, MPILAUNCH_NODE_ADDRESS="10.0.0.4"), ["DATA", "MISSING"])
    assert env == {"PATH": ENVIRON["PATH"], "VIRTUAL_ENV": "/opt/venv", "DATA": "/data",
                   "MPILAUNCH_CHECKPOINT_URL": ENVIRON["MPILAUNCH_CHECKPOINT_URL"],
                   "MPILAUNCH_EXPORT_ENV": "OMP_NUM_THREADS,DATA", "MPILAUNCH_SSH_PORT": "2222"}
    with pytest.raises(InvalidInput, match=SECRET_VARIABLE):
        ranks_environment(ENVIRON, ["DATA", SECRET_VARIABLE])


def _spec(**changes: object) -> LaunchSpec:
    fields: dict[str, object] = dict(flavor=MpiFlavor.OPENMPI, hosts=("10.0.0.4", "10.0.0.5"), ppn=1,
                                     command=COMMAND, ssh_config=SSH_CONFIG, working_dir=Path(f"{TASK}/wd"))
    fields.update(changes)
    return LaunchSpec(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(("changes", "fragment"), [
    ({"ppn": 0}, "ppn=0"), ({"ppn": -2}, "ppn=-2"), ({"ppn": True}, "ppn=True"), ({"ppn": 1.5}, "ppn=1.5"),
    ({"hosts": ()}, "at least one host"), ({"hosts": ("10.0.0.4", "node7")}, "'node7'"),
    ({"hosts": ("10.0.0.4", "10.0.0.4")}, "'10.0.0.4' is listed more than once"),
    ({"hosts": ("10.0.0.4", "")}, "''"), ({"hosts": ("FD00::1",)}, "'FD00::1' is not in canonical form"),
    ({"command": ()}, "a program to run"), ({"command": ("-x", "y")}, "'-x'"),
    ({"ssh_config": Path("ssh_config")}, "ssh_config='ssh_config'"),
    ({"ssh_config": Path("/my dir/ssh_config")}, "'/my dir/ssh_config': must not contain blanks"),
    ({"gate": Path("/my dir/gate.lock")}, "gate='/my dir/gate.lock': must not contain blanks"),
    ({"gate": Path("gate.lock")}, "gate='gate.lock': must be an absolute path"),
    ({"working_dir": Path("wd")}, "working_dir='wd'"),
    ({"environment_names": ("PATH", SECRET_VARIABLE)}, f"{SECRET_VARIABLE} can never be exported"),
    ({"environment_names": ("A,B",)}, "'A,B' is not a variable name"),
    ({"flavor": MpiFlavor.MPICH}, "ssh_wrapper: mpich"),
    ({"flavor": MpiFlavor.INTELMPI, "ssh_wrapper": Path("wrap")}, "ssh_wrapper='wrap'"),
    ({"hosts": ("fd00::1", "fd00::2")}, "IPv6"),
])
def test_invalid_specs_name_the_value(changes: dict[str, object], fragment: str) -> None:
    with pytest.raises(InvalidInput) as err:
        _spec(**changes)
    assert fragment in str(err.value)
    assert err.value.exit_code == 2


def test_several_problems_are_reported_together() -> None:
    with pytest.raises(InvalidInput) as err:
        _spec(ppn=0, hosts=("x",), working_dir=Path("wd"))
    assert len(err.value.details) == 3


ipv4_hosts = st.lists(st.integers(1, 2**32 - 2).map(lambda i: str(ipaddress.IPv4Address(i))),
                      min_size=1, max_size=8, unique=True)
names = st.from_regex(r"[A-Z_][A-Z0-9_]{0,10}", fullmatch=True)


@settings(max_examples=200)
@given(hosts=ipv4_hosts, ppn=st.integers(1, 64), flavor=st.sampled_from(list(MpiFlavor)),
       extra=st.dictionaries(names, st.text(min_size=1, max_size=20), max_size=6),
       export=st.lists(names, max_size=4), secret=st.binary(min_size=32, max_size=48), hostfile=st.booleans())
def test_argv_properties(hosts: list[str], ppn: int, flavor: MpiFlavor, extra: dict[str, str], export: list[str],
                         secret: bytes, hostfile: bool) -> None:
    secret_text = base64.urlsafe_b64encode(secret).decode()
    environ = {**extra, "PATH": "/usr/bin", SECRET_VARIABLE: secret_text, "MPILAUNCH_SSH_PORT": "2222"}
    export = [n for n in export if n != SECRET_VARIABLE]
    ranks = ranks_environment(environ, export)
    assert SECRET_VARIABLE not in ranks and secret_text not in ranks.values()
    spec = LaunchSpec(flavor=flavor, hosts=tuple(hosts), ppn=ppn, command=("/bin/true",), ssh_config=SSH_CONFIG,
                      working_dir=Path("/wd"), environment_names=tuple(ranks), ssh_wrapper=WRAPPER,
                      hostfile=Path("/wd/hostfile") if hostfile else None)
    argv = build_mpirun_argv(spec)
    joined = "\n".join(argv)
    assert secret_text not in joined and SECRET_VARIABLE not in joined
    np_flag = "-np" if flavor is MpiFlavor.OPENMPI else "-n"
    assert int(argv[argv.index(np_flag) + 1]) == len(hosts) * ppn == spec.np
    listed = hostfile_text(flavor, hosts, ppn) if hostfile else joined
    for host in hosts:
        assert host in listed
    if hostfile:
        assert listed.splitlines()[0].startswith(hosts[0] + (" " if flavor is MpiFlavor.OPENMPI else ":"))
    assert argv[-1] == "/bin/true" and argv[0] == "mpirun"


@pytest.mark.parametrize(("text", "flavor"), [
    ("mpirun (Open MPI) 4.1.4\n\nReport bugs to http://www.open-mpi.org/community/help/\n", MpiFlavor.OPENMPI),
    ("mpirun (Open MPI) 5.0.3\n\nReport bugs to https://www.open-mpi.org/community/help/\n", MpiFlavor.OPENMPI),
    ("HYDRA build details:\n    Version:                                 4.0.2\n"
     "    Release Date:                            Thu Apr  7 12:34:45 CDT 2022\n", MpiFlavor.MPICH),
    ("Intel(R) MPI Library for Linux* OS, Version 2021.10 Build 20230619 (id: c2e19c2f3e)\n"
     "Copyright 2003-2023, Intel Corporation.\n", MpiFlavor.INTELMPI),
])
def test_detect_flavor(text: str, flavor: MpiFlavor) -> None:
    assert detect_flavor(text) is flavor


def test_detect_flavor_unknown_names_the_output() -> None:
    with pytest.raises(InvalidInput, match=r"output 'Sun HPC ClusterTools 8'; .*--mpi"):
        detect_flavor("\n  Sun HPC ClusterTools 8\nmore\n")


def test_ssh_wrapper_passes_every_argument(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_ssh = bin_dir / "ssh"
    fake_ssh.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    fake_ssh.chmod(fake_ssh.stat().st_mode | stat.S_IEXEC)
    config = tmp_path / "odd dir" / "ssh config"
    wrapper = tmp_path / "wrapper"
    wrapper.write_text(ssh_wrapper_script(config))
    wrapper.chmod(0o700)
    done = subprocess.run([str(wrapper), "-x", "10.0.0.5", "proxy --arg 'two words'"], capture_output=True,
                          text=True, env={"PATH": f"{bin_dir}:/usr/bin:/bin"}, timeout=10, check=True)
    assert done.stdout.splitlines() == ["-F", str(config), "-x", "10.0.0.5", "proxy --arg 'two words'"]
    gate = tmp_path / "odd dir" / "gate lock"
    wrapper.write_text(ssh_wrapper_script(config, gate))
    gate.parent.mkdir()
    done = subprocess.run([str(wrapper), "10.0.0.5", "cmd"], capture_output=True, text=True,
                          env={"PATH": f"{bin_dir}:/usr/bin:/bin"}, timeout=10, check=True)
    assert done.stdout.splitlines() == ["-F", str(config), "10.0.0.5", "cmd"]  # through flock, once it got the lock
    assert gate.exists()


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="Open MPI is not installed")
def test_open_mpi_accepts_the_command_line_locally(tmp_path: Path) -> None:
    """A real one-host run: the options are accepted, the working directory and exports arrive, the secret does not."""
    environ = {**os.environ, SECRET_VARIABLE: SECRET, "MPILAUNCH_PROBE": "probe-1", "DATA": "d"}
    ranks = ranks_environment(environ, ["DATA"])
    program = ("import os; print(os.getcwd(), os.environ.get('MPILAUNCH_PROBE'), os.environ.get('DATA'), "
               f"os.environ.get('{SECRET_VARIABLE}'))")
    spec = LaunchSpec(flavor=MpiFlavor.OPENMPI, hosts=("127.0.0.1",), ppn=2, command=(sys.executable, "-c", program),
                      ssh_config=tmp_path / "ssh_config", working_dir=tmp_path, environment_names=tuple(ranks),
                      as_root=os.geteuid() == 0)
    assert detect_flavor(subprocess.run(["mpirun", "--version"], capture_output=True, text=True, timeout=30,
                                        check=True).stdout) is MpiFlavor.OPENMPI
    done = subprocess.run(build_mpirun_argv(spec), env=ranks, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"{tmp_path} probe-1 d None"] * 2


def test_ipv6_hosts_go_through_a_hostfile() -> None:
    hosts = ("fd00::4", "fd00::5")
    for flavor in MpiFlavor:
        spec = LaunchSpec(flavor=flavor, hosts=hosts, ppn=2, command=COMMAND, ssh_config=SSH_CONFIG,
                          working_dir=Path("/wd"), hostfile=Path("/wd/hosts"), ssh_wrapper=WRAPPER)
        argv = build_mpirun_argv(spec)
        assert "/wd/hosts" in argv and "--host" not in argv and "-hosts" not in argv
        if flavor is MpiFlavor.OPENMPI:
            assert argv[argv.index("btl_tcp_if_include") + 1] == "fd00::4/127"
    assert hostfile_text(MpiFlavor.OPENMPI, hosts, 2) == "fd00::4 slots=2\nfd00::5 slots=2\n"
    assert hostfile_text(MpiFlavor.MPICH, hosts, 3) == "fd00::4:3\nfd00::5:3\n"


def test_the_runtime_venv_comes_first_on_the_ranks_path() -> None:
    from node_runtime.mpirun import with_runtime_environment

    environ = {"PATH": "/usr/bin:/opt/mpilaunch/current/bin:/bin", "HOME": "/h"}
    out = with_runtime_environment(environ, "/opt/mpilaunch/current", "/usr")
    assert out["PATH"] == "/opt/mpilaunch/current/bin:/usr/bin:/bin" and out["VIRTUAL_ENV"] == "/opt/mpilaunch/current"
    assert out["HOME"] == "/h" and environ["PATH"].startswith("/usr/bin")  # a copy
    assert with_runtime_environment(environ, "/usr", "/usr") == environ  # no venv: unchanged
    assert with_runtime_environment({}, "/v", "/usr")["PATH"] == "/v/bin"


@pytest.mark.parametrize(("argv", "expected"), [
    (["python3", "app.py", "-x"], ["python3", "-m", RANKMAIN, "app.py", "-x"]),
    (["/opt/venv/bin/python3.12", "app.py"], ["/opt/venv/bin/python3.12", "-m", RANKMAIN, "app.py"]),
    (["python", "-u", "-X", "dev", "app.py", "--steps", "3"],
     ["python", "-u", "-X", "dev", "-m", RANKMAIN, "app.py", "--steps", "3"]),
    (["python", "-uB", "-Wignore", "-c", "print(1)", "a"],
     ["python", "-u", "-B", "-W", "ignore", "-m", RANKMAIN, "-c", "print(1)", "a"]),
    (["python3", "-um", "pkg.main", "--flag"], ["python3", "-u", "-m", RANKMAIN, "-m", "pkg.main", "--flag"]),
    (["python3", "-Xdev", "-mpkg"], ["python3", "-X", "dev", "-m", RANKMAIN, "-m", "pkg"]),
    (["python3", "-I", "-O", "app.py"], ["python3", "-I", "-O", "-m", RANKMAIN, "app.py"]),
    (["python3", "--", "app.py"], ["python3", "-m", RANKMAIN, "app.py"]),
    (["python3", "--check-hash-based-pycs", "always", "a.py"],
     ["python3", "--check-hash-based-pycs", "always", "-m", RANKMAIN, "a.py"]),
    # left as they are
    (["python3", "-m", "mpi4py", "app.py"], None),  # aborts already
    (["python3", "-m", RANKMAIN, "app.py"], None),
    (["python3", "-S", "app.py"], None),  # no site: node_runtime could not be imported
    (["python3"], None), (["python3", "-"], None), (["python3", "-i"], None),  # nothing to run / stdin
    (["python3", "--version"], None), (["python3", "-V"], None), (["python3", "-h"], None),
    (["python3", "-c"], None), (["python3", "-Z", "a.py"], None),  # incomplete, unknown
    (["bash", "run.sh"], None), (["./app"], None), (["pythonw", "a.py"], None), (["ipython", "a.py"], None),
    ([], None),
])
def test_python_programs_run_through_rankmain(argv: list[str], expected: list[str] | None) -> None:
    assert python_rank_command(argv) == expected
    assert is_python(argv[0]) if expected else True


def test_the_tap_comes_between_mpirun_and_the_program() -> None:
    for flavor, wrapper in ((MpiFlavor.OPENMPI, None), (MpiFlavor.MPICH, WRAPPER), (MpiFlavor.INTELMPI, WRAPPER)):
        spec = spec_for_node(node(), ENVIRON, flavor=flavor, ppn=2, command=COMMAND, ssh_config=SSH_CONFIG,
                             as_root=True, ssh_wrapper=wrapper, tap=TAP)
        argv = build_mpirun_argv(spec)
        assert tuple(argv[-len(TAP) - len(COMMAND):]) == TAP + COMMAND
        assert "--tag-output" not in argv and "-prepend-rank" not in argv  # the tap tags, losslessly
    assert tap_command("/v/bin/python3", Path("/v/lib/node_runtime/ranktap.py")) == (
        "/v/bin/python3", "-I", "-S", "/v/lib/node_runtime/ranktap.py")


def test_which_python_command_lines_end_the_job_on_an_exception() -> None:
    assert aborts_on_exception(["python3", "-m", RANKMAIN, "app.py"]) is True
    assert aborts_on_exception(["python3", "-u", "-m", "mpi4py", "app.py"]) is True
    assert aborts_on_exception(["python3", "app.py"]) is False
    assert aborts_on_exception(["python3", "-m", "pkg"]) is False
    assert aborts_on_exception(["bash", "run.sh"]) is None
